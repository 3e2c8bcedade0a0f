"""Per-worker counters (model loads, traces, batches, rows, failures, peak memory) gathered on the driver.

Workers are keyed by ``host:pid`` (pids repeat across the nodes of a cluster). One path on every
session kind (classic, Spark Connect, a stream's micro-batches), through public API only: the
statistics ride in flat ``_stats_*`` fields of the UDF's struct (``predict_batch_udf`` takes no
nested struct) and an ``Observation`` (a streaming DataFrame: ``observe`` by name, read from each
micro-batch's progress) aggregates them while the action runs, into one string metric whose size,
and whose state inside the JVM, is bounded by the number of workers, not images:

- every row carries its worker's code (``worker_code``, a number): histograms over the codes count
  rows, failed rows, batches (their first rows) and rows with silenced decoder warnings per worker,
  exactly for up to ``HISTOGRAM_BINS`` workers in one action;
- each batch's first row carries what changes rarely: ``host:pid``, model loads and traces so far
  in the running action (Spark's SQL execution id, a task-local property), the peaks as reported
  (raised when the peak grows by 1/16 or more, so a worker has a handful of distinct reports) and
  the GPU facts; a set keeps the distinct reports;
- the exact largest batch and memory peak, and the worker that had each, are plain maxima.

Spark evaluates observed metrics again at every task's end (for the UI), and Spark Connect 4.0 from
two threads at once: the metric uses only built-ins that hold no state between evaluations (no
lambda, no JSON) and whose work is bounded by the workers. An ``Observation`` describes one
action: the first on a classic session, the latest under Spark Connect (each action replaces the
values). Rows count when they reached the observed plan node: a partial read (``show``, ``first``,
``limit(n).collect()``) counts the rows Spark read. Model loads and traces are counted per process
(``count``), so a model cached in a worker from an earlier run shows 0 loads and 0 traces.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Counts = dict[str, dict[str, Any]]

_PROCESS: dict[str, int] = {"model_loads": 0, "traces": 0, "conversions": 0}  # this worker process, all runs
_WORKER_EXTRA: dict[str, Any] = {}  # per-process facts every report carries (e.g. the pinned GPU)

STATS_PREFIX = "_stats_"  # the UDF struct's statistics fields: _stats_code, _stats_worker, ...
EVENTS = ("model_loads", "traces", "conversions")  # so far in the action (conversions: LiteRT's)
PEAKS = ("peak_batch_bytes", "peak_rss_mb")  # as reported: raised by 1/16 or more
EXACT = ("batch_bytes", "rss_mb")  # this batch's Arrow bytes, the process's peak memory now
# Text (lists joined with ","). CUDA_VISIBLE_DEVICES is free text that may hold ", ", Spark's separator in
# a struct's text: it stays last, where parse_workers' bounded split keeps it whole.
FACTS = ("gpu", "gpu_assigned", "engine", "interpreter", "cuda_visible_devices")
REPORT = ("worker", *EVENTS, *PEAKS, *FACTS)  # the rarely changing report, in the metric's order
ROW_FIELDS = ("code", "warnings")  # on every row (warnings: the decoder warnings silenced for the row)
STATS_FIELDS: tuple[str, ...] = (*ROW_FIELDS, *REPORT, *EXACT)  # the row fields on every row, the others on the first
METRIC = "workers"  # the observation's one metric
NULL_TEXT = "\x00"  # a null fact inside the metric text
HISTOGRAM_BINS = 1024  # exact per-worker counts up to this many workers in one action
PEAK_STEP = 16  # a reported peak is raised when the peak grows by 1/PEAK_STEP or more
PEAK_RAISES = 16  # ... at most this many times per action, then only when it doubles
WAIT_SECONDS = 10.0  # how long ``by_worker`` waits on a classic session for the first action's metrics
_ACTIONS_KEPT = 4  # actions a reporter keeps counters for (concurrent actions on one DataFrame)


def worker_id() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def count(**events: int) -> None:
    """Count process-wide events (``model_loads``, ``traces``) in this worker."""
    for name, n in events.items():
        _PROCESS[name] = _PROCESS.get(name, 0) + n


def set_worker_fact(name: str, value: Any) -> None:
    """A fact about this worker process carried by every report (last value wins)."""
    _WORKER_EXTRA[name] = value


def progress_field(progress: Any, name: str) -> Any:
    """A field of a streaming query's progress: a dict (pyspark 3.5) or a ``StreamingQueryProgress`` (4.x)."""
    value = getattr(progress, name, None)
    if value is None and hasattr(progress, "__getitem__"):
        try:
            value = progress[name]
        except (KeyError, IndexError, ValueError):
            value = None
    return value


def merge(total: Counts, worker: str, counts: dict[str, Any]) -> Counts:
    """Add ``counts`` into ``total[worker]``: numbers add up, ``peak_*`` keep the maximum, others the latest."""
    mine = total.setdefault(worker, {})
    for name, n in counts.items():
        if name.startswith("peak_"):
            mine[name] = max(mine.get(name, 0), n)
        elif isinstance(n, (int, float)) and not isinstance(n, bool):
            mine[name] = mine.get(name, 0) + n
        else:
            mine[name] = n
    return total


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024)


# ---- the worker side -------------------------------------------------------------------------------


def worker_code(worker: str) -> float:
    """The number that stands for ``worker`` in the histograms: 52 bits of its hash, exact as a double."""
    return float(int.from_bytes(hashlib.blake2b(worker.encode(), digest_size=8).digest(), "big") >> 12)


def struct_fields() -> list[Any]:
    """The statistics fields of the UDF's return struct (``_stats_code``, ``_stats_worker``, ...)."""
    from pyspark.sql.types import DoubleType, LongType, StringType, StructField

    def kind(name: str) -> Any:
        if name == "code":
            return DoubleType()
        return StringType() if name == "worker" or name in FACTS else LongType()

    return [StructField(f"{STATS_PREFIX}{name}", kind(name)) for name in STATS_FIELDS]


def _action() -> str | None:
    """The running action: its SQL execution id (the root one when executions nest), None outside SQL."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    return ctx.getLocalProperty("spark.sql.execution.root.id") or ctx.getLocalProperty("spark.sql.execution.id")


def _text(value: Any) -> str | None:
    """A fact as the statistics carry it: a list joined with ``,``, None as None."""
    if value is None:
        return None
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def raised(reported: int, peak: int, raises: int) -> bool:
    """Whether a reported peak is raised to ``peak``: by 1/PEAK_STEP or more, by 2x after PEAK_RAISES raises."""
    if reported == 0:
        return peak > 0
    return peak >= 2 * reported if raises >= PEAK_RAISES else peak * PEAK_STEP >= reported * (PEAK_STEP + 1)


class BatchReporter:
    """Worker side: the report each batch's first row carries (see the module's docstring).

    One per Python worker and UDF (``predict_batch_udf`` caches the predict function, and the reporter
    with it). Create it before loading the model so the load belongs to the first report.
    """

    def __init__(self) -> None:
        self._seen = dict(_PROCESS)
        self.worker = worker_id()
        self.code = worker_code(self.worker)
        self._actions: OrderedDict[str | None, dict[str, int]] = OrderedDict()

    def report(self, *, batch_bytes: int) -> dict[str, Any]:
        """Record one batch of ``batch_bytes`` Arrow bytes; returns its first row's statistics fields."""
        action = _action()
        mine = self._actions.pop(action, None) or dict.fromkeys((*EVENTS, *PEAKS, *EXACT, "raises"), 0)
        self._actions[action] = mine  # the most recent last
        while len(self._actions) > _ACTIONS_KEPT:
            self._actions.popitem(last=False)
        for name, n in _PROCESS.items():  # loads and traces since the previous report go to this action
            mine[name] = mine.get(name, 0) + n - self._seen.get(name, 0)
        self._seen = dict(_PROCESS)
        now = {"batch_bytes": batch_bytes, "rss_mb": peak_rss_mb()}
        for peak, exact in zip(PEAKS, EXACT, strict=True):
            mine[exact] = max(mine[exact], now[exact])  # the peak so far in this action
            if raised(mine[peak], mine[exact], mine["raises"]):
                mine[peak] = mine[exact]
                mine["raises"] += 1
        facts = {name: _text(_WORKER_EXTRA.get(name)) for name in FACTS}
        return {"code": self.code, "worker": self.worker, **{n: mine[n] for n in (*EVENTS, *PEAKS)}, **facts, **now}


def stats_columns(n: int, report: dict[str, Any], warnings: Any = None) -> dict[str, Any]:
    """The ``_stats_*`` columns of a batch of ``n`` rows: the code and ``warnings`` (per row, default 0)
    on every row, the rest on the first."""
    import numpy as np

    columns: dict[str, Any] = {f"{STATS_PREFIX}code": np.full(n, report["code"], dtype=np.float64)}
    columns[f"{STATS_PREFIX}warnings"] = np.zeros(n, np.int64) if warnings is None else np.asarray(warnings, np.int64)
    for name in STATS_FIELDS[len(ROW_FIELDS) :]:
        column = np.full(n, None, dtype=object)
        if n:
            column[0] = report.get(name)
        columns[f"{STATS_PREFIX}{name}"] = column
    return columns


# ---- the driver side -------------------------------------------------------------------------------


def workers_metric(field: Callable[[str], Any], failed: Any) -> Any:
    """The observed metric: one string of ``name:value`` lines, each bounded by the number of workers.

    ``rows``, ``failed``, ``batches``, ``warned``: histograms of worker codes; ``peaks``: the largest batch and
    memory peak, each with the code of the worker that had it; ``reports``: the distinct reports.

    ``field(name)`` is the column of the statistics field ``name``; ``failed`` is true on a row the
    model did not score.
    """
    from pyspark.sql import functions as F

    code, first = field("code"), field("worker").isNotNull()

    def line(name: str, value: Any) -> Any:
        return F.concat(F.lit(f"{name}:"), F.coalesce(value.cast("string"), F.lit("")))

    def histogram(column: Any) -> Any:
        return F.histogram_numeric(column, F.lit(HISTOGRAM_BINS))

    peaks = [p for e in EXACT for p in (F.max(field(e)), F.max_by(code, field(e)))]  # value, whose
    parts = [field("worker").alias("worker"), *(field(n).alias(n) for n in (*EVENTS, *PEAKS))]
    parts += [F.coalesce(field(n), F.lit(NULL_TEXT)).alias(n) for n in FACTS]  # no nulls: one text format
    reports = F.collect_set(F.when(first, F.struct(code.alias("code"), *parts)))
    return F.concat_ws(
        "\n",
        line("rows", histogram(code)),
        line("failed", histogram(F.when(failed, code))),
        line("batches", histogram(F.when(first, code))),
        line("warned", histogram(F.when(field("warnings") > 0, code))),
        line("peaks", F.concat_ws(",", *(F.coalesce(p.cast("string"), F.lit("")) for p in peaks))),
        line("reports", F.array_join(reports.cast("array<string>"), "\t")),
    ).alias(METRIC)


_BIN = re.compile(r"[\[{]([^,\[\]{}]+), ([^,\[\]{}]+)[\]}]")  # one (x, y) of a histogram's text


def _nearest(codes: dict[float, str], x: float) -> str | None:
    """The worker whose code is nearest to ``x`` (a histogram moves a bin by a few units when it merges)."""
    return min(codes.items(), key=lambda item: abs(item[0] - x))[1] if codes else None


def parse_workers(text: str) -> Counts:
    """The metric's text as ``{host:pid: counts}``, in the summaries' order of counts.

    ``gpu`` and ``gpu_assigned`` are lists, ``gpu_assigned`` only where Spark assigned GPUs. Peaks are
    the reported ones, except the exact largest for the worker that had it. What does not parse is
    left out.
    """
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    workers: Counts = {}
    codes: dict[float, str] = {}
    for entry in (lines.get("reports") or "").split("\t"):
        values = entry[1:-1].split(", ", len(REPORT))  # Spark's text of a struct: {a, b, ...} or [a, b, ...]
        if len(values) != len(REPORT) + 1:
            continue
        try:
            code, report = float(values[0]), dict(zip(REPORT, values[1:], strict=True))
            numbers = {n: int(report[n]) for n in (*EVENTS, *PEAKS)}
        except ValueError:
            continue
        codes[code] = report["worker"]
        mine = workers.setdefault(report["worker"], {"model_loads": 0, "traces": 0, "batches": 0, "rows": 0})
        mine.setdefault("rows_failed", 0)
        mine.setdefault("rows_warned", 0)
        for name in (*EVENTS, *PEAKS):  # the latest report has the largest
            mine[name] = max(mine.get(name, 0), numbers[name])
        facts = {n: None if report[n] == NULL_TEXT else report[n] for n in FACTS}
        mine["gpu"] = facts["gpu"].split(",") if facts["gpu"] is not None else mine.get("gpu")
        mine["cuda_visible_devices"] = facts["cuda_visible_devices"]
        mine["engine"] = facts["engine"] or mine.get("engine")  # litert-xnnpack or tensorflow
        mine["interpreter"] = facts["interpreter"] or mine.get("interpreter")  # LiteRT's: ai_edge_litert 2.3.0
        if facts["gpu_assigned"] is not None:
            mine["gpu_assigned"] = sorted(set(mine.get("gpu_assigned", [])) | set(facts["gpu_assigned"].split(",")))
    for line, name in (("rows", "rows"), ("failed", "rows_failed"), ("batches", "batches"), ("warned", "rows_warned")):
        for x, y in _BIN.findall(lines.get(line) or ""):
            worker = _nearest(codes, float(x))
            if worker is not None:
                workers[worker][name] += int(float(y))
    peaks = (lines.get("peaks") or "").split(",")
    for i, name in enumerate(PEAKS):
        try:
            value, code = int(peaks[2 * i]), float(peaks[2 * i + 1])
        except (IndexError, ValueError):
            continue
        worker = _nearest(codes, code)
        if worker is not None:
            workers[worker][name] = max(workers[worker][name], value)
    order = (*EVENTS, "batches", "rows", "rows_failed", "peak_rss_mb", "peak_batch_bytes")
    return {w: {**{n: c.pop(n) for n in order}, **c} for w, c in workers.items()}


def _metric_text(value: Any) -> str:
    """The one string of a micro-batch's observed metrics, however the session hands it over.

    A ``Row`` of the metric (classic), ``Row(values=[...], schema=...)`` (Spark Connect), a dict, or a
    list of values.
    """
    while not isinstance(value, str):
        if value is None:
            return ""
        if "values" in (getattr(value, "__fields__", None) or ()):
            value = value["values"]
        elif isinstance(value, dict):
            value = value.get(METRIC, next(iter(value.values()), ""))
        elif isinstance(value, (list, tuple)):  # Row is a tuple
            if len(value) != 1:
                return "\n".join(_metric_text(v) for v in value)
            value = value[0]
        else:
            return str(value)
    return value


@dataclass
class WorkerStats:
    """Driver side: the observation on the scored DataFrame, and the per-worker counts after an action.

    ``attach`` puts the metric on the scored DataFrame: an ``Observation`` for a DataFrame, metrics
    named ``name`` for a streaming one (each micro-batch's progress carries them: ``add_progress``).
    ``by_worker`` is empty until an action has run.
    """

    name: str
    connect: bool = False
    observation: Any = None
    streaming: bool = False
    _batches: dict[int, str] = field(default_factory=dict)  # micro-batch id -> its metric text
    _metrics: dict[str, Any] | None = None  # the classic Observation's values, once its action ended
    _done: threading.Event | None = None

    @classmethod
    def create(cls, spark: Any, *, connect: bool | None = None) -> WorkerStats:
        """Statistics for one scored DataFrame of ``spark`` (attach them with ``attach``); ``connect`` is the
        session kind when the caller asked already."""
        from image_transfer.runtime import is_connect

        connect = is_connect(spark) if connect is None else connect
        return cls(name=f"image_transfer_{uuid.uuid4().hex[:12]}", connect=connect)

    def attach(self, scored: Any, field: Callable[[str], Any], failed: Any) -> Any:
        """``scored`` observed (see ``workers_metric`` for ``field`` and ``failed``)."""
        metric = workers_metric(field, failed)
        if scored.isStreaming:  # an Observation does not take a stream: named metrics, in each progress
            self.streaming = True
            return scored.observe(self.name, metric)
        from pyspark.sql import Observation

        self.observation = Observation(self.name)
        return scored.observe(self.observation, metric)

    def add_progress(self, progress: Any) -> None:
        """Take a streaming query's micro-batch progress (its observed metrics), once per batch id."""
        if not self.streaming:
            return
        batch = int(progress_field(progress, "batchId"))
        metrics = (progress_field(progress, "observedMetrics") or {}).get(self.name)
        if metrics is not None and batch not in self._batches:
            self._batches[batch] = _metric_text(metrics)

    def metrics(self, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        """The observed values as they reached the driver (``{}`` before an action).

        A classic session delivers them after the action, from Spark's listener thread: this waits up
        to ``timeout`` seconds for them (before any action, the whole ``timeout``).
        """
        if self.observation is None:
            return {}
        if self.connect:  # filled in by each action's response (the latest action's values)
            return dict(self.observation.get)
        if self._done is None:
            self._done = threading.Event()
            threading.Thread(target=self._wait, name=f"{self.name}-observation", daemon=True).start()
        self._done.wait(timeout)
        return dict(self._metrics or {})

    def _wait(self) -> None:
        assert self._done is not None
        try:
            self._metrics = self.observation.get  # blocks until the first action has ended
        except Exception:  # noqa: BLE001 - the session stopped before any action
            self._metrics = {}
        finally:
            self._done.set()

    def by_worker(self, timeout: float = WAIT_SECONDS) -> Counts:
        """Counters per ``host:pid`` worker (after the action; ``{}`` before)."""
        total: Counts = {}
        if self.streaming:  # each micro-batch is an action: add them up
            for text in self._batches.values():
                for worker, counts in parse_workers(text).items():
                    merge(total, worker, counts)
        else:
            total = parse_workers(str(self.metrics(timeout).get(METRIC) or ""))
        return dict(sorted(total.items()))


def failed_fraction(rows_failed: int, rows_out: int) -> float:
    """Share of the output rows that failed (0 for no rows), as the summaries report it."""
    return round(rows_failed / rows_out, 6) if rows_out else 0.0


def failed_lines(sample: list[str], rows_failed: int, *, where: str = "the output's error column") -> list[str]:
    """The summaries' ``  failed: ...`` lines for a sample of the failed rows, and how many more there are."""
    lines = [f"  failed: {e}" for e in sample]
    if rows_failed > len(sample):
        lines.append(f"  ... and {rows_failed - len(sample)} more (all in {where})")
    return lines


def worker_lines(workers: dict[str, dict[str, Any]]) -> list[str]:
    """The summaries' per-worker lines: loads, traces and rows per ``host:pid``, and pinned GPUs if any."""

    def column(name: str) -> list[Any]:
        return [w.get(name, 0) for w in workers.values()]

    lines = [
        f"workers: {len(workers)}; model loads per worker {column('model_loads')}; "
        f"traces per worker {column('traces')}; conversions per worker {column('conversions')}; "
        f"rows per worker {column('rows')}; engine per worker {column('engine')}"
    ]
    interpreters = sorted({str(w["interpreter"]) for w in workers.values() if w.get("interpreter")})
    if interpreters:  # which LiteRT interpreter the workers ran
        lines.append(f"LiteRT interpreter: {', '.join(interpreters)}")
    gpus = [w.get("gpu") for w in workers.values()]
    if any(gpus):  # pinned to the GPU Spark assigned (null: no GPU scheduling)
        lines.append(f"GPUs per worker {[','.join(g) if g else None for g in gpus]}")
    return lines
