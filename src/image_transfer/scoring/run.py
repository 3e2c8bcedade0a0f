"""The handle of one scoring call: model, shipping, statistics after an action."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from image_transfer.errors import TooManyFailures
from image_transfer.scoring.options import PreparedModel, ScoringOptions
from image_transfer.scoring.stats import WorkerStats


@dataclass
class ScoringRun:
    """The handle of one scoring call: the model, how it was shipped, and worker statistics after an action.

    ``stats`` is empty before an action has run. It describes one action on the returned DataFrame
    (Spark's ``Observation``): the first on a classic session, the latest under Spark Connect; a
    stream's statistics add up its micro-batches. ``close`` releases the model's broadcast (also on
    ``with``).
    """

    model: PreparedModel
    options: ScoringOptions
    shipped: str
    stats: WorkerStats
    max_failed_fraction: float = 1.0
    _payload: Any = None
    source: str | None = None  # the model as the caller named it (a path, or an MLflow URI)
    spread: bool = False  # the input was spread by a shuffle before scoring (scoring is the second stage)

    @property
    def model_version(self) -> str:
        """What the output's ``model_version`` column says."""
        return self.model.version

    def workers(self) -> dict[str, dict[str, Any]]:
        """Per ``host:pid`` worker: model_loads, traces, batches, rows, rows_failed, peak_rss_mb, ..."""
        return self.stats.by_worker()

    def totals(self) -> dict[str, int]:
        """rows, rows_failed, batches, model_loads and traces over all workers."""
        names = ("rows", "rows_failed", "batches", "model_loads", "traces")
        workers = self.workers().values()
        return {n: int(sum(w.get(n, 0) for w in workers)) for n in names}

    def check(self, *, rows: int | None = None, failed: int | None = None, sample: Sequence[str] = ()) -> None:
        """Raise ``TooManyFailures`` when more than ``max_failed_fraction`` of the rows failed.

        Counts default to the worker statistics (after an action); a job passes the written output's.
        """
        if rows is None or failed is None:
            totals = self.totals()
            rows, failed = totals["rows"], totals["rows_failed"]
        if rows and failed / rows > self.max_failed_fraction:
            reasons = "".join(f"\n  {s}" for s in sample)
            raise TooManyFailures(
                f"{failed} of {rows} rows failed ({failed / rows:.1%}), over the allowed "
                f"{self.max_failed_fraction:.1%} (max_failed_fraction){reasons}"
            )

    def close(self) -> None:
        """Release the broadcast model bytes (workers keep the loaded model in their cache)."""
        if self._payload is not None and hasattr(self._payload, "unpersist"):
            try:
                self._payload.unpersist()
            except Exception:  # noqa: BLE001 - a stopped context has nothing left to release
                pass
        self._payload = None

    def __enter__(self) -> ScoringRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
