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
from dataclasses import asdict
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


def run_stage(spark: Any, workers: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``worker_main(spec)`` in a barrier stage of ``workers`` tasks; returns each task's report."""
    payload = json.dumps(spec)

    def task(_: Any) -> Any:
        yield json.dumps(_barrier_task(payload))

    rdd = spark.sparkContext.parallelize(range(workers), workers)
    return [json.loads(r) for r in rdd.barrier().mapPartitions(task).collect()]


def _barrier_task(payload: str) -> dict[str, Any]:
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
    report = worker_main(spec, index=index, attempt=attempt, kill=kill)
    ctx.barrier()
    return report


def worker_main(spec: dict[str, Any], *, index: int, attempt: int = 0, kill: str | None = None) -> dict[str, Any]:
    """One MultiWorkerMirroredStrategy worker: build the model, train the image phases, the chief saves."""
    import keras
    import tensorflow as tf

    from image_transfer.models.artifact import save_model
    from image_transfer.training.feed import ArrowFeed, CacheLocation
    from image_transfer.training.train import TrainConfig, build_backbone, build_classifier, unfreeze_top

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    config = TrainConfig(**spec["config"])
    workers = strategy.cluster_resolver.cluster_spec().num_tasks("worker")
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        backbone, preprocess, size = build_backbone(
            config.backbone, weights=config.weights, image_size=config.image_size, trust=config.trust_model_code
        )
        model = build_classifier(
            backbone, preprocess, classes=len(spec["class_names"]), size=size, dropout=config.dropout
        )
        if spec.get("head_weights"):
            import numpy as np

            saved = np.load(spec["head_weights"])
            model.get_layer("classifier").set_weights([saved["kernel"], saved["bias"]])
    train_feed = ArrowFeed(CacheLocation(**spec["train"]), ("content", "label_index"))
    val_feed = (
        ArrowFeed(CacheLocation(**spec["validation"]), ("content", "label_index")) if spec["validation"] else None
    )
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    steps = -(-train_feed.rows // global_batch)
    val_steps = -(-val_feed.rows // global_batch) if val_feed else 0
    log: list[dict[str, Any]] = []
    kill_task, kill_epoch = (int(x) for x in kill.split(":")) if kill else (-1, -1)

    class Record(keras.callbacks.Callback):
        """Epoch numbers as Keras ran them (a resumed stage starts past 0) and this worker's steps."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.steps = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            row = {"epoch": epoch + 1, "phase": self.phase, "steps": self.steps, "attempt": attempt}
            row.update({k: float(v) for k, v in (logs or {}).items()})
            log.append(row)
            if index == kill_task and attempt == 0 and epoch + 1 == kill_epoch:
                os._exit(17)  # the deterministic failure of the resume test

    def datasets(feed: Any, training: bool, seed: int) -> Any:
        # This worker's share, batched at the global batch: the strategy rebatches it into per-replica
        # batches of this worker's replicas (auto-sharding off: the share is already this worker's).
        shard = feed.shard(index, workers)
        with shard.make_tf_dataset(
            batch_size=global_batch,
            image_size=(size, size),
            training=training and config.augment,
            num_epochs=None,
            seed=seed,
        ) as ds:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            return ds.with_options(options)

    phases = [] if spec.get("head_weights") else [("head", config.epochs, config.learning_rate)]
    if config.fine_tune_layers:
        phases.append(("fine_tune", config.fine_tune_epochs or config.epochs, config.learning_rate / 10))
    first = spec.get("first_epoch", 0)
    for phase, n_epochs, lr in phases:
        if phase == "fine_tune":
            unfreeze_top(backbone, config.fine_tune_layers)
        with strategy.scope():
            model.compile(
                optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
            )
        record = Record()
        record.phase = phase
        backup = keras.callbacks.BackupAndRestore(os.path.join(spec["backup_dir"], phase, f"worker-{index}"))
        model.fit(
            datasets(train_feed, True, config.seed + first),
            epochs=first + n_epochs,
            initial_epoch=first,
            steps_per_epoch=steps,
            validation_data=datasets(val_feed, False, 0) if val_feed else None,
            validation_steps=val_steps if val_feed else None,
            callbacks=[backup, record],
            verbose=2 if index == 0 else 0,
        )
        first += n_epochs
    if index == 0:
        save_model(model, spec["model_path"], class_names=spec["class_names"], extra=spec.get("extra"))
    weights_digest = _digest(model.get_weights())
    return {
        "index": index,
        "workers": workers,
        "replicas": int(strategy.num_replicas_in_sync),
        "global_batch_size": global_batch,
        "epochs": log,
        "steps": sum(r["steps"] for r in log),
        "weights_sha256": weights_digest,
        "image_size": size,
        "config": asdict(config),
    }


def _digest(weights: list[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in weights:
        h.update(w.tobytes())
    return h.hexdigest()
