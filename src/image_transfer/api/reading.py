"""Reading: a folder tree of image files, or a Parquet dataset or table, as a DataFrame.

>>> from image_transfer import read_images, read_input
>>> images = read_images(spark, "/Volumes/main/ml/photos")          # path, content
>>> rows = read_input(spark, table="main.ml.photos")                   # any Parquet dataset or table

Reading fails with one line (``UserError``) that says what the path is when it is not what was asked for
(a folder of images given as Parquet, a table name given as a path).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from image_transfer.errors import UserError
from image_transfer.imaging.files import IMAGE_EXTENSIONS, read_image_files
from image_transfer.runtime import on_databricks
from image_transfer.storage.fs import file_system
from image_transfer.storage.outputs import local_path

_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTENSIONS)
_TABLE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*){1,2}$")  # schema.table or catalog.schema.table


def read_images(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Any:
    """A folder tree of image files as a DataFrame ``path, content`` (every matching file, empty ones too)."""
    return read_image_files(spark, folder, extensions=extensions)


def read_input(
    spark: Any,
    *,
    path: str | None = None,
    table: str | None = None,
    images_hint: str | None = None,
    table_flag: str | None = None,
) -> Any:
    """The input DataFrame from a Parquet path or a table name; UserError (one line) when it cannot be read.

    ``images_hint`` is said when ``path`` turns out to be a folder of image files, not Parquet (what
    to run instead); ``table_flag`` when a missing ``path`` is spelled like a table name.
    """
    if (path is None) == (table is None):
        raise UserError("give exactly one of an input path or an input table")
    if path is not None:
        images = _image_files_in(spark, path)
        if images:
            hint = f": {images_hint}" if images_hint else ""
            raise UserError(f"cannot read input {path}: it is a folder of image files ({images}), not Parquet{hint}")
        other = _local_non_parquet(path)
        if other and os.path.splitext(other)[1].lower() in _IMAGE_SUFFIXES:
            hint = f": {images_hint}" if images_hint else ""
            raise UserError(f"cannot read input {path}: it holds image files ({other}), not Parquet{hint}")
        if other:
            raise UserError(f"cannot read input {path}: not a Parquet dataset ({other} is not a Parquet file)")
    try:
        return spark.read.parquet(path) if path is not None else spark.table(table)
    except Exception as exc:  # AnalysisException: missing path or table; not Parquet
        reason = _read_error(exc, images_hint)
        if table_flag and path and "PATH_NOT_FOUND" in str(exc) and _TABLE_NAME.match(path):
            reason += f" (a table? give it with {table_flag})"
        raise UserError(f"cannot read input {path or table}: {reason}") from exc


def looks_like_table(name: str) -> bool:
    """``name`` is spelled like a table name (``schema.table`` or ``catalog.schema.table``)."""
    return bool(_TABLE_NAME.match(name))


def _read_error(exc: BaseException, images_hint: str | None) -> str:
    """One line for a failed read: the Spark error class and what it means, without the JVM stack."""
    text = str(exc)
    if "UNABLE_TO_INFER_SCHEMA" in text:
        return "no Parquet data there (an empty folder, or files that are not Parquet)" + (
            f"; {images_hint}" if images_hint else ""
        )
    found = re.search(r"(\S+) is not a Parquet file", text)
    if found or "CANNOT_READ_FILE_FOOTER" in text:
        which = f" ({found.group(1)} is not a Parquet file)" if found else ""
        return f"not a Parquet dataset{which}; give a Parquet file or folder, or a table"
    classed = re.search(r"\[[A-Z_]+(\.[A-Z_]+)?\][^\n]*", text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (classed.group(0).strip() if classed else lines[0] if lines else type(exc).__name__)[:500]


def _local_non_parquet(path: str, *, sample: int = 3) -> str | None:
    """A local input's data file that is not Parquet (no ``PAR1`` at both ends), when none of its first
    ``sample`` data files is Parquet; else None (also for a path that is not local, or is missing)."""
    local = local_path(path) if not on_databricks() or path.startswith("file:") else None
    if local is None or not os.path.exists(local):
        return None
    if os.path.isfile(local):
        files = [local]
    else:
        files = []
        for root, dirs, names in os.walk(local):
            dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(("_", "."))]
            if len(files) >= sample:
                break
    first = None
    for name in files[:sample]:
        try:
            with open(name, "rb") as fh:
                head = fh.read(4)
                fh.seek(max(0, os.path.getsize(name) - 4))
                tail = fh.read(4)
        except OSError:
            return None  # unreadable here: Spark says why
        if head == tail == b"PAR1":
            return None
        first = first or name
    return first


def _image_files_in(spark: Any, path: str, *, folders: int = 20) -> str:
    """``27 .png`` when ``path`` holds image files and no Parquet file (itself and its first ``folders``
    subfolders, names only); else ""."""
    try:
        fs, where = file_system(spark, path)
        if not fs.exists(where):
            return ""
        names = [(where, n) for n in fs.names(where)]
        for sub in [n for _, n in names if "." not in n and not n.startswith(("_", "."))][:folders]:
            try:
                names += [(sub, n) for n in fs.names(fs.join(where, sub))]
            except Exception:  # noqa: BLE001 - a file without a suffix, or unreadable: not a folder
                continue
    except Exception:  # noqa: BLE001 - only a better message is at stake; the read says the rest
        return ""
    suffixes = [os.path.splitext(n)[1].lower() for _, n in names if not n.startswith(("_", "."))]
    if ".parquet" in suffixes or not any(s in _IMAGE_SUFFIXES for s in suffixes):
        return ""
    counts: dict[str, int] = {}
    for suffix in suffixes:
        if suffix in _IMAGE_SUFFIXES:
            counts[suffix] = counts.get(suffix, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
