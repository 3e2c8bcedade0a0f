"""A class archive for the embedded Spark JVM, so that a local session starts sooner.

A fresh local JVM loads and verifies about 15,000 Spark classes from their jars before it can start
the Python workers. That takes about 1.5 s of the session's start and about 4 CPU-s of its first jobs,
time the workers need to import TensorFlow. HotSpot (JDK 13 and later) can write the classes a run
loaded into an archive as it exits (``-XX:ArchiveClassesAtExit``) and map that archive at the next
start (``-XX:SharedArchiveFile``).

The first local session on a machine writes the archive. Its JVM does this as it exits, on one core,
about 7 s after the command has returned. Later sessions with the same Java, Spark jars and JVM
settings then use it.

How the archive is kept safe:

- It is written under a temporary name. HotSpot writes the archive's header last, so a file with a
  valid header is complete; only then is it renamed into place, in one atomic step.
- A JVM that fails to start with the archive is started again without it, and the archive is
  removed (``cli._spark``).
- An archive that does not match the JVM is ignored by the JVM, silently.

``IMAGE_TRANSFER_JVM_CACHE`` sets the directory. It defaults to
``$XDG_CACHE_HOME/image-transfer/jvm``; ``off`` turns the archive off. Each archive is about 130 MB,
and the two most recently used are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV = "IMAGE_TRANSFER_JVM_CACHE"
KEEP = 2
# A writer that has produced no valid header after this long has died.
STALE_SECONDS = 600.0
# HotSpot's dynamic archive magic (CDS_DYNAMIC_ARCHIVE_MAGIC), the header's first field.
_MAGIC = 0xF00BABA8
_QUIET = "-Xlog:cds*=off"
# Settings that change the JVM's classpath or its object layout: a different value needs its own archive.
_KEYED_CONF = ("spark.driver.memory", "spark.driver.extraClassPath", "spark.driver.extraLibraryPath")
_KEYED_ENV = ("JAVA_HOME", "SPARK_HOME", "SPARK_CONF_DIR", "PYSPARK_SUBMIT_ARGS", "SPARK_DIST_CLASSPATH")


@dataclass(frozen=True)
class JvmStart:
    """The driver JVM's options for one local session, and the archive they use or write.

    - ``options``: what to pass as ``spark.driver.extraJavaOptions``.
    - ``fallback``: the same options without any archive.
    - ``archive``: the archive the JVM maps, or None.
    - ``writing``: the temporary file the JVM writes its archive to as it exits, or None.
    - ``busy``: another JVM is writing this archive now.
    """

    options: str
    fallback: str
    archive: Path | None = None
    writing: Path | None = None
    busy: bool = False


def cache_dir() -> Path | None:
    """Where archives are kept, or None when ``IMAGE_TRANSFER_JVM_CACHE`` is ``off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "image-transfer" / "jvm"


def java_home() -> Path | None:
    """The Java home that ``spark-submit`` runs (``$JAVA_HOME``, else ``java`` on the PATH)."""
    if os.environ.get("JAVA_HOME"):
        java = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
    else:
        found = shutil.which("java")
        if not found:
            return None
        java = Path(found)
    try:
        return java.resolve(strict=True).parent.parent
    except OSError:
        return None


def java_major(home: Path) -> int | None:
    """The Java feature version from the home's ``release`` file (8 for ``1.8.0``), or None."""
    try:
        text = (home / "release").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("JAVA_VERSION="):
            parts = line.split("=", 1)[1].strip().strip('"').split(".")
            try:
                return int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(parts[0])
            except ValueError:
                return None
    return None


def supports_archives(home: Path) -> bool:
    """True for a HotSpot JDK 13+ with its base class archive (what a dynamic archive builds on)."""
    major = java_major(home)
    return major is not None and major >= 13 and (home / "lib" / "server" / "classes.jsa").is_file()


def _spark_home() -> Path | None:
    try:
        from pyspark.find_spark_home import _find_spark_home

        return Path(_find_spark_home()).resolve()
    except Exception:  # noqa: BLE001 - no Spark home, no archive
        return None


def archive_key(base_options: str, conf: Mapping[str, str], home: Path, spark_home: Path) -> str:
    """A digest of everything an archive depends on: the JVM, Spark's jars, and the JVM settings."""
    h = hashlib.sha256()

    def add(*values: object) -> None:
        for value in values:
            h.update(repr(value).encode())
            h.update(b"\0")

    add(str(home), (home / "release").read_bytes())
    libjvm = home / "lib" / "server" / "libjvm.so"
    if libjvm.exists():
        st = libjvm.stat()
        add(st.st_size, st.st_mtime_ns)
    add(str(spark_home))
    jars = spark_home / "jars"
    if jars.is_dir():
        add(sorted((p.name, p.stat().st_size) for p in jars.iterdir()))
    add(base_options, sys.platform)
    add([(k, conf.get(k)) for k in _KEYED_CONF])
    add([(k, os.environ.get(k)) for k in _KEYED_ENV])
    return h.hexdigest()[:24]


def is_complete(path: Path) -> bool:
    """True when ``path`` starts with a dynamic archive's header (HotSpot writes the header last)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and _MAGIC in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))


def _promote(folder: Path, key: str, final: Path) -> bool:
    """Rename a complete temporary archive into place and delete dead writers' files.

    Returns True while another writer's file is still being written.
    """
    busy = False
    for part in sorted(folder.glob(f"{key}.*.part")):
        try:
            if is_complete(part):
                os.replace(part, final)
            elif time.time() - part.stat().st_mtime > STALE_SECONDS:
                part.unlink()
            else:
                busy = True
        except OSError:
            continue  # another process renamed or removed it first
    return busy


def _prune(folder: Path, keep: Path) -> None:
    """Keep ``keep`` and the most recently used other archives, up to ``KEEP`` in all."""
    others = []
    for path in folder.glob("*.jsa"):
        if path != keep:
            try:
                others.append((path.stat().st_mtime, path))
            except OSError:
                continue
    for _, path in sorted(others, reverse=True)[KEEP - 1 :]:
        try:
            path.unlink()
        except OSError:
            pass


def plan(base_options: str, conf: Mapping[str, str]) -> JvmStart:
    """The options for a new local driver JVM: map this setup's archive, or write one as it exits.

    ``conf`` holds the session's settings (``spark.driver.memory`` and the like). With no usable
    directory, a JVM that cannot write archives, or no Spark home, the options are ``base_options``.
    """
    plain = JvmStart(options=base_options, fallback=base_options)
    try:
        folder = cache_dir()
    except RuntimeError:  # no home directory
        return plain
    home = java_home()
    spark_home = _spark_home()
    if folder is None or home is None or spark_home is None or not supports_archives(home):
        return plain
    if any(c.isspace() or c in "'\"\\" for c in str(folder)):
        return plain  # Spark splits the JVM options at whitespace
    try:
        key = archive_key(base_options, conf, home, spark_home)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{key}.jsa"
        busy = _promote(folder, key, final)
        if final.is_file():
            try:
                os.utime(final)  # marks it as recently used, for _prune
            except OSError:
                pass
            _prune(folder, final)
            options = f"{base_options} -XX:SharedArchiveFile={final} -Xshare:auto {_QUIET}"
            return JvmStart(options=options, fallback=base_options, archive=final)
        if busy:
            return JvmStart(options=base_options, fallback=base_options, busy=True)
        if not os.access(folder, os.W_OK):
            return plain
        part = folder / f"{key}.{uuid.uuid4().hex[:12]}.part"
        options = f"{base_options} -XX:ArchiveClassesAtExit={part} {_QUIET}"
        return JvmStart(options=options, fallback=base_options, writing=part)
    except OSError:
        return plain


def discard(archive: Path) -> None:
    """Remove an archive the JVM could not start with."""
    try:
        archive.unlink()
    except OSError:
        pass
