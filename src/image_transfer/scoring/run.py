"""The handle of one scoring call: model, shipping, statistics after an action."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from image_transfer.errors import TooManyFailures
from image_transfer.scoring.options import PreparedModel, ScoringOptions
from image_transfer.scoring.stats import WorkerStats, failed_lines


@dataclass
class ScoringRun:
    """The handle of one scoring call: the model, how it was shipped, and worker statistics after an action.

    ``stats`` is empty before an action has run. It describes one action on the returned DataFrame
    (Spark's ``Observation``): the first on a classic session, the latest under Spark Connect; a
    stream's statistics add up its micro-batches. ``close`` releases the model's broadcast (also on
    ``with``). ``settings()`` runs the actions of its block with the frame's Arrow batch sizes.
    """

    model: PreparedModel
    options: ScoringOptions
    shipped: str
    stats: WorkerStats
    max_failed_fraction: float = 1.0
    _payload: Any = None
    source: str | None = None  # the model as the caller named it (a path, or an MLflow URI)
    spread: bool = False  # the input was spread by a shuffle before scoring (scoring is the second stage)
    conversions: int = 0  # LiteRT conversions on the driver for this call (0: converted before, or TensorFlow)
    arrow: dict[str, str] = field(default_factory=dict)  # this frame's Arrow batch settings (records, bytes)
    session: Any = None  # the SparkSession the frame belongs to
    input_frame: Any = None  # the DataFrame that was scored (its rows are counted without scoring them)

    @property
    def engine(self) -> str:
        """What runs the model on the workers: ``litert-xnnpack`` or ``tensorflow``."""
        from image_transfer.scoring.engines import engine_class

        return engine_class(self.model.compute.engine).label

    @property
    def model_version(self) -> str:
        """What the output's ``model_version`` column says."""
        return self.model.version

    def workers(self) -> dict[str, dict[str, Any]]:
        """Per ``host:pid`` worker: model_loads, traces, batches, rows, rows_failed, peak_rss_mb, ..."""
        return self.stats.by_worker()

    def totals(self) -> dict[str, int]:
        """rows, rows_failed, rows_warned (decoder warnings silenced), batches, model_loads, traces and
        conversions (the driver's too) over all workers."""
        names = ("rows", "rows_failed", "rows_warned", "batches", "model_loads", "traces", "conversions")
        workers = self.workers().values()
        totals = {n: int(sum(w.get(n, 0) for w in workers)) for n in names}
        totals["conversions"] += self.conversions
        return totals

    def check(self, *, rows: int | None = None, failed: int | None = None, sample: Sequence[str] = ()) -> None:
        """Raise ``TooManyFailures`` when more than ``max_failed_fraction`` of the rows failed.

        Counts default to the worker statistics (after an action); a job passes the written output's.
        """
        if rows is None or failed is None:
            totals = self.totals()
            rows, failed = totals["rows"], totals["rows_failed"]
        if rows and failed / rows > self.max_failed_fraction:
            reasons = "".join("\n" + line for line in failed_lines(list(sample), failed)) if sample else ""
            raise TooManyFailures(
                f"{failed} of {rows} rows failed ({failed / rows:.1%}), over the allowed "
                f"{self.max_failed_fraction:.1%} (max_failed_fraction){reasons}"
            )

    @contextmanager
    def settings(self) -> Iterator[ScoringRun]:
        """Run the actions inside the block with this frame's Arrow batches, then restore the session's.

        ``with scoring_run(scored).settings(): scored.write.parquet(out)``: Spark reads its Arrow batch
        size (``spark.sql.execution.arrow.maxRecordsPerBatch``, and ``maxBytesPerBatch`` on Spark 4)
        from the session when an action runs, and has no per-UDF setting, so the frame's values
        (``batch_size`` rows, at most ``max_batch_mb`` encoded bytes) are set for the block and the
        previous ones put back afterwards (an unset one unset again), also when the block fails. The
        settings are the session's while the block runs: actions other threads start meanwhile get them.
        """
        conf = self.session.conf
        before = {key: conf.get(key, None) for key in self.arrow}
        failed = False
        try:
            for key, value in self.arrow.items():
                conf.set(key, value)
            yield self
        except BaseException:
            failed = True
            raise
        finally:
            for key, value in before.items():
                try:
                    if value is None:
                        conf.unset(key)
                    else:
                        conf.set(key, value)
                except Exception:  # noqa: BLE001 - a session that died with the block: keep its error
                    if not failed:
                        raise

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
