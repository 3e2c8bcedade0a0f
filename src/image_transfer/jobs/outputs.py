"""Reading inputs and writing outputs atomically (staging location, then a rename into place)."""

from __future__ import annotations

import math
import uuid
from typing import Any

from image_transfer.errors import UserError
from image_transfer.fs import COMMIT_MARKER, file_system


def read_input(spark: Any, *, path: str | None = None, table: str | None = None) -> Any:
    """The input DataFrame from a Parquet path or a table name; UserError when it cannot be read."""
    if (path is None) == (table is None):
        raise UserError("give exactly one of an input path or an input table")
    try:
        return spark.read.parquet(path) if path is not None else spark.table(table)
    except Exception as exc:  # AnalysisException: missing path or table, not Parquet
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read input {path or table}: {first}") from exc


def _data_files(fs: Any, directory: str) -> tuple[int, int]:
    """(files, bytes) of the data in ``directory`` (recursive; names starting ``_`` or ``.`` are not data)."""
    files = size = 0
    for relative, length in fs.files(directory):
        if any(part.startswith(("_", ".")) for part in relative.split("/") if part):
            continue
        files += 1
        size += length
    return files, size


def _mark_complete(fs: Any, directory: str) -> None:
    """Write the commit marker: the number and total size of the data files now in ``directory``."""
    files, size = _data_files(fs, directory)
    fs.write_text(fs.join(directory, COMMIT_MARKER), f"files={files} bytes={size}\n")


def _state(fs: Any, directory: str) -> str:
    """``complete`` (marker and data match), ``partial`` (marker, data missing), ``unmarked`` or ``missing``."""
    if not fs.exists(directory):
        return "missing"
    marker = fs.join(directory, COMMIT_MARKER)
    if not fs.exists(marker):
        return "unmarked"
    text = fs.read_text(marker)
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    files, size = _data_files(fs, directory)
    return "complete" if (str(files), str(size)) == (fields.get("files"), fields.get("bytes")) else "partial"


def _recover(fs: Any, dest: str) -> None:
    """Clean up after a run that was killed while writing ``dest`` (one writer per output at a time).

    A killed run never counts: its staging data is deleted, complete or not. A ``previous`` directory
    means it was killed while swapping the outputs; the commit marker (written in the staging directory
    once the write succeeded, so it travels with the data) decides which output is complete:

    - ``dest`` complete (the swap finished): the previous output is deleted;
    - ``dest`` missing (killed between the two renames), unmarked or partial (killed during a rename
      that copies file by file, as on object stores): the newest complete previous output is put back;
    - nothing complete, but a marker shows the data split between ``dest`` and ``previous`` (killed while
      moving the previous output aside file by file): its files are moved back together.

    A previous output is never discarded for a partial one. Outputs written before markers existed
    count as complete when they are the only candidate.
    """
    parent, name = fs.parent(dest), dest.rstrip("/").rsplit("/", 1)[-1]
    for path, _ in fs.glob(fs.join(parent, f".{name}.staging-*")):
        fs.delete(path)
    previous = [p for p, _ in sorted(fs.glob(fs.join(parent, f".{name}.previous-*")), key=lambda x: -x[1])]
    if not previous:
        return
    states = [(_state(fs, path), path) for path in previous]
    dest_state = _state(fs, dest)
    found = {st for st, _ in states}
    if dest_state != "complete" and "complete" not in found and "partial" in {dest_state, *found}:
        # Killed while moving the previous output aside file by file: its files are in both places.
        for _, path in states:
            _move_files(fs, path, dest)
        if _state(fs, dest) != "complete":
            return  # nothing complete to recover: leave every directory as it is
        dest_state = "complete"
    if dest_state != "complete":
        keep = next((p for st, p in states if st == "complete"), None)
        keep = keep or next((p for st, p in states if st == "unmarked"), None)  # older versions: no marker
        if keep is None:
            return  # nothing complete to put back: leave every directory as it is
        if fs.exists(dest):
            fs.delete(dest)
        fs.rename(keep, dest)
    for _, path in states:
        if fs.exists(path):
            fs.delete(path)


def _move_files(fs: Any, source: str, target: str) -> None:
    """Move every file under ``source`` to the same relative place under ``target``."""
    for relative, _ in fs.files(source):
        to = fs.join(target, relative)
        fs.mkdirs(fs.parent(to))
        if not fs.exists(to):
            fs.rename(fs.join(source, relative), to)


def write_output(
    df: Any,
    path: str,
    *,
    table: str | None = None,
    rows_per_file: int | None = None,
    rows: int | None = None,
) -> Any:
    """Write ``df`` as Parquet at ``path`` atomically and return it as read back from ``path``.

    The data is written to a hidden staging directory beside ``path``, marked complete
    (``_IMAGE_TRANSFER_COMPLETE``) and renamed into place; a previous output is kept until then. A failed
    write leaves no staging data and the previous output (if any) untouched; what a killed run left
    behind is cleaned up by the next (``_recover``). With ``table``, the written data is also saved as
    that table (overwritten). On a classic session the file operations go through Spark's Hadoop file
    system (any URI); under Spark Connect, which has no JVM gateway, this process does them, so ``path``
    must be one it can see (local, ``/Volumes/...``, ``/dbfs/...``).

    ``rows_per_file`` caps the rows of each file (``maxRecordsPerFile``); given the number of ``rows``
    too, the rows are first redistributed into ``ceil(rows / rows_per_file)`` partitions by a shuffle
    *after* everything ``df`` computes (not a ``coalesce``, which would run the upstream work, such as
    scoring, in fewer tasks), so the output is that many files of even size, not one per task.
    """
    spark = df.sparkSession
    fs, dest = file_system(spark, path)
    token = uuid.uuid4().hex[:12]
    parent, name = fs.parent(dest), dest.rstrip("/").rsplit("/", 1)[-1]
    staging = fs.join(parent, f".{name}.staging-{token}")
    backup = fs.join(parent, f".{name}.previous-{token}")
    fs.mkdirs(parent)
    _recover(fs, dest)
    writer = df.write.mode("error")
    if rows_per_file is not None:
        if rows_per_file < 1:
            raise UserError(f"rows per file must be at least 1, got {rows_per_file}")
        if rows is not None:
            writer = df.repartition(max(1, math.ceil(rows / rows_per_file))).write.mode("error")
        writer = writer.option("maxRecordsPerFile", rows_per_file)
    try:
        writer.parquet(staging)
        _mark_complete(fs, staging)
    except BaseException:
        fs.delete(staging)
        raise
    had_previous = fs.exists(dest)
    if had_previous and not fs.rename(dest, backup):
        fs.delete(staging)
        raise UserError(f"cannot move the previous output at {path} aside")
    if not fs.rename(staging, dest):
        if had_previous:
            fs.rename(backup, dest)
        fs.delete(staging)
        raise UserError(f"cannot move the new output into place at {path}")
    if had_previous:
        fs.delete(backup)
    written = spark.read.parquet(dest)
    if table:
        written.write.mode("overwrite").saveAsTable(table)
    return written
