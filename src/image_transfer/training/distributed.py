"""Training across nodes: the image phases as a Spark barrier stage of N MultiWorkerMirroredStrategy workers.

``train(..., workers=N)`` with N > 1 materialises the train and validation feeds as Parquet on shared
storage (a Volume; a driver-local cache dir is refused on a cluster), then runs one barrier stage of
N tasks (``rdd.barrier().mapPartitions``: classic sessions only; Spark Connect has no RDD API, so
``workers > 1`` there is a ``UserError``). Each task:

- takes the GPUs Spark assigned it (``BarrierTaskContext.resources()["gpu"]``, else none visible),
- builds ``TF_CONFIG`` from the barrier tasks' addresses (``getTaskInfos``) and a free port of each
  (``allGather``), and trains under ``tf.distribute.MultiWorkerMirroredStrategy``,
- reads its own shard of the feed's Parquet row groups (``Feed.shard``), batches of ``batch_size``
  per replica,
- keeps ``BackupAndRestore`` checkpoints per phase on the shared cache dir, so a retried barrier stage
  (Spark retries the whole stage) resumes from its last finished epoch, not from epoch 0.

Before any collective work every task runs the stage's ``check`` (``training.train.worker_check``:
the files it reads are there) and the tasks share its outcome: a ``UserError`` on any of them (a
file the executors cannot read) ends every task at once, and the driver raises it, one line, with no
retried stage; a ``UserError`` later, once the workers train together, fails the stage as any error
does (Spark retries it). The environment a task sets (``TF_CONFIG``, ``CUDA_VISIBLE_DEVICES``) is restored
when it ends, as Spark reuses its Python workers.

The chief (task 0) saves the model and returns the per-epoch metrics; every task returns its steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from image_transfer.errors import UserError


def check_workers(spark: Any, workers: int, cache_dir: str | None) -> None:
    """Refuse what cannot run across ``workers`` nodes, before any work: Connect, or no shared cache dir."""
    from image_transfer.runtime import is_connect

    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return
    if is_connect(spark):
        raise UserError(
            "--workers above 1 needs a barrier stage (the RDD API), which Spark Connect (standard access, "
            "serverless) does not have: use a classic (dedicated) cluster, or --workers 1"
        )
    master = str(spark.sparkContext.master)
    if not master.startswith("local") and (cache_dir is None or not _shared(cache_dir)):
        raise UserError(
            f"--workers {workers} on a cluster needs --cache-dir on shared storage (a /Volumes/... path or "
            f"dbfs:/...), which every worker reads; got {cache_dir or 'a driver-local temp dir'}"
        )


def _shared(path: str) -> bool:
    return path.startswith(("/Volumes/", "dbfs:/", "/dbfs/", "file:///dbfs/", "file:/Volumes/", "file:///Volumes/"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


Main = Callable[..., dict[str, Any]]  # main(spec, *, index, attempt) -> the worker's report
Check = Callable[[dict[str, Any]], None]  # check(spec): raises UserError for what this worker cannot do


def run_stage(
    spark: Any, workers: int, spec: dict[str, Any], main: Main, check: Check | None = None
) -> list[dict[str, Any]]:
    """Run ``main(spec)`` (``training.train.worker_main``) in a barrier stage of ``workers`` tasks; returns each
    task's report. ``main`` is passed in so that this module does not import the training code.

    ``check(spec)`` runs on every task first; a ``UserError`` it raises on any task ends the stage without
    running ``main`` (nor retrying the stage) and is raised here, naming the worker.
    """
    payload = json.dumps(spec)

    def task(_: Any) -> Any:
        yield json.dumps(_barrier_task(payload, main, check))

    rdd = spark.sparkContext.parallelize(range(workers), workers)
    # The shuffle after it makes the barrier stage a map stage: Spark retries a failed barrier map stage
    # whole, and aborts a failed barrier result stage ("Could not recover from a failed barrier ResultStage").
    reports = [json.loads(r) for r in rdd.barrier().mapPartitions(task).repartition(1).collect()]
    refused = sorted((r for r in reports if r.get("user_error")), key=lambda r: r["index"])
    if refused:
        raise UserError(f"on training worker {refused[0]['index']}: {refused[0]['user_error']}")
    return reports


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block; then put back what was there (unset stays unset)."""
    previous = {key: os.environ.get(key) for key in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _barrier_task(payload: str, main: Main, check: Check | None) -> dict[str, Any]:
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    index = ctx.partitionId()
    gpus = ctx.resources().get("gpu")
    spec = json.loads(payload)
    with scoped_environ({"CUDA_VISIBLE_DEVICES": ",".join(gpus.addresses) if gpus else ""}):
        problem = ""
        if check is not None:
            try:
                check(spec)
            except UserError as exc:
                problem = str(exc)
        # Every task learns every task's port and problem: all go on, or all stop here (no collective started).
        shared = [json.loads(m) for m in ctx.allGather(json.dumps({"port": _free_port(), "problem": problem}))]
        if any(m["problem"] for m in shared):
            ctx.barrier()
            return {"index": index, "user_error": problem}
        hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
        tf_config = {
            "cluster": {"worker": [f"{h}:{m['port']}" for h, m in zip(hosts, shared, strict=True)]},
            "task": {"type": "worker", "index": index},
        }
        with scoped_environ({"TF_CONFIG": json.dumps(tf_config)}):
            # A retried barrier stage starts its tasks' attempt numbers afresh: count this task's starts on
            # shared storage.
            starts = os.path.join(spec["backup_dir"], "starts")
            os.makedirs(starts, exist_ok=True)
            attempt = sum(1 for f in os.listdir(starts) if f.startswith(f"task-{index}-"))
            open(os.path.join(starts, f"task-{index}-{attempt}"), "w").close()
            report = main(spec, index=index, attempt=attempt)
            ctx.barrier()
    return report


def weights_digest(weights: list[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()
