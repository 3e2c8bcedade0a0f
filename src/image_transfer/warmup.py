"""A head start for a job's Python workers: started, and TensorFlow imported, while the driver plans.

A scheduled job's fresh executors start a Python worker per task slot on the first scoring task, and
each imports TensorFlow (seconds of CPU) before it can load the model. ``start_workers`` starts
that part as soon as the session exists, in a small background job of one task per slot: each task
starts the import on a thread of its worker and ends at once, so the import overlaps the driver's own
start (reading the input's schema, checking the model, planning) and the slots stay free for the
driver's small jobs (file listing, footer counts). The scoring tasks then run in the same, reused
workers (``spark.python.worker.reuse``), wait for the import if it is still running, and only load and
trace the model. It is a head start, nothing more: when it cannot run (Spark Connect, workers not reused) or
fails, scoring does the same work itself.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from image_transfer.stats import is_connect, worker_id

GROUP = "image-transfer-start-workers"


class WorkerStart:
    """The background job of ``start_workers``: ``wait()`` returns the ``host:pid`` of the workers it readied."""

    def __init__(self, spark: Any, slots: int) -> None:
        self.workers: list[str] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(spark, slots), name="image-transfer-start-workers", daemon=True
        )
        self._thread.start()

    def _run(self, spark: Any, slots: int) -> None:
        try:
            # Its own job group (this thread's): no caller's group or job count includes it.
            spark.sparkContext.setJobGroup(GROUP, "image-transfer: start Python workers")
            # A DataFrame job (not an RDD one): SQL Python runners get their own worker pool, the scoring's.
            ready = spark.range(slots, numPartitions=slots).mapInPandas(_ready_workers, "worker string").collect()
            self.workers = sorted({r["worker"] for r in ready})
        except BaseException as exc:  # noqa: BLE001 - a head start only: scoring does the work itself
            self.error = exc

    def wait_submitted(self, spark: Any, timeout: float = 30.0) -> bool:
        """Wait until the job is submitted (or over): True when it was.

        A fresh driver plans its first jobs slowly and one at a time; letting this one go first puts
        the workers' import ahead of the rest of the planning, which has seconds of slack behind it.
        """
        tracker = spark.sparkContext.statusTracker()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if tracker.getJobIdsForGroup(GROUP):
                return True
            time.sleep(0.02)
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> list[str]:
        """Wait for the job; the workers it readied (empty when it could not run)."""
        self._thread.join(timeout)
        return self.workers


def start_workers(spark: Any, *, wait_submitted: bool = True) -> WorkerStart | None:
    """Start one Python worker per task slot and import TensorFlow in each, in the background.

    Returns once the job is submitted (``wait_submitted``), with the handle (``wait()``), or None where
    it does not apply: Spark Connect, or a session whose Python workers are not reused (then the next
    task would get a fresh worker anyway).
    """
    if is_connect(spark):
        return None
    sc = spark.sparkContext
    if sc.getConf().get("spark.python.worker.reuse", "true").lower() != "true":
        return None
    start = WorkerStart(spark, max(1, int(sc.defaultParallelism)))
    if wait_submitted:
        start.wait_submitted(spark)
    return start


def _ready_workers(batches: Any) -> Any:
    import pandas as pd

    from image_transfer.score import start_preparing_worker

    for _ in batches:
        pass
    start_preparing_worker()  # the import runs on in this worker; the task, and its slot, end now
    yield pd.DataFrame({"worker": [worker_id()]})
