"""Per-worker counters (model loads, traces, batches, rows) gathered on the driver with an accumulator.

``predict_batch_udf`` caches the predict function per Python worker, so the accumulator object it
closed over belongs to the task that created it. Spark deserializes a fresh copy of the accumulator
with every task and sends back only that copy's updates, so ``record`` adds to the copy registered
for the running task (found by id), which keeps counts from every task, not just the first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pyspark.accumulators import AccumulatorParam

Counts = dict[str, dict[str, int]]


class _CountsParam(AccumulatorParam):
    """Merges ``{worker pid: {counter: n}}`` dictionaries: adds counters, keeps the maximum of ``peak_*``."""

    def zero(self, value: Counts) -> Counts:
        return {}

    def addInPlace(self, value1: Counts, value2: Counts) -> Counts:  # noqa: N802 - Spark's name
        for worker, counts in value2.items():
            mine = value1.setdefault(worker, {})
            for name, n in counts.items():
                if name.startswith("peak_"):
                    mine[name] = max(mine.get(name, 0), n)
                else:
                    mine[name] = mine.get(name, 0) + n
        return value1


@dataclass(frozen=True)
class WorkerStats:
    """A handle on the run's accumulator; pass ``accumulator`` into UDF closures."""

    accumulator: Any

    @classmethod
    def create(cls, sc: Any) -> WorkerStats:
        """A new, empty accumulator on this SparkContext."""
        return cls(sc.accumulator({}, _CountsParam()))

    def by_worker(self) -> Counts:
        """Counters per worker pid (driver side, after the action)."""
        return {str(pid): dict(counts) for pid, counts in sorted(self.accumulator.value.items())}


def peak_rss_mb() -> int:
    """This process's peak resident memory so far, in MiB (Linux/macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024)


def record(accumulator: Any, **counts: int) -> None:
    """Add counters for this process to the running task's copy of ``accumulator``."""
    from pyspark.accumulators import _accumulatorRegistry

    current = _accumulatorRegistry.get(accumulator.aid, accumulator)
    current.add({str(os.getpid()): counts})
