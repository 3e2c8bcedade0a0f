"""File systems behind outputs and checkpoints: Spark's Hadoop file system, or this process's own (Connect)."""

from __future__ import annotations

import os
import re
from typing import Any

from image_transfer.errors import UserError


def _qualified(path: str) -> str:
    """Local paths become absolute (Hadoop resolves relative ones against the JVM's directory).

    A path with a scheme (``file:/x``, ``file:///x``, ``dbfs:/x``, ``s3://b/x``) is left as it is.
    """
    return path if re.match(r"^[A-Za-z][\w+.-]*:/", path) else os.path.abspath(path)


def local_absolute(path: str) -> str:
    """A local relative path made absolute against this process's directory (executors and Spark's JVM
    run in others); a URI (``file:...``, ``dbfs:/``, ``s3://``, ``models:/``, ``runs:/``) or an absolute
    path is returned as it is."""
    if re.match(r"^[A-Za-z][\w+.-]+:", path) or os.path.isabs(path):
        return path
    return os.path.abspath(path)


COMMIT_MARKER = "_IMAGE_TRANSFER_COMPLETE"  # in an output directory: its data files, counted when written
STREAM_MARKER = "_IMAGE_TRANSFER_STREAM"  # in an incremental output directory: the checkpoint that writes it


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

    def is_dir(self, path: str) -> bool:
        return bool(self._fs.getFileStatus(self._path(path)).isDirectory())

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

    def _local(self, path: str) -> str | None:
        """The local path of a ``file:`` path (Hadoop's local create is not atomic: these go through Python)."""
        qualified = self.qualify(path)
        return _driver_path(qualified) if qualified.startswith("file:") else None

    def create_new(self, path: str, text: str) -> bool:
        """Create ``path`` holding ``text`` if nothing is there, atomically; False when something is."""
        local = self._local(path)
        if local is not None:
            return _LocalFs().create_new(local, text)
        try:
            out = self._fs.create(self._path(path), False)  # overwrite=false: atomic on HDFS and ABFS
        except Exception as exc:  # noqa: BLE001 - Py4JJavaError: FileAlreadyExistsException, or a real fault
            if self.exists(path):
                return False
            raise OSError(f"cannot create {path}: {str(exc).splitlines()[0][:300]}") from exc
        try:
            out.write(bytearray(text.encode()))
        finally:
            out.close()
        return True

    def replace_text(self, path: str, text: str) -> None:
        """Replace ``path``'s text (readers see the old text or the new, where the file system allows)."""
        local = self._local(path)
        if local is not None:
            _LocalFs().replace_text(local, text)
        else:
            self.write_text(path, text)

    def read_small(self, path: str) -> str:
        """``read_text`` for files ``create_new``/``replace_text`` wrote."""
        local = self._local(path)
        return _LocalFs().read_text(local) if local is not None else self.read_text(path)

    def remove(self, path: str) -> None:
        """Delete a file ``create_new``/``replace_text`` wrote."""
        local = self._local(path)
        if local is not None:
            _LocalFs().delete(local)
        else:
            self.delete(path)


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

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

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

    def create_new(self, path: str, text: str) -> bool:
        """Create ``path`` holding ``text`` if nothing is there, atomically (``O_EXCL``); False when something is."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True

    def replace_text(self, path: str, text: str) -> None:
        """Replace ``path``'s text atomically (a temporary file renamed over it)."""
        import uuid

        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)

    read_small = read_text
    remove = delete


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
    from image_transfer.runtime import is_connect

    if is_connect(spark):
        return _LocalFs(), _driver_path(path)
    fs = _HadoopFs(spark, _qualified(path))
    return fs, fs.qualify(_qualified(path))
