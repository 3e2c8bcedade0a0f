"""Reading inputs and writing outputs atomically (staging location, then a rename into place)."""

from __future__ import annotations

import math
import os
import re
import uuid
from typing import Any

from image_transfer.errors import UserError


def read_input(spark: Any, *, path: str | None = None, table: str | None = None) -> Any:
    """The input DataFrame from a Parquet path or a table name; UserError when it cannot be read."""
    if (path is None) == (table is None):
        raise UserError("give exactly one of an input path or an input table")
    try:
        return spark.read.parquet(path) if path is not None else spark.table(table)
    except Exception as exc:  # AnalysisException: missing path or table, not Parquet
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read input {path or table}: {first}") from exc


def _qualified(path: str) -> str:
    """Local paths become absolute (Hadoop resolves relative ones against the JVM's directory).

    A path with a scheme (``file:/x``, ``file:///x``, ``dbfs:/x``, ``s3://b/x``) is left as it is.
    """
    return path if re.match(r"^[A-Za-z][\w+.-]*:/", path) else os.path.abspath(path)


COMMIT_MARKER = "_IMAGE_TRANSFER_COMPLETE"  # in an output directory: its data files, counted when written


class _HadoopFs:
    """The output's file system through Spark's Hadoop FileSystem (classic sessions: any URI Spark can write)."""

    def __init__(self, spark: Any, path: str) -> None:
        self._jvm = spark.sparkContext._jvm
        self._path = self._jvm.org.apache.hadoop.fs.Path
        self._fs = self._path(path).getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())

    def qualify(self, path: str) -> str:
        return str(self._fs.makeQualified(self._path(path)).toString())

    def join(self, parent: str, name: str) -> str:
        return str(self._path(self._path(parent), name).toString())

    def parent(self, path: str) -> str:
        return str(self._path(path).getParent().toString())

    def exists(self, path: str) -> bool:
        return bool(self._fs.exists(self._path(path)))

    def delete(self, path: str) -> None:
        self._fs.delete(self._path(path), True)

    def rename(self, source: str, target: str) -> bool:
        return bool(self._fs.rename(self._path(source), self._path(target)))

    def mkdirs(self, path: str) -> None:
        self._fs.mkdirs(self._path(path))

    def glob(self, pattern: str) -> list[tuple[str, int]]:
        """(path, modification time) of what matches."""
        found = self._fs.globStatus(self._path(pattern)) or []
        return [(str(s.getPath().toString()), int(s.getModificationTime())) for s in found]

    def files(self, directory: str) -> list[tuple[str, int]]:
        """(path relative to ``directory``, size) of every file below it."""
        root = self.qualify(directory).rstrip("/")
        it = self._fs.listFiles(self._path(directory), True)
        out = []
        while it.hasNext():
            status = it.next()
            out.append((self.qualify(str(status.getPath().toString()))[len(root) + 1 :], int(status.getLen())))
        return out

    def names(self, directory: str) -> list[str]:
        """Names of the entries directly in ``directory``."""
        return [str(st.getPath().getName()) for st in self._fs.listStatus(self._path(directory))]

    def size(self, path: str) -> int:
        return int(self._fs.getFileStatus(self._path(path)).getLen())

    def write_text(self, path: str, text: str) -> None:
        out = self._fs.create(self._path(path), True)
        try:
            out.write(bytearray(text.encode()))
        finally:
            out.close()

    def read_text(self, path: str) -> str:
        stream = self._fs.open(self._path(path))
        try:
            return str(self._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
        finally:
            stream.close()


class _LocalFs:
    """The output's file system from this process (Spark Connect: no JVM gateway; a path the driver sees)."""

    def qualify(self, path: str) -> str:
        return os.path.abspath(path)

    def join(self, parent: str, name: str) -> str:
        return os.path.join(parent, name)

    def parent(self, path: str) -> str:
        return os.path.dirname(os.path.abspath(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def delete(self, path: str) -> None:
        import shutil

        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)

    def rename(self, source: str, target: str) -> bool:
        try:
            os.rename(source, target)
            return True
        except OSError:
            return False

    def mkdirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def glob(self, pattern: str) -> list[tuple[str, int]]:
        import glob

        return [(p, int(os.path.getmtime(p) * 1000)) for p in glob.glob(pattern)]

    def files(self, directory: str) -> list[tuple[str, int]]:
        out = []
        for root, _, names in os.walk(directory):
            for name in names:
                full = os.path.join(root, name)
                out.append((os.path.relpath(full, directory), os.path.getsize(full)))
        return out

    def names(self, directory: str) -> list[str]:
        return os.listdir(directory)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def write_text(self, path: str, text: str) -> None:
        with open(path, "w") as fh:
            fh.write(text)

    def read_text(self, path: str) -> str:
        with open(path) as fh:
            return fh.read()


def _driver_path(path: str) -> str:
    """A path this process can open for an output under Spark Connect; UserError for a remote URI."""
    if path.startswith("dbfs:/") and not path.startswith("dbfs://"):
        rest = "/" + path[len("dbfs:/") :].lstrip("/")
        return rest if rest.startswith("/Volumes/") else "/dbfs" + rest
    if path.startswith("file:"):
        return "/" + path[len("file:") :].lstrip("/")
    if "://" in path:
        raise UserError(
            f"under Spark Connect the output must be a path this process can see (e.g. /Volumes/...), not {path}; "
            "or write a table (--output-table)"
        )
    return os.path.abspath(path)


def file_system(spark: Any, path: str) -> tuple[Any, str]:
    """(file system, ``path`` as it names it) for the files behind outputs and checkpoints.

    Spark's Hadoop file system on a classic session; under Spark Connect (no JVM gateway) this process's
    own file operations, on a path it can see (local, ``/Volumes/...``, ``/dbfs/...``).
    """
    from image_transfer.stats import is_connect

    if is_connect(spark):
        return _LocalFs(), _driver_path(path)
    fs = _HadoopFs(spark, _qualified(path))
    return fs, fs.qualify(_qualified(path))


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
