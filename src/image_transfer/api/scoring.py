"""Scoring and featurizing in batch: lazy scored DataFrames for notebooks, jobs and the CLI alike.

>>> from image_transfer import read_images, score_images, scoring_run
>>> scored = score_images(read_images(spark, "/Volumes/main/ml/images"), "/Volumes/main/ml/models/m.keras")
>>> scored.orderBy(scored.probability.asc_nulls_last()).show()  # least confident first, failed rows last
>>> scoring_run(scored).workers()                 # after an action: loads, traces, rows per worker

Each call checks the model on the driver (a clear ``UserError`` before anything is scheduled) and
returns a lazy DataFrame: keys, then ``prediction, probability, top_k`` (or ``embedding``), ``error``
and ``model_version``. Nothing runs until an action (``show``, ``write``, ``collect``, ``display``).
The scoring keywords are ``ScoringOptions``' fields, with its defaults (a test holds them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from image_transfer.scoring.options import ScoringOptions
from image_transfer.scoring.score import score_frame, scoring_run


def score_images(
    df: Any,
    model: str,
    *,
    top_k: int = 5,
    model_version: str | None = None,
    options: ScoringOptions | None = None,
    image_column: str = "content",
    key_columns: Sequence[str] = ("path",),
    batch_size: int = 64,
    max_image_bytes: int | str | None = None,
    max_pixels: int | str | None = None,
    broadcast_max_mb: float = 256.0,
    max_batch_mb: float | None = None,
    partitions: int | None = None,
    max_failed_fraction: float = 0.5,
    precision: str = "float32",
    jit: bool = False,
    overlap: str = "auto",
    engine: str = "auto",
    litert_cache: str | None = None,
    trust_model_code: bool = False,
) -> Any:
    """Classify the images in ``df[image_column]``: keys, ``prediction, probability, top_k, error, model_version``.

    ``model`` is a ``.keras`` file, a SavedModel directory or a ``.tflite`` file (local or on a mounted
    path such as ``/Volumes/...``), or an MLflow URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN/PATH``. An alias is resolved here, once, and ``model_version`` is ``NAME/VERSION``;
    for a path it is the file's digest (``sha256:...``) unless ``model_version`` says otherwise.
    Bad images become a row with ``error`` set, never a failed job.

    The options are ``ScoringOptions``' fields (each documented there), as keywords or bundled as
    ``options`` (keywords left at their defaults keep ``options``' values): the input columns
    (``image_column``, ``key_columns``), batching (``batch_size``, ``max_batch_mb``, ``partitions``), the
    image limits (``max_image_bytes``, ``max_pixels``), shipping (``broadcast_max_mb``: a larger model is
    read by the executors from its path, which on a cluster must be on shared storage such as
    ``/Volumes/...``), the failure threshold (``max_failed_fraction``), and compute: ``engine`` (``auto``:
    LiteRT on CPU workers, TensorFlow on GPU ones), ``precision``, ``jit``, ``overlap``, ``litert_cache``,
    ``trust_model_code``. ``scoring_run(result)`` is the handle with the statistics;
    ``scoring_run(result).check()`` raises ``TooManyFailures`` when more than ``max_failed_fraction`` of
    the rows failed.
    """
    return score_frame(
        df,
        model,
        mode="classify",
        top_k=top_k,
        layer=None,
        model_version=model_version,
        options=ScoringOptions.merged(options, locals()),
    )


def featurize_images(
    df: Any,
    model: str,
    *,
    layer: str | None = None,
    model_version: str | None = None,
    options: ScoringOptions | None = None,
    image_column: str = "content",
    key_columns: Sequence[str] = ("path",),
    batch_size: int = 64,
    max_image_bytes: int | str | None = None,
    max_pixels: int | str | None = None,
    broadcast_max_mb: float = 256.0,
    max_batch_mb: float | None = None,
    partitions: int | None = None,
    max_failed_fraction: float = 0.5,
    precision: str = "float32",
    jit: bool = False,
    overlap: str = "auto",
    engine: str = "auto",
    litert_cache: str | None = None,
    trust_model_code: bool = False,
) -> Any:
    """Embed the images with a layer of ``model``: keys, ``embedding array<float>, error, model_version``.

    ``layer`` names the layer whose output is the embedding; by default the input of the final
    classifier layer (the pooled backbone features of a transfer-learning model). ``model`` is a path
    or an MLflow URI, and the options are those of ``score_images``.
    """
    return score_frame(
        df,
        model,
        mode="embed",
        top_k=5,
        layer=layer,
        model_version=model_version,
        options=ScoringOptions.merged(options, locals()),
    )


__all__ = ["featurize_images", "score_images", "scoring_run"]
