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

``train`` runs the phases, which live beside it: ``config`` (``TrainConfig``, ``TrainResult``), ``build`` (the
model), ``fit`` (the phases on this node), ``distributed`` (the image phases across workers, ``worker_main``)
and ``report`` (the metrics JSON, the curves, MLflow). Their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.storage.fs import local_absolute
from image_transfer.training.build import (
    build_backbone,
    build_classifier,
    build_model,
    head_dropout,
    precision_policy,
    unfreeze_top,
)
from image_transfer.training.config import (
    BACKBONES,
    DEFAULT_IMAGE_SIZE,
    FROM_BACKBONE_FILE,
    HEAD_INPUTS,
    Backbone,
    TrainConfig,
    TrainResult,
    absolute_paths,
    weights_used,
)
from image_transfer.training.distributed import WorkerCallbacks, train_across, worker_check, worker_main
from image_transfer.training.fit import (
    Fitting,
    data_summary,
    embed_features,
    final_accuracy,
    fit_on_node,
    node_strategy,
    open_feeds,
    phases,
)
from image_transfer.training.report import log_to_mlflow, mlflow_enabled, plot_training_curves, publish, write_metrics

__all__ = [
    "BACKBONES",
    "DEFAULT_IMAGE_SIZE",
    "FROM_BACKBONE_FILE",
    "HEAD_INPUTS",
    "Backbone",
    "TrainConfig",
    "TrainResult",
    "WorkerCallbacks",
    "absolute_paths",
    "build_backbone",
    "build_classifier",
    "check_output_model",
    "head_dropout",
    "log_to_mlflow",
    "mlflow_enabled",
    "plot_training_curves",
    "train",
    "unfreeze_top",
    "weights_used",
    "worker_check",
    "worker_main",
    "write_metrics",
]


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
    from image_transfer.models.artifact import save_model
    from image_transfer.training.prepare import usable

    config, output_model, metrics_path, names = _checked(
        df,
        config,
        output_model=output_model,
        metrics_path=metrics_path,
        register_as=register_as,
        workers=workers,
        overwrite=overwrite,
    )
    train_df, val_df = usable(df, "train"), usable(df, "validation")
    has_val = not val_df.isEmpty()
    strategy, replicas, batch = node_strategy(config, strategy)
    policy = precision_policy(config)
    backbone, model, size = build_model(config, strategy, policy, classes=len(names))
    if config.head_input == "features" and config.augment:
        print(
            "train: augmentation does not apply to cached features: the head trains on un-augmented "
            + ("embeddings; fine-tuning augments" if config.fine_tune_layers else "embeddings")
        )
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="image-transfer-train-")))
        checkpoints = Path(config.checkpoint_dir) if config.checkpoint_dir else tmp / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        fitting = Fitting(config, strategy, policy, backbone, model, size, replicas, batch, checkpoints)
        if config.head_input == "features":
            embed_features(stack, fitting, df, names)
        open_feeds(stack, fitting, train_df, val_df, has_val=has_val)
        worker_steps = _run_phases(df.sparkSession, fitting, names, tmp, callbacks, worker_callbacks)
        final = final_accuracy(fitting)
        seconds = time.perf_counter() - started
        save_model(  # float32: scoring picks its precision
            fitting.float32_model(),
            output_model,
            class_names=names,
            extra={"backbone": config.backbone, "image_size": size, "trained_by": "image-transfer train"},
        )
    result = _result(fitting, output_model, names, final=final, seconds=seconds, worker_steps=worker_steps)
    publish(result, metrics_path, register_as=register_as)
    return result


def _result(
    fitting: Fitting,
    output_model: str,
    names: Sequence[str],
    *,
    final: float | None,
    seconds: float,
    worker_steps: list[int] | None,
) -> TrainResult:
    """The ``TrainResult`` of the phases ``fitting`` ran (``final``: the validation accuracy)."""
    config = fitting.config
    data_path, train_rows, val_rows = data_summary(fitting)
    images = sum(e["images"] for e in fitting.epochs)
    train_seconds = sum(e["train_seconds"] for e in fitting.epochs)
    return TrainResult(
        model_path=output_model,
        class_names=list(names),
        image_size=fitting.size,
        data_path=data_path,
        train_rows=train_rows,
        validation_rows=val_rows,
        epochs=fitting.epochs,
        final_validation_accuracy=final,
        images_per_second=images / train_seconds if train_seconds > 0 else 0.0,
        seconds=seconds,
        config=asdict(replace(config, image_size=fitting.size, weights=weights_used(config))),
        replicas=fitting.replicas,
        global_batch_size=fitting.batch,
        precision=fitting.policy,
        workers=config.workers if fitting.across else 1,
        worker_steps=worker_steps,
        head_input=config.head_input,
        features=fitting.features.to_dict() if fitting.features is not None else None,
    )


def _checked(
    df: Any,
    config: TrainConfig,
    *,
    output_model: str,
    metrics_path: str | None,
    register_as: str | None,
    workers: int | None,
    overwrite: bool,
) -> tuple[TrainConfig, str, str | None, list[str]]:
    """(config, output model, metrics path, class names) with local paths made absolute, or a ``UserError``
    before any work: the output model, the tracking server ``register_as`` needs, two classes, the workers."""
    from image_transfer.training import distributed
    from image_transfer.training.prepare import class_names

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
    if workers is not None:
        config = replace(config, workers=workers)
    distributed.check_workers(df.sparkSession, config.workers, config.cache_dir)
    return config, output_model, metrics_path, names


def _run_phases(
    spark: Any,
    fitting: Fitting,
    names: Sequence[str],
    tmp: Path,
    callbacks: Sequence[Any],
    worker_callbacks: WorkerCallbacks | None,
) -> list[int] | None:
    """Each phase here, until one trains on images across workers: that one and the rest run there, and the
    chief's model replaces ``fitting.model``. Returns each worker's steps then, else None."""
    from image_transfer.models.load import load_keras

    for phase, n_epochs, lr in phases(fitting.config):
        on_features = fitting.features is not None and phase == "head"
        if fitting.across and not on_features:  # this and any later phase: on the workers
            fitting.epochs, worker_steps, fitting.replicas, fitting.batch = train_across(
                spark,
                fitting.config,
                fitting.train_feed,
                fitting.val_feed,
                names,
                fitting.head,
                fitting.epochs,
                tmp,
                worker_callbacks,
            )
            fitting.model = load_keras(str(tmp / "across.keras"))
            return worker_steps
        fit_on_node(fitting, phase, n_epochs, lr, callbacks=callbacks)
    return None
