"""Reading folders of image files into DataFrames ``path, content``."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")
EVERY_FILE = "*"  # as an extension: every file, whatever its name (the content decides)


def extension_glob(extensions: Sequence[str]) -> str:
    """The ``pathGlobFilter`` matching file names with one of ``extensions`` (lower or upper case).

    ``*`` among them matches every file.
    """
    if EVERY_FILE in {e.strip() for e in extensions}:
        return "*"
    return "*.{" + ",".join(sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})) + "}"


def read_image_files(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Any:
    """Read a folder tree of image files with Spark's ``binaryFile`` source: ``path``, ``content``.

    Lazy: nothing runs until an action (Spark lists the folder on the driver, as for any file source).
    Files are filtered by extension (case-insensitive; ``*`` takes every file and lets the content
    decide); unreadable and empty images are kept (scoring reports them per row), so every file that
    matched appears in the result. Spark's file sources make no row for a zero-byte file: those come
    back, with empty content, from a listing that runs inside the action on an executor (for folders
    the executors can open as local paths: local, ``file:``, ``/Volumes``, ``/dbfs``; elsewhere a
    zero-byte file has no row). ``skipped_files`` says what the extension filter left out.
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
    local = _local_folder(folder)
    if local is None:
        return df
    return df.unionByName(_empty_files(spark, local, pattern, df.schema))


def _local_folder(folder: str) -> tuple[str, str] | None:
    """(the folder as a local path, the prefix Spark's ``path`` column gives it) or None when not local."""
    if folder.startswith("file:"):
        return "/" + folder[len("file:") :].lstrip("/"), "file:"
    if folder.startswith("dbfs:/") and not folder.startswith("dbfs://"):
        rest = "/" + folder[len("dbfs:/") :].lstrip("/")
        return (rest if rest.startswith("/Volumes/") else "/dbfs" + rest), "dbfs:"
    if "://" in folder:
        return None
    path = os.path.abspath(folder)
    if path.startswith(("/Volumes/", "/dbfs/")):
        return path, "dbfs:"
    return path, "file:"


def _empty_files(spark: Any, local: tuple[str, str], pattern: str, schema: Any) -> Any:
    """A lazy DataFrame ``path, content`` of the zero-byte files under a local folder (listed in the action)."""
    root, prefix = local

    def listing(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for _ in batches:
            found = [_spark_path(p, prefix) for p in zero_byte_files(root, pattern)]
            yield pd.DataFrame({"path": found, "content": [b""] * len(found)})

    return spark.range(1).mapInPandas(listing, schema)


def _spark_path(path: str, prefix: str) -> str:
    """A local path as the ``path`` column names it: ``file:/a/b``, ``dbfs:/Volumes/...``, ``dbfs:/x``."""
    if prefix == "dbfs:" and path.startswith("/dbfs/"):
        return "dbfs:" + path[len("/dbfs") :]
    return prefix + path


def zero_byte_files(root: str, pattern: str) -> list[str]:
    """The zero-byte files below ``root`` whose names match ``pattern`` (as Spark's ``pathGlobFilter``
    does, case as given), hidden names (``.``, ``_``) left out as Spark's listing leaves them."""
    if pattern.startswith("*.{"):
        names = pattern[3:-1].split(",")
        patterns = [f"*.{n}" for n in names]
    else:
        patterns = [pattern]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "_")))
        for name in sorted(files):
            if name.startswith((".", "_")) or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            path = os.path.join(directory, name)
            try:
                if os.path.getsize(path) == 0 and os.path.isfile(path):
                    found.append(path)
            except OSError:
                continue
    return found


def skipped_files(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, int]:
    """The files under ``folder`` (recursive) that ``read_image_files`` leaves out for their extension.

    Counts by extension (lower case, ``""`` for a name without one); one pass over the file listing,
    no file is read (a lazy report: it runs when called). With ``*`` among the extensions nothing is
    skipped. A folder that cannot be listed skips nothing here (the read says why).
    """
    from pyspark.sql import functions as F

    if EVERY_FILE in {e.strip() for e in extensions}:
        return {}
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
