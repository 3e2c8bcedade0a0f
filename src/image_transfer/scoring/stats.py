"""Per-worker counters (model loads, traces, batches, rows, failures, peak memory) gathered on the driver.

Workers are keyed by ``host:pid`` (pids repeat across the nodes of a cluster). The worker side is the
same on every session: each scoring batch reports what changed since the last one (``BatchReporter``).
How the reports reach the driver depends on the session:

- classic: an accumulator. ``predict_batch_udf`` caches the predict function per Python worker, so the
  accumulator object it closed over belongs to the task that created it; Spark deserializes a fresh
  copy with every task and sends back only that copy's updates, so reports go to the copy registered
  for the running task (found by id), which keeps counts from every task.
- Spark Connect (no accumulators): the report rides in a ``_stats`` column on the batch's first row and
  is aggregated by an ``Observation`` while the action runs, so no extra pass is needed.

Model loads and traces are counted per process (``count``), so a model cached in a worker from an
earlier run shows 0 loads and 0 traces in the next run.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from image_transfer.session import is_connect

Counts = dict[str, dict[str, Any]]

_PROCESS: dict[str, int] = {"model_loads": 0, "traces": 0}  # this worker process, all runs
_WORKER_EXTRA: dict[str, Any] = {}  # per-process facts every report carries (e.g. the pinned GPU)
STATS_FIELD = "_stats"


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


class BatchReporter:
    """Worker side: turns each batch into a report of what changed since the previous one.

    ``sink`` is an accumulator (classic) or None (Connect: ``report`` returns the JSON for the
    ``_stats`` column). Create it before loading the model so the load is part of the first report.
    """

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self._seen = dict(_PROCESS)
        self._worker = worker_id()

    def report(self, **batch: int) -> str | None:
        """Record one batch (``rows``, ``rows_failed``, ...); returns the ``_stats`` value for its first row."""
        counts: dict[str, Any] = {"batches": 1, **batch, "peak_rss_mb": peak_rss_mb()}
        for name, n in _PROCESS.items():
            counts[name] = n - self._seen.get(name, 0)
        self._seen = dict(_PROCESS)
        counts.update(_WORKER_EXTRA)
        if self._sink is None:
            return json.dumps({"worker": self._worker, "counts": counts}, separators=(",", ":"))
        from pyspark.accumulators import _accumulatorRegistry

        current = _accumulatorRegistry.get(self._sink.aid, self._sink)
        current.add({self._worker: counts})
        return None


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
            value = next(iter(value.values()), "")
        elif isinstance(value, (list, tuple)):  # Row is a tuple
            if len(value) != 1:
                return "\n".join(_metric_text(v) for v in value)
            value = value[0]
        else:
            return str(value)
    return value


def _counts_param() -> Any:
    from pyspark.accumulators import AccumulatorParam

    class _CountsParam(AccumulatorParam):
        """Merges ``{worker: {counter: n}}`` dictionaries with ``merge``."""

        def zero(self, value: Counts) -> Counts:
            return {}

        def addInPlace(self, value1: Counts, value2: Counts) -> Counts:  # noqa: N802 - Spark's name
            for worker, counts in value2.items():
                merge(value1, worker, counts)
            return value1

    return _CountsParam()


@dataclass
class WorkerStats:
    """Driver side: the sink handed to workers, and the per-worker counts after an action.

    ``accumulator`` is set on a classic session; under Spark Connect ``observation`` is (attached to
    the scored DataFrame with ``attach``). ``by_worker`` is empty until an action has run.
    """

    accumulator: Any = None
    observation: Any = None
    name: str = ""  # the observation's (and a stream's observed metrics') name
    stream_name: str | None = None  # a streaming DataFrame under Connect: named observed metrics
    _reports: list[str] = field(default_factory=list)
    _batches_seen: set[int] = field(default_factory=set)

    @classmethod
    def create(cls, spark: Any) -> WorkerStats:
        """An accumulator on a classic session, an Observation under Spark Connect."""
        if is_connect(spark):
            from pyspark.sql import Observation

            name = f"image_transfer_{uuid.uuid4().hex[:12]}"
            return cls(observation=Observation(name), name=name)
        return cls(accumulator=spark.sparkContext.accumulator({}, _counts_param()))

    @property
    def sink(self) -> Any:
        """What ``BatchReporter`` needs on the workers (picklable)."""
        return self.accumulator

    def attach(self, scored: Any, column: Any) -> Any:
        """Observe the per-batch ``_stats`` column (Connect); classic sessions return ``scored`` as it is.

        A streaming DataFrame cannot carry an ``Observation``: it gets named metrics, which each
        micro-batch's progress reports (feed them to ``add_progress``).
        """
        if self.observation is None:
            return scored
        from pyspark.sql import functions as F

        # One string metric: Spark Connect cannot send array-valued observed metrics back.
        reports = F.concat_ws("\n", F.collect_list(column)).alias("reports")
        if scored.isStreaming:
            self.stream_name = self.name
            return scored.observe(self.stream_name, reports)
        return scored.observe(self.observation, reports)

    def add_progress(self, progress: Any) -> None:
        """Take a streaming query's micro-batch progress (its observed metrics), once per batch id."""
        if self.stream_name is None:
            return
        batch = int(progress_field(progress, "batchId"))
        metrics = (progress_field(progress, "observedMetrics") or {}).get(self.stream_name)
        if batch in self._batches_seen or metrics is None:
            return
        self._batches_seen.add(batch)
        self._reports.append(_metric_text(metrics))

    def by_worker(self) -> Counts:
        """Counters per ``host:pid`` worker (after the action; ``{}`` before)."""
        if self.accumulator is not None:
            return {w: dict(c) for w, c in sorted(self.accumulator.value.items())}
        if self.stream_name is not None:
            reports = "\n".join(self._reports)
        else:
            try:
                reports = self.observation.get.get("reports") or ""
            except Exception:  # noqa: BLE001 - no action has run yet
                return {}
        total: Counts = {}
        for raw in reports.splitlines():
            if not raw:
                continue
            item = json.loads(raw)
            merge(total, item["worker"], item["counts"])
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
