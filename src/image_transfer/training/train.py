"""Train: transfer learning on a prepared dataset, fed by Petastorm or Arrow, saved for ``score``.

A pretrained backbone (``keras.applications`` by name, or a Keras file) is frozen under a new
softmax head for the dataset's classes; optionally a second phase unfreezes the backbone's top
layers at a tenth of the learning rate. The model takes float RGB 0..255 at its input size and holds
its preprocessing, and is saved with ``model.save_model`` so ``score`` reports class names. The
best weights by validation accuracy are checkpointed and restored; a metrics JSON and a PNG of the
training curves are written beside it, and MLflow gets the run when a tracking server is set.

With ``head_input="features"`` (the default) the frozen phase does not run the backbone per epoch:
the executors embed every train and validation image once through the featurize path (the scoring
engine, GPU pinning, per-row errors: unreadable rows are left out and counted), the embeddings are
cached as Parquet beside the feeds, and the head (the same dropout and softmax layers) trains on them
on the driver. Augmentation cannot apply to cached features: it applies to fine-tuning only.
``head_input="images"`` trains the head on decoded (augmented) images each epoch, as fine-tuning does.

On a node with several GPUs, training runs under ``tf.distribute.MirroredStrategy`` over all of them
(``devices.training_strategy``): ``batch_size`` is per GPU, so the global batch is ``batch_size`` x GPUs
and an epoch has proportionally fewer steps; the learning rate is not scaled. ``mixed_precision``
computes in float16 on GPUs (the classifier's softmax stays float32); the saved model is float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.storage.fs import local_absolute

DEFAULT_IMAGE_SIZE = 224
HEAD_INPUTS = ("features", "images")


@dataclass(frozen=True)
class Backbone:
    """How to build one ``keras.applications`` backbone and the preprocessing its weights expect."""

    constructor: str  # attribute of keras.applications
    preprocess: str  # "scale_-1_1", "caffe" or "none" (built into the network)
    min_size: int = 32


BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", "scale_-1_1"),
    "resnet50": Backbone("ResNet50", "caffe"),
    "efficientnet_b0": Backbone("EfficientNetB0", "none"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a model is trained (recorded in the metrics and MLflow params)."""

    backbone: str = "mobilenet_v2"  # a name in BACKBONES, or a .keras file
    weights: str = "imagenet"  # imagenet | none | a weights file (keras.applications backbones)
    epochs: int = 5
    fine_tune_layers: int = 0
    fine_tune_epochs: int | None = None  # default: ``epochs``
    batch_size: int = 32
    image_size: int | None = None  # default: 224, or a backbone file's input size
    learning_rate: float = 1e-3
    dropout: float = 0.2
    patience: int = 3
    augment: bool = True
    seed: int = 0
    data_path: str = "auto"
    cache_dir: str | None = None
    checkpoint_dir: str | None = None  # default: a temp dir, deleted at the end
    mixed_precision: bool = False  # mixed_float16 on GPUs (ignored without one)
    head_input: str = "features"  # features: the frozen phase trains on embeddings computed once; images
    workers: int = 1  # > 1: the image phases as a barrier stage of MultiWorkerMirroredStrategy workers
    trust_model_code: bool = False  # a backbone file may name code outside Keras (custom layers)
    litert_cache: str | None = None  # features: the shared LiteRT conversion cache (ScoringOptions.litert_cache)

    def __post_init__(self) -> None:
        if self.head_input not in HEAD_INPUTS:
            raise UserError(f"head-input must be one of {', '.join(HEAD_INPUTS)}, not {self.head_input!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.fine_tune_layers < 0:
            raise UserError(f"fine-tune-layers must be >= 0, got {self.fine_tune_layers}")
        if self.image_size is not None and self.image_size < 32:
            raise UserError(f"image-size must be at least 32, got {self.image_size}")
        if self.backbone not in BACKBONES and not self.backbone.endswith(".keras"):
            raise UserError(f"unknown backbone {self.backbone!r}: one of {', '.join(BACKBONES)}, or a .keras file")


FROM_BACKBONE_FILE = "from the backbone file"


def weights_used(config: TrainConfig) -> str:
    """The weights training starts from, as recorded: a file backbone's own unless a weights file is given."""
    if config.backbone.endswith(".keras") and config.weights in ("imagenet", "none"):
        return FROM_BACKBONE_FILE
    return config.weights


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its local relative paths (a backbone or weights file, the cache and checkpoint dirs)
    made absolute: barrier workers and executors run in other directories. URIs stay as they are."""
    changes: dict[str, Any] = {}
    if config.backbone.endswith(".keras"):
        changes["backbone"] = local_absolute(config.backbone)
    if config.weights not in ("imagenet", "none"):
        changes["weights"] = local_absolute(config.weights)
    for name in ("cache_dir", "checkpoint_dir"):
        if getattr(config, name):
            changes[name] = local_absolute(getattr(config, name))
    return replace(config, **changes)


@dataclass
class TrainResult:
    """What ``train`` produced; ``to_dict`` is the metrics JSON."""

    model_path: str
    class_names: list[str]
    image_size: int
    data_path: str
    train_rows: int
    validation_rows: int
    epochs: list[dict[str, Any]]
    final_validation_accuracy: float | None
    images_per_second: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    metrics_path: str | None = None
    plot_path: str | None = None
    mlflow_run_id: str | None = None
    registered_version: str | None = None  # NAME/VERSION when registered

    @property
    def model_uri(self) -> str:
        """What ``score`` and ``evaluate`` take: ``models:/NAME/VERSION`` when registered, else the file."""
        return f"models:/{self.registered_version}" if self.registered_version else self.model_path

    replicas: int = 1  # devices the model trained on (MirroredStrategy: GPUs; across workers: all of them)
    workers: int = 1  # training processes (nodes) of the image phases
    worker_steps: list[int] | None = None  # with workers > 1: each worker's training steps
    global_batch_size: int = 0  # batch_size x replicas
    precision: str = "float32"  # the Keras policy training ran under
    head_input: str = "images"  # what the frozen phase trained on
    features: dict[str, Any] | None = None  # with head_input features: rows embedded, failed, seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        return asdict(self)

    def describe(self) -> str:
        """A short human summary."""
        acc = self.final_validation_accuracy
        return (
            f"trained on {self.train_rows} images ({len(self.class_names)} classes) via {self.data_path}, "
            f"{len(self.epochs)} epochs in {self.seconds:.1f}s ({self.images_per_second:.1f} images/s); "
            f"validation accuracy {'n/a' if acc is None else f'{acc:.3f}'} on {self.validation_rows} images\n"
            f"model: {self.model_path}"
            + (f"\nmetrics: {self.metrics_path}" if self.metrics_path else "")
            + (f"\ncurves: {self.plot_path}" if self.plot_path else "")
            + (f"\nMLflow run: {self.mlflow_run_id}" if self.mlflow_run_id else "")
            + (f"\nregistered: {self.model_uri}" if self.registered_version else "")
        )


# ---- the model ---------------------------------------------------------------------------------


def _preprocess_layers(kind: str) -> list[Any]:
    """Keras layers for a preprocessing, so it lives (serialisably, without Lambda) inside the model."""
    import numpy as np
    from keras import layers

    if kind == "none":
        return []
    if kind == "scale_-1_1":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    if kind == "caffe":  # RGB -> BGR and ImageNet means off: a fixed 1x1 linear map on the channels
        swap = np.eye(3, dtype="float32")[::-1]
        mean = np.array([103.939, 116.779, 123.68], "float32")
        dense = layers.Dense(3, trainable=False, name="preprocess")
        dense.build((None, 3))
        dense.set_weights([swap, -mean])
        return [dense]
    raise ValueError(kind)


def build_backbone(
    name: str, *, weights: str, image_size: int | None, trust: bool = False
) -> tuple[Any, list[Any], int]:
    """(backbone, preprocessing layers, input size); a file backbone keeps its own preprocessing.

    A backbone file naming code outside Keras is refused unless ``trust`` (``--trust-model-code``).
    """
    import keras

    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import embedding_model, load_keras

    if name in BACKBONES:
        spec = BACKBONES[name]
        size = image_size or DEFAULT_IMAGE_SIZE
        if weights == "none":
            w: str | None = None
        elif weights == "imagenet":
            w = "imagenet"
        else:
            if not Path(weights).is_file():
                raise UserError(f"weights file not found: {weights}")
            w = weights
        try:
            net = getattr(keras.applications, spec.constructor)(
                include_top=False, weights=w, input_shape=(size, size, 3), pooling="avg"
            )
        except ValueError as exc:
            raise UserError(f"cannot build {name} with weights {weights}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a failed imagenet download surfaces as many types
            if w == "imagenet":
                raise UserError(
                    f"cannot load the ImageNet weights for {name} ({type(exc).__name__}: {exc}); they are "
                    "downloaded on first use: without internet, pass --weights PATH or --weights none"
                ) from exc
            raise
        return net, _preprocess_layers(spec.preprocess), size
    # A Keras file: a feature extractor, or a classifier cut before its last layer.
    net = load_keras(name, trust=trust)
    if read_metadata(name).get("class_names"):
        net = embedding_model(net, None)
    if weights not in ("imagenet", "none"):
        net.load_weights(weights)
    shape = tuple(net.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise UserError(f"backbone {name} must take square RGB images [None, n, n, 3], takes {shape}")
    if image_size is not None and image_size != shape[1]:
        raise UserError(f"backbone {name} takes {shape[1]}x{shape[2]} images; --image-size {image_size} differs")
    if len(net.outputs[0].shape) == 4:
        net = keras.Model(net.inputs, keras.layers.GlobalAveragePooling2D()(net.outputs[0]))
    if len(net.outputs[0].shape) != 2:
        raise UserError(f"backbone {name} must output features [None, d], outputs {tuple(net.outputs[0].shape)}")
    return net, [], int(shape[1])


def head_dropout(rate: float) -> Any:
    """The head's Dropout layer (``head_dropout``).

    Under ``MultiWorkerMirroredStrategy`` make it outside the strategy's scope and pass it to
    ``build_classifier``: its random-seed variable is then the worker's own, not mirrored (Keras < 3.5 makes
    it uint32, which the strategy cannot broadcast, and each worker may draw its own dropout masks).
    """
    import keras

    return keras.layers.Dropout(rate, name="head_dropout")


def build_classifier(
    backbone: Any,
    preprocess: Sequence[Any],
    *,
    classes: int,
    size: int,
    dropout: float,
    dropout_layer: Any = None,
) -> Any:
    """Frozen ``backbone`` under a new softmax head: float RGB 0..255 [None, size, size, 3] -> [None, classes].

    ``dropout_layer`` (``head_dropout(dropout)``, made elsewhere) replaces the one made here.
    """
    import keras

    backbone.trainable = False
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    for layer in preprocess:
        x = layer(x)
    x = backbone(x, training=False)  # BatchNorm stays in inference mode, also when fine-tuned
    if isinstance(x, (list, tuple)) and len(x) == 1:  # Keras 3.12+: a file saved as [output] calls as a list
        x = x[0]
    x = (dropout_layer if dropout_layer is not None else head_dropout(dropout))(x)
    # float32 softmax also under a mixed policy (float16 probabilities lose the small ones)
    outputs = keras.layers.Dense(classes, activation="softmax", name="classifier", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="image_transfer_classifier")


def unfreeze_top(backbone: Any, layers: int) -> int:
    """Make the top ``layers`` layers with weights trainable (BatchNorm stays frozen); returns how many."""
    import keras

    backbone.trainable = True
    weighted = [lyr for lyr in backbone.layers if lyr.weights]
    top = {id(lyr) for lyr in weighted[-layers:]} if layers else set()
    count = 0
    for lyr in backbone.layers:
        lyr.trainable = id(lyr) in top and not isinstance(lyr, keras.layers.BatchNormalization)
        count += lyr.trainable
    return count


# ---- training ----------------------------------------------------------------------------------


def _throughput_callback(batch_size: int, log: list[dict[str, Any]]) -> Any:
    import keras

    class Throughput(keras.callbacks.Callback):
        """Training images per second of each epoch (validation excluded)."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start, self.end, self.steps = time.perf_counter(), None, 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = (self.end or time.perf_counter()) - self.start
            log.append({"images": self.steps * batch_size, "train_seconds": seconds})

    return Throughput()


def _phases(config: TrainConfig, *, head: bool = True) -> list[tuple[str, int, float]]:
    """(phase, epochs, learning rate) of each phase to run: the head's (unless ``head`` is false), then
    fine-tuning's at a tenth of the learning rate when ``fine_tune_layers``."""
    phases = [("head", config.epochs, config.learning_rate)] if head else []
    if config.fine_tune_layers:
        phases.append(("fine_tune", config.fine_tune_epochs or config.epochs, config.learning_rate / 10))
    return phases


def _phase_line(config: TrainConfig, phase: str, epochs: int, learning_rate: float, *, on: str) -> str:
    """The line printed as a phase begins (Keras then numbers its epochs from 1)."""
    what = (
        "training the new head (backbone frozen)"
        if phase == "head"
        else f"fine-tuning the top {config.fine_tune_layers} backbone layers"
    )
    count = f"{epochs} epoch" + ("" if epochs == 1 else "s")
    return f"train: {what} for {count} at learning rate {learning_rate:g}, on {on}"


def _fit_phase(
    model: Any,
    train_ds: Any,
    val_ds: Any | None,
    *,
    phase: str,
    first_epoch: int,
    epochs: int,
    steps: int,
    val_steps: int,
    config: TrainConfig,
    checkpoint: Path,
    best: float | None,
    callbacks: Sequence[Any],
    batch_size: int,
) -> tuple[list[dict[str, Any]], float | None]:
    """One ``fit`` phase; restores the best weights seen so far (this phase's or ``best`` before it).

    Its rows number the epochs of the whole run: ``first_epoch`` + 1 on.
    """
    import keras

    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    timing: list[dict[str, Any]] = []
    saver = keras.callbacks.ModelCheckpoint(
        str(checkpoint),
        monitor=monitor,
        mode="max",
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=best,
    )
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, mode="max", patience=config.patience)
    history = model.fit(  # epochs numbered from 1 in each phase, as its line says (_phase_line)
        train_ds,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=val_ds,
        validation_steps=val_steps if val_ds is not None else None,
        callbacks=[_throughput_callback(batch_size, timing), saver, stopper, *callbacks],
        verbose=2,
    )
    rows = []
    for i, t in enumerate(timing):
        row = {"epoch": first_epoch + i + 1, "phase": phase}
        row.update({k: float(v[i]) for k, v in history.history.items() if i < len(v)})
        row["images_per_second"] = t["images"] / t["train_seconds"] if t["train_seconds"] > 0 else 0.0
        row.update(t)
        rows.append(row)
    if checkpoint.exists():
        model.load_weights(str(checkpoint))
    scores = [r[monitor] for r in rows if monitor in r]
    if scores and (best is None or max(scores) > best):
        best = max(scores)
    return rows, best


def _train_across(
    spark: Any,
    config: TrainConfig,
    train_feed: Any,
    val_feed: Any,
    names: Sequence[str],
    head: Any,
    epochs: list[dict[str, Any]],
    tmp: Path,
    output_model: str,
    worker_callbacks: WorkerCallbacks | None = None,
) -> tuple[list[dict[str, Any]], list[int], int, int]:
    """The image phases on ``config.workers`` barrier tasks; the chief's model lands at ``tmp/across.keras``.

    Returns (all epochs' rows, each worker's steps, replicas, global batch).
    """
    import functools
    import shutil

    import numpy as np

    from image_transfer.training import distributed

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
    for phase, n_epochs, lr in _phases(config, head=head is None):
        print(_phase_line(config, phase, n_epochs, lr, on=f"images, across {config.workers} workers"))
    main = functools.partial(worker_main, callbacks=worker_callbacks)
    try:
        reports = distributed.run_stage(spark, config.workers, spec, main, check=worker_check)
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


def _head_model(model: Any) -> Any:
    """The classifier's head alone (its own dropout and softmax layers, shared): embeddings -> probabilities."""
    import keras

    dense = model.get_layer("classifier")
    dropout = model.get_layer("head_dropout")
    inputs = keras.Input((int(dense.kernel.shape[0]),), name="features")
    return keras.Model(inputs, dense(dropout(inputs)), name="image_transfer_head")


def _feature_datasets(features: Any, *, batch: int, seed: int) -> tuple[Any, Any, int, int]:
    """(train, validation or None, steps, validation steps) over cached embeddings, repeating forever."""
    import tensorflow as tf

    x, y = features.splits["train"]
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch)
        .prefetch(2)
    )
    vx, vy = features.splits["validation"]
    val_ds = tf.data.Dataset.from_tensor_slices((vx, vy)).batch(batch).repeat() if len(vy) else None
    return train_ds, val_ds, math.ceil(len(y) / batch), math.ceil(len(vy) / batch)


def _feature_accuracy(head: Any, x: Any, y: Any, *, batch: int) -> float:
    """Exact accuracy of ``head`` on embeddings ``x`` with labels ``y``."""
    import numpy as np

    predicted = np.concatenate(
        [np.argmax(head(x[i : i + batch], training=False).numpy(), -1) for i in range(0, len(y), batch)]
    )
    return float((predicted == y).mean())


def _evaluate_split(model: Any, feed: Any, *, batch_size: int, image_size: int) -> float:
    """Exact accuracy over one pass of ``feed``."""
    import numpy as np

    correct = total = 0
    with feed.make_tf_dataset(batch_size=batch_size, image_size=(image_size, image_size)) as ds:
        for images, labels in ds:
            # A direct call: the whole batch on one device also when the model is mirrored.
            predicted = np.argmax(model(images, training=False).numpy(), axis=-1)
            correct += int((predicted == labels.numpy()).sum())
            total += len(predicted)
    return correct / total if total else 0.0


def check_output_model(output_model: str, backbone: str, *, overwrite: bool = False) -> None:
    """UserError before any training unless ``output_model`` is a ``.keras`` file path whose save would
    not replace the backbone file it trains from, nor a directory (a SavedModel, a dataset), nor (unless
    ``overwrite``) any existing file."""
    if not output_model.endswith(".keras"):
        raise UserError(f"--output-model must be a .keras file path, got {output_model}")
    out = Path(output_model)
    if out.is_dir():
        raise UserError(f"--output-model {output_model} is a directory: give a .keras file path")
    if backbone.endswith(".keras") and out.exists() and Path(backbone).exists() and out.samefile(backbone):
        raise UserError(f"--output-model {output_model} is the backbone file: saving would replace it")
    if out.exists() and not overwrite:
        raise UserError(f"--output-model {output_model} exists: not replaced (--overwrite replaces it)")


def train(
    df: Any,
    config: TrainConfig,
    *,
    output_model: str,
    metrics_path: str | None = None,
    callbacks: Sequence[Any] = (),
    register_as: str | None = None,
    strategy: Any = None,
    workers: int | None = None,
    worker_callbacks: WorkerCallbacks | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train on a prepared dataset's ``train`` split, validate on ``validation``, save the model.

    An existing ``output_model`` is refused before any training unless ``overwrite`` (never the backbone
    file it trains from).
    The feed caches are deleted when this returns or raises. ``callbacks`` are extra Keras callbacks.
    With a tracking server the run is logged to MLflow; ``register_as`` also registers the model as a
    new version of that name (``catalog.schema.model`` on Unity Catalog).
    ``workers`` (default ``config.workers``, 1) above 1 runs the image phases as a barrier stage of that
    many MultiWorkerMirroredStrategy workers (``training.distributed``; classic sessions only).
    ``strategy`` is a ``tf.distribute`` strategy (default: ``devices.training_strategy()``, mirrored over
    the GPUs when there are several); ``config.batch_size`` is per replica.
    ``worker_callbacks(index, attempt)`` gives extra Keras callbacks for each barrier worker (see
    ``worker_main``); ``callbacks`` apply to the phases trained here.
    Local relative paths (the backbone or weights file, the cache and checkpoint dirs, ``output_model``,
    ``metrics_path``) are made absolute here: executors and barrier workers run in other directories.
    """
    import keras

    from image_transfer import devices
    from image_transfer.models.artifact import save_model
    from image_transfer.models.load import load_keras
    from image_transfer.scoring.options import ScoringOptions
    from image_transfer.training.feed import open_features, open_feed
    from image_transfer.training.prepare import class_names, usable

    config = absolute_paths(config)
    output_model = local_absolute(output_model)
    metrics_path = local_absolute(metrics_path) if metrics_path else None
    check_output_model(output_model, config.backbone, overwrite=overwrite)
    if register_as:  # before training, not after
        from image_transfer.models.uris import require_tracking

        require_tracking(f"--register-as {register_as}")
    names = class_names(df)
    if len(names) < 2:
        raise UserError(f"need at least two classes to train, found {len(names)}: {', '.join(names)}")
    from image_transfer.training import distributed

    if workers is not None:
        config = replace(config, workers=workers)
    distributed.check_workers(df.sparkSession, config.workers, config.cache_dir)
    train_df, val_df = usable(df, "train"), usable(df, "validation")
    has_val = not val_df.isEmpty()
    devices.enable_memory_growth()
    strategy = strategy or devices.training_strategy()
    replicas = int(strategy.num_replicas_in_sync)
    batch = config.batch_size * replicas  # the global batch, split over the replicas
    if replicas > 1:
        print(f"train: mirrored over {replicas} devices, global batch {batch} ({config.batch_size} per device)")
        if not devices.keras_averages_replicas():  # a known defect: the workaround of --workers fails in-graph here
            print(
                f"train: Keras {keras.__version__} applies each device's own gradient under MirroredStrategy (the "
                "devices drift apart; the first device's weights are saved); Keras >= 3.8 averages them"
            )
    policy = "float32"
    if config.mixed_precision:
        if devices.visible_gpus():
            policy = "mixed_float16"
        else:
            print("train: --mixed-precision needs a GPU; training in float32")
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        with strategy.scope():
            backbone, preprocess, size = build_backbone(
                config.backbone, weights=config.weights, image_size=config.image_size, trust=config.trust_model_code
            )
            if policy != "float32":  # a backbone file keeps its saved float32 layers unless retyped
                backbone = devices.with_policy(backbone, policy)
            model = build_classifier(backbone, preprocess, classes=len(names), size=size, dropout=config.dropout)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    shape = (size, size)
    from_features = config.head_input == "features"
    if from_features and config.augment:
        print(
            "train: augmentation does not apply to cached features: the head trains on un-augmented "
            + ("embeddings; fine-tuning augments" if config.fine_tune_layers else "embeddings")
        )
    needs_images = not from_features or bool(config.fine_tune_layers)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="image-transfer-train-")))
        ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else tmp / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        features = head = None
        if from_features:
            features = stack.enter_context(
                open_features(
                    usable(df).where("split IN ('train', 'validation')"),
                    devices.with_policy(model, "float32") if policy != "float32" else model,
                    class_names=names,
                    cache_dir=config.cache_dir,
                    options=ScoringOptions(trust_model_code=config.trust_model_code, litert_cache=config.litert_cache),
                )
            )
            if features.rows_failed:
                print(f"train: {features.rows_failed} of {features.rows} images could not be embedded; left out")
            with strategy.scope():
                head = _head_model(model)
        train_feed = val_feed = None
        across = config.workers > 1 and needs_images
        if config.workers > 1 and not needs_images:
            print(f"train: --workers {config.workers}: no phase trains on images; the head trains on the driver")
        if needs_images:
            data_path = "arrow" if across else config.data_path  # the workers read the Parquet themselves
            files = config.workers * 2 if across else None
            train_feed = stack.enter_context(
                open_feed(train_df, path=data_path, cache_dir=config.cache_dir, files=files)
            )
            val_feed = (
                stack.enter_context(open_feed(val_df, path=train_feed.path, cache_dir=config.cache_dir, files=files))
                if has_val
                else None
            )
        epochs: list[dict[str, Any]] = []
        best: float | None = None
        worker_steps = None
        for phase, n_epochs, lr in _phases(config):
            on_features = features is not None and phase == "head"
            if across and not on_features:  # this and any later phase: on the workers
                epochs, worker_steps, replicas, batch = _train_across(
                    df.sparkSession,
                    config,
                    train_feed,
                    val_feed,
                    names,
                    head,
                    epochs,
                    tmp,
                    output_model,
                    worker_callbacks,
                )
                model = load_keras(str(tmp / "across.keras"))
                break
            fitted = head if on_features else model
            if phase == "fine_tune":
                unfreeze_top(backbone, config.fine_tune_layers)
            print(_phase_line(config, phase, n_epochs, lr, on="cached features" if on_features else "images"))
            with strategy.scope():
                optimizer = keras.optimizers.Adam(lr)
                if policy == "mixed_float16":
                    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
                fitted.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            with contextlib.ExitStack() as datasets:
                if on_features:
                    train_ds, val_ds, steps, val_steps = _feature_datasets(features, batch=batch, seed=config.seed)
                else:
                    steps = math.ceil(train_feed.rows / batch)
                    val_steps = math.ceil(val_feed.rows / batch) if val_feed else 0
                    train_ds = datasets.enter_context(
                        train_feed.make_tf_dataset(
                            batch_size=batch,
                            image_size=shape,
                            training=config.augment,
                            num_epochs=None,
                            seed=config.seed + len(epochs),
                        )
                    )
                    val_ds = (
                        datasets.enter_context(
                            val_feed.make_tf_dataset(batch_size=batch, image_size=shape, num_epochs=None)
                        )
                        if val_feed
                        else None
                    )
                checkpoint = ckpt_dir / f"best-{phase}.weights.h5"
                checkpoint.unlink(missing_ok=True)  # never restore a previous run's weights
                rows, best = _fit_phase(
                    fitted,
                    train_ds,
                    val_ds,
                    phase=phase,
                    first_epoch=len(epochs),
                    epochs=n_epochs,
                    steps=steps,
                    val_steps=val_steps,
                    config=config,
                    checkpoint=checkpoint,
                    best=best,
                    callbacks=callbacks,
                    batch_size=batch,
                )
            for row in rows:
                row["input"] = "features" if on_features else "images"
            epochs += rows
            if phase == "fine_tune" and not checkpoint.exists():  # fine-tuning never beat the head phase
                with strategy.scope():
                    (head or model).load_weights(str(ckpt_dir / "best-head.weights.h5"))
        if val_feed is not None:
            final = _evaluate_split(model, val_feed, batch_size=batch, image_size=size)
        elif features is not None and len(features.splits["validation"][1]):
            final = _feature_accuracy(head, *features.splits["validation"], batch=batch)
        else:
            final = None
        if train_feed is not None:
            data_path, train_rows = train_feed.path, train_feed.rows
            val_rows = val_feed.rows if val_feed else 0
        else:
            data_path = "features"
            train_rows, val_rows = (len(features.splits[k][1]) for k in ("train", "validation"))
        seconds = time.perf_counter() - started
        save_model(
            devices.with_policy(model, "float32") if policy != "float32" else model,  # scoring picks its precision
            output_model,
            class_names=names,
            extra={"backbone": config.backbone, "image_size": size, "trained_by": "image-transfer train"},
        )
    images = sum(e["images"] for e in epochs)
    train_seconds = sum(e["train_seconds"] for e in epochs)
    result = TrainResult(
        model_path=output_model,
        class_names=list(names),
        image_size=size,
        data_path=data_path,
        train_rows=train_rows,
        validation_rows=val_rows,
        epochs=epochs,
        final_validation_accuracy=final,
        images_per_second=images / train_seconds if train_seconds > 0 else 0.0,
        seconds=seconds,
        config=asdict(replace(config, image_size=size, weights=weights_used(config))),
        replicas=replicas,
        global_batch_size=batch,
        precision=policy,
        workers=config.workers if across else 1,
        worker_steps=worker_steps,
        head_input=config.head_input,
        features=features.to_dict() if features is not None else None,
    )
    metrics = Path(metrics_path) if metrics_path else Path(output_model).with_suffix(".metrics.json")
    write_metrics(result, metrics)
    log_to_mlflow(result, register_as=register_as)
    if result.registered_version:  # the metrics JSON names the version too
        metrics.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def write_metrics(result: TrainResult, path: Path) -> None:
    """The metrics JSON at ``path`` and the training curves as a PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = path.with_suffix(".png")
    plot_training_curves(result.epochs, plot)
    result.metrics_path, result.plot_path = str(path), str(plot)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def plot_training_curves(epochs: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, with the fine-tuning start marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(x, [e.get(metric) for e in epochs], marker="o", label=f"train {metric}")
            if any(f"val_{metric}" in e for e in epochs):
                ax.plot(x, [e.get(f"val_{metric}") for e in epochs], marker="o", label=f"validation {metric}")
            tuned = [e["epoch"] for e in epochs if e["phase"] == "fine_tune"]
            if tuned:
                ax.axvline(tuned[0] - 0.5, color="grey", linestyle="--", label="fine-tuning")
            ax.set_xlabel("epoch")
            ax.set_title(metric)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def mlflow_enabled() -> bool:
    """MLflow is importable and a tracking server is configured (always the case on Databricks)."""
    from image_transfer.models.uris import tracking_configured

    return tracking_configured()


def log_to_mlflow(result: TrainResult, *, register_as: str | None = None) -> str | None:
    """Log the run to MLflow (see ``registry.log_training``) and register the model; returns the run id."""
    from image_transfer.lifecycle.tracking import log_training

    run_id, version = log_training(result, register_as=register_as)
    result.mlflow_run_id, result.registered_version = run_id, version
    return run_id


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
    from image_transfer.training.distributed import weights_digest
    from image_transfer.training.feed import ArrowFeed, CacheLocation

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    config = TrainConfig(**spec["config"])
    workers = strategy.cluster_resolver.cluster_spec().num_tasks("worker")
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
    # Made outside the scope, the wrapper holds no strategy of its own and fit() takes the scope's (it
    # runs inside it): Keras 3.8+ then skips its eager build step, which fails under this strategy
    # (it reduces the input batch's (x, y) pair as one value); the layers' variables are the scope's.
    trainer = _synced_logs(model)
    train_feed = ArrowFeed(CacheLocation(**spec["train"]), ("content", "label_index"))
    val_feed = (
        ArrowFeed(CacheLocation(**spec["validation"]), ("content", "label_index")) if spec["validation"] else None
    )
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    steps = -(-train_feed.rows // global_batch)
    val_steps = -(-val_feed.rows // global_batch) if val_feed else 0
    log: list[dict[str, Any]] = []
    extra = list(callbacks(index, attempt)) if callbacks else []

    class Record(keras.callbacks.Callback):
        """Epoch numbers of the whole run (Keras counts each phase from 1; a resumed stage starts past it)
        and this worker's steps."""

        def __init__(self, phase: str, first: int) -> None:
            super().__init__()
            self.phase, self.first = phase, first

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.steps, self.start, self.end = 0, time.perf_counter(), None

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1
            self.end = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = (self.end or time.perf_counter()) - self.start  # validation excluded
            row = {"epoch": self.first + epoch + 1, "phase": self.phase, "steps": self.steps, "attempt": attempt}
            row["train_seconds"] = seconds
            row.update({k: float(v) for k, v in (logs or {}).items()})
            log.append(row)

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

    first = spec.get("first_epoch", 0)
    for phase, n_epochs, lr in _phases(config, head=not spec.get("head_weights")):
        if phase == "fine_tune":
            unfreeze_top(backbone, config.fine_tune_layers)
        if index == 0:
            print(_phase_line(config, phase, n_epochs, lr, on="images"), flush=True)
        with strategy.scope():
            trainer.compile(
                optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
            )
        backup = keras.callbacks.BackupAndRestore(os.path.join(spec["backup_dir"], phase, f"worker-{index}"))
        with strategy.scope():  # a resumed stage's BackupAndRestore loads the weights: in the scope
            trainer.fit(
                datasets(train_feed, True, config.seed + first),
                epochs=n_epochs,
                steps_per_epoch=steps,
                validation_data=datasets(val_feed, False, 0) if val_feed else None,
                validation_steps=val_steps if val_feed else None,
                callbacks=[backup, Record(phase, first), *extra],
                verbose=2 if index == 0 else 0,
            )
        first += n_epochs
    if index == 0:
        save_model(model, spec["model_path"], class_names=spec["class_names"], extra=spec.get("extra"))
    digest = weights_digest(model.get_weights())
    return {
        "index": index,
        "workers": workers,
        "replicas": int(strategy.num_replicas_in_sync),
        "global_batch_size": global_batch,
        "epochs": log,
        "steps": sum(r["steps"] for r in log),
        "weights_sha256": digest,
        "image_size": size,
        "config": asdict(config),
    }
