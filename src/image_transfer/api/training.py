"""Training steps: prepare a labelled dataset, train (transfer learning), evaluate, promote by alias.

>>> from image_transfer import prepare_dataset, train_model, evaluate_model, dataset_rows
>>> prepare_dataset(spark, "/Volumes/main/ml/labelled", "/Volumes/main/ml/dataset")
>>> data = spark.read.parquet("/Volumes/main/ml/dataset")
>>> trained = train_model(data, output_model="/Volumes/main/ml/models/m.keras", epochs=5, fine_tune_layers=20)
>>> evaluate_model(data, model="/Volumes/main/ml/models/m.keras").accuracy

Each is keyword-only after its data, and raises ``UserError`` (one line) for what it cannot do before
any work starts. The training keywords are ``TrainConfig``'s fields with its defaults (a test holds them
equal); ``config`` bundles them (keywords left at their defaults keep ``config``'s values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

from image_transfer.imaging.files import IMAGE_EXTENSIONS
from image_transfer.imaging.screen import ImageLimits
from image_transfer.scoring.options import ScoringOptions
from image_transfer.training.config import TrainConfig, TrainResult
from image_transfer.training.evaluate import EvaluationResult, evaluate
from image_transfer.training.prepare import PrepareResult, prepare, usable
from image_transfer.training.promotion import Promotion, PromotionRefused, promote
from image_transfer.training.train import train


def prepare_dataset(
    spark: Any,
    images_dir: str,
    output: str,
    *,
    output_table: str | None = None,
    labels: str | None = None,
    validation_fraction: float = 0.2,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    limits: ImageLimits | None = None,
    rejected_file: str | None = None,
    overwrite: bool = False,
    wait: float | None = None,
) -> PrepareResult:
    """A labelled image folder (one subfolder per class, or ``labels``: a CSV or table of ``path, label``)
    read, screened and split into ``train``/``validation``, written atomically as Parquet at ``output``
    (and ``output_table``): ``path, content, label, label_index, split, error``.

    Unreadable or oversized images (``limits``) are rows with ``error`` set; ``rejected_file`` gets a CSV
    of them. ``output`` may replace only an earlier prepared dataset unless ``overwrite``; ``wait``
    seconds for another run writing it.
    """
    return prepare(
        spark,
        images_dir,
        output,
        output_table=output_table,
        labels=labels,
        validation_fraction=validation_fraction,
        extensions=extensions,
        limits=limits,
        rejected_file=rejected_file,
        overwrite=overwrite,
        wait=wait,
    )


def dataset_rows(df: Any, split: str | None = None) -> Any:
    """A prepared dataset's usable rows (no ``error``), of ``split`` (``train`` or ``validation``) if given."""
    return usable(df, split)


def train_model(
    df: Any,
    *,
    output_model: str,
    config: TrainConfig | None = None,
    metrics_path: str | None = None,
    register_as: str | None = None,
    overwrite: bool = False,
    backbone: str = "mobilenet_v2",
    weights: str = "imagenet",
    epochs: int = 5,
    fine_tune_layers: int = 0,
    fine_tune_epochs: int | None = None,
    batch_size: int = 32,
    image_size: int | None = None,
    learning_rate: float = 1e-3,
    dropout: float = 0.2,
    patience: int = 3,
    augment: bool = True,
    seed: int = 0,
    data_path: str = "auto",
    cache_dir: str | None = None,
    checkpoint_dir: str | None = None,
    mixed_precision: bool = False,
    head_input: str = "features",
    workers: int = 1,
    trust_model_code: bool = False,
    litert_cache: str | None = None,
) -> TrainResult:
    """Fine-tune ``backbone`` on a prepared dataset's ``train`` split, validate on ``validation``, save
    ``output_model`` (a ``.keras`` file; an existing one is refused unless ``overwrite``).

    The frozen phase trains the head for ``epochs`` (on embeddings computed once when ``head_input`` is
    ``features``), then the top ``fine_tune_layers`` of the backbone are unfrozen for ``fine_tune_epochs``.
    ``backbone`` is a Keras application name or a ``.keras`` file; ``data_path`` picks the feed (``auto``,
    ``petastorm``, ``arrow``); ``workers`` above 1 trains the image phases as a barrier stage. With an
    MLflow tracking server the run is logged, and ``register_as`` registers the model. Every keyword is
    ``TrainConfig``'s field of that name.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    values = locals()
    given = {n: values[n] for n in defaults if values[n] != defaults[n]}
    chosen = replace(config, **given) if config is not None else TrainConfig(**given)
    return train(
        df, chosen, output_model=output_model, metrics_path=metrics_path, register_as=register_as, overwrite=overwrite
    )


def evaluate_model(
    df: Any,
    *,
    model: str,
    split: str = "validation",
    metrics_path: str | None = None,
    options: ScoringOptions | None = None,
) -> EvaluationResult:
    """Classify a prepared dataset's ``split`` rows with ``model`` (a path or an MLflow URI) and compare the
    predictions with ``label``: accuracy, per-class figures and the confusion matrix (JSON at
    ``metrics_path``). ``options`` are the scoring options but ``image_column`` and ``key_columns``."""
    return evaluate(df.sparkSession, df, model_path=model, split=split, metrics_path=metrics_path, options=options)


def promote_model(
    df: Any,
    *,
    model: str,
    alias: str,
    min_accuracy: float = 0.0,
    tolerance: float = 0.0,
    split: str = "validation",
    metrics_path: str | None = None,
    options: ScoringOptions | None = None,
) -> tuple[EvaluationResult, Promotion]:
    """Evaluate the registered version ``model`` (``models:/NAME/VERSION``) and ``alias``'s current version on
    the same rows; move ``alias`` to ``model`` when its accuracy is at least ``min_accuracy`` and within
    ``tolerance`` of the current one. Returns the candidate's evaluation and the decision
    (``promotion.promoted``, ``promotion.reason``)."""
    return promote(
        df.sparkSession,
        df,
        model=model,
        alias=alias,
        min_accuracy=min_accuracy,
        tolerance=tolerance,
        split=split,
        metrics_path=metrics_path,
        options=options,
    )


__all__ = [
    "EvaluationResult",
    "PrepareResult",
    "Promotion",
    "PromotionRefused",
    "TrainConfig",
    "TrainResult",
    "dataset_rows",
    "evaluate_model",
    "prepare_dataset",
    "promote_model",
    "train_model",
]
