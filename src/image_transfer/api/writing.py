"""Writing a scored output with the job guarantees: atomically, one writer at a time, with progress, the run
summary and its verdict (the failure threshold; a model failure as one line).

>>> from image_transfer import read_images, score_images, write_scored
>>> scored = score_images(read_images(spark, "/Volumes/main/ml/photos"), model)
>>> summary = write_scored(scored, "/Volumes/main/ml/scores")
>>> summary.rows_failed, summary.images_per_second

The CLI's ``score`` and ``featurize``, the demo and the notebook all write through ``write_scored``;
``write_output`` writes any DataFrame with the same atomic swap and lease.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from image_transfer.errors import RunFailed, TooManyFailures, UserError
from image_transfer.scoring.options import MODEL_ERROR
from image_transfer.scoring.run import ScoringRun
from image_transfer.scoring.stats import failed_fraction, failed_lines, worker_lines
from image_transfer.storage.outputs import write_output

SAMPLE_ERRORS = 5


@dataclass
class RunSummary:
    """What a scoring job did; ``to_dict`` is the ``--summary`` JSON."""

    mode: str
    model: str
    model_version: str
    output: str
    rows_in: int
    rows_out: int
    rows_failed: int
    seconds: float
    workers: dict[str, dict[str, Any]]
    shipped: str
    errors_sample: list[str] = field(default_factory=list)
    max_failed_fraction: float = 1.0
    threshold_exceeded: bool = False
    compute: dict[str, Any] = field(default_factory=dict)  # batch size, precision, jit, overlap
    rows_warned: int = 0  # rows whose decoding raised warnings (silenced: they never reach the console)
    embedding: str = ""  # featurize: how the embedding is made when it is not a layer's own output (pooled)

    @property
    def images_per_second(self) -> float:
        """Output rows per second of the scoring action."""
        return self.rows_out / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = asdict(self)
        out["images_per_second"] = round(self.images_per_second, 2)
        out["seconds"] = round(self.seconds, 3)
        out["failed_fraction"] = failed_fraction(self.rows_failed, self.rows_out)
        return out

    def describe(self) -> str:
        """A short human summary."""
        lines = [
            f"{self.mode}: {self.rows_in} rows in, {self.rows_out} out, {self.rows_failed} failed, "
            f"{self.seconds:.1f}s ({self.images_per_second:.1f} images/s); model {self.model_version} "
            f"({self.shipped})",
            *worker_lines(self.workers),
        ]
        if self.embedding:
            lines.append(f"  embedding: {self.embedding}")
        lines += failed_lines(self.errors_sample, self.rows_failed)
        if self.rows_warned:
            lines.append(f"  {self.rows_warned} rows decoded with decoder warnings (not shown)")
        if self.threshold_exceeded:
            lines.append(f"  more than {self.max_failed_fraction:.1%} of the rows failed: the run fails")
        return "\n".join(lines)


FILE_TARGET_BYTES = 256 * 1024 * 1024  # output files of about this size suit Parquet readers


def default_rows_per_file(scored: Any) -> int:
    """Rows per output file for files of about ``FILE_TARGET_BYTES``, from the scored output's row width."""
    from image_transfer.scoring.score import scoring_run

    run = scoring_run(scored)
    keys = 96 * max(1, len(run.options.key_columns))  # a path or id, compressed
    if run.model.mode == "embed":
        row = keys + 4 * run.model.width + 64
    else:
        row = keys + 24 * run.model.width + 64  # prediction, probability, top-k labels and probabilities
    return max(1000, FILE_TARGET_BYTES // row)


def count_rows(df: Any) -> int:
    """Rows of an input without reading its image bytes (Parquet footers, file listings)."""
    return df.select().count()


def _model_failure(exc: BaseException) -> RunFailed | None:
    text = str(exc)
    if MODEL_ERROR not in text:
        return None
    line = next(ln for ln in text.splitlines() if MODEL_ERROR in ln)
    return RunFailed(line[line.index(MODEL_ERROR) :].strip())


def write_scored(
    scored: Any,
    output: str,
    *,
    output_table: str | None = None,
    overwrite: bool = False,
    rows_per_file: int | None = None,
    wait: float | None = None,
    progress_interval: float | None = None,
    summary_path: str | None = None,
    print_fn: Callable[[str], None] = print,
    command: str | None = None,
) -> RunSummary:
    """Run a scoring by writing its output with the job guarantees; returns the run's summary.

    ``scored`` is what ``score_images`` or ``featurize_images`` returned. It is written as Parquet at
    ``output`` atomically (staged, counted, marked, renamed into place: a failed write leaves the previous
    output untouched), holding ``output``'s lease (one writer at a time; another live writer is a
    ``UserError``, or is waited for ``wait`` seconds), never over data that is not a previous output of the
    same command unless ``overwrite``; with ``output_table`` the data is also saved as that table. Files
    hold about 256 MB each (``rows_per_file`` sets their rows). Progress is printed every
    ``progress_interval`` seconds (0: never; default: when the console is a terminal), then the summary
    (and its JSON to ``summary_path``). ``command`` is the name the output's marker records (default
    ``score`` or ``featurize``): only an earlier output of the same command is replaced.

    Raises ``UserError`` for an empty input (nothing written), ``RunFailed`` when the model failed
    (nothing written) and ``TooManyFailures`` after writing the output and the summary when more than
    ``max_failed_fraction`` of the rows failed.
    """
    from image_transfer.scoring.score import scoring_run

    run = scoring_run(scored)
    rows_in = count_rows(run.input_frame)
    require_rows(rows_in)
    command = command or ("score" if run.model.mode == "classify" else "featurize")
    per_file = rows_per_file or default_rows_per_file(scored)
    return write_and_summarize(
        run.session,
        scored,
        rows_in=rows_in,
        writer=lambda df: write_output(
            df,
            output,
            table=output_table,
            rows_per_file=per_file,
            rows=rows_in,
            command=command,
            overwrite=overwrite,
            wait=wait,
        ),
        output=output_table or output,
        mode=run.model.mode,
        progress_interval=progress_interval,
        summary_path=summary_path,
        print_fn=print_fn,
    )


__all__ = ["RunSummary", "write_output", "write_scored"]


def write_and_summarize(
    spark: Any,
    scored: Any,
    *,
    rows_in: int,
    writer: Callable[[Any], Any],
    output: str,
    mode: str,
    progress_interval: float | None = None,
    summary_path: str | None = None,
    print_fn: Callable[[str], None] = print,
) -> RunSummary:
    """``write_scored``'s core: run the scoring by writing ``scored`` with ``writer`` (which returns it read
    back), with progress and the frame's Arrow batches, then summarise.

    Raises ``RunFailed`` when the model failed (nothing written), ``TooManyFailures`` after writing the
    output and the summary when more than the run's ``max_failed_fraction`` of the rows failed.
    """
    from pyspark.sql import functions as F

    from image_transfer.scoring.progress import Progress
    from image_transfer.scoring.score import scoring_run

    run: ScoringRun = scoring_run(scored)
    what = "score" if mode == "classify" else "featurize"
    description = f"{what} {rows_in:,} images with {run.model_version} ({Path(run.model.info.path).name})"
    started = time.perf_counter()
    try:
        with (
            Progress(
                spark,
                what,
                total_rows=rows_in,
                description=description,
                interval=progress_interval,
                input_stage=1 if run.spread else 0,
            ),
            run.settings(),
        ):  # the frame's Arrow batches for the write only, the session's back after
            written = writer(scored)
    except Exception as exc:
        failure = _model_failure(exc)
        if failure is not None:
            raise failure from exc
        raise
    finally:
        run.close()
    seconds = time.perf_counter() - started
    failed = written.where(F.col("error").isNotNull())
    first_key = run.options.key_columns[0] if run.options.key_columns else None
    sample = [
        f"{r[first_key]}: {r['error']}" if first_key else r["error"] for r in failed.limit(SAMPLE_ERRORS).collect()
    ]
    rows_out, rows_failed = written.count(), failed.count()
    summary = RunSummary(
        mode=what,
        model=run.source or run.model.info.path,
        model_version=run.model_version,
        output=output,
        rows_in=rows_in,
        rows_out=rows_out,
        rows_failed=rows_failed,
        seconds=seconds,
        workers=run.workers(),
        shipped=run.shipped,
        errors_sample=sample,
        max_failed_fraction=run.max_failed_fraction,
        compute={**run.options.compute_summary(), "engine_used": run.engine},
        embedding=run.model.info.embedding_note(),
    )
    summary.rows_warned = int(sum(w.get("rows_warned", 0) for w in summary.workers.values()))
    try:
        run.check(rows=rows_out, failed=rows_failed, sample=sample)
    except TooManyFailures:
        summary.threshold_exceeded = True
        report(summary, summary_path, print_fn)
        raise
    report(summary, summary_path, print_fn)
    return summary


def report(summary: RunSummary, path: str | None, print_fn: Callable[[str], None] = print) -> None:
    """Print the summary and write it as JSON to ``path``."""
    print_fn(summary.describe())
    write_summary(summary.to_dict(), path)


def write_summary(summary: dict[str, Any], path: str | None) -> None:
    """Write a summary dictionary as JSON to ``path`` (nothing when None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def require_rows(rows: int, what: str = "the input") -> None:
    """UserError for an empty input (before anything is written)."""
    if rows == 0:
        raise UserError(f"{what} has no rows")
