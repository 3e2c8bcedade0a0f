"""Models: save with their class names, inspect on the driver, ship to workers, load safely there.

A model is a Keras file (``.keras``) or a TensorFlow SavedModel directory whose input is a batch of
RGB images ``[None, height, width, 3]`` in 0..255 (float) and whose output is ``[None, classes]``.
Preprocessing that the network expects either lives inside the model (what ``train`` saves) or is
named in the metadata (``preprocess``). Metadata travels inside the model: an ``image_transfer.json``
entry in the ``.keras`` zip, or that file in the SavedModel directory; ``<model path>.json`` beside
the model is read too, for models made elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError

METADATA_NAME = "image_transfer.json"
PREPROCESSING = ("none", "scale_0_1", "scale_-1_1", "caffe")


def preprocess_fn(name: str) -> Callable[[Any], Any]:
    """Graph function mapping float RGB 0..255 to what a network expects (``none``: unchanged)."""
    if name not in PREPROCESSING:
        raise UserError(f"unknown preprocessing {name!r}; one of {', '.join(PREPROCESSING)}")
    if name == "none":
        return lambda x: x
    if name == "scale_0_1":
        return lambda x: x / 255.0
    if name == "scale_-1_1":
        return lambda x: x / 127.5 - 1.0
    import tensorflow as tf  # caffe (ResNet50 / VGG): BGR, ImageNet means subtracted

    mean = tf.constant([103.939, 116.779, 123.68], tf.float32)
    return lambda x: x[..., ::-1] - mean


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned about a model before scheduling any work."""

    path: str
    kind: str  # "keras" or "savedmodel"
    height: int
    width: int
    output_width: int
    class_names: tuple[str, ...] | None
    preprocess: str = "none"
    size_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def label(self, index: int) -> str:
        """Class name of an output index (the index itself when the model has no class names)."""
        return self.class_names[index] if self.class_names else str(index)


def model_kind(path: str | os.PathLike[str]) -> str:
    """``keras`` for a ``.keras`` file, ``savedmodel`` for a SavedModel directory; UserError otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {path}")
    if p.is_dir():
        if (p / "saved_model.pb").exists():
            return "savedmodel"
        raise UserError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
    if p.suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise UserError(f"{path} is not a valid .keras file (not a zip archive)")
        return "keras"
    raise UserError(f"unsupported model format {p.suffix or p.name!r}: use a .keras file or a SavedModel directory")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata stored inside the model, or beside it as ``<path>.json``; ``{}`` when there is none."""
    p = Path(path)
    try:
        if p.is_dir() and (p / METADATA_NAME).exists():
            return json.loads((p / METADATA_NAME).read_text())
        if p.is_file() and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                if METADATA_NAME in zf.namelist():
                    return json.loads(zf.read(METADATA_NAME))
        beside = Path(str(p) + ".json")
        if beside.exists():
            return json.loads(beside.read_text())
    except (json.JSONDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"unreadable model metadata for {path}: {exc}") from exc
    return {}


def save_model(
    model: Any,
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None,
    preprocess: str = "none",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a Keras model as ``.keras`` with its class names and preprocessing inside the file.

    The file is assembled in a local temp dir and copied into place with one sequential write, then
    renamed: Volumes and DBFS FUSE mounts refuse a zip's random writes, and readers never see half a file.
    """
    import shutil

    p = Path(path)
    if p.suffix != ".keras":
        raise ValueError(f"model path must end in .keras: {path}")
    metadata = {"class_names": list(class_names) if class_names else None, "preprocess": preprocess}
    metadata.update(extra or {})
    p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="image-transfer-save-") as tmp:
        local = Path(tmp) / "model.keras"
        model.save(local)
        with zipfile.ZipFile(local, "a") as zf:
            zf.writestr(METADATA_NAME, json.dumps(metadata, indent=2))
        staging = p.with_name(f".{p.name}.partial")
        shutil.copyfile(local, staging)
        os.replace(staging, p)
    return p


def load_keras(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` file in Keras safe mode: a model that would run Python code is refused."""
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" in str(exc) or "lambda" in str(exc).lower():
            raise UserError(
                f"refused to load {path}: it contains Python code (e.g. a Lambda layer), which Keras "
                "safe mode does not run; rebuild the model without it"
            ) from exc
        raise UserError(f"cannot load Keras model {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt archives raise many types
        raise UserError(f"cannot load Keras model {path}: {type(exc).__name__}: {exc}") from exc


class _SavedModelCallable:
    """A SavedModel's ``serving_default`` signature as a one-input, one-output callable."""

    def __init__(self, path: str) -> None:
        import tensorflow as tf

        self._loaded = tf.saved_model.load(path)
        if "serving_default" not in self._loaded.signatures:
            raise UserError(f"SavedModel {path} has no serving_default signature")
        self._fn = self._loaded.signatures["serving_default"]
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"SavedModel {path} must have one input and one output, has {len(inputs)}/{len(outputs)}")
        self._input_name, spec = next(iter(inputs.items()))
        self._output_name = next(iter(outputs))
        self.input_shape = tuple(spec.shape.as_list())
        self.output_shape = tuple(outputs[self._output_name].shape.as_list())

    def __call__(self, x: Any, training: bool = False) -> Any:
        return self._fn(**{self._input_name: x})[self._output_name]


def load_model(path: str | os.PathLike[str], kind: str) -> Any:
    """Load a model for inference: a Keras model, or a callable over a SavedModel signature."""
    if kind == "keras":
        return load_keras(path)
    try:
        return _SavedModelCallable(str(path))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load SavedModel {path}: {type(exc).__name__}: {exc}") from exc


def _shapes(model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if isinstance(model, _SavedModelCallable):
        return model.input_shape, model.output_shape
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"the model must have one input and one output, has {len(model.inputs)}/{len(model.outputs)}")
    return tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)


def embedding_model(model: Any, layer: str | None) -> Any:
    """A Keras model from the input to ``layer``'s output, or to the input of the final classifier."""
    import keras

    if isinstance(model, _SavedModelCallable):
        raise UserError("featurize needs a Keras (.keras) model, to pick a layer")
    if layer:
        try:
            chosen = model.get_layer(layer)
        except ValueError as exc:
            names = ", ".join(lyr.name for lyr in model.layers[-8:])
            raise UserError(f"no layer {layer!r} in the model (last layers: {names})") from exc
        # The layer's output as called in this model (for a nested model, ``.output`` is its own graph's).
        nodes = getattr(chosen, "_inbound_nodes", None)
        target = nodes[-1].output_tensors[0] if nodes else chosen.output
    else:
        target = model.layers[-1].input
    try:
        return keras.Model(model.inputs, target)
    except ValueError as exc:
        raise UserError(f"cannot cut the model at {layer or 'the input of its last layer'}: {exc}") from exc


def inspect_model(path: str, *, layer: str | None = None, embed: bool = False) -> ModelInfo:
    """Check the model on the driver is usable; raises UserError with the reason.

    A Keras 3 ``.keras`` file of standard layers is checked from its archive (every member's CRC) and
    its config (input, output and embedding shapes), without importing TensorFlow: a scheduled job's
    driver then spends no CPU on it while the workers start. Anything the config cannot settle (a
    SavedModel, custom or Python-code layers, an unusual head) is loaded once here instead.
    """
    kind = model_kind(path)
    metadata = read_metadata(path)
    shapes = _config_shapes(path, layer=layer, embed=embed) if kind == "keras" else None
    if shapes is None:
        model = load_model(path, kind)
        if embed:
            model = embedding_model(model, layer)
        shapes = _shapes(model)
    in_shape, out_shape = shapes
    if len(in_shape) != 4 or in_shape[-1] != 3 or not all(isinstance(d, int) for d in in_shape[1:3]):
        raise UserError(
            f"the model's input {in_shape} is not a batch of fixed-size RGB images [None, height, width, 3]"
        )
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        what = "embedding" if embed else "class scores"
        raise UserError(f"the model's output {out_shape} is not a batch of {what} [None, n]")
    names = metadata.get("class_names")
    if names is not None and not embed and len(names) != out_shape[1]:
        raise UserError(f"the model has {out_shape[1]} outputs but its metadata names {len(names)} classes")
    preprocess = metadata.get("preprocess", "none")
    preprocess_fn(preprocess)  # validates the name
    return ModelInfo(
        path=str(path),
        kind=kind,
        height=int(in_shape[1]),
        width=int(in_shape[2]),
        output_width=int(out_shape[1]),
        class_names=tuple(names) if names else None,
        preprocess=preprocess,
        size_bytes=_size(Path(path)),
        metadata=metadata,
    )


# Layers whose output shape the config settles: same shape as the input, or computed below.
_SAME_SHAPE = {
    "Activation",
    "BatchNormalization",
    "Dropout",
    "GaussianNoise",
    "Identity",
    "LayerNormalization",
    "LeakyReLU",
    "ReLU",
    "Rescaling",
    "Softmax",
}
_GLOBAL_POOLING = {"GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling1D", "GlobalMaxPooling1D"}
Shape = tuple[Any, ...]


def _output_shape(spec: dict[str, Any], in_shape: Shape | None) -> Shape | None:
    """The output shape of a standard layer given its input's, or None when the config cannot tell."""
    kind, config = spec.get("class_name"), spec.get("config") or {}
    if in_shape is None:
        return None
    if kind in _SAME_SHAPE:
        return in_shape
    if kind == "Dense" and isinstance(config.get("units"), int):
        return (*in_shape[:-1], config["units"])
    if kind in _GLOBAL_POOLING and not config.get("keepdims") and config.get("data_format") != "channels_first":
        return (in_shape[0], in_shape[-1])
    if kind == "Flatten" and all(isinstance(d, int) for d in in_shape[1:]):
        return (in_shape[0], math.prod(in_shape[1:]))
    return None


def _tensors(value: Any) -> list[dict[str, Any]]:
    """The ``__keras_tensor__`` entries of a layer's inbound node arguments (nested lists and dicts)."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [value.get("config") or {}]
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list):
        return [t for v in value for t in _tensors(v)]
    return []


def _shape(value: Any) -> Shape | None:
    return tuple(value) if isinstance(value, list) else None


def _config_shapes(path: str, *, layer: str | None, embed: bool) -> tuple[Shape, Shape] | None:
    """(input shape, output shape) of a Keras 3 archive from its config alone; None when unsure.

    The output is the model's, or with ``embed`` the named layer's (default: the input of the last
    layer), as ``inspect_model`` would find by loading. A damaged archive raises UserError.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"config.json", "metadata.json"} <= names:
                return None
            if not str(json.loads(zf.read("metadata.json")).get("keras_version", "")).startswith("3."):
                return None
            text = zf.read("config.json").decode()
            bad = zf.testzip()  # reads every member: a damaged weights file shows here, not on a worker
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid .keras file: {exc}") from exc
    if bad is not None:
        raise UserError(f"{path} is not a valid .keras file: {bad} is damaged (CRC mismatch)")
    if "Lambda" in text or "__lambda__" in text:
        return None  # loading refuses it in safe mode, with the reason
    config = json.loads(text)
    modules = {str(m) for m in _values(config, "module")}
    if any(not m.startswith("keras") for m in modules):
        return None  # custom layers: only loading tells
    body = config.get("config") or {}
    layers = body.get("layers") or []
    if not layers:
        return None
    if config.get("class_name") == "Sequential":
        return _sequential_shapes(config, layers, layer=layer, embed=embed)
    if config.get("class_name") != "Functional":
        return None
    inputs, outputs = body.get("input_layers") or [], body.get("output_layers") or []
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(inputs[0], list) or not isinstance(outputs[0], list):
        return None
    by_name = {_layer_name(spec): spec for spec in layers}
    first = by_name.get(inputs[0][0]) or {}
    in_shape = _shape((first.get("config") or {}).get("batch_shape"))
    if first.get("class_name") != "InputLayer" or in_shape is None:
        return None
    if any(len(spec.get("inbound_nodes") or []) > 1 for spec in layers):
        return None  # a layer called more than once: which call is meant, only loading tells
    consumed: dict[str, Shape] = {}  # a layer's output shape, as the layers after it saw it
    for spec in layers:
        for node in spec.get("inbound_nodes") or []:
            for tensor in _tensors(node):
                history, shape = tensor.get("keras_history"), _shape(tensor.get("shape"))
                if isinstance(history, list) and len(history) == 3 and history[2] == 0 and shape is not None:
                    consumed.setdefault(str(history[0]), shape)

    def inbound(spec: dict[str, Any]) -> Shape | None:
        tensors = [t for node in spec.get("inbound_nodes") or [] for t in _tensors(node)]
        return _shape(tensors[0].get("shape")) if len(tensors) == 1 else None

    if embed:
        if layer is None:
            out = inbound(layers[-1])
            return (in_shape, out) if out is not None else None
        chosen = by_name.get(layer)
        if chosen is None:
            return None  # loading names the layers there are
        out = consumed.get(layer) or _output_shape(chosen, inbound(chosen))
        return (in_shape, out) if out is not None else None
    last = by_name.get(outputs[0][0])
    out = _output_shape(last, inbound(last)) if last is not None else None
    return (in_shape, out) if out is not None else None


def _sequential_shapes(
    config: dict[str, Any], layers: list[dict[str, Any]], *, layer: str | None, embed: bool
) -> tuple[Shape, Shape] | None:
    """The shapes of a Sequential model's config: each layer's input as built, else propagated."""
    if layers[0].get("class_name") == "InputLayer":
        in_shape = _shape((layers[0].get("config") or {}).get("batch_shape"))
        layers = layers[1:]
    else:
        in_shape = _shape((config.get("build_config") or {}).get("input_shape"))
    if in_shape is None or not layers:
        return None
    shape: Shape | None = in_shape
    for i, spec in enumerate(layers):
        shape = _shape((spec.get("build_config") or {}).get("input_shape")) or shape  # as built, when recorded
        if embed and layer is None and i == len(layers) - 1:
            return (in_shape, shape) if shape is not None else None  # the input of the last layer
        shape = _output_shape(spec, shape)
        if embed and layer is not None and _layer_name(spec) == layer:
            break
    else:
        if embed:
            return None  # no such layer: loading says which there are
    return (in_shape, shape) if shape is not None else None


def _layer_name(spec: dict[str, Any]) -> Any:
    return spec.get("name") or (spec.get("config") or {}).get("name")


def _values(value: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in a JSON document."""
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == key] + [x for v in value.values() for x in _values(v, key)]
    if isinstance(value, list):
        return [x for v in value for x in _values(v, key)]
    return []


def pack(path: str, kind: str) -> bytes:
    """The model as bytes for a broadcast: the ``.keras`` file, or a tar of the SavedModel directory."""
    if kind == "keras":
        return Path(path).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname="model")
    return buf.getvalue()


def content_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model's bytes (a SavedModel: of its files' relative paths and bytes), hex."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def unpack(data: bytes, kind: str, digest: str | None = None) -> str:
    """Materialise shipped model bytes on the worker; returns the local model path.

    The model lands in ``<tmp>/image-transfer-models/<digest>`` and is reused by every worker process
    of the machine that ships the same model (written to a private dir, then renamed into place, so
    readers never see half a model); nothing accumulates per process.
    """
    digest = digest or hashlib.sha256(data).hexdigest()
    root = Path(tempfile.gettempdir()) / "image-transfer-models"
    final = root / digest[:32]
    name = "model.keras" if kind == "keras" else "model"
    if (final / name).exists():
        return str(final / name)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    try:
        if kind == "keras":
            (staging / name).write_bytes(data)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # Python < 3.11.4: refuse members that would escape the target directory
                    for member in tar.getmembers():
                        if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                            raise UserError(f"unsafe path in packed model: {member.name}")
                    tar.extractall(staging)
        try:
            os.rename(staging, final)
        except OSError:  # another worker put the same model in place first
            pass
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return str(final / name)


def configure_threads(cores: int) -> bool:
    """Limit TensorFlow to ``cores`` threads so concurrent workers do not oversubscribe the CPU.

    Must run before TensorFlow executes anything in the process; returns False when it was too late.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(cores)
        return True
    except RuntimeError:
        return False
