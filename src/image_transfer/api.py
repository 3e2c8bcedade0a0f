"""The Python API: lazy scored DataFrames for notebooks, jobs and the CLI alike.

>>> from image_transfer import read_images, score_images, scoring_run
>>> scored = score_images(read_images(spark, "/Volumes/main/ml/images"), "/Volumes/main/ml/models/m.keras")
>>> scored.orderBy(scored.probability.asc_nulls_last()).show()  # least confident first, failed rows last
>>> scoring_run(scored).workers()                 # after an action: loads, traces, rows per worker

Each call checks the model on the driver (a clear ``UserError`` before anything is scheduled) and
returns a lazy DataFrame: keys, then ``prediction, probability, top_k`` (or ``embedding``), ``error``
and ``model_version``. Nothing runs until an action (``show``, ``write``, ``collect``, ``display``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from image_transfer.errors import TooManyFailures, UserError
from image_transfer.imaging.files import IMAGE_EXTENSIONS, read_image_files
from image_transfer.lifecycle.uris import resolve_model
from image_transfer.scoring.frame import scored_frame
from image_transfer.scoring.options import CLOSURE_MAX_BYTES, ScoringOptions, prepare_model
from image_transfer.scoring.run import ScoringRun
from image_transfer.session import is_connect

_RUN_ATTRIBUTE = "_image_transfer_run"


def read_images(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Any:
    """A folder tree of image files as a DataFrame ``path, content`` (every matching file, empty ones too)."""
    return read_image_files(spark, folder, extensions=extensions)


def _model(df: Any, model: str, model_version: str | None, broadcast_max_mb: float) -> tuple[str, str | None, float]:
    """(local path, version, broadcast limit): a registry URI resolved once, on the driver, to one version.

    A downloaded model sits in a driver-local folder, so it always travels with the job (a broadcast,
    or inside the UDF under Spark Connect), never by path.
    """
    resolved = resolve_model(model)
    if not resolved.downloaded:
        return resolved.path, model_version, broadcast_max_mb
    size = sum(f.stat().st_size for f in _files(resolved.path))
    if is_connect(df.sparkSession) and size > CLOSURE_MAX_BYTES:
        raise UserError(
            f"{model} ({size / 2**20:.0f} MB) is too large to travel inside the UDF under Spark Connect: "
            "download it to a shared path (a Volume) with mlflow.artifacts.download_artifacts and pass that path"
        )
    return resolved.path, model_version or resolved.version, max(broadcast_max_mb, size / 2**20 + 1)


def _files(path: str) -> list[Any]:
    from pathlib import Path

    p = Path(path)
    return [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]


def _attach(df: Any, run: ScoringRun, max_failed_fraction: float, source: str) -> Any:
    run.max_failed_fraction = max_failed_fraction
    run.source = str(source)
    setattr(df, _RUN_ATTRIBUTE, run)
    return df


def score_images(
    df: Any,
    model: str,
    *,
    top_k: int = 5,
    model_version: str | None = None,
    options: ScoringOptions | None = None,
    **keywords: Any,
) -> Any:
    """Classify the images in ``df[image_column]``: keys, ``prediction, probability, top_k, error, model_version``.

    ``model`` is a ``.keras`` file or a SavedModel directory (local or on a mounted path such as
    ``/Volumes/...``), or an MLflow URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN/PATH``. An alias is resolved here, once, and ``model_version`` is ``NAME/VERSION``;
    for a path it is the file's digest (``sha256:...``) unless ``model_version`` says otherwise.
    Bad images become a row with ``error`` set, never a failed job.

    Options (keywords, or a ``ScoringOptions`` as ``options``; see ``ScoringOptions`` for each):
    ``image_column`` (``content``), ``key_columns`` (``("path",)``), ``batch_size`` (64),
    ``max_image_bytes`` (24 MiB), ``max_pixels`` (64 M), ``broadcast_max_mb`` (256: a larger model is
    read by the executors from its path, which on a cluster must be on shared storage such as
    ``/Volumes/...``), ``max_batch_mb`` (1536 encoded bytes per Arrow batch), ``partitions``,
    ``max_failed_fraction`` (0.5), and compute: ``precision`` (``float32``, ``float16``, ``bfloat16``),
    ``jit`` (XLA on a fixed batch shape), ``overlap`` (``auto``, ``on``, ``off``). On a GPU cluster each
    Python worker is pinned to the GPU Spark assigned its task.
    ``scoring_run(result)`` is the handle with the statistics; ``scoring_run(result).check()`` raises
    ``TooManyFailures`` when more than ``max_failed_fraction`` of the rows failed.
    """
    return _scored(
        df,
        model,
        mode="classify",
        top_k=top_k,
        layer=None,
        version=model_version,
        options=ScoringOptions.build(options, **keywords),
    )


def featurize_images(
    df: Any,
    model: str,
    *,
    layer: str | None = None,
    model_version: str | None = None,
    options: ScoringOptions | None = None,
    **keywords: Any,
) -> Any:
    """Embed the images with a layer of ``model``: keys, ``embedding array<float>, error, model_version``.

    ``layer`` names the layer whose output is the embedding; by default the input of the final
    classifier layer (the pooled backbone features of a transfer-learning model). ``model`` is a path
    or an MLflow URI, and the options are those of ``score_images``.
    """
    return _scored(
        df,
        model,
        mode="embed",
        top_k=5,
        layer=layer,
        version=model_version,
        options=ScoringOptions.build(options, **keywords),
    )


def _scored(
    df: Any, model: str, *, mode: str, top_k: int, layer: str | None, version: str | None, options: ScoringOptions
) -> Any:
    path, version, broadcast_max_mb = _model(df, model, version, options.broadcast_max_mb)
    prepared = prepare_model(path, mode=mode, top_k=top_k, layer=layer, version=version, trust=options.trust_model_code)
    options = replace(options, broadcast_max_mb=broadcast_max_mb)
    result, run = scored_frame(df, prepared, options)
    return _attach(result, run, options.max_failed_fraction, model)


def scoring_run(df: Any) -> ScoringRun:
    """The ``ScoringRun`` handle of a DataFrame returned by ``score_images`` or ``featurize_images``.

    Transformations return new DataFrames without the handle: keep the one the call returned.
    """
    run = getattr(df, _RUN_ATTRIBUTE, None) if _RUN_ATTRIBUTE in vars(df) else None
    if run is None:
        raise UserError("not a DataFrame returned by score_images or featurize_images")
    return run


__all__ = [
    "TooManyFailures",
    "featurize_images",
    "read_images",
    "score_images",
    "scoring_run",
]
