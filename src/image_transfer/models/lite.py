"""LiteRT flatbuffers (``.tflite``): the interpreter, a flatbuffer's shapes and outputs.

Nothing here imports TensorFlow where ``ai_edge_litert`` is installed (``tf.lite`` is the fallback).
"""

from __future__ import annotations

from typing import Any

from image_transfer.errors import UserError, first_line

Shape = tuple[Any, ...]


def interpreter_class() -> Any | None:
    """LiteRT's ``Interpreter``: ``ai_edge_litert`` where installed, else ``tf.lite``; None without either."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter
    except (ImportError, AttributeError):
        return None


def interpreter_name() -> str | None:
    """Which LiteRT interpreter ``interpreter_class`` gives, with its version: ``ai_edge_litert 2.3.0`` or
    ``tf.lite (tensorflow 2.16.2)``; None without either (what the workers report)."""
    from importlib import metadata

    cls = interpreter_class()
    if cls is None:
        return None
    if cls.__module__.startswith("ai_edge_litert"):
        try:
            return f"ai_edge_litert {metadata.version('ai-edge-litert')}"
        except metadata.PackageNotFoundError:
            return "ai_edge_litert"
    import tensorflow as tf

    return f"tf.lite (tensorflow {tf.__version__})"


def load_interpreter(data: bytes, what: str) -> Any:
    """A LiteRT interpreter of the flatbuffer ``data`` (``what`` names it in errors); UserError when it
    cannot load (no interpreter installed, ops the interpreter does not have, a damaged file)."""
    cls = interpreter_class()
    if cls is None:
        raise UserError(f"no LiteRT interpreter is installed (ai_edge_litert or tf.lite) to load {what}")
    try:
        interpreter = cls(model_content=data)
        interpreter.get_input_details()
    except Exception as exc:  # noqa: BLE001 - the interpreter raises many types
        raise UserError(f"LiteRT cannot load {what}: {first_line(exc)[:300]}") from exc
    return interpreter


def _shape(details: dict[str, Any]) -> Shape:
    """A tensor's shape, dynamic dimensions (``-1`` in its signature) as None."""
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) else details["shape"]
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def io_shapes(interpreter: Any, what: str) -> tuple[Shape, Shape]:
    """(input shape, output shape) of a loaded flatbuffer; UserError unless it has one float32 input and
    one output."""
    import numpy as np

    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(f"{what} has {len(inputs)} inputs and {len(outputs)} outputs, not 1 and 1")
    if np.dtype(inputs[0]["dtype"]) != np.float32:
        raise UserError(
            f"{what} takes {np.dtype(inputs[0]['dtype']).name} input, not float32 images "
            "(a model quantized with integer inputs): convert it with float inputs"
        )
    return _shape(inputs[0]), _shape(outputs[0])


def outputs_in_unit_range(interpreter: Any, height: int, width: int, preprocess: str) -> bool | None:
    """Whether the flatbuffer's outputs on a few random images all lie in [0, 1] (probabilities can);
    None when it raises on them. Preprocessed as the workers do, without TensorFlow."""
    import numpy as np

    from image_transfer.models.load import in_unit_range, preprocess_fn

    details = interpreter.get_input_details()[0]
    batch = max(1, int(details["shape"][0]))
    pixels = np.random.default_rng(0).uniform(0, 255, (max(4, batch), height, width, 3)).astype("float32")
    images = np.asarray(preprocess_fn(preprocess)(pixels), dtype="float32")
    index = interpreter.get_output_details()[0]["index"]
    results = []
    try:
        interpreter.allocate_tensors()
        for lo in range(0, len(images) - batch + 1, batch):
            interpreter.set_tensor(details["index"], np.ascontiguousarray(images[lo : lo + batch]))
            interpreter.invoke()
            results.append(np.array(interpreter.get_tensor(index), dtype="float64"))
    except Exception:  # noqa: BLE001 - a model that refuses random images: not decided here
        return None
    return in_unit_range(np.concatenate(results))
