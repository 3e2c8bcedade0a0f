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

import os
import threading
import time
from typing import Any

from image_transfer.stats import is_connect, worker_id

GROUP = "image-transfer-start-workers"


class WorkerStart:
    """The background job of ``start_workers``: ``wait()`` returns the ``host:pid`` of the workers it readied.

    With ``rdd_env`` (the environment that puts an RDD job's Python workers in the same pool as the
    SQL Arrow UDFs'), the job is a plain RDD job, built here on the caller's thread: it needs no SQL
    planning (a fresh driver's first DataFrame costs seconds) and its workers import no pandas before
    the task starts. Without, it is a ``mapInPandas`` job.
    """

    def __init__(self, spark: Any, slots: int, *, rdd_env: dict[str, str] | None = None) -> None:
        self.workers: list[str] = []
        self.error: BaseException | None = None
        rdd = _rdd_job(spark, slots, rdd_env) if rdd_env is not None else None
        self._thread = threading.Thread(
            target=self._run, args=(spark, slots, rdd), name="image-transfer-start-workers", daemon=True
        )
        self._thread.start()

    def _run(self, spark: Any, slots: int, rdd: Any) -> None:
        try:
            # Its own job group (this thread's): no caller's group or job count includes it.
            spark.sparkContext.setJobGroup(GROUP, "image-transfer: start Python workers")
            if rdd is not None:
                ready = rdd.collect()
            else:
                frame = spark.range(slots, numPartitions=slots).mapInPandas(_ready_workers, "worker string")
                ready = [r["worker"] for r in frame.collect()]
            self.workers = sorted(set(ready))
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
    start = WorkerStart(spark, max(1, int(sc.defaultParallelism)), rdd_env=sql_worker_env(spark))
    if wait_submitted:
        start.wait_submitted(spark)
    return start


def sql_worker_env(spark: Any) -> dict[str, str] | None:
    """What an RDD job's Python function needs in its environment to get the SQL UDFs' workers, or None.

    Spark keeps one pool of Python workers per interpreter and environment, and its SQL runners add
    ``SPARK_SIMPLIFIED_TRACEBACK=1`` (``spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled``)
    where RDD runners do not; with it, both share workers (checked on Spark 3.5 and 4.0 by the tests).
    None where that is not known to hold: a Databricks runtime (its own runners), or the fault
    handler configured differently for SQL and for RDDs.
    """
    if "DATABRICKS_RUNTIME_VERSION" in os.environ:
        return None
    core = spark.sparkContext.getConf().get("spark.python.worker.faulthandler.enabled", "false").lower()
    sql = str(spark.conf.get("spark.sql.execution.pyspark.udf.faulthandler.enabled", core)).lower()
    if sql != core:
        return None
    simplified = spark.conf.get("spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled", "true")
    return {"SPARK_SIMPLIFIED_TRACEBACK": "1"} if str(simplified).lower() == "true" else {}


def _rdd_job(spark: Any, slots: int, env: dict[str, str]) -> Any:
    """The RDD of the head start, its Python function carrying ``env`` (captured when ``_jrdd`` is built)."""
    sc = spark.sparkContext
    rdd = sc.parallelize(range(slots), slots).mapPartitions(_ready_worker_ids)
    saved = dict(sc.environment)
    sc.environment.update(env)
    try:
        rdd._jrdd  # noqa: B018 - builds the JVM side now, with this environment
    finally:
        sc.environment.clear()
        sc.environment.update(saved)
    return rdd


def _ready_worker_ids(rows: Any) -> Any:
    from image_transfer.score import start_preparing_worker

    for _ in rows:
        pass
    start_preparing_worker()  # the import runs on in this worker; the task, and its slot, end now
    yield worker_id()


def _ready_workers(batches: Any) -> Any:
    import pandas as pd

    yield pd.DataFrame({"worker": list(_ready_worker_ids(batches))})
