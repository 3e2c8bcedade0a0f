"""Logging and registering a training run with MLflow (params, metrics, the pyfunc model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from image_transfer.errors import RunFailed, first_line
from image_transfer.models.uris import (
    KERAS_ARTIFACT,
    MODEL_ARTIFACT,
    PARAM_MAX_CHARS,
    import_mlflow,
    registry_uri,
    require_tracking,
    tracking_configured,
    using_registry,
)


def loggable_params(params: dict[str, Any]) -> dict[str, str]:
    """Parameter values as strings cut to ``PARAM_MAX_CHARS`` (the full values go into an artifact)."""
    out = {}
    for key, value in params.items():
        if value is None:
            continue
        text = str(value)
        if len(text) > PARAM_MAX_CHARS:
            tail = f"... ({len(text)} chars)"
            text = text[: PARAM_MAX_CHARS - len(tail)] + tail
        out[key] = text
    return out


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("tensorflow", "keras", "numpy", "pandas", "pillow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            try:
                pins.append(f"{package}=={version(package + '-cpu')}")
            except PackageNotFoundError:
                pins.append(package)
    return pins


def package_source() -> str:
    """The folder of this package's source (``.../image_transfer``), for ``code_paths``."""
    return str(Path(__file__).resolve().parents[1])


def log_model(model_path: str, *, class_names: list[str] | None) -> str:
    """Log our ``.keras`` file as an MLflow pyfunc model (``MODEL_ARTIFACT``) in the active run; returns its URI.

    The model is self-contained: this package's source goes with it (``code_paths``; MLflow puts it
    on ``sys.path`` when loading), so an environment built from its pip requirements alone (Model
    Serving, ``spark_udf(env_manager="virtualenv")``) loads and predicts without image-transfer installed.
    """
    mlflow = import_mlflow("logging the model")
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from image_transfer.lifecycle.pyfunc import ImageClassifier

    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "content")]),
        outputs=Schema([ColSpec("string", "prediction"), ColSpec("double", "probability"), ColSpec("string", "error")]),
    )
    mlflow3 = int(mlflow.__version__.split(".")[0]) >= 3
    where = {"name": MODEL_ARTIFACT} if mlflow3 else {"artifact_path": MODEL_ARTIFACT}
    info = mlflow.pyfunc.log_model(
        **where,
        python_model=ImageClassifier(),
        artifacts={KERAS_ARTIFACT: model_path},
        signature=signature,
        pip_requirements=_pip_requirements(),  # explicit: inferring them would load the model in a subprocess
        code_paths=[package_source()],  # the pyfunc imports image_transfer: it travels with the model
        metadata={"class_names": class_names, "format": "image-transfer keras"},
    )
    return info.model_uri


def register(model_uri: str, name: str, *, tags: dict[str, str] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns the version number."""
    mlflow = import_mlflow("registering the model")
    try:
        with using_registry(registry_uri(name)):
            mv = mlflow.register_model(model_uri, name, tags=tags)
    except Exception as exc:  # noqa: BLE001 - permission, bad name, server errors
        raise RunFailed(f"cannot register {model_uri} as {name}: {first_line(exc)}") from exc
    return str(mv.version)


def log_training(result: Any, *, register_as: str | None = None) -> tuple[str | None, str | None]:
    """Log a ``TrainResult`` to MLflow and register it as ``register_as``: (run id, ``NAME/VERSION``).

    Params (long values cut; the full config and class names as ``config.json``), per-epoch metrics,
    the metrics JSON and curves, and the model as an MLflow pyfunc around the ``.keras`` file.
    Nothing happens (None, None) when no tracking server is configured and nothing is to be registered.
    """
    if register_as:
        require_tracking(f"--register-as {register_as}")
    elif not tracking_configured():
        return None, None
    mlflow = import_mlflow("logging to MLflow")
    with mlflow.start_run(nested=mlflow.active_run() is not None) as run:
        params = dict(result.config)
        params.update(data_path=result.data_path, classes=",".join(result.class_names))  # the path "auto" chose
        params["num_classes"] = len(result.class_names)
        for name in ("replicas", "global_batch_size", "precision"):  # how training ran (GPUs, policy)
            if getattr(result, name, None) is not None:
                params[name] = getattr(result, name)
        mlflow.log_params(loggable_params(params))
        mlflow.log_text(json.dumps({**result.config, "class_names": result.class_names}, indent=2), "config.json")
        for e in result.epochs:
            values = {k: v for k, v in e.items() if isinstance(v, float) and k != "train_seconds"}
            mlflow.log_metrics(values, step=e["epoch"])
        if result.final_validation_accuracy is not None:
            mlflow.log_metric("final_validation_accuracy", result.final_validation_accuracy)
        mlflow.log_metric("train_images_per_second", result.images_per_second)
        for extra in (result.metrics_path, result.plot_path):
            if extra and Path(extra).exists():
                mlflow.log_artifact(extra)
        model_uri = log_model(result.model_path, class_names=list(result.class_names))
        version = None
        if register_as:
            tags = {}
            if result.final_validation_accuracy is not None:
                tags["final_validation_accuracy"] = f"{result.final_validation_accuracy:.6f}"
            number = register(model_uri, register_as, tags=tags)
            version = f"{register_as}/{number}"
            mlflow.set_tag("registered_model_version", version)
        return run.info.run_id, version
