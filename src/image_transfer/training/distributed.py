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

The chief (task 0) saves the model and returns the per-epoch metrics; every task returns its steps.
``IMAGE_TRANSFER_TEST_KILL`` (``TASK:EPOCH``) makes attempt 0 of that task exit after that epoch: the
tests' deterministic worker failure.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from image_transfer.errors import UserError

KILL_ENV = "IMAGE_TRANSFER_TEST_KILL"


def check_workers(spark: Any, workers: int, cache_dir: str | None) -> None:
    """Refuse what cannot run across ``workers`` nodes, before any work: Connect, or no shared cache dir."""
    from image_transfer.session import is_connect

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


Main = Callable[..., dict[str, Any]]  # main(spec, *, index, attempt, kill) -> the worker's report


def run_stage(spark: Any, workers: int, spec: dict[str, Any], main: Main) -> list[dict[str, Any]]:
    """Run ``main(spec)`` (``training.train.worker_main``) in a barrier stage of ``workers`` tasks; returns each
    task's report. ``main`` is passed in so that this module does not import the training code."""
    payload = json.dumps(spec)

    def task(_: Any) -> Any:
        yield json.dumps(_barrier_task(payload, main))

    rdd = spark.sparkContext.parallelize(range(workers), workers)
    # The shuffle after it makes the barrier stage a map stage: Spark retries a failed barrier map stage
    # whole, and aborts a failed barrier result stage ("Could not recover from a failed barrier ResultStage").
    reports = rdd.barrier().mapPartitions(task).repartition(1).collect()
    return [json.loads(r) for r in reports]


def _barrier_task(payload: str, main: Main) -> dict[str, Any]:
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    index = ctx.partitionId()
    gpus = ctx.resources().get("gpu")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus.addresses) if gpus else ""
    hosts = [info.address.rsplit(":", 1)[0] for info in ctx.getTaskInfos()]
    ports = ctx.allGather(str(_free_port()))
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)]},
            "task": {"type": "worker", "index": index},
        }
    )
    spec = json.loads(payload)
    kill = os.environ.get(KILL_ENV) or spec.get("kill")
    # A retried barrier stage starts its tasks' attempt numbers afresh: count this task's starts on shared storage.
    starts = os.path.join(spec["backup_dir"], "starts")
    os.makedirs(starts, exist_ok=True)
    attempt = sum(1 for f in os.listdir(starts) if f.startswith(f"task-{index}-"))
    open(os.path.join(starts, f"task-{index}-{attempt}"), "w").close()
    report = main(spec, index=index, attempt=attempt, kill=kill)
    ctx.barrier()
    return report


def weights_digest(weights: list[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()
