"""Writing outputs atomically (staging location, then a rename into place), and tables.

An output is only ever written over a previous output of the same command (its commit marker says
which), a missing path or an empty folder, unless asked to ``overwrite``; never over its own input.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from image_transfer.errors import RunFailed, UserError
from image_transfer.storage.fs import COMMIT_MARKER, STREAM_MARKER, file_system
from image_transfer.storage.lease import OutputLease, hold

# ---- where an output may be written ---------------------------------------------------------------------


def local_path(path: str) -> str | None:
    """The resolved local path of ``path``, ``file:/x``, ``file:///x`` or ``file://localhost/x``; None for
    another scheme (``dbfs:/``, ``s3://``)."""
    if path.startswith("file:"):
        rest = path[len("file:") :]
        if rest.startswith("//"):
            host, _, tail = rest[2:].partition("/")
            if host not in ("", "localhost"):
                return None
            rest = "/" + tail
        return os.path.realpath(rest)
    if re.match(r"^[A-Za-z][\w+.-]*:/", path):
        return None
    return os.path.realpath(path)


def _glob_root(path: str) -> str:
    """``path`` up to its first component with a glob character (``data/*.parquet`` -> ``data``)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?[{"):
            return "/".join(parts[:i]) or ("/" if path.startswith("/") else ".")
    return path


def _location(spark: Any, path: str) -> tuple[str, str] | None:
    """(file system, absolute path) to compare places by, or None when it takes a session to know.

    Without a session: local paths and ``file:`` URIs, resolved (symlinks too); a path without a scheme
    is not local on Databricks (Spark resolves it on DBFS). With one: what Spark's Hadoop file system
    qualifies it to (a classic session) or the driver path (Spark Connect).
    """
    from image_transfer.runtime import on_databricks

    path = _glob_root(path)
    if spark is None:
        if on_databricks() and not path.startswith("file:"):
            return None
        local = local_path(path)
        return ("file://", local) if local is not None else None
    try:
        _, where = file_system(spark, path)
    except Exception:  # noqa: BLE001 - no file system for this scheme (models:/...): not a place
        return None
    parts = urlsplit(where)
    if parts.scheme in ("", "file"):
        return "file://", os.path.realpath(parts.path)
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/") or "/"


def _relation(output: tuple[str, str], source: tuple[str, str]) -> str | None:
    """``is``, ``contains`` or ``is inside`` when the output's place overlaps the input's."""
    if output[0] != source[0]:
        return None
    out, src = output[1].rstrip("/") or "/", source[1].rstrip("/") or "/"
    if out == src:
        return "is"
    if src.startswith(out.rstrip("/") + "/"):
        return "contains"
    if out.startswith(src.rstrip("/") + "/"):
        return "is inside"
    return None


def _owner(fs: Any, directory: str) -> str | None:
    """The command recorded in ``directory``'s commit marker ("" for a marker without one); None: no marker."""
    marker = fs.join(directory, COMMIT_MARKER)
    if not fs.exists(marker):
        return None
    try:
        text = fs.read_text(marker)
    except Exception:  # noqa: BLE001 - unreadable (a checksum error): ours, by whom unknown
        return ""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    return fields.get("command", "")


def _is_dir(fs: Any, path: str) -> bool:
    hadoop = getattr(fs, "_fs", None)  # fs._HadoopFs: Spark's Hadoop FileSystem
    if hadoop is None:
        return os.path.isdir(path)
    return bool(hadoop.getFileStatus(fs._path(path)).isDirectory())


def _existing(fs: Any, dest: str) -> tuple[str, str | None]:
    """What is at ``dest``: ``missing``, ``empty``, ``file``, ``foreign`` (not an output of this project),
    or ``output`` with the command that wrote it ("" when its marker predates recording it).

    A run killed while swapping outputs leaves ``.NAME.previous-*`` beside ``dest``: those say whose
    output it is (``_recover`` puts it back before writing).
    """
    parent, name = fs.parent(dest), dest.rstrip("/").rsplit("/", 1)[-1]
    previous = [p for p, _ in sorted(fs.glob(fs.join(parent, f".{name}.previous-*")), key=lambda x: -x[1])]
    owners = [o for o in (_owner(fs, p) for p in previous) if o is not None] or ([""] if previous else [])
    if fs.exists(dest):
        if not _is_dir(fs, dest):
            return "file", None
        owner = _owner(fs, dest)
        if owner is not None:
            return "output", owner
        if owners:
            return "output", owners[0]
        return ("empty", None) if not fs.names(dest) else ("foreign", None)
    return ("output", owners[0]) if owners else ("missing", None)


def replace_refusal(fs: Any, dest: str, *, command: str | None, path: str | None = None) -> str | None:
    """Why an output must not replace what is at ``dest`` without being told to overwrite it, or None.

    Free to write: nothing there, an empty folder, or a previous output of this project written by
    ``command`` (or by any command when ``command`` is None; an old marker records none).
    """
    kind, owner = _existing(fs, dest)
    shown = path or dest
    if kind == "file":
        return f"{shown} is an existing file, not an output of image-transfer"
    if kind == "foreign" and (fs.exists(fs.join(dest, STREAM_MARKER)) or fs.exists(fs.join(dest, "_spark_metadata"))):
        return f"{shown} holds an incremental output (a streaming checkpoint's), not a batch output"
    if kind == "foreign":
        return f"{shown} exists and is not an output of image-transfer (it has no {COMMIT_MARKER} marker)"
    if kind == "output" and owner and command and owner != command:
        return f"{shown} holds the output of `image-transfer {owner}`, not of `{command}`"
    return None


def check_output(
    output: str,
    *,
    command: str | None,
    inputs: Sequence[str | None] = (),
    overwrite: bool = False,
    append: bool = False,
    spark: Any = None,
    flag: str = "--output",
) -> bool:
    """Refuse (UserError) an ``output`` that overlaps an input, or would replace what it must not.

    The output may not be, contain or lie inside an input (``append``: be or lie inside one), even with
    ``overwrite``. Unless ``overwrite`` or ``append``, what is at ``output`` must be free to replace
    (``replace_refusal``). Without a session (``spark`` None) only local paths and ``file:`` URIs are
    checked; returns whether everything was (False: check again with the session).
    """
    from image_transfer.storage.fs import _LocalFs

    place = _location(spark, output)
    sources = {source: _location(spark, source) for source in inputs if source}
    for source, where in sources.items():
        relation = _relation(place, where) if place is not None and where is not None else None
        if relation is None or (append and relation == "contains"):
            continue
        harm = "destroy the input" if relation != "is inside" else "mix the output into the input"
        what = {"is": "is the input", "contains": "contains the input", "is inside": "lies inside the input"}[relation]
        raise UserError(f"{flag} {output} {what} {source}: writing there would {harm}; give an {flag} outside it")
    if place is not None and not (append or overwrite):
        fs, dest = (_LocalFs(), place[1]) if spark is None else file_system(spark, output)
        refusal = replace_refusal(fs, dest, command=command, path=output)
        if refusal:
            raise UserError(f"{refusal}: not replaced; give --overwrite to replace it, or another {flag}")
    return place is not None and all(where is not None for where in sources.values())


def _data_files(fs: Any, directory: str) -> tuple[int, int]:
    """(files, bytes) of the data in ``directory`` (recursive; names starting ``_`` or ``.`` are not data)."""
    files = size = 0
    for relative, length in fs.files(directory):
        if any(part.startswith(("_", ".")) for part in relative.split("/") if part):
            continue
        files += 1
        size += length
    return files, size


def _mark_complete(fs: Any, directory: str, command: str | None = None, rows: int | None = None) -> None:
    """Write the commit marker: the number and total size of the data files now in ``directory``, their
    rows and the command that wrote them (when known)."""
    files, size = _data_files(fs, directory)
    by = (f" rows={rows}" if rows is not None else "") + (f" command={command}" if command else "")
    fs.write_text(fs.join(directory, COMMIT_MARKER), f"files={files} bytes={size}{by}\n")


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
    """Clean up after a run that was killed while writing ``dest`` (call it holding the output's lease:
    any other run's staging data is then a killed run's, whose lease expired).

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


@contextmanager
def output_lease(
    spark: Any, path: str, *, command: str | None = None, wait: float | None = None, table: str | None = None
) -> Iterator[OutputLease]:
    """Hold the lease on the output ``path`` for the block (``lease.hold``): one writer per output at a time.

    Another run's live lease: UserError naming it at once, or after waiting ``wait`` seconds for it.
    ``write_output`` takes it itself; a command takes it first to fail before any work. With ``table``,
    the table's lease is held too (``table_lease_path``).
    """
    fs, dest = file_system(spark, path)
    fs.mkdirs(fs.parent(dest))
    with hold(fs, dest, command=command, wait=wait, shown=path) as lease:
        if not table:
            yield lease
            return
        with hold(fs, table_lease_path(fs, dest, table), command=command, wait=wait, shown=f"table {table}"):
            yield lease


def table_lease_path(fs: Any, dest: str, table: str) -> str:
    """What the lease on ``table`` is taken on when it is written from the output ``dest``: ``TABLE.table``
    in the output's folder (its lease file ``.TABLE.table.lease`` beside the output's own).

    A path every writer of the output can reach, on Databricks too (a Volume, DBFS, cloud storage) and
    under Spark Connect, where the metastore has no lock to offer: writers of one table whose outputs
    share a folder exclude one another.
    """
    return fs.join(fs.parent(dest), f"{table.replace('`', '').lower()}.table")


TABLE_PROPERTY = "image_transfer.command"  # what marks a table as a command's output (its name)


def _table_sql_name(table: str) -> str:
    """``table`` with each part in backquotes, for SQL; UserError for a name that cannot be quoted."""
    parts = [part.strip("`") for part in table.split(".")]
    if not 1 <= len(parts) <= 3 or any(not part or "`" in part for part in parts):
        raise UserError(f"--output-table {table}: give a table name as table, schema.table or catalog.schema.table")
    return ".".join(f"`{part}`" for part in parts)


def check_table(spark: Any, table: str | None, *, command: str | None, overwrite: bool = False) -> None:
    """Refuse (UserError) to replace an existing ``table`` that is not an output of ``command`` (any
    command when None), which its ``TABLE_PROPERTY`` records, unless ``overwrite``."""
    if not table:
        return
    name = _table_sql_name(table)
    if overwrite or not spark.catalog.tableExists(table):
        return
    properties = {row[0]: row[1] for row in spark.sql(f"SHOW TBLPROPERTIES {name}").collect()}
    written_by = properties.get(TABLE_PROPERTY)
    if written_by is None:
        what = "exists and is not an output of image-transfer"
    elif command is not None and written_by != command:
        what = f"is the output of image-transfer {written_by}, not {command}"
    else:
        return
    raise UserError(f"--output-table {table} {what}: not replaced; give --overwrite to replace it, or another table")


def save_table(df: Any, table: str, *, command: str | None) -> None:
    """Save ``df`` as ``table`` (replacing it: ``check_table`` first) marked as ``command``'s output.

    The mark (``TABLE_PROPERTY``) is made with the table, in the same step: ``CREATE OR REPLACE TABLE
    ... AS SELECT`` where the catalog has it (Delta, Unity Catalog); where it has not (the session
    catalog's file tables), the old table is dropped first and the new one created with its mark, so a
    run killed in between leaves no table (the next run creates it), never an unmarked one.
    """
    spark = df.sparkSession
    provider = spark.conf.get("spark.sql.sources.default", "parquet")
    mark = command or "image-transfer"

    def writer() -> Any:
        return df.writeTo(table).using(provider).tableProperty(TABLE_PROPERTY, mark)

    try:
        writer().createOrReplace()
        return
    except Exception as exc:  # AnalysisException: this catalog does not replace tables as one step
        if "TABLE_OPERATION" not in str(exc) and "REPLACE TABLE" not in str(exc):
            raise
    spark.sql(f"DROP TABLE IF EXISTS {_table_sql_name(table)}")
    writer().create()


def _discard(fs: Any, path: str) -> None:
    """Delete a failed write's staging data; a failure here never hides the write's own error.

    After Ctrl-C the main thread's Py4J connection may be the interrupted one: a second try runs on a
    thread of its own (a connection of its own). What stays is cleaned up by the next run (``_recover``).
    """
    import threading

    try:
        fs.delete(path)
        return
    except Exception:  # noqa: BLE001 - try once more off this thread
        pass
    retry = threading.Thread(target=lambda: _ignore_errors(fs.delete, path), name="image-transfer-cleanup")
    retry.start()
    retry.join(timeout=30)


def _ignore_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - best effort: the next run cleans up
        pass


def write_output(
    df: Any,
    path: str,
    *,
    table: str | None = None,
    rows_per_file: int | None = None,
    rows: int | None = None,
    command: str | None = None,
    overwrite: bool = False,
    wait: float | None = None,
) -> Any:
    """Write ``df`` as Parquet at ``path`` atomically and return it as read back from ``path``.

    ``path`` must be missing, an empty folder or a previous output of ``command`` (any command when
    None), which the marker records: anything else (a file, a folder of other data, another command's
    output) is refused with a UserError before anything is touched, unless ``overwrite``.

    One writer at a time: the write holds the output's lease (``output_lease``; another run's live lease
    is a UserError naming it, or is waited for ``wait`` seconds), and ``table``'s lease with it. The data
    is written to a hidden staging directory beside ``path``, counted (the Parquet footers' rows: with
    ``rows`` given, the staged rows must equal it, else RunFailed and the previous output untouched),
    marked complete (``_IMAGE_TRANSFER_COMPLETE``) and renamed into place; a previous output is kept until
    then. A failed write leaves no staging data and the previous output (if any) untouched; what a killed run left
    behind is cleaned up by the next once the killed run's lease has expired (``_recover``). With
    ``table``, the written data is also saved as that table, replacing it; an existing table that is not
    an output of ``command`` is refused first, unless ``overwrite`` (``check_table``). On a classic
    session the file operations go through Spark's Hadoop file system (any URI); under Spark Connect,
    which has no JVM gateway, this process does them, so ``path`` must be one it can see (local,
    ``/Volumes/...``, ``/dbfs/...``).

    ``rows_per_file`` caps the rows of each file (``maxRecordsPerFile``); given the number of ``rows``
    too, the rows are first redistributed into ``ceil(rows / rows_per_file)`` partitions by a shuffle
    *after* everything ``df`` computes (not a ``coalesce``, which would run the upstream work, such as
    scoring, in fewer tasks), so the output is that many files of even size, not one per task.
    """
    spark = df.sparkSession
    if rows_per_file is not None and rows_per_file < 1:
        raise UserError(f"rows per file must be at least 1, got {rows_per_file}")
    with output_lease(spark, path, command=command, wait=wait, table=table) as lease:
        return _write_leased(df, path, lease, table, rows_per_file, rows, command, overwrite)


def _write_leased(
    df: Any,
    path: str,
    lease: OutputLease,
    table: str | None,
    rows_per_file: int | None,
    rows: int | None,
    command: str | None,
    overwrite: bool,
) -> Any:
    """``write_output``'s work, holding the output's lease."""
    spark = df.sparkSession
    fs, dest = file_system(spark, path)
    if not overwrite:
        refusal = replace_refusal(fs, dest, command=command, path=path)
        if refusal:
            raise UserError(f"{refusal}: not replaced (overwrite replaces it)")
    check_table(spark, table, command=command, overwrite=overwrite)
    token = uuid.uuid4().hex[:12]
    parent, name = fs.parent(dest), dest.rstrip("/").rsplit("/", 1)[-1]
    staging = fs.join(parent, f".{name}.staging-{token}")
    backup = fs.join(parent, f".{name}.previous-{token}")
    _recover(fs, dest)
    writer = df.write.mode("error")
    if rows_per_file is not None:
        if rows is not None:
            writer = df.repartition(max(1, math.ceil(rows / rows_per_file))).write.mode("error")
        writer = writer.option("maxRecordsPerFile", rows_per_file)
    try:
        writer.parquet(staging)
        # From the Parquet footers, of the part files named one by one: Spark warns of (and ignores) a hidden
        # folder named as the path, and Spark 4 logs a trace for a glob.
        parts = [fs.join(staging, rel) for rel, _ in fs.files(staging) if rel.endswith(".parquet") and "/" not in rel]
        staged = spark.read.parquet(*parts).count() if parts else 0
        if rows is not None and staged != rows:
            raise RunFailed(
                f"the staged output of {path} has {staged:,} rows, not the {rows:,} expected: "
                "not replaced (the previous output, if any, is untouched)"
            )
        _mark_complete(fs, staging, command, staged)
        lease.check()
    except BaseException:
        _discard(fs, staging)
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
        save_table(written, table, command=command)
    return written
