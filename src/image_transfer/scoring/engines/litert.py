"""The LiteRT engine: the model converted to a flatbuffer (``litert_convert``), run by the XNNPACK
interpreter on CPU workers; decoding and preprocessing stay in TensorFlow (one traced function).

The converted flatbuffer is shipped instead of the model (by path, a worker converts once per machine).
A ``.tflite`` model runs on LiteRT only (``only_engine``). Settings only TensorFlow honours
(``--precision`` other than float32, ``--jit``, ``--overlap on``) are reasons LiteRT cannot run a model.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from image_transfer.errors import UserError
from image_transfer.scoring.engines.base import Outputs, cluster_gpus, say_once
from image_transfer.scoring.engines.tensorflow import GraphDecoding, graph_decoders
from image_transfer.scoring.options import PreparedModel
from image_transfer.scoring.stats import count

LITE_CHUNK = 8  # images per interpreter call. Measured with XNNPACK on 1 thread: ResNet50's peak memory
# 3.8 GB at 64, 1.4 GB at 16, 1.1 GB at 8 (13.4, 13.0, 12.9 img/s); MobileNetV2 as fast at 8 as at 64
NO_INTERPRETER = "no LiteRT interpreter is installed (ai_edge_litert or tf.lite)"


def interpreter_available() -> bool:
    """Whether ``interpreter_class`` will find an interpreter, without importing TensorFlow (seconds on a
    driver that does not otherwise need it)."""
    from importlib.util import find_spec

    return any(find_spec(name) is not None for name in ("ai_edge_litert", "tensorflow"))


def tensorflow_only(precision: str, jit: bool, overlap: str) -> str | None:
    """Why these settings need TensorFlow, or None."""
    if precision != "float32":
        return f"precision {precision} is a TensorFlow setting"
    if jit:
        return "--jit (XLA) is a TensorFlow setting"
    if overlap == "on":
        return "--overlap on is a TensorFlow setting"
    return None


def refuse_flatbuffer_settings(path: str, requested: str, compute: Any) -> None:
    """UserError when a ``.tflite`` model at ``path`` is asked to run on TensorFlow, or with a setting only
    TensorFlow honours, or no LiteRT interpreter is installed."""
    where = f"{path} is a LiteRT flatbuffer (.tflite): it runs only on LiteRT"
    if requested == "tensorflow":
        raise UserError(f"{where}, not on --engine tensorflow: use --engine litert or auto")
    reason = tensorflow_only(compute.precision, compute.jit, compute.overlap)
    if reason is not None:
        raise UserError(f"{where}, and {reason}: leave it out")
    if not interpreter_available():
        raise UserError(f"{where}, and {NO_INTERPRETER}")


class LiteRTEngine(GraphDecoding):
    """The LiteRT engine: decoding in TensorFlow (one traced function), the model in the XNNPACK interpreter.

    The interpreter runs with ``threads`` threads (the task's cores) on chunks of ``LITE_CHUNK`` images
    (a model with a fixed batch: chunks of that batch, the last one padded), so its activations stay
    small; its input is resized only when the chunk size changes (a batch's remainder). Top-k as
    TensorFlow's.
    """

    name = "litert"
    label = "litert-xnnpack"  # what the statistics call it
    title = "LiteRT"

    # ---- the driver side

    @classmethod
    def refusal(cls, prepared: PreparedModel) -> str | None:
        compute = prepared.compute
        reason = tensorflow_only(compute.precision, compute.jit, compute.overlap)
        if reason is None and not interpreter_available():
            reason = NO_INTERPRETER
        return reason

    @classmethod
    def auto_here(cls, spark: Any) -> bool:
        return not cluster_gpus(spark)  # GPU workers run TensorFlow

    @classmethod
    def payload(cls, prepared: PreparedModel) -> tuple[bytes | None, bool]:
        """The flatbuffer (converted once per network, else from a cache; a ``.tflite`` model's own bytes)."""
        from image_transfer.scoring.engines.litert_convert import converted

        return converted(prepared)

    @classmethod
    def only_engine(cls, prepared: PreparedModel, requested: str, spark: Any) -> None:
        """A ``.tflite`` model: UserError for ``--engine tensorflow`` or a setting only TensorFlow honours;
        ``auto`` on a cluster with GPUs says in one line that they stay unused."""
        refuse_flatbuffer_settings(prepared.info.path, requested, prepared.compute)
        if requested == "auto" and cluster_gpus(spark):
            line = "image-transfer: engine auto runs LiteRT on the CPUs: a .tflite model runs only on LiteRT"
            say_once(prepared.digest, line)

    # ---- the worker side

    @classmethod
    def prepare_process(cls, cores: int) -> None:
        from image_transfer.scoring.engines.tensorflow import prepare_tensorflow

        prepare_tensorflow(cores)  # decoding runs in TensorFlow

    @classmethod
    def load(cls, prepared: PreparedModel, shipped: bytes | None, cores: int) -> LiteRTEngine:
        """From the shipped flatbuffer, or converted here (once per machine) from the shared path."""
        if shipped is None:
            shipped, _ = cls.payload(prepared)
        return cls(prepared, shipped, cores)

    def __init__(self, prepared: PreparedModel, flatbuffer: bytes, threads: int) -> None:
        from image_transfer.models.lite import interpreter_class, interpreter_name

        _, decode, decode_only = graph_decoders(prepared, counted=True)  # the one traced function of this engine
        self._decode, self._decode_only = decode, decode_only
        self.interpreter = interpreter_class()(model_content=flatbuffer, num_threads=threads)
        self.interpreter_name = interpreter_name()  # ai_edge_litert 2.3.0, or tf.lite (tensorflow 2.16.2)
        count(model_loads=1)
        details = self.interpreter.get_input_details()[0]
        self._input = details["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        signature_batch = int(details.get("shape_signature", details["shape"])[0])
        self.fixed = int(details["shape"][0]) if signature_batch > 0 else 0  # a batch the model fixes
        self._shape = [int(d) for d in details["shape"]]
        self._allocated: int | None = None
        self._lock = threading.Lock()  # one interpreter: one batch at a time
        self.k, self.mode = prepared.width, prepared.mode
        self.split = self.overlap = False

    def describe(self) -> dict[str, Any]:
        return {"engine": self.label, "interpreter": self.interpreter_name}

    def decode(self, payloads: list[bytes], orientations: list[int]) -> np.ndarray:
        import tensorflow as tf

        return self._decode(tf.constant(payloads), tf.constant(orientations, tf.int32)).numpy()

    def run(self, images: np.ndarray) -> Outputs:
        import tensorflow as tf

        with self._lock:
            outputs = self._invoke(images)
        if self.mode == "embed":
            return {"embedding": outputs.reshape(len(outputs), -1)}
        top = tf.math.top_k(outputs, k=self.k)  # as the TensorFlow engine's (ties: the lower index)
        return {"probabilities": top.values.numpy(), "indices": top.indices.numpy()}

    def _invoke(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        outputs = []
        for lo in range(0, n, self.fixed or LITE_CHUNK):
            chunk = images[lo : lo + (self.fixed or LITE_CHUNK)]
            size = self.fixed or len(chunk)  # a fixed batch: the chunk padded to it
            if self._allocated != size:  # a full chunk's size, or a batch's remainder (once per partition)
                self.interpreter.resize_tensor_input(self._input, [size, *self._shape[1:]])
                self.interpreter.allocate_tensors()
                self._allocated = size
            if len(chunk) < size:
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            self.interpreter.set_tensor(self._input, np.ascontiguousarray(chunk, np.float32))
            self.interpreter.invoke()
            outputs.append(np.array(self.interpreter.get_tensor(self._output))[: n - lo])
        return np.concatenate(outputs).astype(np.float32, copy=False)
