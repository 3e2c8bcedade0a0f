"""Progress of long runs from Spark's status tracker: tasks (and so about how many images) done, rate, ETA.

A live bar on a terminal; plain periodic lines when the output is not a terminal (job logs).

>>> with Progress(spark, "score", total_rows=1_204_311):
...     scored.write.parquet(out)
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from typing import Any, TextIO

from image_transfer.runtime import is_connect

# What ``setJobGroup`` sets on this thread: saved on entry, put back on exit (None clears a property).
CALLER_PROPERTIES = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Report the progress of the Spark jobs started inside the ``with`` block every ``interval`` seconds.

    The jobs are tagged with a job group (and ``description`` as the Spark UI's job description);
    images done are estimated from the share of tasks done in the stage that scores (the group's
    ``input_stage``-th: 1 when the input is first spread by a shuffle) times ``total_rows``. The
    caller's own job group and description come back on exit. Under Spark Connect (no status tracker,
    no job groups) the operations get a tag of their own instead, removed on exit (the caller's stay).
    """

    def __init__(
        self,
        spark: Any,
        label: str,
        *,
        total_rows: int,
        description: str | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        input_stage: int = 0,
    ) -> None:
        self.spark = spark
        self.label = label
        self.total_rows = total_rows
        self.description = description or label
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (1.0 if self.live else 30.0)
        self.group = f"image-transfer-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self.lines: list[str] = []
        self.input_stage = input_stage
        self._caller: dict[str, str | None] = {}
        self._tagged = False

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if is_connect(self.spark):  # no job groups: a tag of our own on this thread's operations
            if hasattr(self.spark, "addTag"):
                self.spark.addTag(self.group)
                self._tagged = True
            return self
        sc = self.spark.sparkContext
        self._caller = {key: sc.getLocalProperty(key) for key in CALLER_PROPERTIES}
        sc.setJobGroup(self.group, self.description)
        self._thread = threading.Thread(target=self._loop, name="image-transfer-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stop.set()
        if self._tagged:
            self.spark.removeTag(self.group)  # the caller's own tags stay
            self._tagged = False
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._emit(final=True, succeeded=exc_type is None)
            sc = self.spark.sparkContext
            for key, value in self._caller.items():  # the caller's job group and description, as they were
                sc.setLocalProperty(key, value)

    def tasks(self) -> tuple[int, int, float]:
        """(tasks done, tasks known) over the group's jobs so far, and the share done of the input stage.

        The input stage (by stage id, the group's first, or the second after a spreading shuffle) is
        where the images are scored; later stages (a shuffle into evenly sized output files) carry only
        the small output rows.
        """
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        stages = []
        for job_id in tracker.getJobIdsForGroup(self.group) or []:
            job = tracker.getJobInfo(job_id)
            if job is None:
                continue
            for stage_id in job.stageIds:
                stage = tracker.getStageInfo(stage_id)
                if stage is not None:
                    done += stage.numCompletedTasks
                    total += stage.numTasks
                    stages.append(stage)
        ordered = sorted(stages, key=lambda s: s.stageId)
        first = ordered[self.input_stage] if len(ordered) > self.input_stage else None
        share = first.numCompletedTasks / first.numTasks if first is not None and first.numTasks else 0.0
        return done, total, share

    def render(self, done: int, total: int, elapsed: float, share: float | None = None) -> str:
        """One progress line: tasks, estimated images (``share`` of them done), images/s and ETA."""
        if share is None:
            share = done / total if total else 0.0
        images = int(self.total_rows * share)
        rate = images / elapsed if elapsed > 0 else 0.0
        eta = (self.total_rows - images) / rate if rate > 0 else None
        width = 24
        bar = "#" * int(width * share) + "-" * (width - int(width * share))
        return (
            f"{self.label}: [{bar}] {done}/{total} tasks, ~{images:,}/{self.total_rows:,} images, "
            f"{rate:.1f} images/s, elapsed {_fmt_duration(elapsed)}, "
            f"ETA {_fmt_duration(eta) if eta is not None else '?'}"
        )

    def _emit(self, *, final: bool = False, succeeded: bool = False) -> None:
        try:
            done, total, share = self.tasks()
        except Exception:  # noqa: BLE001 - the context is stopping; nothing more to say
            return
        if total == 0 and not final:
            return
        if succeeded:  # every image went through (a stage adaptive execution skipped never completes)
            share, done = 1.0, max(done, total)
        line = self.render(done, total, time.monotonic() - self._started, share)
        self.lines.append(line)
        if self.live:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._emit()
