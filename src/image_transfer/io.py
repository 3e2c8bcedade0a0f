"""Reading inputs and writing outputs atomically (staging location, then a rename into place)."""

from __future__ import annotations

import os
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
    """Local paths become absolute (Hadoop resolves relative ones against the JVM's directory)."""
    return path if "://" in path or path.startswith("dbfs:") else os.path.abspath(path)


def _recover(fs: Any, hadoop_path: Any, parent: Any, dest: Any) -> None:
    """Clean up after a run that was killed while writing ``dest`` (one writer per output at a time).

    Its staging data is incomplete and is deleted. If it was killed between moving the previous
    output aside and moving the new one in, the previous output is put back.
    """
    name = dest.getName()
    for status in fs.globStatus(hadoop_path(parent, f".{name}.staging-*")) or []:
        fs.delete(status.getPath(), True)
    previous = sorted(
        fs.globStatus(hadoop_path(parent, f".{name}.previous-*")) or [], key=lambda s: s.getModificationTime()
    )
    for status in previous:
        if not fs.exists(dest):
            fs.rename(status.getPath(), dest)
        else:
            fs.delete(status.getPath(), True)


def write_output(df: Any, path: str, *, table: str | None = None) -> Any:
    """Write ``df`` as Parquet at ``path`` atomically and return it as read back from ``path``.

    The data is written to a hidden staging directory beside ``path`` and renamed into place only
    when complete; a previous output is kept until then. A failed write leaves no staging data and
    the previous output (if any) untouched; what a killed run left behind is cleaned up by the next.
    With ``table``, the written data is also saved as that table (overwritten).
    """
    spark = df.sparkSession
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path
    dest = hadoop_path(_qualified(path))
    fs = dest.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    token = uuid.uuid4().hex[:12]
    parent = dest.getParent()
    staging = hadoop_path(parent, f".{dest.getName()}.staging-{token}")
    backup = hadoop_path(parent, f".{dest.getName()}.previous-{token}")
    fs.mkdirs(parent)
    _recover(fs, hadoop_path, parent, dest)
    try:
        df.write.mode("error").parquet(staging.toString())
    except BaseException:
        fs.delete(staging, True)
        raise
    had_previous = fs.exists(dest)
    if had_previous and not fs.rename(dest, backup):
        fs.delete(staging, True)
        raise UserError(f"cannot move the previous output at {path} aside")
    if not fs.rename(staging, dest):
        if had_previous:
            fs.rename(backup, dest)
        fs.delete(staging, True)
        raise UserError(f"cannot move the new output into place at {path}")
    if had_previous:
        fs.delete(backup, True)
    written = spark.read.parquet(dest.toString())
    if table:
        written.write.mode("overwrite").saveAsTable(table)
    return written
