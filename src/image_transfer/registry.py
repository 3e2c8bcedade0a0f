"""The model lifecycle with MLflow: log and register trained models, promote by alias, resolve model URIs.

``resolve_model`` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN/PATH`` into a
local ``.keras`` file once, on the driver: an alias is resolved to a concrete version first, so a
run never mixes versions when the alias moves. A plain path is returned unchanged. ``log_training``
logs a training run (params, per-epoch metrics, curves, metrics JSON) with the model as an MLflow
pyfunc that wraps our ``.keras`` file, and registers a version. ``promote`` evaluates a version and
its alias's current version on the same split and moves the alias only when the candidate is good
enough. MLflow is imported inside the functions: the wheel does not need it unless these are used.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from image_transfer.errors import RunFailed, UserError

MODEL_ARTIFACT = "model"  # the MLflow model's name (artifact path) in a training run
KERAS_ARTIFACT = "keras_model"  # the pyfunc's artifact key of the .keras file
PARAM_MAX_CHARS = 250  # under every MLflow's limit on a parameter value (500 in 2.x, 6000 in 3.x)
URI_SCHEMES = ("models:/", "runs:/")


class PromotionRefused(RunFailed):
    """The evaluated version is not good enough for the alias: the alias stays where it was (exit 1)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a local path: ``version`` is ``NAME/VERSION`` (None for a plain path)."""

    path: str
    uri: str
    version: str | None = None
    name: str | None = None
    number: str | None = None  # the registered version number
    run_id: str | None = None

    @property
    def downloaded(self) -> bool:
        """The model was downloaded to a driver-local folder (so it must travel with the job)."""
        return self.uri != self.path


def is_model_uri(model: str) -> bool:
    """``models:/...`` or ``runs:/...`` (resolved through MLflow) rather than a file path."""
    return str(model).startswith(URI_SCHEMES)


def _mlflow(what: str) -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise UserError(
            f"{what} needs MLflow, which is not installed: pip install 'image-transfer[mlflow]' "
            "(or pass a model file path instead)"
        ) from exc
    return mlflow


def _registry_uri(name: str | None) -> str | None:
    """``databricks-uc`` for a three-level name on Databricks unless a registry is configured; else None."""
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        return None
    if name and name.count(".") == 2 and "DATABRICKS_RUNTIME_VERSION" in os.environ:
        return "databricks-uc"
    return None


def client(name: str | None = None) -> Any:
    """An ``MlflowClient`` for the tracking server and the registry ``name`` lives in."""
    mlflow = _mlflow("the model registry")
    return mlflow.MlflowClient(registry_uri=_registry_uri(name))


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in alias:
            return name, alias, None
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise UserError(f"not a model URI: {uri!r}; use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/PATH")


_DOWNLOADS: dict[tuple[str, str, str], str] = {}  # (tracking, registry, concrete URI) -> local model path
_DOWNLOAD_LOCK = threading.Lock()
_ROOT: list[Path] = []


def _download_root() -> Path:
    if not _ROOT:
        root = Path(tempfile.mkdtemp(prefix="image-transfer-registry-"))
        atexit.register(shutil.rmtree, root, True)
        _ROOT.append(root)
    return _ROOT[0]


def find_model_file(local: str | os.PathLike[str]) -> str:
    """The ``.keras`` file (or SavedModel directory) in a downloaded artifact; UserError when there is none."""
    p = Path(local)
    if p.is_file() or (p / "saved_model.pb").exists():
        return str(p)
    found = sorted(p.rglob("*.keras")) or sorted(d.parent for d in p.rglob("saved_model.pb"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise UserError(f"{what} .keras model files or SavedModels in the downloaded artifact {local}")
    return str(found[0])


def _download(uri: str, *, registry_uri: str | None) -> str:
    mlflow = _mlflow(f"model {uri}")
    key = (mlflow.get_tracking_uri(), registry_uri or mlflow.get_registry_uri(), uri)  # versions never change
    with _DOWNLOAD_LOCK:
        if key in _DOWNLOADS and Path(_DOWNLOADS[key]).exists():
            return _DOWNLOADS[key]
        dst = Path(tempfile.mkdtemp(prefix="model-", dir=_download_root()))
        previous = mlflow.get_registry_uri() if registry_uri else None
        try:
            if registry_uri:
                mlflow.set_registry_uri(registry_uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
        except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException, OSError, HTTP errors
            raise UserError(f"cannot download model {uri}: {type(exc).__name__}: {exc}") from exc
        finally:
            if previous:
                mlflow.set_registry_uri(previous)
        path = find_model_file(local)
        _DOWNLOADS[key] = path
        return path


def resolve_model(model: str) -> ResolvedModel:
    """A local path for ``model``: a plain path unchanged; a registry or run URI resolved once and downloaded.

    An alias is resolved to its version here, once: the returned version (``NAME/VERSION``) is what
    the caller scores with, whatever the alias points to later.
    """
    model = str(model)
    if not is_model_uri(model):
        return ResolvedModel(path=model, uri=model)
    if model.startswith("runs:/"):
        rest = model[len("runs:/") :].strip("/")
        run_id, _, path = rest.partition("/")
        if not run_id or not path:
            raise UserError(f"not a run URI: {model!r}; use runs:/RUN_ID/ARTIFACT_PATH")
        return ResolvedModel(
            path=_download(_run_artifact_uri(run_id, path), registry_uri=None),
            uri=model,
            version=f"runs:/{run_id}/{path}",
            run_id=run_id,
        )
    name, alias, number = parse_models_uri(model)
    mlflow_client = client(name)
    try:
        mv = (
            mlflow_client.get_model_version_by_alias(name, alias)
            if alias
            else mlflow_client.get_model_version(name, number)
        )
    except Exception as exc:  # noqa: BLE001 - MlflowException (not found, no permission) or a connection error
        raise UserError(f"cannot resolve {model}: {_first_line(exc)}") from exc
    concrete = f"models:/{name}/{mv.version}"
    return ResolvedModel(
        path=_download(concrete, registry_uri=_registry_uri(name)),
        uri=model,
        version=f"{name}/{mv.version}",
        name=name,
        number=str(mv.version),
        run_id=mv.run_id or None,
    )


def _run_artifact_uri(run_id: str, path: str) -> str:
    """Where ``runs:/RUN/PATH`` lives: MLflow 3 keeps a model logged in a run outside the run's artifacts.

    Looked up through the run's logged-model outputs: MLflow 3's own fallback first tries the run's
    artifacts and, on a tracking server, retries the missing path for minutes.
    """
    mlflow = _mlflow(f"model runs:/{run_id}/{path}")
    mlflow_client = mlflow.MlflowClient()
    try:
        outputs = getattr(mlflow_client.get_run(run_id), "outputs", None)  # MLflow >= 3
    except Exception as exc:  # noqa: BLE001 - no such run, no permission, connection errors
        raise UserError(f"cannot resolve runs:/{run_id}/{path}: {_first_line(exc)}") from exc
    name, _, rest = path.partition("/")
    for output in getattr(outputs, "model_outputs", None) or []:
        logged = mlflow_client.get_logged_model(output.model_id)
        if logged.name == name:
            return logged.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"runs:/{run_id}/{path}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- logging and registering a training run ----------------------------------------------------------


def mlflow_installed() -> bool:
    """MLflow can be imported here (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a blocked or half-imported module
        return False


def tracking_configured() -> bool:
    """MLflow is importable and a tracking server is set (always the case on Databricks)."""
    if not mlflow_installed():
        return False
    return bool(os.environ.get("MLFLOW_TRACKING_URI")) or "DATABRICKS_RUNTIME_VERSION" in os.environ


def require_tracking(what: str) -> None:
    """UserError unless ``tracking_configured()``: checked before training, not after."""
    _mlflow(what)
    if not tracking_configured():
        raise UserError(f"{what} needs an MLflow tracking server: set MLFLOW_TRACKING_URI")


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


def log_model(model_path: str, *, class_names: list[str] | None) -> str:
    """Log our ``.keras`` file as an MLflow pyfunc model (``MODEL_ARTIFACT``) in the active run; returns its URI."""
    mlflow = _mlflow("logging the model")
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from image_transfer.pyfunc import ImageClassifier

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
        metadata={"class_names": class_names, "format": "image-transfer keras"},
    )
    return info.model_uri


def register(model_uri: str, name: str, *, tags: dict[str, str] | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name``; returns the version number."""
    mlflow = _mlflow("registering the model")
    previous = mlflow.get_registry_uri()
    registry_uri = _registry_uri(name)
    try:
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        mv = mlflow.register_model(model_uri, name, tags=tags)
    except Exception as exc:  # noqa: BLE001 - permission, bad name, server errors
        raise RunFailed(f"cannot register {model_uri} as {name}: {_first_line(exc)}") from exc
    finally:
        if registry_uri:
            mlflow.set_registry_uri(previous)
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
    mlflow = _mlflow("logging to MLflow")
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


# ---- promotion -------------------------------------------------------------------------------------


@dataclass
class Promotion:
    """The decision on moving ``alias`` to the evaluated version; ``to_dict`` goes into the evaluation JSON."""

    alias: str
    name: str
    candidate_version: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    min_accuracy: float
    tolerance: float
    promoted: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready decision."""
        return asdict(self)

    def describe(self) -> str:
        """One line: what happened and why."""
        verb = "promoted" if self.promoted else "not promoted"
        return f"{self.name}/{self.candidate_version} {verb} to @{self.alias}: {self.reason}"


def decide(
    candidate: float,
    champion: float | None,
    *,
    min_accuracy: float,
    tolerance: float,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """Whether a candidate with accuracy ``candidate`` may take the alias from one with ``champion``."""
    if candidate < min_accuracy:
        return False, f"validation accuracy {candidate:.4f} is below the minimum {min_accuracy:.4f}"
    if champion is not None and candidate < champion - tolerance:
        return False, (
            f"validation accuracy {candidate:.4f} is worse than the current version {champion_version}'s "
            f"{champion:.4f} by more than the tolerance {tolerance:.4f}"
        )
    if champion is None:
        return True, f"validation accuracy {candidate:.4f} >= {min_accuracy:.4f} and the alias was not set"
    return True, (
        f"validation accuracy {candidate:.4f} >= {min_accuracy:.4f} and not worse than the current version "
        f"{champion_version}'s {champion:.4f} by more than {tolerance:.4f}"
    )


def promote(
    spark: Any,
    df: Any,
    *,
    model: str,
    alias: str,
    min_accuracy: float = 0.0,
    tolerance: float = 0.0,
    split: str = "validation",
    batch_size: int = 64,
    metrics_path: str | None = None,
) -> tuple[Any, Promotion]:
    """Evaluate the registered version ``model`` and its alias's current version; move the alias if better.

    Writes the evaluation JSON (with ``promotion``) and logs the decision to the version's training run
    (or a new run). Returns (the candidate's ``EvaluationResult``, the ``Promotion``); when
    ``promotion.promoted`` is False the alias did not move (the CLI then exits 1 with the reason).
    """
    from image_transfer.evaluate import evaluate

    if not alias or "/" in alias or "@" in alias:
        raise UserError(f"not an alias name: {alias!r}")
    if not 0.0 <= min_accuracy <= 1.0 or tolerance < 0.0:
        raise UserError(f"min accuracy must be in [0, 1] and tolerance >= 0, got {min_accuracy}, {tolerance}")
    resolved = resolve_model(model)
    if resolved.name is None:
        raise UserError(f"--promote-to needs a registered model (models:/NAME/VERSION or @ALIAS), got {model}")
    mlflow_client = client(resolved.name)
    try:
        current = mlflow_client.get_model_version_by_alias(resolved.name, alias)
    except Exception:  # noqa: BLE001 - the alias is not set (RESOURCE_DOES_NOT_EXIST / NOT_FOUND)
        current = None
    candidate_uri = f"models:/{resolved.name}/{resolved.number}"
    result = evaluate(spark, df, model_path=candidate_uri, split=split, batch_size=batch_size)
    champion_version = champion_accuracy = None
    if current is not None and str(current.version) != resolved.number:
        champion_version = str(current.version)
        try:
            champion = evaluate(
                spark, df, model_path=f"models:/{resolved.name}/{champion_version}", split=split, batch_size=batch_size
            )
        except UserError as exc:  # e.g. the classes changed: no comparison, so no automatic promotion
            raise UserError(
                f"cannot evaluate the current @{alias} version {resolved.name}/{champion_version} on the {split} "
                f"split ({exc}); the alias stays: set it by hand if {resolved.version} should replace it"
            ) from exc
        champion_accuracy = champion.accuracy
    promoted, reason = decide(
        result.accuracy,
        champion_accuracy,
        min_accuracy=min_accuracy,
        tolerance=tolerance,
        champion_version=f"{resolved.name}/{champion_version}",
    )
    if current is not None and str(current.version) == resolved.number and promoted:
        reason = f"already @{alias}; {reason}"
    decision = Promotion(
        alias=alias,
        name=resolved.name,
        candidate_version=str(resolved.number),
        candidate_accuracy=result.accuracy,
        champion_version=champion_version,
        champion_accuracy=champion_accuracy,
        min_accuracy=min_accuracy,
        tolerance=tolerance,
        promoted=promoted,
        reason=reason,
    )
    if promoted:
        mlflow_client.set_registered_model_alias(resolved.name, alias, resolved.number)
    record = json.dumps({**result.to_dict(), "promotion": decision.to_dict()}, indent=2) + "\n"
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(record)
    _log_decision(resolved, result, decision, split=split, record=record)
    return result, decision


def _log_decision(resolved: ResolvedModel, result: Any, decision: Promotion, *, split: str, record: str) -> None:
    """The accuracies and the decision on the version's training run (a new run if it has none) and version."""
    mlflow = _mlflow("logging the promotion")
    mlflow_client = client(resolved.name)
    try:
        run_id = resolved.run_id
        if run_id is None:  # registered from a file, not from a run: the decision gets a run of its own
            nested = mlflow.active_run() is not None
            with mlflow.start_run(run_name=f"evaluate {resolved.version}", nested=nested) as run:
                run_id = run.info.run_id
        prefix = f"promotion_{decision.alias}"
        mlflow_client.log_metric(run_id, f"evaluate_{split}_accuracy", result.accuracy)
        if decision.champion_accuracy is not None:
            mlflow_client.log_metric(run_id, f"{prefix}_champion_{split}_accuracy", decision.champion_accuracy)
        for key, value in {
            f"{prefix}_decision": "promoted" if decision.promoted else "refused",
            f"{prefix}_reason": decision.reason[:5000],
            f"{prefix}_champion_version": str(decision.champion_version or ""),
        }.items():
            mlflow_client.set_tag(run_id, key, value)
        mlflow_client.log_text(run_id, record, f"evaluate-{decision.alias}.json")
        accuracy = f"{result.accuracy:.6f}"
        mlflow_client.set_model_version_tag(resolved.name, resolved.number, f"{split}_accuracy", accuracy)
    except Exception as exc:  # noqa: BLE001 - the decision stands; the record is best effort
        print(f"warning: could not log the promotion to MLflow: {_first_line(exc)}")
