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

Before any collective work every task runs the stage's ``check`` (``worker_check``:
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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.training.build import build_backbone, build_classifier, compile_phase, head_dropout, unfreeze_top
from image_transfer.training.config import TrainConfig
from image_transfer.training.fit import phase_line, phases


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
    """Run ``main(spec)`` (``worker_main``) in a barrier stage of ``workers`` tasks; returns each task's report.
    ``main`` is passed in: ``train_across`` binds its worker callbacks to ``worker_main``.

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


def train_across(
    spark: Any,
    config: TrainConfig,
    train_feed: Any,
    val_feed: Any,
    names: Sequence[str],
    head: Any,
    epochs: list[dict[str, Any]],
    tmp: Path,
    worker_callbacks: WorkerCallbacks | None = None,
) -> tuple[list[dict[str, Any]], list[int], int, int]:
    """The image phases on ``config.workers`` barrier tasks; the chief's model lands at ``tmp/across.keras``.

    Returns (all epochs' rows, each worker's steps, replicas, global batch).
    """
    import functools
    import shutil

    import numpy as np

    # Beside the feed's Parquet (not inside: the workers read that folder as a dataset), deleted below.
    shared = Path(train_feed.location.local + "-stage")
    shared.mkdir()
    spec: dict[str, Any] = {
        "config": asdict(config),
        "class_names": list(names),
        "train": asdict(train_feed.location),
        "validation": asdict(val_feed.location) if val_feed else None,
        "backup_dir": str(shared / "backup"),
        "model_path": str(shared / "model.keras"),
        "first_epoch": len(epochs),
        "extra": {"backbone": config.backbone, "trained_by": "image-transfer train"},
    }
    if head is not None:  # the head trained on features here: the workers start from it
        weights = head.get_layer("classifier").get_weights()
        np.savez(shared / "head.npz", kernel=weights[0], bias=weights[1])
        spec["head_weights"] = str(shared / "head.npz")
    print(f"train: the image phases across {config.workers} workers (MultiWorkerMirroredStrategy, barrier stage)")
    for phase, n_epochs, lr in phases(config, head=head is None):
        print(phase_line(config, phase, n_epochs, lr, on=f"images, across {config.workers} workers"))
    main = functools.partial(worker_main, callbacks=worker_callbacks)
    try:
        reports = run_stage(spark, config.workers, spec, main, check=worker_check)
        reports.sort(key=lambda r: r["index"])
        shutil.copyfile(shared / "model.keras", tmp / "across.keras")
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    chief = reports[0]
    rows = []
    for r in chief["epochs"]:
        images = r["steps"] * chief["global_batch_size"]  # the whole stage's: every worker's replicas
        rate = images / r["train_seconds"] if r["train_seconds"] > 0 else 0.0
        rows.append(dict(r, input="images", images=images, images_per_second=rate))
    return epochs + rows, [r["steps"] for r in reports], chief["replicas"], chief["global_batch_size"]


def _synced_logs(model: Any) -> Any:
    """``model`` to fit under MultiWorkerMirroredStrategy: the same layers and weights, synchronised steps.

    - Keras 3 reduces each step's logs across workers with ``axis=0``, which a scalar loss or accuracy
      lacks ("Invalid reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388):
      the logs go out with shape [1], which reduces to the same mean.
    - Where Keras does not average gradients across replicas (``scoring.devices.keras_averages_replicas``),
      the step all-reduces them (mean) before the optimizer applies them, as Keras 3.8+ does.

    Uses the documented way to customise ``fit``: overriding ``train_step`` and ``test_step``.
    """
    import keras
    import tensorflow as tf

    from image_transfer.devices import keras_averages_replicas

    averaged = keras_averages_replicas()

    def shaped(logs: dict[str, Any]) -> dict[str, Any]:
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    class Synced(keras.Model):
        def __init__(self, inner: Any) -> None:
            super().__init__(name=f"{inner.name}_synced")
            self.inner = inner
            self.built = True  # its only weights are the inner model's, which is built

        def call(self, inputs: Any, training: bool = False) -> Any:
            return self.inner(inputs, training=training)

        def train_step(self, data: Any) -> Any:
            if averaged:
                return shaped(super().train_step(data))
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
                scaled = self.optimizer.scale_loss(loss)  # mixed precision: the LossScaleOptimizer's scale
            weights = self.trainable_weights
            grads = tape.gradient(scaled, weights)
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, grads)
            self.optimizer.apply_gradients(zip(grads, weights, strict=True))
            self._loss_tracker.update_state(loss, sample_weight=tf.shape(x)[0])  # as Keras 3.3's own step
            return shaped(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

        def test_step(self, data: Any) -> Any:
            return shaped(super().test_step(data))

    return Synced(model)


WorkerCallbacks = Callable[[int, int], Sequence[Any]]  # (worker index, attempt) -> extra Keras callbacks


def worker_check(spec: dict[str, Any]) -> None:
    """What a worker checks before any collective work, without starting TensorFlow (MultiWorkerMirroredStrategy
    must configure it first): the files it reads are there on this executor (the backbone or weights file,
    the training cache). A ``UserError`` otherwise, which ``distributed.run_stage`` reports."""
    config = TrainConfig(**spec["config"])
    files = [("backbone", config.backbone if config.backbone.endswith(".keras") else None)]
    files.append(("weights", config.weights if config.weights not in ("imagenet", "none") else None))
    for what, path in files:
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UserError(
                f"cannot read the {what} file {path} on this executor ({exc.strerror or exc}): give a path "
                "every node reads (e.g. /Volumes/...)"
            ) from exc
    for split in ("train", "validation"):
        if spec.get(split) and not os.path.isdir(spec[split]["local"]):
            raise UserError(
                f"the training cache {spec[split]['local']} is not visible on this executor: give --cache-dir "
                "on storage every node reads (a /Volumes/... path)"
            )


def worker_main(
    spec: dict[str, Any], *, index: int, attempt: int = 0, callbacks: WorkerCallbacks | None = None
) -> dict[str, Any]:
    """One MultiWorkerMirroredStrategy worker: build the model, train the image phases, the chief saves.

    ``callbacks(index, attempt)`` gives extra Keras callbacks for this worker's ``fit`` calls (after the
    backup's): it travels to the executors pickled, so it must be importable there or defined in ``__main__``.
    """
    import keras
    import tensorflow as tf

    from image_transfer.models.artifact import save_model

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    config = TrainConfig(**spec["config"])
    workers = strategy.cluster_resolver.cluster_spec().num_tasks("worker")
    backbone, model, size = _worker_model(spec, config, strategy)
    # Made outside the scope, the wrapper holds no strategy of its own and fit() takes the scope's (it
    # runs inside it): Keras 3.8+ then skips its eager build step, which fails under this strategy
    # (it reduces the input batch's (x, y) pair as one value); the layers' variables are the scope's.
    trainer = _synced_logs(model)
    train_feed, val_feed = _worker_feeds(spec)
    share = _WorkerShare(
        index=index, workers=workers, batch=config.batch_size * strategy.num_replicas_in_sync, size=size
    )
    steps = -(-train_feed.rows // share.batch)
    val_steps = -(-val_feed.rows // share.batch) if val_feed else 0
    log: list[dict[str, Any]] = []
    extra = list(callbacks(index, attempt)) if callbacks else []
    first = spec.get("first_epoch", 0)
    for phase, n_epochs, lr in phases(config, head=not spec.get("head_weights")):
        if phase == "fine_tune":
            unfreeze_top(backbone, config.fine_tune_layers)
        if index == 0:
            print(phase_line(config, phase, n_epochs, lr, on="images"), flush=True)
        compile_phase(trainer, strategy, learning_rate=lr)
        backup = keras.callbacks.BackupAndRestore(os.path.join(spec["backup_dir"], phase, f"worker-{index}"))
        with strategy.scope():  # a resumed stage's BackupAndRestore loads the weights: in the scope
            trainer.fit(
                share.dataset(train_feed, training=config.augment, seed=config.seed + first),
                epochs=n_epochs,
                steps_per_epoch=steps,
                validation_data=share.dataset(val_feed, training=False, seed=0) if val_feed else None,
                validation_steps=val_steps if val_feed else None,
                callbacks=[backup, _record(log, phase, first, attempt), *extra],
                verbose=2 if index == 0 else 0,
            )
        first += n_epochs
    if index == 0:
        save_model(model, spec["model_path"], class_names=spec["class_names"], extra=spec.get("extra"))
    return _worker_report(strategy, model, config, share, log)


def _worker_model(spec: dict[str, Any], config: TrainConfig, strategy: Any) -> tuple[Any, Any, int]:
    """(backbone, classifier, input size) in ``strategy``'s scope; the classifier starts from the head trained
    on features when ``spec`` has its weights."""
    import keras

    keras.utils.set_random_seed(config.seed)
    dropout = head_dropout(config.dropout)  # outside the scope: see head_dropout
    with strategy.scope():
        backbone, preprocess, size = build_backbone(
            config.backbone, weights=config.weights, image_size=config.image_size, trust=config.trust_model_code
        )
        model = build_classifier(
            backbone,
            preprocess,
            classes=len(spec["class_names"]),
            size=size,
            dropout=config.dropout,
            dropout_layer=dropout,
        )
        if spec.get("head_weights"):
            import numpy as np

            saved = np.load(spec["head_weights"])
            model.get_layer("classifier").set_weights([saved["kernel"], saved["bias"]])
    return backbone, model, size


def _worker_feeds(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The train and validation (or None) feeds over the Parquet the driver wrote."""
    from image_transfer.training.feed import ArrowFeed, CacheLocation

    train_feed = ArrowFeed(CacheLocation(**spec["train"]), ("content", "label_index"))
    val_feed = (
        ArrowFeed(CacheLocation(**spec["validation"]), ("content", "label_index")) if spec["validation"] else None
    )
    return train_feed, val_feed


@dataclass(frozen=True)
class _WorkerShare:
    """This worker's place in the stage: its index of ``workers``, the global batch, the input size."""

    index: int
    workers: int
    batch: int
    size: int

    def dataset(self, feed: Any, *, training: bool, seed: int) -> Any:
        """This worker's share of ``feed``, batched at the global batch: the strategy rebatches it into
        per-replica batches of this worker's replicas (auto-sharding off: the share is already this worker's)."""
        import tensorflow as tf

        shard = feed.shard(self.index, self.workers)
        with shard.make_tf_dataset(
            batch_size=self.batch,
            image_size=(self.size, self.size),
            training=training,
            num_epochs=None,
            seed=seed,
        ) as ds:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            return ds.with_options(options)


def _record(log: list[dict[str, Any]], phase: str, first: int, attempt: int) -> Any:
    """A callback that appends each epoch's row to ``log``: numbered in the whole run (Keras counts each phase
    from 1; a resumed stage starts past it), with this worker's steps."""
    import keras

    class Record(keras.callbacks.Callback):
        """Epoch numbers of the whole run and this worker's steps."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.steps, self.start, self.end = 0, time.perf_counter(), None

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = (self.end or time.perf_counter()) - self.start  # validation excluded
            row = {"epoch": first + epoch + 1, "phase": phase, "steps": self.steps, "attempt": attempt}
            row["train_seconds"] = seconds
            row.update({k: float(v) for k, v in (logs or {}).items()})
            log.append(row)

    return Record()


def _worker_report(
    strategy: Any, model: Any, config: TrainConfig, share: _WorkerShare, log: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a worker returns to the driver: its epochs' rows and steps, and a digest of its weights."""
    return {
        "index": share.index,
        "workers": share.workers,
        "replicas": int(strategy.num_replicas_in_sync),
        "global_batch_size": share.batch,
        "epochs": log,
        "steps": sum(r["steps"] for r in log),
        "weights_sha256": weights_digest(model.get_weights()),
        "image_size": share.size,
        "config": asdict(config),
    }
