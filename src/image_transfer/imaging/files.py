"""Reading folders of image files into DataFrames ``path, content``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")


def extension_glob(extensions: Sequence[str]) -> str:
    """The ``pathGlobFilter`` matching file names with one of ``extensions`` (lower or upper case)."""
    return "*.{" + ",".join(sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})) + "}"


def read_image_files(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Any:
    """Read a folder tree of image files with Spark's ``binaryFile`` source: ``path``, ``content``.

    Files are filtered by extension (case-insensitive); unreadable and empty images are kept (scoring
    reports them per row), so every file that matched appears in the result.
    """
    from pyspark.sql import functions as F

    from image_transfer.errors import UserError

    pattern = extension_glob(extensions)
    try:
        df = (
            spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", pattern)
            .load(folder)
        )
    except Exception as exc:  # AnalysisException: path does not exist
        raise UserError(f"cannot read images from {folder}: {str(exc).splitlines()[0]}") from exc
    df = df.select(F.col("path"), F.col("content"))
    # Spark's file sources make no row for a zero-byte file; put those back, with empty content.
    listed = df.inputFiles()
    if df.count() == len(listed):
        return df
    seen = {r["path"] for r in df.select("path").collect()}
    empty = sorted({_hadoop_path_string(f) for f in listed} - seen)
    return df.unionByName(spark.createDataFrame([(p, b"") for p in empty], df.schema))


def skipped_files(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, int]:
    """The files under ``folder`` (recursive) that ``read_image_files`` leaves out for their extension.

    Counts by extension (lower case, ``""`` for a name without one); one pass over the file listing,
    no file is read. A folder that cannot be listed skips nothing here (the read says why).
    """
    from pyspark.sql import functions as F

    try:
        listing = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(folder)
    except Exception:  # noqa: BLE001 - AnalysisException: missing folder; read_image_files reports it
        return {}
    suffix = F.lower(F.regexp_extract(F.col("path"), r"\.([^./]+)$", 1)).alias("suffix")
    keep = sorted({e.lower().lstrip(".") for e in extensions})
    rows = listing.select(suffix).where(~F.col("suffix").isin(keep)).groupBy("suffix").count().collect()
    return {r["suffix"]: int(r["count"]) for r in rows}


def describe_skipped(skipped: dict[str, int]) -> str:
    """``3 files with other extensions (2 .txt, 1 without an extension)``, most common first; "" for none."""
    if not skipped:
        return ""
    total = sum(skipped.values())
    kinds = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0] == "", kv[0]))
    parts = [f"{n} .{ext}" if ext else f"{n} without an extension" for ext, n in kinds]
    return f"{total} file{'s' if total != 1 else ''} with other extensions ({', '.join(parts)})"


def _hadoop_path_string(uri: str) -> str:
    """``file:///a%20b`` (a URI, as ``inputFiles`` gives) -> ``file:/a b`` (as the ``path`` column has it)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if not parts.scheme:
        return uri
    if parts.netloc:
        return f"{parts.scheme}://{parts.netloc}{unquote(parts.path)}"
    return f"{parts.scheme}:{unquote(parts.path)}"
