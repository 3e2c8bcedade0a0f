"""Training on this node: the phases (the head, then fine-tuning), each one ``fit`` with its callbacks and
best-weights checkpoint, on cached features or on a feed's images, under the node's strategy."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_transfer.training.build import compile_phase, head_model, unfreeze_top
from image_transfer.training.config import TrainConfig


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


def phases(config: TrainConfig, *, head: bool = True) -> list[tuple[str, int, float]]:
    """(phase, epochs, learning rate) of each phase to run: the head's (unless ``head`` is false), then
    fine-tuning's at a tenth of the learning rate when ``fine_tune_layers``."""
    phases = [("head", config.epochs, config.learning_rate)] if head else []
    if config.fine_tune_layers:
        phases.append(("fine_tune", config.fine_tune_epochs or config.epochs, config.learning_rate / 10))
    return phases


def phase_line(config: TrainConfig, phase: str, epochs: int, learning_rate: float, *, on: str) -> str:
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
    history = model.fit(  # epochs numbered from 1 in each phase, as its line says (phase_line)
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


def node_strategy(config: TrainConfig, strategy: Any = None) -> tuple[Any, int, int]:
    """(strategy, replicas, global batch) on this node: ``strategy``, else ``devices.training_strategy()``
    (mirrored over the GPUs when there are several); ``config.batch_size`` is per replica."""
    import keras

    from image_transfer import devices

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
    return strategy, replicas, batch


@dataclass
class Fitting:
    """What the phases share: the model, what it trains on, the epochs' rows and the best score so far.

    After the image phases ran across workers, ``model`` is the chief's and ``replicas``, ``batch`` the stage's.
    """

    config: TrainConfig
    strategy: Any
    policy: str  # the Keras policy the model was built under
    backbone: Any
    model: Any
    size: int
    replicas: int
    batch: int  # the global batch
    checkpoints: Path
    features: Any = None  # with head_input features: the FeatureCache of the train and validation splits
    head: Any = None  # with head_input features: the head alone (the model's layers), trained on ``features``
    train_feed: Any = None
    val_feed: Any = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None  # the best monitored score of the phases so far

    @property
    def needs_images(self) -> bool:
        """Some phase trains on images: the head (``head_input`` images) or fine-tuning."""
        return self.config.head_input != "features" or bool(self.config.fine_tune_layers)

    @property
    def across(self) -> bool:
        """The image phases run on ``config.workers`` barrier workers."""
        return self.config.workers > 1 and self.needs_images

    def float32_model(self) -> Any:
        """The model with float32 layers (what is saved and embedded with: scoring picks its precision)."""
        from image_transfer import devices

        return devices.with_policy(self.model, "float32") if self.policy != "float32" else self.model


def embed_features(stack: contextlib.ExitStack, fitting: Fitting, df: Any, names: Sequence[str]) -> None:
    """Embed the prepared dataset's train and validation images once (``feed.open_features``, deleted when
    ``stack`` closes) and make the head to train on them."""
    from image_transfer.scoring.options import ScoringOptions
    from image_transfer.training import feed
    from image_transfer.training.prepare import usable

    config = fitting.config
    fitting.features = stack.enter_context(
        feed.open_features(
            usable(df).where("split IN ('train', 'validation')"),
            fitting.float32_model(),
            class_names=names,
            cache_dir=config.cache_dir,
            options=ScoringOptions(trust_model_code=config.trust_model_code, litert_cache=config.litert_cache),
        )
    )
    cache = fitting.features
    if cache.rows_failed:
        print(f"train: {cache.rows_failed} of {cache.rows} images could not be embedded; left out")
    with fitting.strategy.scope():
        fitting.head = head_model(fitting.model)


def open_feeds(stack: contextlib.ExitStack, fitting: Fitting, train_df: Any, val_df: Any, *, has_val: bool) -> None:
    """The train and validation feeds of the image phases (closed with ``stack``), when a phase needs images;
    across workers, Arrow over Parquet files the workers share out."""
    from image_transfer.training.feed import open_feed

    config = fitting.config
    if config.workers > 1 and not fitting.needs_images:
        print(f"train: --workers {config.workers}: no phase trains on images; the head trains on the driver")
    if not fitting.needs_images:
        return
    data_path = "arrow" if fitting.across else config.data_path  # the workers read the Parquet themselves
    files = config.workers * 2 if fitting.across else None
    fitting.train_feed = stack.enter_context(
        open_feed(train_df, path=data_path, cache_dir=config.cache_dir, files=files)
    )
    fitting.val_feed = (
        stack.enter_context(open_feed(val_df, path=fitting.train_feed.path, cache_dir=config.cache_dir, files=files))
        if has_val
        else None
    )


def _image_datasets(fitting: Fitting, stack: contextlib.ExitStack) -> tuple[Any, Any, int, int]:
    """(train, validation or None, steps, validation steps) over the feeds' images, repeating forever."""
    config, batch, shape = fitting.config, fitting.batch, (fitting.size, fitting.size)
    steps = math.ceil(fitting.train_feed.rows / batch)
    val_steps = math.ceil(fitting.val_feed.rows / batch) if fitting.val_feed else 0
    train_ds = stack.enter_context(
        fitting.train_feed.make_tf_dataset(
            batch_size=batch,
            image_size=shape,
            training=config.augment,
            num_epochs=None,
            seed=config.seed + len(fitting.epochs),
        )
    )
    val_ds = (
        stack.enter_context(fitting.val_feed.make_tf_dataset(batch_size=batch, image_size=shape, num_epochs=None))
        if fitting.val_feed
        else None
    )
    return train_ds, val_ds, steps, val_steps


def fit_on_node(
    fitting: Fitting, phase: str, epochs: int, learning_rate: float, *, callbacks: Sequence[Any] = ()
) -> None:
    """Train one phase here: the head on cached features, or the model on images; its rows join ``fitting.epochs``.

    Fine-tuning that never beats the head phase leaves the head phase's best weights.
    """
    config = fitting.config
    on_features = fitting.features is not None and phase == "head"
    fitted = fitting.head if on_features else fitting.model
    if phase == "fine_tune":
        unfreeze_top(fitting.backbone, config.fine_tune_layers)
    print(phase_line(config, phase, epochs, learning_rate, on="cached features" if on_features else "images"))
    compile_phase(fitted, fitting.strategy, learning_rate=learning_rate, policy=fitting.policy)
    with contextlib.ExitStack() as datasets:
        if on_features:
            train_ds, val_ds, steps, val_steps = _feature_datasets(
                fitting.features, batch=fitting.batch, seed=config.seed
            )
        else:
            train_ds, val_ds, steps, val_steps = _image_datasets(fitting, datasets)
        checkpoint = fitting.checkpoints / f"best-{phase}.weights.h5"
        checkpoint.unlink(missing_ok=True)  # never restore a previous run's weights
        rows, fitting.best = _fit_phase(
            fitted,
            train_ds,
            val_ds,
            phase=phase,
            first_epoch=len(fitting.epochs),
            epochs=epochs,
            steps=steps,
            val_steps=val_steps,
            config=config,
            checkpoint=checkpoint,
            best=fitting.best,
            callbacks=callbacks,
            batch_size=fitting.batch,
        )
    for row in rows:
        row["input"] = "features" if on_features else "images"
    fitting.epochs += rows
    if phase == "fine_tune" and not checkpoint.exists():  # fine-tuning never beat the head phase
        with fitting.strategy.scope():
            (fitting.head or fitting.model).load_weights(str(fitting.checkpoints / "best-head.weights.h5"))


def final_accuracy(fitting: Fitting) -> float | None:
    """Exact validation accuracy of the trained model (or head, on the cached features); None without a
    validation split."""
    if fitting.val_feed is not None:
        return _evaluate_split(fitting.model, fitting.val_feed, batch_size=fitting.batch, image_size=fitting.size)
    if fitting.features is not None and len(fitting.features.splits["validation"][1]):
        return _feature_accuracy(fitting.head, *fitting.features.splits["validation"], batch=fitting.batch)
    return None


def data_summary(fitting: Fitting) -> tuple[str, int, int]:
    """(data path, train rows, validation rows) of what the phases read: the feeds, else the cached features."""
    if fitting.train_feed is not None:
        val_rows = fitting.val_feed.rows if fitting.val_feed else 0
        return fitting.train_feed.path, fitting.train_feed.rows, val_rows
    train_rows, val_rows = (len(fitting.features.splits[k][1]) for k in ("train", "validation"))
    return "features", train_rows, val_rows
