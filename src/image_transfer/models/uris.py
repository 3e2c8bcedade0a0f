"""MLflow model URIs: parse, resolve (alias -> version) and download once on the driver; tracking checks."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError, first_line
from image_transfer.runtime import on_databricks

MODEL_ARTIFACT = "model"  # the MLflow model's name (artifact path) in a training run
KERAS_ARTIFACT = "keras_model"  # the pyfunc's artifact key of the .keras file
PARAM_MAX_CHARS = 250  # under every MLflow's limit on a parameter value (500 in 2.x, 6000 in 3.x)
URI_SCHEMES = ("models:/", "runs:/")


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


def import_mlflow(what: str) -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise UserError(
            f"{what} needs MLflow, which is not installed: pip install 'image-transfer[mlflow]' "
            "(or pass a model file path instead)"
        ) from exc
    return mlflow


def registry_uri(name: str | None) -> str | None:
    """``databricks-uc`` for a three-level name on Databricks unless a registry is configured; else None."""
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        return None
    if name and name.count(".") == 2 and on_databricks():
        return "databricks-uc"
    return None


def client(name: str | None = None) -> Any:
    """An ``MlflowClient`` for the tracking server and the registry ``name`` lives in."""
    mlflow = import_mlflow("the model registry")
    return mlflow.MlflowClient(registry_uri=registry_uri(name))


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


# A URL's query string (a presigned URL's is its credential: ``sig=``, ``X-Amz-Signature=``, tokens),
# and signature-like parameters outside a URL.
_URL_QUERY = re.compile(r"((?:https?|s3|gs|abfss?|wasbs?)://[^\s?#'\"<>]+)\?[^\s#'\"<>]*", re.IGNORECASE)
_SECRET_PARAM = re.compile(
    r"\b((?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|token|se|sv|sp)=)[^&\s'\"<>]+",
    re.IGNORECASE,
)


def scrub_urls(text: str) -> str:
    """``text`` without URL query strings or signature parameters (a presigned URL is a credential)."""
    return _SECRET_PARAM.sub(r"\1<redacted>", _URL_QUERY.sub(r"\1?<redacted>", text))


_REGISTRY_LOCK = threading.RLock()


@contextmanager
def using_registry(target: str | None) -> Iterator[None]:
    """MLflow's registry URI set to ``target`` for the block (nothing changes when None), then put back.

    MLflow keeps the registry URI for the whole process: every block of every thread takes one lock, so
    two blocks never interleave their settings (the one place the package changes it).
    """
    if not target:
        yield
        return
    mlflow = import_mlflow("the model registry")
    with _REGISTRY_LOCK:
        previous = mlflow.get_registry_uri()
        mlflow.set_registry_uri(target)
        try:
            yield
        finally:
            mlflow.set_registry_uri(previous)


def _download(uri: str, *, registry_uri: str | None) -> str:
    mlflow = import_mlflow(f"model {uri}")
    key = (mlflow.get_tracking_uri(), registry_uri or mlflow.get_registry_uri(), uri)  # versions never change
    with _DOWNLOAD_LOCK:
        if key in _DOWNLOADS and Path(_DOWNLOADS[key]).exists():
            return _DOWNLOADS[key]
        dst = Path(tempfile.mkdtemp(prefix="model-", dir=_download_root()))
        try:
            with using_registry(registry_uri):
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
        except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException, OSError, HTTP errors
            # MLflow's HTTP errors quote the presigned URL they fetched (``Forbidden for url: ...?sig=``)
            raise UserError(scrub_urls(f"cannot download model {uri}: {type(exc).__name__}: {exc}")) from None
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
    import_mlflow(f"model {model}")
    if not tracking_configured(registry=model.startswith("models:/")):
        # MLflow would fall back to ./mlruns: create it, then say the model is not found there
        raise UserError(
            f"cannot resolve {model}: no MLflow tracking server is configured (MLFLOW_TRACKING_URI is not "
            "set and this is not Databricks). Set MLFLOW_TRACKING_URI to the server that holds the model "
            "(a local store: file:/path/to/mlruns), or pass the model's file path"
        )
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
        raise UserError(f"cannot resolve {model}: {scrub_urls(first_line(exc))}") from exc
    concrete = f"models:/{name}/{mv.version}"
    return ResolvedModel(
        path=_download(concrete, registry_uri=registry_uri(name)),
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
    mlflow = import_mlflow(f"model runs:/{run_id}/{path}")
    mlflow_client = mlflow.MlflowClient()
    try:
        outputs = getattr(mlflow_client.get_run(run_id), "outputs", None)  # MLflow >= 3
    except Exception as exc:  # noqa: BLE001 - no such run, no permission, connection errors
        raise UserError(f"cannot resolve runs:/{run_id}/{path}: {first_line(exc)}") from exc
    name, _, rest = path.partition("/")
    for output in getattr(outputs, "model_outputs", None) or []:
        logged = mlflow_client.get_logged_model(output.model_id)
        if logged.name == name:
            return logged.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"runs:/{run_id}/{path}"


def mlflow_installed() -> bool:
    """MLflow can be imported here (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a blocked or half-imported module
        return False


def tracking_configured(*, registry: bool = False) -> bool:
    """MLflow is importable and a tracking server is set (always the case on Databricks).

    Set means ``MLFLOW_TRACKING_URI`` in the environment; with ``registry`` a model registry set in
    ``MLFLOW_REGISTRY_URI`` counts too. Imports nothing.
    """
    if not mlflow_installed():
        return False
    if on_databricks() or os.environ.get("MLFLOW_TRACKING_URI"):
        return True
    return registry and bool(os.environ.get("MLFLOW_REGISTRY_URI"))


def require_tracking(what: str) -> None:
    """UserError unless ``tracking_configured()``: checked before training, not after."""
    import_mlflow(what)
    if not tracking_configured():
        raise UserError(f"{what} needs an MLflow tracking server: set MLFLOW_TRACKING_URI")
