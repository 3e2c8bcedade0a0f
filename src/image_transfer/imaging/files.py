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


def _hadoop_path_string(uri: str) -> str:
    """``file:///a%20b`` (a URI, as ``inputFiles`` gives) -> ``file:/a b`` (as the ``path`` column has it)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if not parts.scheme:
        return uri
    if parts.netloc:
        return f"{parts.scheme}://{parts.netloc}{unquote(parts.path)}"
    return f"{parts.scheme}:{unquote(parts.path)}"
