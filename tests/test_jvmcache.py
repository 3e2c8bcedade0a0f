"""The embedded JVM's class archive: written once, renamed into place only when complete, and dropped when bad."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from image_transfer import jvmcache

BASE = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
CONF = {"spark.driver.memory": "1g"}
HOME = jvmcache.java_home()
pytestmark = pytest.mark.skipif(
    HOME is None or not jvmcache.supports_archives(HOME), reason="needs a HotSpot JDK 13+ with its base archive"
)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(jvmcache.ENV, str(tmp_path / "jvm"))
    return tmp_path / "jvm"


def _header() -> bytes:
    return (0xF00BABA8).to_bytes(4, sys.byteorder) + b"\1" * 60


def test_a_complete_archive_is_renamed_into_place_and_used(folder):
    first = jvmcache.plan(BASE, CONF)
    assert first.archive is None and first.writing is not None and first.writing.parent == folder
    assert f"-XX:ArchiveClassesAtExit={first.writing}" in first.options and first.fallback == BASE
    first.writing.write_bytes(_header())  # what the JVM leaves when it has written the archive

    second = jvmcache.plan(BASE, CONF)
    assert second.archive is not None and second.archive.read_bytes() == _header()
    assert f"-XX:SharedArchiveFile={second.archive}" in second.options and second.writing is None
    assert not first.writing.exists()
    # Other settings of the JVM need an archive of their own.
    other = jvmcache.plan(BASE, {"spark.driver.memory": "2g"})
    assert other.archive is None and other.writing is not None


def test_an_archive_being_written_is_left_alone_until_stale(folder):
    first = jvmcache.plan(BASE, CONF)
    assert first.writing is not None
    first.writing.write_bytes(b"\0" * 64)  # the JVM writes the header last: this one is not done
    busy = jvmcache.plan(BASE, CONF)
    assert busy.busy and busy.archive is None and busy.writing is None and busy.options == BASE
    assert first.writing.exists()

    old = time.time() - jvmcache.STALE_SECONDS - 1
    os.utime(first.writing, (old, old))  # its writer died long ago
    again = jvmcache.plan(BASE, CONF)
    assert not first.writing.exists() and again.writing is not None and not again.busy


def test_only_the_most_recently_used_archives_are_kept(folder):
    folder.mkdir(parents=True)
    for i in range(3):
        old = folder / f"old{i}.jsa"
        old.write_bytes(_header())
        os.utime(old, (time.time() - 100 + i, time.time() - 100 + i))
    start = jvmcache.plan(BASE, CONF)
    start.writing.write_bytes(_header())
    current = jvmcache.plan(BASE, CONF).archive
    assert sorted(p.name for p in folder.glob("*.jsa")) == sorted([current.name, "old2.jsa"])


def test_off_or_an_unusable_folder_gives_the_plain_options(tmp_path, monkeypatch):
    monkeypatch.setenv(jvmcache.ENV, "off")
    assert jvmcache.plan(BASE, CONF) == jvmcache.JvmStart(options=BASE, fallback=BASE)
    monkeypatch.setenv(jvmcache.ENV, str(tmp_path / "with space"))
    assert jvmcache.plan(BASE, CONF).options == BASE


SESSION = textwrap.dedent(
    """
    from image_transfer import cli
    spark = cli._spark("jvm archive test", "local[1]")
    pid = spark._jvm.java.lang.ProcessHandle.current().pid()
    mapped = sorted({line.split()[-1] for line in open(f"/proc/{pid}/maps") if line.rstrip().endswith(".jsa")})
    assert spark.range(100).selectExpr("sum(id)").first()[0] == 4950
    print("MAPPED", *mapped)
    """
)


def _session(folder: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **{jvmcache.ENV: str(folder)})
    # Waits for the JVM too: it holds stdout until it has written its archive and exited.
    return subprocess.run(
        [sys.executable, "-c", SESSION], env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=True
    )


def _mapped(run: subprocess.CompletedProcess[str]) -> list[str]:
    return next(line.split()[1:] for line in run.stdout.splitlines() if line.startswith("MAPPED"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the JVM's mappings from /proc")
def test_a_real_jvm_writes_the_archive_then_maps_it_and_survives_a_broken_one(tmp_path):
    folder = tmp_path / "jvm"
    first = _session(folder, tmp_path)
    assert not any(str(folder) in m for m in _mapped(first))
    parts = list(folder.glob("*.part"))
    assert len(parts) == 1 and jvmcache.is_complete(parts[0]) and parts[0].stat().st_size > 10_000_000

    second = _session(folder, tmp_path)
    archives = list(folder.glob("*.jsa"))
    assert len(archives) == 1 and [str(archives[0])] == [m for m in _mapped(second) if str(folder) in m]

    # A complete header over a truncated body crashes a JVM that maps it: the session starts without it.
    data = archives[0].read_bytes()
    archives[0].chmod(0o644)
    archives[0].write_bytes(data[:2_000_000])
    third = _session(folder, tmp_path)
    assert not any(str(folder) in m for m in _mapped(third))
    assert "removed the JVM class archive" in third.stderr and not archives[0].exists()
