"""Inspecting a model on the driver without TensorFlow where possible: input size, output width, probabilities."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.models import lite
from image_transfer.models.artifact import ModelInfo, check_zip_members, model_kind, read_metadata, size_on_disk
from image_transfer.models.load import (
    EMBEDDING_POOL,
    embedding_model,
    io_shapes,
    load_model,
    outputs_in_unit_range,
    preprocess_fn,
)
from image_transfer.models.trust import check_keras_trust


def inspect_model(
    path: str, *, layer: str | None = None, embed: bool = False, classify: bool = False, trust: bool = False
) -> ModelInfo:
    """Check the model on the driver is usable; raises UserError with the reason.

    A Keras 3 ``.keras`` file of standard layers is checked from its archive (every member's CRC) and
    its config (input, output and embedding shapes, the last activation), without importing
    TensorFlow: a scheduled job's driver then spends no CPU on it while the workers start. Anything
    the config cannot settle (a SavedModel, custom or Python-code layers, an unusual head) is loaded
    once here instead. With ``classify`` the outputs must be class probabilities (``check_classifier``).
    Unless ``trust``, a config naming code outside Keras is refused first, nothing it names imported
    (``check_keras_trust``). A LiteRT ``.tflite`` file is loaded in LiteRT's interpreter (no TensorFlow
    where ``ai_edge_litert`` is installed); its class names and preprocessing come from ``<path>.json``.
    """
    kind = model_kind(path)
    if kind == "keras":
        check_zip_members(path)
        check_keras_trust(path, trust)
    metadata = read_metadata(path)
    shapes = _config_shapes(path, layer=layer, embed=embed) if kind == "keras" else None
    probabilities = _config_probabilities(path) if kind == "keras" and not embed else None
    model = interpreter = None
    if kind == "tflite":
        interpreter, shapes = _flatbuffer_shapes(path, layer=layer, embed=embed)
    elif shapes is None or (classify and probabilities is None):
        model = load_model(path, kind, trust=trust)
        if probabilities is None and not embed:
            probabilities = _loaded_probabilities(model)
        if shapes is None:
            cut = embedding_model(model, layer) if embed else model
            shapes = io_shapes(cut)
            if embed and cut.layers[-1].name == EMBEDDING_POOL:  # a feature map embedding_model pools
                shapes = (shapes[0], tuple(cut.layers[-1].input.shape))
    in_shape, out_shape = shapes
    if len(in_shape) != 4 or in_shape[-1] != 3 or not all(isinstance(d, int) for d in in_shape[1:3]):
        raise UserError(
            f"the model's input {in_shape} is not a batch of fixed-size RGB images [None, height, width, 3]"
        )
    pooled_from = None
    if embed and len(out_shape) == 4 and isinstance(out_shape[3], int):
        pooled_from, out_shape = tuple(out_shape), (out_shape[0], out_shape[3])  # embedding_model pools it
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        if embed:
            at = f"layer {layer!r}'s output" if layer else "the model's output"
            raise UserError(
                f"{at} {tuple(out_shape)} is neither a batch of embeddings [None, n] nor a spatial feature map "
                "[None, height, width, channels] (pooled by its global average): name a layer with one of "
                "those outputs (--layer, layer=)"
            )
        raise UserError(f"the model's output {tuple(out_shape)} is not a batch of class scores [None, n]")
    names = metadata.get("class_names")
    if names is not None and not embed and len(names) != out_shape[1]:
        raise UserError(f"the model has {out_shape[1]} outputs but its metadata names {len(names)} classes")
    preprocess = metadata.get("preprocess", "none")
    preprocess_fn(preprocess)  # validates the name
    if classify and probabilities is None and model is not None:  # the structure does not tell: try it
        probabilities = outputs_in_unit_range(model, int(in_shape[1]), int(in_shape[2]), preprocess)
    if classify and interpreter is not None:  # a flatbuffer: its ops are not read, its outputs tried
        probabilities = lite.outputs_in_unit_range(interpreter, int(in_shape[1]), int(in_shape[2]), preprocess)
    info = ModelInfo(
        path=str(path),
        kind=kind,
        height=int(in_shape[1]),
        width=int(in_shape[2]),
        output_width=int(out_shape[1]),
        class_names=tuple(names) if names else None,
        preprocess=preprocess,
        size_bytes=size_on_disk(Path(path)),
        metadata=metadata,
        probabilities=probabilities,
        pooled_from=pooled_from,
    )
    if classify:
        check_classifier(info)
    return info


def _flatbuffer_shapes(path: str, *, layer: str | None, embed: bool) -> tuple[Any, tuple[Shape, Shape]]:
    """(interpreter, (input shape, output shape)) of a ``.tflite`` file, loaded in LiteRT's interpreter.

    A flatbuffer cannot be cut at a layer, and its output is taken as it is: a batch of vectors only.
    """
    if layer is not None:
        raise UserError(
            f"{path} is a LiteRT flatbuffer: it cannot be cut at a layer (--layer, layer=). featurize takes "
            "its output; to embed with an inner layer, featurize the .keras model it was converted from"
        )
    interpreter = lite.load_interpreter(Path(path).read_bytes(), str(path))
    in_shape, out_shape = lite.io_shapes(interpreter, str(path))
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        use = "embeddings" if embed else "class scores"
        raise UserError(
            f"{path}'s output {out_shape} is not a batch of {use} [None, n]: a flatbuffer's output is taken "
            "as it is (a feature map is not pooled here): convert the model with the pooling in it"
        )
    return interpreter, (in_shape, out_shape)


def check_classifier(info: ModelInfo) -> None:
    """UserError unless the model's outputs are class probabilities (it ends in a softmax or sigmoid).

    A headless backbone (features, no class names) would otherwise be reported as classes with
    "probabilities" above 1: it is for ``featurize``. A head without a softmax (logits) is refused
    too, class names or not: scores reported as probabilities would mislead.
    """
    if info.probabilities is not False:
        return
    if info.class_names is None:
        raise UserError(
            f"{info.path} is not a classifier: its output (None, {info.output_width}) is not class probabilities "
            "(no softmax or sigmoid at the end) and it has no class names. It looks like a feature extractor: "
            "use featurize (image-transfer featurize, featurize_images) for its embeddings, "
            "or train a classification head on it (image-transfer train --backbone)"
        )
    raise UserError(
        f"{info.path} has class names but its outputs are not probabilities (no softmax or sigmoid at the "
        "end: logits?): end the model with one, e.g. keras.Sequential([model, keras.layers.Softmax()]), "
        "and save it again; or use featurize for the raw outputs"
    )


PROBABILITY_ACTIVATIONS = {"softmax", "sigmoid", "hard_sigmoid"}
PROBABILITY_OPS = {"Softmax", "Sigmoid"}
# Ops after which a SavedModel's outputs are surely not probabilities (other ops: tried on random images).
_NOT_PROBABILITY_OPS = {
    "MatMul", "BatchMatMulV2", "BiasAdd", "Add", "AddV2", "Mean", "Max", "Sum", "Relu", "Relu6", "Elu",
    "Selu", "LeakyRelu", "Tanh", "LogSoftmax", "Conv2D", "Reshape", "Squeeze", "ConcatV2", "FusedBatchNormV3",
}  # fmt: skip
# Layers that pass their input's values through at inference: what decides is the layer before.
_PASS_THROUGH = {"Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Identity", "ActivityRegularization"}
_OPAQUE = {"Lambda", "TFSMLayer"}  # standard layers whose outputs their config does not describe


def _activation_name(value: Any) -> str | None:
    """``softmax`` of ``"softmax"`` or of a serialized activation (``{"config": "softmax", ...}``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        config = value.get("config")
        if isinstance(config, str):
            return config
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            return config["name"]
    return None


def _spec_probabilities(spec: dict[str, Any]) -> bool | None | str:
    """Whether a layer spec ends in probabilities: True, False, None (cannot tell) or ``"pass"`` (look before)."""
    kind, config = spec.get("class_name"), spec.get("config") or {}
    if not str(spec.get("module") or "keras").startswith("keras"):
        return None  # a custom layer
    if kind in _PASS_THROUGH:
        return "pass"
    if kind in _OPAQUE:
        return None
    if kind == "Softmax":
        return True
    if kind in ("Functional", "Sequential", "Model") and isinstance(config.get("layers"), list):
        return _model_probabilities(spec)
    if "activation" in config:
        name = _activation_name(config["activation"])
        return None if name is None else name in PROBABILITY_ACTIVATIONS
    return False  # a standard layer without an activation: pooling, normalisation, reshaping, merging...


def _refs(value: Any) -> list[Any]:
    """A Functional config's ``input_layers`` / ``output_layers`` as a list of ``[name, node, tensor]``:
    Keras 3.3 writes ``[["dense", 0, 0]]``, Keras 3.12+ a single one flat, ``["dense", 0, 0]``."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [value]
    return value if isinstance(value, list) else []


def _model_probabilities(config: dict[str, Any]) -> bool | None:
    """Whether a Keras model config (Functional or Sequential) ends in a softmax or sigmoid; None when unsure."""
    body = config.get("config") or {}
    layers = body.get("layers") or []
    if not layers:
        return None
    if config.get("class_name") == "Sequential":
        for spec in reversed(layers):
            if spec.get("class_name") == "InputLayer":
                return None
            found = _spec_probabilities(spec)
            if found != "pass":
                return found  # type: ignore[return-value]
        return None
    outputs = _refs(body.get("output_layers"))
    if len(outputs) != 1 or not isinstance(outputs[0], list):
        return None
    by_name = {_layer_name(spec): spec for spec in layers}
    name = outputs[0][0]
    for _ in range(len(layers)):
        spec = by_name.get(name)
        if spec is None or spec.get("class_name") == "InputLayer":
            return None
        found = _spec_probabilities(spec)
        if found != "pass":
            return found  # type: ignore[return-value]
        tensors = [t for node in spec.get("inbound_nodes") or [] for t in _tensors(node)]
        history = tensors[0].get("keras_history") if len(tensors) == 1 else None
        if not isinstance(history, list) or not history:
            return None
        name = history[0]
    return None


def _config_probabilities(path: str) -> bool | None:
    """Whether a Keras 3 archive's model ends in a softmax or sigmoid, from its config; None when unsure."""
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
    except (KeyError, zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError):
        return None
    return _model_probabilities(config) if isinstance(config, dict) else None


def _loaded_probabilities(model: Any) -> bool | None:
    """Whether a loaded model ends in a softmax or sigmoid: its Keras config, or a SavedModel's graph."""
    output_op = getattr(model, "output_op", None)
    if output_op is not None:  # a SavedModel signature
        try:
            op = output_op()
        except Exception:  # noqa: BLE001 - an unusual graph: the outputs are tried instead
            return None
        if op in PROBABILITY_OPS:
            return True
        return False if op in _NOT_PROBABILITY_OPS else None
    try:
        return _model_probabilities({"class_name": type(model).__name__, "config": model.get_config()})
    except Exception:  # noqa: BLE001 - a model whose config cannot be read: the outputs are tried instead
        return None


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
    config = _archive_config(path)
    if config is None:
        return None
    body = config.get("config") or {}
    layers = body.get("layers") or []
    if not layers:
        return None
    if config.get("class_name") == "Sequential":
        return _sequential_shapes(config, layers, layer=layer, embed=embed)
    if config.get("class_name") != "Functional":
        return None
    return _functional_shapes(body, layers, layer=layer, embed=embed)


def _archive_config(path: str) -> dict[str, Any] | None:
    """A Keras 3 archive's config, when its shapes can be read from it (Keras's own layers, no Lambda);
    None when only loading tells; UserError for a damaged archive."""
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
    return config


def _consumed_shapes(layers: list[dict[str, Any]]) -> dict[str, Shape]:
    """Each layer's output shape, as the layers after it saw it (their inbound tensors)."""
    consumed: dict[str, Shape] = {}
    for spec in layers:
        for node in spec.get("inbound_nodes") or []:
            for tensor in _tensors(node):
                history, shape = tensor.get("keras_history"), _shape(tensor.get("shape"))
                if isinstance(history, list) and len(history) == 3 and history[2] == 0 and shape is not None:
                    consumed.setdefault(str(history[0]), shape)
    return consumed


def _inbound(spec: dict[str, Any]) -> Shape | None:
    tensors = [t for node in spec.get("inbound_nodes") or [] for t in _tensors(node)]
    return _shape(tensors[0].get("shape")) if len(tensors) == 1 else None


def _functional_shapes(
    body: dict[str, Any], layers: list[dict[str, Any]], *, layer: str | None, embed: bool
) -> tuple[Shape, Shape] | None:
    """``_config_shapes`` of a functional model's config."""
    inputs, outputs = _refs(body.get("input_layers")), _refs(body.get("output_layers"))
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(inputs[0], list) or not isinstance(outputs[0], list):
        return None
    by_name = {_layer_name(spec): spec for spec in layers}
    first = by_name.get(inputs[0][0]) or {}
    in_shape = _shape((first.get("config") or {}).get("batch_shape"))
    if first.get("class_name") != "InputLayer" or in_shape is None:
        return None
    if any(len(spec.get("inbound_nodes") or []) > 1 for spec in layers):
        return None  # a layer called more than once: which call is meant, only loading tells
    last = by_name.get(outputs[0][0])
    model_out = _output_shape(last, _inbound(last)) if last is not None else None
    if not embed:
        return (in_shape, model_out) if model_out is not None else None
    if layer is None:
        out = _inbound(layers[-1])
        if out is not None and len(out) != 2:
            out = model_out  # no classifier at the end: the backbone's own output, as embedding_model cuts
        return (in_shape, out) if out is not None else None
    chosen = by_name.get(layer)
    if chosen is None:
        return None  # loading names the layers there are
    out = _consumed_shapes(layers).get(layer) or _output_shape(chosen, _inbound(chosen))
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
        if embed and layer is None and i == len(layers) - 1 and shape is not None and len(shape) == 2:
            return (in_shape, shape)  # the input of the last layer (else its output: a headless backbone)
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
