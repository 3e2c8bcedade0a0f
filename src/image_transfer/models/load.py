"""Loading models safely (Keras safe mode, SavedModel adapter), preprocessing, the embedding sub-model."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from image_transfer.errors import UserError
from image_transfer.models.artifact import PREPROCESSING


def preprocess_fn(name: str) -> Callable[[Any], Any]:
    """Function mapping float RGB 0..255 (a tensor or an array) to what a network expects (``none``: unchanged)."""
    if name not in PREPROCESSING:
        raise UserError(f"unknown preprocessing {name!r}; one of {', '.join(PREPROCESSING)}")
    if name == "none":
        return lambda x: x
    if name == "scale_0_1":
        return lambda x: x / 255.0
    if name == "scale_-1_1":
        return lambda x: x / 127.5 - 1.0
    import numpy as np  # caffe (ResNet50 / VGG): BGR, ImageNet means subtracted (on tensors and arrays alike)

    mean = np.array([103.939, 116.779, 123.68], np.float32)
    return lambda x: x[..., ::-1] - mean


def tidy_autograph() -> None:
    """Remove each file TensorFlow's autograph writes (``<tmp>/__autograph_generated_file*.py``) once loaded.

    Autograph writes the converted source of every traced Python function to a temp file and
    deletes it at exit, but Spark's Python workers end with ``os._exit`` or a signal, so their files
    stayed in ``/tmp`` for good. Here each file goes as soon as its module is loaded; its source stays
    in ``linecache``, so tracebacks still show the lines. Idempotent; does nothing if TensorFlow's
    autograph loader is not where this expects it.
    """
    try:
        from tensorflow.python.autograph.pyct import loader
    except ImportError:
        return
    original = getattr(loader, "load_source", None)
    if original is None or getattr(original, "_image_transfer_tidy", False):
        return

    def load_source(source: str, delete_on_exit: bool) -> tuple[Any, str]:
        module, file_name = original(source, delete_on_exit)
        if delete_on_exit:
            import linecache

            linecache.cache[file_name] = (len(source), None, source.splitlines(True), file_name)
            try:
                os.remove(file_name)
            except OSError:
                pass
        return module, file_name

    load_source._image_transfer_tidy = True  # type: ignore[attr-defined]
    loader.load_source = load_source


def load_keras(path: str | os.PathLike[str], *, trust: bool = False) -> Any:
    """Load a ``.keras`` file in Keras safe mode: a model that would run Python code is refused.

    Untrusted (the default), a config naming code outside Keras is refused before Keras reads it
    (``check_keras_trust``), whatever the Keras version; with ``trust`` its modules are imported.
    """
    from image_transfer.models.trust import check_keras_trust, warn_unfixed_keras

    check_keras_trust(path, trust)
    import keras

    if not trust:
        warn_unfixed_keras()
    tidy_autograph()

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

        tidy_autograph()
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

    def output_op(self) -> str | None:
        """The type of the op computing the output (``Softmax``, ``MatMul``...), through identities and
        function calls; None when the graph does not say (the output is an input, or an unknown call)."""
        graph_def = self._fn.graph.as_graph_def()
        functions = {f.signature.name: f for f in graph_def.library.function}
        if len(self._fn.outputs) != 1:
            return None
        tensor = self._fn.outputs[0]
        nodes = {n.name: n for n in graph_def.node}
        return _producer(nodes, f"{tensor.op.name}:{tensor.value_index}", functions)


_PASS_OPS = {"Identity", "IdentityN", "StopGradient", "Snapshot", "EnsureShape", "CheckNumerics", "PreventGradient"}
_CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}


def _producer(nodes: dict[str, Any], ref: str, functions: dict[str, Any], depth: int = 0) -> str | None:
    """The op type behind a tensor reference (``node``, ``node:1``, or in a function ``node:out:1``)."""
    parts = ref.split(":")
    node = nodes.get(parts[0])
    if node is None or depth > 64 or ref.startswith("^"):
        return None
    index = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 0
    inputs = [i for i in node.input if not i.startswith("^")]
    if node.op in _PASS_OPS and inputs:
        return _producer(
            nodes, inputs[index if node.op == "IdentityN" and index < len(inputs) else 0], functions, depth + 1
        )
    if node.op in _CALL_OPS:
        body = functions.get(node.attr["f"].func.name)
        if body is None or index >= len(body.signature.output_arg):
            return None
        ret = body.ret.get(body.signature.output_arg[index].name)
        return _producer({n.name: n for n in body.node_def}, ret, functions, depth + 1) if ret else None
    return str(node.op)


def outputs_in_unit_range(model: Any, height: int, width: int, preprocess: str) -> bool | None:
    """Whether the model's outputs on a few random images all lie in [0, 1] (probabilities can).

    The last resort when the model's structure does not tell whether it ends in a softmax or sigmoid;
    None when the model raises on them (then the workers' first batch tells).
    """
    import numpy as np
    import tensorflow as tf

    pixels = np.random.default_rng(0).uniform(0, 255, (4, height, width, 3)).astype("float32")
    try:
        outputs = np.asarray(model(preprocess_fn(preprocess)(tf.constant(pixels)), training=False), dtype="float64")
    except Exception:  # noqa: BLE001 - a model that refuses random images: not decided here
        return None
    return in_unit_range(outputs)


def in_unit_range(outputs: Any) -> bool:
    """Whether every output is finite and within [0, 1] (float tolerance): what probabilities can be."""
    import numpy as np

    return bool(np.all(np.isfinite(outputs)) and outputs.min() >= -1e-6 and outputs.max() <= 1 + 1e-6)


def load_model(path: str | os.PathLike[str], kind: str, *, trust: bool = False) -> Any:
    """Load a model for inference: a Keras model, or a callable over a SavedModel signature.

    ``trust``: a ``.keras`` config may name code outside Keras (``load_keras``). A SavedModel has no
    safe mode: its graph runs as saved, trusted or not.
    """
    if kind == "keras":
        return load_keras(path, trust=trust)
    try:
        return _SavedModelCallable(str(path))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load SavedModel {path}: {type(exc).__name__}: {exc}") from exc


def io_shapes(model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    if isinstance(model, _SavedModelCallable):
        return model.input_shape, model.output_shape
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"the model must have one input and one output, has {len(model.inputs)}/{len(model.outputs)}")
    return tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)


EMBEDDING_POOL = "image_transfer_pool"  # the global average pooling added after a spatial feature map


def embedding_model(model: Any, layer: str | None) -> Any:
    """A Keras model from the input to ``layer``'s output, or by default to the input of the final
    classifier (for a headless backbone, whose last layer's input is not ``[None, n]``: its own output).

    A spatial feature map ``[None, h, w, c]`` is pooled to an embedding ``[None, c]`` by its global
    average, as ``keras.applications`` models with ``pooling="avg"`` do.
    """
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
        if len(target.shape) != 2:
            target = model.outputs[0]  # no classifier at the end: the backbone's own output
    try:
        if len(target.shape) == 4:
            target = keras.layers.GlobalAveragePooling2D(name=EMBEDDING_POOL)(target)
        return keras.Model(model.inputs, target)
    except ValueError as exc:
        raise UserError(f"cannot cut the model at {layer or 'the input of its last layer'}: {exc}") from exc


def configure_threads(cores: int) -> bool:
    """Limit TensorFlow to ``cores`` threads so concurrent workers do not oversubscribe the CPU.

    Must run before TensorFlow executes anything in the process; returns False when it was too late.
    """
    import tensorflow as tf

    tidy_autograph()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(cores)
        return True
    except RuntimeError:
        return False
