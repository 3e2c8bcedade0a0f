"""Incremental scoring: each new image in a folder scored exactly once; a run that dies resumes.

A Structured Streaming query over the image folder with ``Trigger.AvailableNow`` (score everything
new, then stop: a scheduled job's semantics). The files are found by the open-source ``binaryFile``
streaming source, or on Databricks by Auto Loader (``cloudFiles``), at most ``max_files_per_trigger``
per micro-batch. The scoring is ``score_images`` applied to the stream: one ``predict_batch_udf``,
so the model is shipped once per run and each worker loads and traces it once for all micro-batches.

Exactly once comes from Spark's sinks: the Parquet file sink commits each micro-batch in its
``_spark_metadata`` log (readers that go through Spark see only committed files), and tables are
written with ``toTable`` (Delta's transaction log on Databricks). The checkpoint records which files
each micro-batch took; a killed run's unfinished micro-batch is re-run with the same files.

Spark's file sources make no row for a zero-byte file. With the ``binaryFile`` source, the files a
run took are read back from the checkpoint and compared with the output: each file that matched is
either in the output once (with ``error`` for unreadable images) or listed in ``not_scored`` with the
reason. Auto Loader keeps its file list in its own state store: there the run reports rows only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from image_transfer.errors import RunFailed, TooManyFailures, UserError
from image_transfer.imaging.files import IMAGE_EXTENSIONS
from image_transfer.scoring import streaming
from image_transfer.scoring.options import MODEL_ERROR, ScoringOptions
from image_transfer.scoring.run import ScoringRun
from image_transfer.scoring.stats import failed_fraction, failed_lines, worker_lines
from image_transfer.scoring.streaming import DEFAULT_MAX_FILES_PER_TRIGGER, SOURCES

SAMPLE_ERRORS = 5
ZERO_BYTES = "zero-byte file: Spark's file source makes no row for it"
GONE = "the file was removed before it was read"
ACCOUNTED = "image_transfer_accounted"  # in the checkpoint: the last micro-batch a run's summary covered


@dataclass
class IncrementalResult:
    """What one incremental run did; ``to_dict`` is the ``--summary`` JSON.

    ``files_new`` is how many files were taken from the folder since the last run that finished (so
    a killed run's committed micro-batches count in the next run; None with Auto Loader), ``rows_out``
    how many output rows they have, ``batches`` the rows per micro-batch this run processed, and
    ``not_scored`` the files that matched but have no output row, each with the reason.
    """

    mode: str
    images: str
    source: str
    checkpoint: str
    output: str
    model: str
    model_version: str
    shipped: str
    files_new: int | None
    rows_out: int
    rows_failed: int
    seconds: float
    batches: list[dict[str, int]] = field(default_factory=list)
    not_scored: list[dict[str, str]] = field(default_factory=list)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors_sample: list[str] = field(default_factory=list)
    max_failed_fraction: float = 1.0
    threshold_exceeded: bool = False
    compute: dict[str, Any] = field(default_factory=dict)  # batch size, precision, jit, overlap

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["failed_fraction"] = failed_fraction(self.rows_failed, self.rows_out)
        return out

    def describe(self) -> str:
        """A short human summary."""
        new = "" if self.files_new is None else f"{self.files_new} new files, "
        lines = [
            f"{self.mode} (incremental, {self.source}): {new}{self.rows_out} rows out, {self.rows_failed} failed, "
            f"{len(self.batches)} micro-batches {[b['rows'] for b in self.batches]}, {self.seconds:.1f}s; "
            f"model {self.model_version} ({self.shipped})",
            *worker_lines(self.workers),
        ]
        lines += failed_lines(self.errors_sample, self.rows_failed)
        lines += [f"  not scored: {n['path']}: {n['reason']}" for n in self.not_scored]
        if self.threshold_exceeded:
            lines.append(f"  more than {self.max_failed_fraction:.1%} of the rows failed: the run fails")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise ``TooManyFailures`` when more than ``max_failed_fraction`` of this run's rows failed."""
        if self.rows_out and self.rows_failed / self.rows_out > self.max_failed_fraction:
            self.threshold_exceeded = True
            raise TooManyFailures(
                f"{self.rows_failed} of {self.rows_out} rows failed ({self.rows_failed / self.rows_out:.1%}), "
                f"over the allowed {self.max_failed_fraction:.1%} (max_failed_fraction)"
            )


# ---- the checkpoint: which micro-batches committed, which files each took --------------------------


def _accounted(spark: Any, checkpoint: str) -> int:
    """The last micro-batch a finished run has accounted for (a killed run's batches are the next run's)."""
    from image_transfer.storage.fs import file_system

    fs, path = file_system(spark, f"{checkpoint}/{ACCOUNTED}")
    return int(fs.read_text(path).strip()) if fs.exists(path) else -1


def _set_accounted(spark: Any, checkpoint: str, batch_id: int) -> None:
    from image_transfer.storage.fs import file_system

    fs, path = file_system(spark, f"{checkpoint}/{ACCOUNTED}")
    fs.write_text(path, f"{batch_id}\n")


def _why_missing(spark: Any, path: str) -> str:
    from image_transfer.storage.fs import file_system

    fs, where = file_system(spark, path)
    if not fs.exists(where):
        return GONE
    size = fs.size(where)
    return ZERO_BYTES if size == 0 else f"no output row for a file of {size} bytes"


# ---- whose output: the checkpoint's own, or none yet --------------------------------------------------

CHECKPOINT_PROPERTY = "image_transfer.checkpoint"  # on an incremental output table: its checkpoint's id


def _refuse(output: str, what: str) -> UserError:
    return UserError(
        f"{output} {what}: an incremental run writes only into its own checkpoint's output (or a new or "
        "empty one); give a new output, or the checkpoint that writes this one"
    )


def _check_own_output(spark: Any, output: str, checkpoint: str) -> None:
    """UserError unless the Parquet ``output`` is missing, empty, or this checkpoint's own.

    Its own: its ``STREAM_MARKER`` names this checkpoint's id, or (an output written before the marker)
    the file sink's log has commits and the checkpoint has run. Anything else would be hidden: once the
    file sink's ``_spark_metadata`` log is there, readers see only the files it lists.
    """
    from image_transfer.storage.fs import COMMIT_MARKER, STREAM_MARKER, file_system

    fs, where = file_system(spark, output)
    if not fs.exists(where):
        return
    if not fs.is_dir(where):
        raise _refuse(output, "is an existing file")
    names = fs.names(where)
    if STREAM_MARKER in names:
        fields = dict(p.split("=", 1) for p in fs.read_text(fs.join(where, STREAM_MARKER)).split() if "=" in p)
        if fields.get("checkpoint_id") == streaming.checkpoint_id(spark, checkpoint):
            return
        raise _refuse(output, f"holds the output of another checkpoint ({fields.get('checkpoint', 'unknown')})")
    if streaming.last_batch(spark, f"{output}/_spark_metadata") >= 0:
        if streaming.last_batch(spark, f"{checkpoint}/offsets") >= 0:
            return  # written before the marker: the checkpoint's, as far as can be told
        # The file sink would skip the micro-batch ids its log already has: new files would be lost.
        raise _refuse(output, "holds the output of another checkpoint")
    if not any(not n.startswith(("_", ".")) for n in names):
        return  # empty (at most an empty log)
    if COMMIT_MARKER in names:
        fields = dict(p.split("=", 1) for p in fs.read_text(fs.join(where, COMMIT_MARKER)).split() if "=" in p)
        by = f"`image-transfer {fields['command']}`" if fields.get("command") else "image-transfer"
        raise _refuse(output, f"holds a batch output of {by} (its rows would be hidden from readers)")
    raise _refuse(output, "holds other data, not this checkpoint's output (its rows would be hidden from readers)")


def _check_own_table(spark: Any, table: str | None, checkpoint: str) -> None:
    """UserError unless ``table`` is missing, empty, or this checkpoint's own (its ``CHECKPOINT_PROPERTY``;
    a table written before the property: the checkpoint has run and no batch command marked it)."""
    from image_transfer.storage.outputs import TABLE_PROPERTY, _table_sql_name

    if not table or not spark.catalog.tableExists(table):
        return
    properties = {row[0]: row[1] for row in spark.sql(f"SHOW TBLPROPERTIES {_table_sql_name(table)}").collect()}
    if TABLE_PROPERTY in properties:
        raise _refuse(table, f"holds a batch output of `image-transfer {properties[TABLE_PROPERTY]}`")
    own = properties.get(CHECKPOINT_PROPERTY)
    if own is not None:
        if own == streaming.checkpoint_id(spark, checkpoint):
            return
        raise _refuse(table, "holds the output of another checkpoint")
    if streaming.last_batch(spark, f"{checkpoint}/offsets") >= 0 or spark.table(table).isEmpty():
        return
    raise _refuse(table, "holds other data, not this checkpoint's output")


def _mark_own(spark: Any, output: str | None, table: str | None, checkpoint: str) -> None:
    """Record, once, that ``output`` (or ``table``) is this checkpoint's (``_check_own_output``)."""
    from image_transfer.storage.fs import STREAM_MARKER, file_system
    from image_transfer.storage.outputs import _table_sql_name

    ident = streaming.checkpoint_id(spark, checkpoint)
    if ident is None:
        return
    if output:
        fs, where = file_system(spark, output)
        marker = fs.join(where, STREAM_MARKER)
        if fs.exists(where) and not fs.exists(marker):
            fs.write_text(marker, f"checkpoint_id={ident} checkpoint={checkpoint}\n")
    elif table and spark.catalog.tableExists(table):
        name = _table_sql_name(table)
        properties = {row[0]: row[1] for row in spark.sql(f"SHOW TBLPROPERTIES {name}").collect()}
        if CHECKPOINT_PROPERTY not in properties:
            spark.sql(f"ALTER TABLE {name} SET TBLPROPERTIES ('{CHECKPOINT_PROPERTY}' = '{ident}')")


# ---- the run --------------------------------------------------------------------------------------


def _written(spark: Any, output: str | None, table: str | None) -> Any:
    return spark.table(table) if table else spark.read.parquet(output)


def _locations(
    spark: Any,
    images_dir: str,
    checkpoint: str,
    output: str | None,
    output_table: str | None,
    *,
    source: str,
    extensions: Sequence[str],
    max_files_per_trigger: int,
) -> tuple[str, str, str | None, str]:
    """(images, checkpoint, output, resolved source) checked, and qualified on a classic session; UserError
    before any work."""
    from image_transfer.runtime import is_connect
    from image_transfer.storage.fs import _qualified, file_system

    if not checkpoint:
        raise UserError("incremental scoring needs a checkpoint location")
    if (output is None) == (output_table is None):
        raise UserError("give exactly one of an output path or an output table")
    if not is_connect(spark):  # under Connect the server resolves paths; this process cannot qualify them
        images_dir, checkpoint = _qualified(images_dir), _qualified(checkpoint)
        output = _qualified(output) if output else None
    resolved = streaming.resolve_source(source)
    streaming.reader_options(resolved, extensions=extensions, max_files_per_trigger=max_files_per_trigger)
    fs, where = file_system(spark, images_dir)
    if not fs.exists(where):
        raise UserError(f"cannot read images from {images_dir}: the folder does not exist")
    if output:
        _check_own_output(spark, output, checkpoint)
    else:
        _check_own_table(spark, output_table, checkpoint)
    return images_dir, checkpoint, output, resolved


def _stream(
    out: Any,
    run: ScoringRun,
    *,
    mode: str,
    checkpoint: str,
    output: str | None,
    output_table: str | None,
    print_fn: Callable[[str], None] | None,
) -> dict[int, int]:
    """Run the query to the end (``AvailableNow``): the rows of each micro-batch with rows, by batch id."""
    from image_transfer.scoring.stats import progress_field

    writer = (
        out.writeStream.outputMode("append")
        .option("checkpointLocation", checkpoint)
        .queryName(f"image-transfer-{mode}-incremental")
        .trigger(availableNow=True)
    )
    batches: dict[int, int] = {}
    query = None
    try:
        with run.settings():  # a stream plans its micro-batches with the settings it started with
            query = writer.toTable(output_table) if output_table else writer.format("parquet").start(output)
            while True:
                done = query.awaitTermination(2)
                for progress in query.recentProgress:
                    run.stats.add_progress(progress)  # each micro-batch's statistics ride in its progress
                    batch_id = int(progress_field(progress, "batchId"))
                    rows = int(progress_field(progress, "numInputRows") or 0)
                    if batch_id not in batches and rows and print_fn:
                        print_fn(f"micro-batch {batch_id}: {rows} rows")
                    if rows:
                        batches[batch_id] = rows
                if done:
                    return batches
    except Exception as exc:
        if MODEL_ERROR in str(exc):
            line = next(ln for ln in str(exc).splitlines() if MODEL_ERROR in ln)
            raise RunFailed(line[line.index(MODEL_ERROR) :].strip()) from exc
        raise
    finally:
        if query is not None:
            streaming.stop(query)  # an error or Ctrl-C in the loop: the query must not run on
        run.close()


def _files_accounted(
    spark: Any, checkpoint: str, written: Any, accounted: int, committed: int
) -> tuple[int, int, int, list[dict[str, str]], list[str]]:
    """For the binaryFile source: (files taken, rows out, rows failed, files not scored, failed sample) of the
    micro-batches ``(accounted, committed]``, from the checkpoint's file log joined with the output."""
    from pyspark.sql import functions as F

    if committed <= accounted:
        return 0, 0, 0, [], []
    taken = streaming.files_taken(
        spark,
        checkpoint,
        streaming.source_log_offset(spark, checkpoint, accounted),
        streaming.source_log_offset(spark, checkpoint, committed),
    )
    rows = written.select("path", "error", F.lit(True).alias("_hit"))
    joined = taken.join(rows, "path", "left").cache()
    try:
        counts = joined.agg(
            F.count(F.lit(1)).alias("files"), F.count("_hit").alias("rows"), F.count("error").alias("failed")
        ).first()
        files, rows_out, failed = int(counts.files), int(counts.rows), int(counts.failed)
        not_scored: list[dict[str, str]] = []
        if files > rows_out:
            missing = sorted(r.path for r in joined.where(F.col("_hit").isNull()).select("path").collect())
            not_scored = [{"path": p, "reason": _why_missing(spark, p)} for p in missing]
        sample: list[str] = []
        if failed:
            sample = [
                f"{r.path}: {r.error}" for r in joined.where(F.col("error").isNotNull()).limit(SAMPLE_ERRORS).collect()
            ]
        return files, rows_out, failed, not_scored, sample
    finally:
        joined.unpersist()


def _run_facts(run: ScoringRun) -> dict[str, Any]:
    """What the summary says of the model and the workers."""
    return {
        "model": run.model.info.path,
        "model_version": run.model_version,
        "shipped": run.shipped,
        "workers": run.workers(),
        "compute": {**run.options.compute_summary(), "engine_used": run.engine},
    }


def _run(
    spark: Any,
    images_dir: str,
    scorer: Callable[[Any], Any],
    *,
    mode: str,
    checkpoint: str,
    output: str | None,
    output_table: str | None,
    source: str,
    extensions: Sequence[str],
    max_files_per_trigger: int,
    max_failed_fraction: float,
    print_fn: Callable[[str], None] | None,
) -> IncrementalResult:
    from pyspark.sql import functions as F

    from image_transfer.scoring.score import scoring_run

    images_dir, checkpoint, output, resolved = _locations(
        spark,
        images_dir,
        checkpoint,
        output,
        output_table,
        source=source,
        extensions=extensions,
        max_files_per_trigger=max_files_per_trigger,
    )
    stream = streaming.read_new_images(
        spark, images_dir, source=resolved, extensions=extensions, max_files_per_trigger=max_files_per_trigger
    )
    scored = scorer(stream)  # the model is checked here, before the query starts
    run: ScoringRun = scoring_run(scored)
    run.max_failed_fraction = max_failed_fraction
    accounted = _accounted(spark, checkpoint)
    # Under AvailableNow, current_timestamp() is the micro-batch's timestamp (the same if it is re-run).
    out = scored.withColumn("scored_at", F.current_timestamp())
    started = time.perf_counter()
    batches = _stream(
        out, run, mode=mode, checkpoint=checkpoint, output=output, output_table=output_table, print_fn=print_fn
    )
    seconds = time.perf_counter() - started
    committed_after = streaming.last_batch(spark, f"{checkpoint}/commits")
    if output and streaming.last_batch(spark, f"{output}/_spark_metadata") < 0:
        streaming.readable_when_empty(spark, output, out.schema)
    _mark_own(spark, output, output_table, checkpoint)
    files_new: int | None = None
    rows_out, rows_failed = sum(batches.values()), run.totals()["rows_failed"]
    not_scored: list[dict[str, str]] = []
    sample: list[str] = []
    if resolved == "binaryFile":
        written = _written(spark, output, output_table)
        files_new, rows_out, rows_failed, not_scored, sample = _files_accounted(
            spark, checkpoint, written, accounted, committed_after
        )
    result = IncrementalResult(
        **_run_facts(run),
        mode="score" if mode == "classify" else "featurize",
        images=images_dir,
        source=resolved,
        checkpoint=checkpoint,
        output=output_table or output or "",
        files_new=files_new,
        rows_out=rows_out,
        rows_failed=rows_failed,
        seconds=seconds,
        batches=[{"batch_id": b, "rows": n} for b, n in sorted(batches.items())],
        not_scored=not_scored,
        errors_sample=sample,
        max_failed_fraction=max_failed_fraction,
    )
    try:
        result.check()
    except TooManyFailures:
        pass  # the flag is set; the caller decides (the CLI writes the summary, then fails)
    if committed_after > accounted:
        _set_accounted(spark, checkpoint, committed_after)
    return result


def score_new_images(
    spark: Any,
    images_dir: str,
    model: str,
    *,
    checkpoint: str,
    output: str | None = None,
    output_table: str | None = None,
    source: str = "auto",
    max_files_per_trigger: int = DEFAULT_MAX_FILES_PER_TRIGGER,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    top_k: int = 5,
    model_version: str | None = None,
    print_fn: Callable[[str], None] | None = None,
    options: ScoringOptions | None = None,
    image_column: str = "content",
    key_columns: Sequence[str] = ("path",),
    batch_size: int = 64,
    max_image_bytes: int | str | None = None,
    max_pixels: int | str | None = None,
    broadcast_max_mb: float = 256.0,
    max_batch_mb: float | None = None,
    partitions: int | None = None,
    max_failed_fraction: float = 0.5,
    precision: str = "float32",
    jit: bool = False,
    overlap: str = "auto",
    engine: str = "auto",
    litert_cache: str | None = None,
    trust_model_code: bool = False,
) -> IncrementalResult:
    """Classify the images under ``images_dir`` that no earlier run with this ``checkpoint`` took.

    Appends ``path, prediction, probability, top_k, error, model_version, scored_at`` to the Parquet
    dataset ``output`` (read it with Spark: the ``_spark_metadata`` log lists the committed files) or
    to the table ``output_table``, then stops. ``result.threshold_exceeded`` (and ``result.check()``)
    tell whether more than ``max_failed_fraction`` of this run's rows failed. To re-score everything
    with a new model, use a new checkpoint and a new output. The scoring options are those of
    ``score_images`` (``image_column`` and ``key_columns`` are the files': ``content`` and ``path``;
    other values are refused).
    """
    from image_transfer.api.scoring import score_images

    opts = _file_options(ScoringOptions.merged(options, locals()))
    return _run(
        spark,
        images_dir,
        lambda df: score_images(df, model, top_k=top_k, model_version=model_version, options=opts),
        mode="classify",
        checkpoint=checkpoint,
        output=output,
        output_table=output_table,
        source=source,
        extensions=extensions,
        max_files_per_trigger=max_files_per_trigger,
        max_failed_fraction=opts.max_failed_fraction,
        print_fn=print_fn,
    )


def featurize_new_images(
    spark: Any,
    images_dir: str,
    model: str,
    *,
    checkpoint: str,
    output: str | None = None,
    output_table: str | None = None,
    layer: str | None = None,
    source: str = "auto",
    max_files_per_trigger: int = DEFAULT_MAX_FILES_PER_TRIGGER,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    model_version: str | None = None,
    print_fn: Callable[[str], None] | None = None,
    options: ScoringOptions | None = None,
    image_column: str = "content",
    key_columns: Sequence[str] = ("path",),
    batch_size: int = 64,
    max_image_bytes: int | str | None = None,
    max_pixels: int | str | None = None,
    broadcast_max_mb: float = 256.0,
    max_batch_mb: float | None = None,
    partitions: int | None = None,
    max_failed_fraction: float = 0.5,
    precision: str = "float32",
    jit: bool = False,
    overlap: str = "auto",
    engine: str = "auto",
    litert_cache: str | None = None,
    trust_model_code: bool = False,
) -> IncrementalResult:
    """Embed the new images under ``images_dir`` (as ``score_new_images``): ``path, embedding, error, ...``."""
    from image_transfer.api.scoring import featurize_images

    opts = _file_options(ScoringOptions.merged(options, locals()))
    return _run(
        spark,
        images_dir,
        lambda df: featurize_images(df, model, layer=layer, model_version=model_version, options=opts),
        mode="embed",
        checkpoint=checkpoint,
        output=output,
        output_table=output_table,
        source=source,
        extensions=extensions,
        max_files_per_trigger=max_files_per_trigger,
        max_failed_fraction=opts.max_failed_fraction,
        print_fn=print_fn,
    )


def _file_options(options: ScoringOptions) -> ScoringOptions:
    """Refuse what does not apply to image files: their bytes are ``content``, their key is ``path``."""
    for name, value in (("image_column", "content"), ("key_columns", ("path",))):
        if getattr(options, name) != value:
            raise UserError(
                f"incremental scoring reads image files: {name} ({ScoringOptions.flag(name)}) does not apply"
            )
    return options


__all__ = [
    "DEFAULT_MAX_FILES_PER_TRIGGER",
    "SOURCES",
    "IncrementalResult",
    "featurize_new_images",
    "score_new_images",
]
