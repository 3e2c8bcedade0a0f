"""Concurrent writers of one output: the output's lease (storage/lease.py), its take-over once expired, and
the row count checked before the swap."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from image_transfer.errors import RunFailed, UserError
from image_transfer.jobs import cli
from image_transfer.storage.fs import COMMIT_MARKER, _LocalFs
from image_transfer.storage.lease import LEASE_TTL_ENV, Holder, OutputLease, hold, lease_path
from image_transfer.storage.outputs import write_output

# The outcome does not depend on library versions: CI runs this file in the default environment only.
pytestmark = pytest.mark.anyversion

HOLDER = Path(__file__).parent / "jobs" / "lease_holder.py"


def _left_beside(out: Path) -> list[str]:
    """The hidden lease and staging files a writer leaves beside ``out`` (none once it is done)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def few_images(fixtures_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lease") / "images"
    root.mkdir()
    for f in sorted((fixtures_dir / "images" / "circle").iterdir())[:4]:
        shutil.copyfile(f, root / f.name)
    return root


def _cli(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    return subprocess.Popen(
        [sys.executable, "-m", "image_transfer", *argv, "--master", "local[1]"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_second_writer_fails_naming_the_holder_or_waits(few_images, tmp_path):
    """Two `image-transfer ingest` processes while a run holds the output's lease: without --wait exit 2 at
    once with one line naming the holder; with --wait it waits, then writes once the lease is released."""
    out = tmp_path / "images.parquet"
    with hold(_LocalFs(), str(out), command="score"):
        refused = _cli("ingest", "--images", str(few_images), "--output", str(out))
        waiting = _cli("ingest", "--images", str(few_images), "--output", str(out), "--wait", "300")
        _, err = refused.communicate(timeout=300)
        assert refused.returncode == 2, err[-3000:]
        holder = f"another `image-transfer score` run {socket.gethostname()}:{os.getpid()}"
        assert holder in err and "Traceback" not in err, err[-3000:]
        assert err.count("error:") == 1 and "--wait" in err
        seen = []
        for line in waiting.stderr:  # until it says it waits (EOF: it ended without waiting)
            seen.append(line)
            if "waiting:" in line:
                break
        assert any(holder in line for line in seen if "waiting:" in line), "".join(seen)[-3000:]
        assert not out.exists()
    stdout, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-3000:]
    assert f"ingested 4 files from {few_images}" in stdout
    assert "rows=4 " in (out / COMMIT_MARKER).read_text()
    assert _left_beside(out) == []


@pytest.mark.connect
def test_a_killed_holder_is_taken_over_only_once_its_lease_expired(spark, tmp_path, monkeypatch):
    """A run SIGKILLed while holding the lease: its lease and staging stay (while it lived, another writer
    was refused and left its staging alone); once the lease expired a writer takes it over and cleans up."""
    monkeypatch.setenv(LEASE_TTL_ENV, "2")
    out = tmp_path / "scored.parquet"
    env = {**os.environ, LEASE_TTL_ENV: "2"}
    holder = subprocess.Popen([sys.executable, str(HOLDER), str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"being written by another `image-transfer score` run \S+:{holder.pid},"):
            write_output(spark.range(3), str(out))
        assert _left_beside(out) == [f".{out.name}.lease", f".{out.name}.staging-killed"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert _left_beside(out) == [f".{out.name}.lease", f".{out.name}.staging-killed"]  # killed: nothing released
    assert write_output(spark.range(3), str(out), wait=120).count() == 3
    assert _left_beside(out) == []


@pytest.mark.connect
def test_rows_out_must_equal_rows_in_before_the_swap(spark, tmp_path):
    out = tmp_path / "scored.parquet"
    write_output(spark.range(5), str(out), command="score")
    with pytest.raises(RunFailed, match=r"has 3 rows, not the 4 expected: not replaced"):
        write_output(spark.range(3), str(out), rows=4, command="score")
    assert spark.read.parquet(str(out)).count() == 5
    assert _left_beside(out) == []
    assert write_output(spark.range(4), str(out), rows=4, command="score").count() == 4


def test_a_lease_taken_over_is_not_swapped_in(tmp_path):
    """A holder whose lease another run took over (it stalled past the TTL) must not replace the output."""
    fs, dest = _LocalFs(), str(tmp_path / "out")
    lease = OutputLease(fs, dest, command="score").acquire()
    try:
        lease.check()
        fs.replace_text(lease.path, lease._record(0).replace(lease.token, "another0run0"))
        with pytest.raises(RunFailed, match="lost the lease on"):
            lease.check()
    finally:
        lease.release()
    assert Path(lease.path).exists()  # not this run's any more: left to its holder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--wait", "-1"], "--wait must be at least 0 seconds"),
        (["--images", "imgs", "--checkpoint", "c", "--wait"], "--wait does not apply to incremental scoring"),
    ],
)
def test_wait_is_checked_before_spark(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(cli, "session", lambda *a, **k: pytest.fail("a SparkSession was asked for"))
    source = [] if "--images" in extra else ["--input", str(tmp_path / "in")]
    argv = ["score", *source, "--model", "m", "--output", str(tmp_path / "o"), *extra]
    assert cli.run(argv) == 2
    assert message in capsys.readouterr().err


def test_a_killed_holder_on_this_host_is_taken_over_at_once(spark, tmp_path):
    """A run SIGKILLed on this host leaves a lease with a fresh heartbeat: the rerun takes it over at once
    (its process is gone), without waiting out the TTL, and cleans up its staging."""
    out = tmp_path / "scored.parquet"
    holder = subprocess.Popen([sys.executable, str(HOLDER), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert _left_beside(out) == [f".{out.name}.lease", f".{out.name}.staging-killed"]
    assert write_output(spark.range(3), str(out), command="score").count() == 3  # no --wait: at once
    assert _left_beside(out) == []


def test_a_live_or_remote_holder_is_not_taken_over(tmp_path):
    """A fresh lease of a live process on this host, or of any process on another host, stays refused."""
    fs, dest = _LocalFs(), str(tmp_path / "out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    now = time.time()
    for owner in (f"{socket.gethostname()}:{os.getppid()}", f"another-host-{uuid.uuid4().hex[:6]}:{dead_pid}"):
        Path(lease_path(fs, dest)).write_text(Holder(owner, "t0ken", "score", now, now).text())
        with pytest.raises(UserError, match=f"run {owner},"):
            OutputLease(fs, dest).acquire()


def test_a_directory_at_the_lease_path_is_a_user_error(tmp_path):
    """A directory where the lease file goes: a UserError naming it (it used to spin forever, even with a wait)."""
    fs, dest = _LocalFs(), str(tmp_path / "out")
    os.mkdir(lease_path(fs, dest))
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            OutputLease(fs, dest).acquire(wait=1).release()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(timeout=60)  # a guard against the old endless spin, not a timing
    assert outcome, "acquire did not return"
    assert isinstance(outcome[0], UserError) and f"{lease_path(fs, dest)} of {dest} is a directory" in str(outcome[0])


class _OverwritingFs(_LocalFs):
    """A local file system whose rewrite is a plain overwrite, as on Hadoop file systems: while it runs the
    lease file is empty; the rewrite pauses there until the test lets it go on."""

    def __init__(self) -> None:
        self.torn, self.go_on = threading.Event(), threading.Event()

    def replace_text(self, path: str, text: str) -> None:
        with open(path, "w") as fh:
            fh.flush()
            if not self.torn.is_set():
                self.torn.set()
                self.go_on.wait(timeout=60)
            fh.write(text)


def test_check_never_takes_a_heartbeat_being_written_for_a_lost_lease(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_TTL_ENV, "0.8")  # a heartbeat every 0.2 s
    fs = _OverwritingFs()
    lease = OutputLease(fs, str(tmp_path / "out"), command="score").acquire()
    try:
        assert fs.torn.wait(timeout=60)  # the heartbeat is rewriting the lease file: it is empty now
        failed: list[BaseException] = []

        def check() -> None:
            try:
                lease.check()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                failed.append(exc)

        checker = threading.Thread(target=check)
        checker.start()
        checker.join(timeout=1)  # without the lock it reads the empty file now
        fs.go_on.set()
        checker.join(timeout=60)
        assert not checker.is_alive() and failed == []
    finally:
        fs.go_on.set()
        lease.release()
