"""A DataFrame scored by a model named by path or MLflow URI: the model resolved and checked on the driver
once, the session kind asked once, and the run handle attached to the result.

The API's ``score_images`` and ``featurize_images``, the incremental runs and training's evaluation and
feature cache all come through ``score_frame``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.models.uris import resolve_model
from image_transfer.runtime import is_connect
from image_transfer.scoring.frame import scored_frame
from image_transfer.scoring.options import CLOSURE_MAX_BYTES, ScoringOptions, prepare_model
from image_transfer.scoring.run import ScoringRun

_RUN_ATTRIBUTE = "_image_transfer_run"


def _model(
    model: str, model_version: str | None, broadcast_max_mb: float, *, connect: bool
) -> tuple[str, str | None, float]:
    """(local path, version, broadcast limit): a registry URI resolved once, on the driver, to one version.

    A downloaded model sits in a driver-local folder, so it always travels with the job (a broadcast,
    or inside the UDF under Spark Connect), never by path.
    """
    resolved = resolve_model(model)
    if not resolved.downloaded:
        return resolved.path, model_version, broadcast_max_mb
    size = sum(f.stat().st_size for f in _files(resolved.path))
    if connect and size > CLOSURE_MAX_BYTES:
        raise UserError(
            f"{model} ({size / 2**20:.0f} MB) is too large to travel inside the UDF under Spark Connect: "
            "download it to a shared path (a Volume) with mlflow.artifacts.download_artifacts and pass that path"
        )
    return resolved.path, model_version or resolved.version, max(broadcast_max_mb, size / 2**20 + 1)


def _files(path: str) -> list[Path]:
    p = Path(path)
    return [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]


def score_frame(
    df: Any,
    model: str,
    *,
    mode: str,
    top_k: int,
    layer: str | None,
    model_version: str | None,
    options: ScoringOptions,
) -> Any:
    """``df`` scored (``mode`` ``classify``) or embedded (``embed``) by ``model``: a lazy DataFrame with its
    ``ScoringRun`` attached (``scoring_run``)."""
    connect = is_connect(df.sparkSession)
    path, version, broadcast_max_mb = _model(model, model_version, options.broadcast_max_mb, connect=connect)
    prepared = prepare_model(path, mode=mode, top_k=top_k, layer=layer, version=version, trust=options.trust_model_code)
    options = replace(options, broadcast_max_mb=broadcast_max_mb)
    result, run = scored_frame(df, prepared, options, connect=connect)
    run.max_failed_fraction = options.max_failed_fraction
    run.source = str(model)
    run.input_frame = df
    setattr(result, _RUN_ATTRIBUTE, run)
    return result


def scoring_run(df: Any) -> ScoringRun:
    """The ``ScoringRun`` handle of a DataFrame returned by ``score_images`` or ``featurize_images``.

    Transformations return new DataFrames without the handle: keep the one the call returned.
    """
    run = getattr(df, _RUN_ATTRIBUTE, None) if _RUN_ATTRIBUTE in vars(df) else None
    if run is None:
        raise UserError("not a DataFrame returned by score_images or featurize_images")
    return run
