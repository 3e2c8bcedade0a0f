"""Per-worker counters (model loads, traces, batches, rows, failures, peak memory) gathered on the driver.

Workers are keyed by ``host:pid`` (pids repeat across the nodes of a cluster). One path on every
session kind (classic, Spark Connect, a stream's micro-batches), through public API only:

- worker side (``BatchReporter``): the first row of each scoring batch carries this worker's counters
  so far in the running action (the action is Spark's SQL execution id, a task-local property), in
  the flat ``_stats_*`` fields of the UDF's struct (``STATS_FIELDS``; ``predict_batch_udf`` takes no
  nested struct); every other row has nulls there.
- driver side (``WorkerStats``): an ``Observation`` (a streaming DataFrame: ``observe`` by name, read
  from each micro-batch's progress) with one metric, ``workers_metric``, that keeps only the latest
  report of each worker, one line per worker, so what reaches the driver's Python, or a Connect
  client, is bounded by the number of workers, not images. The reduction runs inside the observed
  expression with built-ins that hold no state (sort, zip, set difference, cast, join; no lambda and
  no JSON): Spark Connect 4.0 evaluates observed metrics from two threads at once, and a lambda
  variable or a JSON writer shared by both gives corrupt results. Inside the driver's JVM the
  observation holds one small row per batch until the action ends.

An ``Observation`` describes one action: the first on a classic session, the latest under Spark
Connect (each action replaces the values). Rows count when their batch reached the observed plan
node: a partial read (``show``, ``first``, ``limit(n).collect()``) counts each worker up to the last
batch Spark read from it. Model loads and traces are counted per process (``count``), so a model
cached in a worker from an earlier run shows 0 loads and 0 traces in the next run.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Counts = dict[str, dict[str, Any]]

_PROCESS: dict[str, int] = {"model_loads": 0, "traces": 0}  # this worker process, all runs
_WORKER_EXTRA: dict[str, Any] = {}  # per-process facts every report carries (e.g. the pinned GPU)

STATS_PREFIX = "_stats_"  # the UDF struct's statistics fields: _stats_worker, _stats_rows, ...
COUNTERS = ("batches", "rows", "rows_failed", "model_loads", "traces", "batch_bytes")  # add up
PEAKS = ("peak_batch_bytes", "peak_rss_mb")  # the maximum
FACTS = ("gpu", "gpu_assigned", "cuda_visible_devices")  # the latest (lists joined with ",")
# ``batches`` right after ``worker``: the observed metric sorts reports by (worker, batches).
STATS_FIELDS: tuple[str, ...] = ("worker", *COUNTERS, *PEAKS, *FACTS)
METRIC = "workers"  # the observation's one metric: a line per worker
NULL_TEXT = "\x00"  # a null fact inside the metric text
# The counts of a worker as the summaries show them (then gpu, cuda_visible_devices, gpu_assigned).
SUMMARY_ORDER = ("model_loads", "traces", "batches", "rows", "rows_failed", *PEAKS[::-1], "batch_bytes")
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


def struct_fields() -> list[Any]:
    """The statistics fields of the UDF's return struct (``_stats_worker``, ``_stats_rows``, ...)."""
    from pyspark.sql.types import LongType, StringType, StructField

    def kind(name: str) -> Any:
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


class BatchReporter:
    """Worker side: this worker's counters so far in each action, reported on every batch.

    One per Python worker and UDF (``predict_batch_udf`` caches the predict function, and the reporter
    with it). Create it before loading the model so the load belongs to the first report.
    """

    def __init__(self) -> None:
        self._seen = dict(_PROCESS)
        self._worker = worker_id()
        self._actions: OrderedDict[str | None, dict[str, int]] = OrderedDict()

    def report(self, *, rows: int, rows_failed: int, batch_bytes: int, peak_batch_bytes: int) -> dict[str, Any]:
        """Record one batch; returns the report for its first row (``STATS_FIELDS``: totals in this action)."""
        action = _action()
        mine = self._actions.pop(action, None) or dict.fromkeys((*COUNTERS, *PEAKS), 0)
        self._actions[action] = mine  # the most recent last
        while len(self._actions) > _ACTIONS_KEPT:
            self._actions.popitem(last=False)
        for name, n in _PROCESS.items():  # loads and traces since the previous report go to this action
            mine[name] = mine.get(name, 0) + n - self._seen.get(name, 0)
        self._seen = dict(_PROCESS)
        mine["batches"] += 1
        mine["rows"] += rows
        mine["rows_failed"] += rows_failed
        mine["batch_bytes"] += batch_bytes
        mine["peak_batch_bytes"] = max(mine["peak_batch_bytes"], peak_batch_bytes)
        mine["peak_rss_mb"] = max(mine["peak_rss_mb"], peak_rss_mb())
        facts = {name: _text(_WORKER_EXTRA.get(name)) for name in FACTS}
        return {"worker": self._worker, **mine, **facts}


def stats_columns(n: int, report: dict[str, Any]) -> dict[str, Any]:
    """The ``_stats_*`` columns of a batch of ``n`` rows: ``report`` on the first row, nulls elsewhere."""
    import numpy as np

    columns: dict[str, Any] = {}
    for name in STATS_FIELDS:
        column = np.full(n, None, dtype=object)
        if n:
            column[0] = report.get(name)
        columns[f"{STATS_PREFIX}{name}"] = column
    return columns


# ---- the driver side -------------------------------------------------------------------------------


def workers_metric(field: Callable[[str], Any]) -> Any:
    """The observed metric: each worker's latest report (most batches), one line per worker.

    ``field(name)`` is the column of the statistics field ``name``. Reports sorted by (worker, batches)
    descending put each worker's latest first; zipped with the worker before each, that first one is
    the only report whose pair does not also appear zipped with its own worker, so a set difference
    of the two (as strings, which Spark compares by hash) keeps exactly one report per worker.
    """
    from pyspark.sql import functions as F

    worker = field("worker")
    parts = [worker.alias("worker"), *(field(n).alias(n) for n in (*COUNTERS, *PEAKS))]
    parts += [F.coalesce(field(n), F.lit(NULL_TEXT)).alias(n) for n in FACTS]  # no nulls: one text format
    reports = F.sort_array(F.collect_list(F.when(worker.isNotNull(), F.struct(*parts))), asc=False)
    workers = reports["worker"]
    before = F.slice(F.concat(F.array(F.lit("")), workers), 1, F.size(workers))  # the worker of the report before
    with_before = F.arrays_zip(reports, before).cast("array<string>")
    with_own = F.arrays_zip(reports, workers).cast("array<string>")
    return F.array_join(F.array_except(with_before, with_own), "\n").alias(METRIC)


def parse_workers(text: str) -> Counts:
    """The metric's lines as ``{host:pid: counts}``; a line is Spark's text of ``{{report}, worker before}``.

    Counts come in the summaries' order; ``gpu`` and ``gpu_assigned`` are lists, ``gpu_assigned`` only
    where Spark assigned GPUs. A line that does not parse is left out.
    """
    workers: Counts = {}
    for line in text.splitlines():
        end = max(line.rfind("}, "), line.rfind("], "))  # ``[...]`` with the legacy cast format
        values = line[2:end].split(", ", len(STATS_FIELDS) - 1)  # only the last fact may hold ", "
        if end < 2 or len(values) != len(STATS_FIELDS):
            continue
        report = dict(zip(STATS_FIELDS, values, strict=True))
        facts = {n: None if report[n] == NULL_TEXT else report[n] for n in FACTS}
        try:
            counts: dict[str, Any] = {n: int(report[n]) for n in SUMMARY_ORDER}
        except ValueError:
            continue
        counts["gpu"] = facts["gpu"].split(",") if facts["gpu"] is not None else None
        counts["cuda_visible_devices"] = facts["cuda_visible_devices"]
        if facts["gpu_assigned"] is not None:
            counts["gpu_assigned"] = facts["gpu_assigned"].split(",")
        workers[report["worker"]] = counts
    return workers


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
    def create(cls, spark: Any) -> WorkerStats:
        """Statistics for one scored DataFrame of ``spark`` (attach them with ``attach``)."""
        from image_transfer.session import is_connect

        return cls(name=f"image_transfer_{uuid.uuid4().hex[:12]}", connect=is_connect(spark))

    def attach(self, scored: Any, field: Callable[[str], Any]) -> Any:
        """``scored`` observed: ``field(name)`` is the column of the statistics field ``name``."""
        metric = workers_metric(field)
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


def worker_lines(workers: dict[str, dict[str, Any]]) -> list[str]:
    """The summaries' per-worker lines: loads, traces and rows per ``host:pid``, and pinned GPUs if any."""

    def column(name: str) -> list[Any]:
        return [w.get(name, 0) for w in workers.values()]

    lines = [
        f"workers: {len(workers)}; model loads per worker {column('model_loads')}; "
        f"traces per worker {column('traces')}; rows per worker {column('rows')}"
    ]
    gpus = [w.get("gpu") for w in workers.values()]
    if any(gpus):  # pinned to the GPU Spark assigned (null: no GPU scheduling)
        lines.append(f"GPUs per worker {[','.join(g) if g else None for g in gpus]}")
    return lines
