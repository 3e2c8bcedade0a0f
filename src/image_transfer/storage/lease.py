"""A lease on an output: one writer at a time.

The lease is a lock file beside the output (``.NAME.lease``) made with the file system's atomic create
(``O_EXCL`` locally, Hadoop's ``create(overwrite=false)`` elsewhere). It records the holder (host and
process), the command, when it started and a heartbeat, which a thread of the holder refreshes every
quarter of the TTL. A lease whose heartbeat is older than the TTL (``IMAGE_TRANSFER_LEASE_TTL`` seconds,
default ``DEFAULT_TTL``) has expired: its holder was killed. The next writer takes it over, and only then
may it clean up what the holder left (its staging data). A holder on this host whose process is gone
(killed) is taken over at once, without waiting for the TTL. A second writer of a live lease fails at once
with a UserError naming the holder, or waits for it (``wait``). The holder checks, before it replaces
the output, that the lease is still its own (``OutputLease.check``).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from image_transfer.errors import RunFailed, UserError

LEASE_TTL_ENV = "IMAGE_TRANSFER_LEASE_TTL"
DEFAULT_TTL = 60.0  # seconds without a heartbeat after which a lease has expired
_POLL = 0.5  # seconds between looks at a held lease while waiting
_RETRY = 0.05  # seconds before trying again to create a lease file released just now


def lease_ttl() -> float:
    """The lease TTL in seconds (``IMAGE_TRANSFER_LEASE_TTL``, or ``DEFAULT_TTL``); UserError when not positive."""
    raw = os.environ.get(LEASE_TTL_ENV)
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not ttl > 0 or math.isinf(ttl):
        raise UserError(f"{LEASE_TTL_ENV} must be a positive number of seconds, got {raw!r}")
    return ttl


def lease_path(fs: Any, dest: str) -> str:
    """Where the lease on the output ``dest`` lives: ``.NAME.lease`` beside it."""
    return fs.join(fs.parent(dest), f".{dest.rstrip('/').rsplit('/', 1)[-1]}.lease")


@dataclass(frozen=True)
class Holder:
    """What a lease file records."""

    owner: str
    token: str
    command: str
    started: float
    heartbeat: float

    def text(self) -> str:
        return (
            f"owner={self.owner} token={self.token} command={self.command or '-'} "
            f"started={self.started:.3f} heartbeat={self.heartbeat:.3f}\n"
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        try:
            command = fields.get("command", "-")
            return cls(
                fields["owner"], fields["token"], "" if command == "-" else command,
                float(fields["started"]), float(fields["heartbeat"]),
            )  # fmt: skip
        except (KeyError, ValueError):
            return None  # being written, or not ours

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        by = f"`image-transfer {self.command}` " if self.command else ""
        return f"{by}run {self.owner}, started {started}, last heartbeat {max(0.0, now - self.heartbeat):.0f}s ago"


class OutputLease:
    """The lease on one output, held from ``acquire`` to ``release`` and kept alive by a heartbeat thread."""

    def __init__(self, fs: Any, dest: str, *, command: str | None = None, shown: str | None = None) -> None:
        self.fs, self.dest, self.shown = fs, dest, shown or dest
        self.path = lease_path(fs, dest)
        self.ttl = lease_ttl()
        self.token = uuid.uuid4().hex[:12]
        self.command = command or ""
        self.started = 0.0
        self.took_over: Holder | None = None  # the expired holder this lease replaced, if any
        self._stop = threading.Event()
        self._lost: Holder | None = None
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()  # the heartbeat's rewrite and check's read: never a torn read

    def _record(self, now: float) -> str:
        owner = f"{socket.gethostname()}:{os.getpid()}"
        return Holder(owner, self.token, self.command, self.started, now).text()

    def holder(self) -> Holder | None:
        """Who holds the lease now (None: nobody); UserError when the lease path is a directory."""
        try:
            text = self.fs.read_small(self.path)
        except Exception:  # noqa: BLE001 - released meanwhile, or unreadable
            if not self.fs.exists(self.path):
                return None
            if self.fs.is_dir(self.path):
                raise UserError(
                    f"the lease path {self.path} of {self.shown} is a directory, not a lease file: remove it"
                ) from None
            text = ""  # unreadable: aged by the file's time, as one being written
        found = Holder.parse(text)
        if found is None and self.fs.exists(self.path):
            # Created but not yet written (or its writer was killed right then): aged by the file's time.
            stamps = [mtime / 1000 for _, mtime in self.fs.glob(self.path)]
            return Holder("unknown", "", "", min(stamps, default=time.time()), min(stamps, default=time.time()))
        return found

    def acquire(self, wait: float | None = None) -> OutputLease:
        """Take the lease; a live one held by another run: UserError at once, or after ``wait`` seconds."""
        deadline = None if wait is None else time.monotonic() + wait
        announced = False
        while True:
            self.started = time.time()
            if self.fs.create_new(self.path, self._record(self.started)):
                break
            now = time.time()
            holder = self.holder()
            if holder is None:  # released just now: try again, without spinning, within the deadline
                if deadline is not None and time.monotonic() >= deadline:
                    raise UserError(f"could not take the lease {self.path} on {self.shown} within {wait:.0f}s")
                time.sleep(_RETRY)
                continue
            if now - holder.heartbeat > self.ttl or _dead_here(holder):
                self._take_over(holder)
                continue
            busy = (
                f"{self.shown} is being written by another {holder.describe(now)} (lease {self.path}; it "
                f"expires {self.ttl:.0f}s after the last heartbeat)"
            )
            if deadline is None:
                raise UserError(f"{busy}; wait for it with --wait [SECONDS], or give another output")
            if time.monotonic() >= deadline:
                raise UserError(f"{busy}; still held after waiting {wait:.0f}s")
            if not announced:
                print(f"image-transfer: waiting: {busy}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(max(0.0, min(_POLL, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: Holder) -> None:
        """Remove an expired lease: renamed aside first, so of several runs taking it over only one does."""
        aside = f"{self.path}.expired-{self.token}"
        if not self.fs.rename(self.path, aside):
            return
        try:
            grabbed = Holder.parse(self.fs.read_small(aside))
        except Exception:  # noqa: BLE001 - unreadable: as stale as what was seen
            grabbed = stale
        if grabbed is not None and grabbed.token != stale.token:
            self.fs.rename(aside, self.path)  # another run took it over just before: give it back
            return
        self.fs.remove(aside)
        self.took_over = stale

    def _beat(self) -> None:
        interval = max(0.2, self.ttl / 4)
        while not self._stop.wait(interval):
            try:
                with self._io:
                    holder = self.holder()
                    if holder is not None and holder.token not in (self.token, ""):
                        self._lost = holder
                        return
                    self.fs.replace_text(self.path, self._record(time.time()))
            except Exception:  # noqa: BLE001 - a transient fault: the next beat tries again
                continue

    def check(self) -> None:
        """RunFailed when the lease is no longer this run's (it expired and another run took it over)."""
        with self._io:  # not while the heartbeat rewrites the file (a plain overwrite on Hadoop file systems)
            holder = self._lost or self.holder()
        if holder is None or holder.token != self.token:
            who = f" to {holder.describe(time.time())}" if holder is not None else ""
            raise RunFailed(
                f"lost the lease on {self.shown}{who} (no heartbeat for {self.ttl:.0f}s): the output was not replaced"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self.fs.remove(self.path)
        except Exception:  # noqa: BLE001 - cannot remove it: it expires after the TTL
            pass


def _dead_here(holder: Holder) -> bool:
    """Whether ``holder`` is a process of this host that no longer exists (killed: its lease is free)."""
    host, _, pid = holder.owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, as another user's
        return False
    return False


_HELD: dict[str, list[Any]] = {}  # lease path -> [lease, depth]: leases this process holds
_HELD_LOCK = threading.Lock()


@contextmanager
def hold(
    fs: Any, dest: str, *, command: str | None = None, wait: float | None = None, shown: str | None = None
) -> Iterator[OutputLease]:
    """Hold the lease on the output ``dest`` for the block (re-entrant: a lease this process holds is reused).

    ``wait``: None fails at once (UserError naming the holder) when another run holds a live lease;
    a number waits that many seconds for it (``math.inf``: as long as it takes).
    """
    path = lease_path(fs, dest)
    with _HELD_LOCK:
        held = _HELD.get(path)
        if held is not None:
            held[1] += 1
    if held is None:
        lease = OutputLease(fs, dest, command=command, shown=shown).acquire(wait)
        with _HELD_LOCK:
            _HELD[path] = held = [lease, 1]
    try:
        yield held[0]
    finally:
        with _HELD_LOCK:
            held[1] -= 1
            done = held[1] == 0
            if done:
                _HELD.pop(path, None)
        if done:
            held[0].release()
