"""Checks a job makes before Spark starts (or with it), and what it reports beside its step: the CLI's
preflight, as functions over the layers below.

A bad output path, a model file that cannot serve the command, or a flag combination that cannot work is
a ``UserError`` (exit 2) in a second, not after a session has started.
"""

from __future__ import annotations

from typing import Any

from image_transfer.api.reading import looks_like_table
from image_transfer.imaging.files import IMAGE_EXTENSIONS, skipped_files
from image_transfer.imaging.screen import ImageLimits
from image_transfer.storage.fs import local_absolute
from image_transfer.storage.outputs import check_output, output_lease
from image_transfer.training.train import check_output_model


def image_limits(*, max_bytes: int | None, max_pixels: int | None) -> ImageLimits:
    """The image limits of the flags (defaults where not given)."""
    return ImageLimits.of(max_bytes=max_bytes, max_pixels=max_pixels)


def check_model(
    model: str, *, mode: str | None, layer: str | None = None, trust: bool = False, options: Any = None
) -> None:
    """A model file checked before Spark starts (as flags are): a missing or unusable file is exit 2 in a
    second, not after the session's start; a ``.tflite`` also against the engine ``options`` ask for.
    MLflow URIs are resolved later, once (they download)."""
    from image_transfer.models.artifact import model_kind
    from image_transfer.models.inspection import inspect_model
    from image_transfer.models.uris import is_model_uri

    if is_model_uri(model):
        return
    kind = model_kind(model)  # exists, and is a model file or SavedModel folder
    # A backbone's shapes are train's to check; a SavedModel is checked by loading it, which scoring does.
    if mode is not None and kind in ("keras", "tflite"):
        inspect_model(model, layer=layer, embed=mode == "embed", classify=mode == "classify", trust=trust)
    if kind == "tflite" and options is not None:
        from image_transfer.scoring.engines.litert import refuse_flatbuffer_settings
        from image_transfer.scoring.options import Compute

        refuse_flatbuffer_settings(model, options.engine, Compute.of(options))


def model_metadata(path: str) -> dict[str, Any]:
    """The metadata a ``.keras`` file carries (who trained it, class names, preprocessing)."""
    from image_transfer.models.artifact import read_metadata

    return read_metadata(path)


def describe_model(model: str, *, embed: bool = False, layer: str | None = None, trust: bool = False) -> dict:
    """What the driver knows of ``model`` (a path or an MLflow URI) without loading it on a worker: kind,
    input size, outputs, class names, whether its outputs are probabilities, preprocessing, digest."""
    from image_transfer.models.uris import resolve_model
    from image_transfer.scoring.options import prepare_model

    resolved = resolve_model(model)
    prepared = prepare_model(resolved.path, mode="embed" if embed else "classify", layer=layer, trust=trust)
    info = prepared.info
    return {
        "model": model,
        "kind": info.kind,
        "input": [info.height, info.width, 3],
        "outputs": info.output_width,
        "class_names": list(info.class_names) if info.class_names else None,
        "probabilities": info.probabilities,
        "preprocess": info.preprocess,
        "digest": f"sha256:{prepared.digest}",
    }


__all__ = [
    "IMAGE_EXTENSIONS",
    "check_model",
    "check_output",
    "check_output_model",
    "describe_model",
    "image_limits",
    "local_absolute",
    "looks_like_table",
    "model_metadata",
    "output_lease",
    "skipped_files",
]
