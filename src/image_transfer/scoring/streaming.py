"""Spark's Structured Streaming, read in one adapter: the file sources (``binaryFile``, Auto Loader), and the
layout of a query's checkpoint and of the file sink's log, which are Spark's private files.

What is read, and where Spark keeps it (the same in Spark 3.5 and 4.0-4.3; tests/test_streaming.py
checks it on every supported version): ``<checkpoint>/metadata`` (JSON with the query ``id``),
``<checkpoint>/offsets/<batch>`` (a version line, then one JSON line per source; the file source's has
``logOffset``), ``<checkpoint>/commits/<batch>``, ``<checkpoint>/sources/0/<logOffset>`` (the file source's
log: a version line, then one JSON line per file taken, ``{"path": URI, "batchId": n, ...}``), and the file
sink's ``<output>/_spark_metadata/<batch>`` (``.compact`` every tenth). Nothing else in the package reads
these files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from image_transfer.errors import RunFailed, UserError
from image_transfer.imaging.files import IMAGE_EXTENSIONS, extension_glob
from image_transfer.runtime import on_databricks

SOURCES = ("auto", "cloudFiles", "binaryFile")
DEFAULT_MAX_FILES_PER_TRIGGER = 1000


def resolve_source(source: str, *, databricks: bool | None = None) -> str:
    """``cloudFiles`` or ``binaryFile``; ``auto`` is Auto Loader on Databricks, ``binaryFile`` elsewhere.

    ``databricks``: whether this runs on Databricks (default: ``runtime.on_databricks()``)."""
    if source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    if source != "auto":
        return source
    return "cloudFiles" if (on_databricks() if databricks is None else databricks) else "binaryFile"


def reader_options(source: str, *, extensions: Sequence[str], max_files_per_trigger: int) -> tuple[str, dict[str, str]]:
    """The streaming reader's format and options for a resolved source (``cloudFiles`` or ``binaryFile``)."""
    if max_files_per_trigger < 1:
        raise UserError(f"max files per trigger must be at least 1, got {max_files_per_trigger}")
    glob = extension_glob(extensions)
    if source == "cloudFiles":  # Auto Loader lists recursively; binaryFile needs no schema inference
        return "cloudFiles", {
            "cloudFiles.format": "binaryFile",
            "cloudFiles.includeExistingFiles": "true",
            "cloudFiles.maxFilesPerTrigger": str(max_files_per_trigger),
            "pathGlobFilter": glob,
        }
    if source == "binaryFile":
        return "binaryFile", {
            "recursiveFileLookup": "true",
            "pathGlobFilter": glob,
            "maxFilesPerTrigger": str(max_files_per_trigger),
        }
    raise ValueError(f"not a resolved source: {source!r}")


def binary_file_schema() -> Any:
    """The ``binaryFile`` schema (streaming file sources need it given)."""
    from pyspark.sql.types import BinaryType, LongType, StringType, StructField, StructType, TimestampType

    return StructType(
        [
            StructField("path", StringType(), False),
            StructField("modificationTime", TimestampType(), False),
            StructField("length", LongType(), False),
            StructField("content", BinaryType(), True),
        ]
    )


def read_new_images(
    spark: Any,
    images_dir: str,
    *,
    source: str = "auto",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    max_files_per_trigger: int = DEFAULT_MAX_FILES_PER_TRIGGER,
) -> Any:
    """A streaming DataFrame ``path, content`` of the image files under ``images_dir`` (recursively)."""
    fmt, options = reader_options(
        resolve_source(source), extensions=extensions, max_files_per_trigger=max_files_per_trigger
    )
    stream = spark.readStream.format(fmt).schema(binary_file_schema()).options(**options).load(images_dir)
    return stream.select("path", "content")


# ---- the checkpoint: which micro-batches committed, which files each took --------------------------


def last_batch(spark: Any, folder: str) -> int:
    """The highest batch id logged in ``folder`` (``commits``, ``offsets``, ``_spark_metadata``); -1 when none."""
    from image_transfer.storage.fs import file_system

    fs, path = file_system(spark, folder)
    if not fs.exists(path):
        return -1
    names = [n.removesuffix(".compact") for n in fs.names(path)]
    return max((int(n) for n in names if n.isdigit()), default=-1)


def source_log_offset(spark: Any, checkpoint: str, batch_id: int) -> int:
    """The file source's log offset recorded for a micro-batch (-1 before the first)."""
    if batch_id < 0:
        return -1
    lines = [r.value for r in spark.read.text(f"{checkpoint}/offsets/{batch_id}").collect()]
    for line in lines:
        if "logOffset" in line:
            return int(json.loads(line)["logOffset"])
    raise RunFailed(f"no file source offset in {checkpoint}/offsets/{batch_id}")


def files_taken(spark: Any, checkpoint: str, after: int, upto: int) -> Any:
    """DataFrame ``path`` of the files the binaryFile source took in its log batches ``(after, upto]``."""
    from pyspark.sql import functions as F

    log = spark.read.text(f"{checkpoint}/sources/0").where(F.col("value").startswith("{"))
    batch = F.get_json_object("value", "$.batchId").cast("long")
    uri = F.get_json_object("value", "$.path")
    # The log has URIs (file:///a%20b), the path column Hadoop paths (file:/a b): decode, keeping '+'.
    decoded = F.expr("url_decode(replace(_uri, '+', '%2B'))")
    path = F.regexp_replace(decoded, "^file:///", "file:/")
    taken = log.where((batch > after) & (batch <= upto)).select(uri.alias("_uri"))
    return taken.select(path.alias("path")).distinct()


def checkpoint_id(spark: Any, checkpoint: str) -> str | None:
    """The query id Spark records in the checkpoint (its ``metadata``); None before its first run."""
    from image_transfer.storage.fs import file_system

    fs, path = file_system(spark, f"{checkpoint}/metadata")
    try:
        return str(json.loads(fs.read_text(path))["id"]) if fs.exists(path) else None
    except (ValueError, KeyError, TypeError):
        return None


def readable_when_empty(spark: Any, output: str, schema: Any) -> None:
    """Make a Parquet output no micro-batch has committed to (an empty folder, no new files) readable.

    The file sink makes ``_spark_metadata`` before its first commit; while that log is empty, readers
    find no files and cannot infer a schema. The empty log goes and one empty Parquet file with the
    output's schema comes: readers see no rows, with the columns. The sink's first commit starts a
    new log, which lists only its own files.
    """
    from image_transfer.storage.fs import file_system

    fs, where = file_system(spark, output)
    log = fs.join(where, "_spark_metadata")
    if fs.exists(log):
        fs.delete(log)
    if fs.exists(where) and any(n.endswith(".parquet") for n in fs.names(where)):
        return
    spark.createDataFrame([], schema).write.mode("append").parquet(output)


def stop(query: Any) -> None:
    """Stop a streaming query that is still running (what stopping raises is not the caller's error)."""
    try:
        if query.isActive:
            query.stop()
    except Exception:  # noqa: BLE001 - the error that ended the loop is the one to report
        pass
