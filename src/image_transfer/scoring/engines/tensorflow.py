"""The TensorFlow engine: the Keras model or SavedModel in traced ``tf.function`` graphs.

Imports TensorFlow only inside its functions: a driver that picks another engine imports none.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import Any

import numpy as np

from image_transfer.scoring.engines.base import Engine, Outputs
from image_transfer.scoring.options import OVERLAP_CHUNKS, PreparedModel
from image_transfer.scoring.stats import count


def tensorflow_version() -> str:
    """TensorFlow's version, from the imported module, else from the installed distribution's metadata
    (without importing it)."""
    module = sys.modules.get("tensorflow")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return _installed_tensorflow_version()


@functools.cache
def _installed_tensorflow_version() -> str:
    from importlib import metadata

    for dist in metadata.packages_distributions().get("tensorflow", []):  # a scan of all packages: once
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    import tensorflow as tf

    return str(tf.__version__)


def prepare_tensorflow(cores: int) -> None:
    """Ready this process for TensorFlow: quiet logs, ``cores`` threads, memory growth on its GPUs (the
    process is pinned to its task's GPU before: ``devices.pin_worker``). What is already done stays."""
    from image_transfer import devices
    from image_transfer.models.load import configure_threads

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_threads(cores)
    devices.enable_memory_growth()


def graph_decoders(prepared: PreparedModel, *, counted: bool = False) -> tuple[Any, Any, Any]:
    """(``decoded``: encoded bytes and orientations to the preprocessed images, a Python function to
    trace into a graph; ``decode``: the same as a ``tf.function``; ``decode_only``: their shapes, a
    ``tf.function`` traced only when a batch fails). ``counted``: ``decode`` counts its traces (where it
    is the engine's one traced function)."""
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_batch
    from image_transfer.models.load import preprocess_fn

    info = prepared.info
    height, width = info.height, info.width
    preprocess = preprocess_fn(info.preprocess)
    signature = [tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)]

    def decoded(encoded: Any, orientations: Any) -> Any:
        return preprocess(decode_batch(encoded, height, width, orientations))

    @tf.function(input_signature=signature, reduce_retracing=True)
    def decode(encoded: Any, orientations: Any) -> Any:
        if counted:
            count(traces=1)  # Python side effect: runs only while tracing
        return decoded(encoded, orientations)

    @tf.function(input_signature=signature, reduce_retracing=True)
    def decode_only(encoded: Any, orientations: Any) -> Any:
        return tf.shape(decode_batch(encoded, height, width, orientations))

    return decoded, decode, decode_only


class GraphDecoding(Engine):
    """An engine whose images are decoded by TensorFlow's graph (``imaging.graph``): TensorFlow's own, and
    LiteRT's (the same pixels whatever runs the model)."""

    _decode_only: Any

    @property
    def decode_failures(self) -> tuple[type[BaseException], ...]:  # type: ignore[override]
        import tensorflow as tf

        return (tf.errors.InvalidArgumentError,)

    def check_decode(self, payloads: list[bytes], orientations: list[int]) -> None:
        import tensorflow as tf

        self._decode_only(tf.constant(payloads), tf.constant(orientations, tf.int32))


class TensorFlowEngine(GraphDecoding):
    """A loaded model and its traced functions, built once per worker process and model.

    Two ways to run a batch, same outputs: ``serve``, one graph from encoded bytes to top-k (the
    default on CPU), or ``decode`` then ``infer`` over chunks of the batch, the next chunk decoded on a
    background thread while the model runs the current one (``overlap``; by default when a GPU is
    visible) and the only way with ``jit``: ``infer`` is XLA-compiled for one fixed batch shape, the
    last chunk padded and the padding dropped. ``traces`` counts the traces of the function that runs
    the model (``serve`` or ``infer``), so it stays 1 per worker either way; the decode functions,
    which hold no model, are not counted.
    """

    name = "tensorflow"
    label = "tensorflow"
    title = "TensorFlow"

    @classmethod
    def takes(cls, kind: str) -> bool:
        return kind != "tflite"

    @classmethod
    def prepare_process(cls, cores: int) -> None:
        prepare_tensorflow(cores)

    @classmethod
    def load(cls, prepared: PreparedModel, shipped: bytes | None, cores: int) -> TensorFlowEngine:
        """From the packed model shipped (unpacked once per machine), else the model's path."""
        from image_transfer.models.artifact import unpack

        info = prepared.info
        path = info.path if shipped is None else unpack(shipped, info.kind, prepared.digest)
        return cls(prepared, path)

    def __init__(self, prepared: PreparedModel, path: str) -> None:
        import tensorflow as tf

        from image_transfer import devices
        from image_transfer.models.load import embedding_model, load_model

        info, compute = prepared.info, prepared.compute
        model = load_model(path, info.kind, trust=prepared.trusted)
        if prepared.mode == "embed":
            model = embedding_model(model, prepared.layer)
        if compute.precision != "float32":
            model = devices.with_policy(model, devices.keras_policy(compute.precision))
        count(model_loads=1)
        height, width, k, mode = info.height, info.width, prepared.width, prepared.mode
        signature = [tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)]
        decoded, decode, decode_only = graph_decoders(prepared)

        def head(images: Any) -> Any:
            outputs = tf.cast(model(images, training=False), tf.float32)
            if mode == "embed":
                return {"embedding": outputs}
            top = tf.math.top_k(outputs, k=k)
            return {"probabilities": top.values, "indices": top.indices}

        @tf.function(input_signature=signature, reduce_retracing=True)
        def serve(encoded: Any, orientations: Any) -> Any:
            count(traces=1)  # Python side effect: runs only while tracing
            return head(decoded(encoded, orientations))

        self.overlap = compute.overlap == "on" or (compute.overlap == "auto" and devices.visible_gpus() > 0)
        self.split = self.overlap or compute.jit
        self.fixed = 0  # the XLA path's batch shape
        if compute.jit:
            size = compute.batch_size or 64
            self.fixed = math.ceil(size / OVERLAP_CHUNKS) if self.overlap else size
        image_spec = tf.TensorSpec([self.fixed or None, height, width, 3], tf.float32)

        @tf.function(input_signature=[image_spec], jit_compile=compute.jit or None, reduce_retracing=True)
        def infer(images: Any) -> Any:
            count(traces=1)
            return head(images)

        self.serve = serve
        self._decode_only = decode_only
        self._decode = decode
        self._infer = infer
        self._pool: Any = None

    def decode(self, payloads: list[bytes], orientations: list[int]) -> np.ndarray:
        import tensorflow as tf

        return self._decode(tf.constant(payloads), tf.constant(orientations, tf.int32)).numpy()

    def run(self, images: Any) -> Outputs:
        """The model part (``infer``) on decoded images: a NumPy array or a tensor (kept on its device)."""
        return self._run_model(images, len(images))

    def infer(self, payloads: list[bytes], orientations: list[int]) -> Outputs:
        import tensorflow as tf

        if not self.split:
            out = self.serve(tf.constant(payloads), tf.constant(orientations, tf.int32))
            return {k: v.numpy() for k, v in out.items()}
        n = len(payloads)
        size = self.fixed or (math.ceil(n / OVERLAP_CHUNKS) if self.overlap else n)
        pieces = [(lo, min(lo + size, n)) for lo in range(0, n, size)]

        def decode(lo: int, hi: int) -> Any:
            return self._decode(tf.constant(payloads[lo:hi]), tf.constant(orientations[lo:hi], tf.int32))

        results: list[Outputs] = []
        if not self.overlap or len(pieces) == 1:
            for lo, hi in pieces:
                results.append(self._run_model(decode(lo, hi), hi - lo))
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-transfer-decode")
            pending = self._pool.submit(decode, *pieces[0])
            try:
                for i, (lo, hi) in enumerate(pieces):
                    images = pending.result()
                    if i + 1 < len(pieces):
                        pending = self._pool.submit(decode, *pieces[i + 1])  # decodes while the model runs
                    results.append(self._run_model(images, hi - lo))
            finally:
                if not pending.cancel():
                    pending.exception()  # wait: no decode keeps running into the next batch
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

    def _run_model(self, images: Any, n: int) -> Outputs:
        import tensorflow as tf

        if self.fixed and n < self.fixed:  # the XLA shape is fixed: pad, then drop the padding
            images = tf.pad(images, [[0, self.fixed - n], [0, 0], [0, 0], [0, 0]])
        out = self._infer(images)
        return {k: v.numpy()[:n] for k, v in out.items()}
