"""The worker side: the per-process model cache, the Scorer (traced graphs), the predict function factory."""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from image_transfer.errors import UserError, first_line
from image_transfer.imaging.screen import ImageLimits, convert, screen_batch
from image_transfer.scoring.options import MODEL_ERROR, OVERLAP_CHUNKS, ModelFailure, PreparedModel
from image_transfer.scoring.stats import BatchReporter, count, set_worker_fact, stats_columns

# ---- the worker side -------------------------------------------------------------------------------

_CACHE_SIZE = 2  # traced scoring functions kept per worker process (least recently used goes)
_CACHE: OrderedDict[tuple[Any, ...], Scorer] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOADING: dict[tuple[Any, ...], threading.Lock] = {}  # cache key -> the lock its one load holds


def _task_cores() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else max(1, os.cpu_count() or 1)
    except Exception:  # noqa: BLE001 - older Spark without TaskContext.cpus()
        return 1


class Scorer:
    """A loaded model and its traced functions, built once per worker process and model.

    Two ways to run a batch, same outputs: ``serve``, one graph from encoded bytes to top-k (the
    default on CPU), or ``decode`` then ``infer`` over chunks of the batch, the next chunk decoded on a
    background thread while the model runs the current one (``overlap``; by default when a GPU is
    visible) and the only way with ``jit``: ``infer`` is XLA-compiled for one fixed batch shape, the
    last chunk padded and the padding dropped. ``traces`` counts the traces of the function that runs
    the model (``serve`` or ``infer``), so it stays 1 per worker either way; the decode functions,
    which hold no model, are not counted.
    """

    def __init__(self, prepared: PreparedModel, path: str) -> None:
        import tensorflow as tf

        from image_transfer import devices
        from image_transfer.imaging.graph import decode_batch
        from image_transfer.models.load import embedding_model, load_model, preprocess_fn

        info, compute = prepared.info, prepared.compute
        model = load_model(path, info.kind, trust=prepared.trusted)
        if prepared.mode == "embed":
            model = embedding_model(model, prepared.layer)
        if compute.precision != "float32":
            model = devices.with_policy(model, devices.keras_policy(compute.precision))
        count(model_loads=1)
        preprocess = preprocess_fn(info.preprocess)
        height, width, k, mode = info.height, info.width, prepared.width, prepared.mode
        signature = [tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)]

        def decoded(encoded: Any, orientations: Any) -> Any:
            return preprocess(decode_batch(encoded, height, width, orientations))

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

        @tf.function(input_signature=signature, reduce_retracing=True)
        def decode_only(encoded: Any, orientations: Any) -> Any:  # traced only if a batch fails
            return tf.shape(decode_batch(encoded, height, width, orientations))

        self.overlap = compute.overlap == "on" or (compute.overlap == "auto" and devices.visible_gpus() > 0)
        self.split = self.overlap or compute.jit
        self.fixed = 0  # the XLA path's batch shape
        if compute.jit:
            size = compute.batch_size or 64
            self.fixed = math.ceil(size / OVERLAP_CHUNKS) if self.overlap else size
        image_spec = tf.TensorSpec([self.fixed or None, height, width, 3], tf.float32)

        @tf.function(input_signature=signature, reduce_retracing=True)
        def decode(encoded: Any, orientations: Any) -> Any:
            return decoded(encoded, orientations)

        @tf.function(input_signature=[image_spec], jit_compile=compute.jit or None, reduce_retracing=True)
        def infer(images: Any) -> Any:
            count(traces=1)
            return head(images)

        self.serve = serve
        self._decode_only = decode_only
        self._decode = decode
        self._infer = infer
        self._pool: Any = None

    def run(self, payloads: list[bytes], orientations: list[int]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Outputs for the payloads that decode (in order) and, by payload position, decode errors.

        A failing batch is bisected with the decode-only function to find the images that do not
        decode; those Pillow decodes are converted (``convert``) and scored, the others are per-row errors.
        An error the model raises on decodable images is a ``ModelFailure`` (not a per-row one).
        """
        import tensorflow as tf

        if not payloads:
            return {}, {}
        try:
            outputs = self._call(payloads, orientations)
        except tf.errors.InvalidArgumentError as exc:
            first = exc
        else:
            return outputs, {}
        errors: dict[int, str] = {}
        self._bisect(payloads, orientations, 0, len(payloads), errors)
        if not errors:
            raise ModelFailure(f"{MODEL_ERROR}: {first_line(first)}") from first
        payloads, orientations = list(payloads), list(orientations)
        for j in sorted(errors):  # what the graph refuses and Pillow decodes (a bad PNG checksum): converted
            converted, _ = convert(payloads[j], orientations[j])
            if converted is not None:
                payloads[j], orientations[j] = converted, 1
                del errors[j]
        good = [i for i in range(len(payloads)) if i not in errors]
        if not good:
            return {}, errors
        try:
            return self._call([payloads[i] for i in good], [orientations[i] for i in good]), errors
        except tf.errors.InvalidArgumentError as exc:
            raise ModelFailure(f"{MODEL_ERROR}: {first_line(exc)}") from exc

    def _call(self, payloads: list[bytes], orientations: list[int]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        if not self.split:
            out = self.serve(tf.constant(payloads), tf.constant(orientations, tf.int32))
            return {k: v.numpy() for k, v in out.items()}
        n = len(payloads)
        size = self.fixed or (math.ceil(n / OVERLAP_CHUNKS) if self.overlap else n)
        pieces = [(lo, min(lo + size, n)) for lo in range(0, n, size)]

        def decode(lo: int, hi: int) -> Any:
            return self._decode(tf.constant(payloads[lo:hi]), tf.constant(orientations[lo:hi], tf.int32))

        results: list[dict[str, np.ndarray]] = []
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

    def _run_model(self, images: Any, n: int) -> dict[str, np.ndarray]:
        import tensorflow as tf

        if self.fixed and n < self.fixed:  # the XLA shape is fixed: pad, then drop the padding
            images = tf.pad(images, [[0, self.fixed - n], [0, 0], [0, 0], [0, 0]])
        out = self._infer(images)
        return {k: v.numpy()[:n] for k, v in out.items()}

    def _bisect(self, payloads: list[bytes], orientations: list[int], lo: int, hi: int, errors: dict[int, str]) -> None:
        import tensorflow as tf

        try:
            self._decode_only(tf.constant(payloads[lo:hi]), tf.constant(orientations[lo:hi], tf.int32))
            return
        except tf.errors.InvalidArgumentError as exc:
            if hi - lo == 1:
                errors[lo] = f"could not decode image: {first_line(exc)[:200]}"
                return
        mid = (lo + hi) // 2
        self._bisect(payloads, orientations, lo, mid, errors)
        self._bisect(payloads, orientations, mid, hi, errors)


LITE_CHUNK = 8  # images per interpreter call. Measured with XNNPACK on 1 thread: ResNet50's peak memory
# 3.8 GB at 64, 1.4 GB at 16, 1.1 GB at 8 (13.4, 13.0, 12.9 img/s); MobileNetV2 as fast at 8 as at 64


class LiteScorer(Scorer):
    """The LiteRT engine: decoding in TensorFlow (one traced function), the model in the XNNPACK interpreter.

    The interpreter runs with ``threads`` threads (the task's cores) on chunks of ``LITE_CHUNK`` images
    (a model with a fixed batch: chunks of that batch, the last one padded), so its activations stay
    small; its input is resized only when the chunk size changes (a batch's remainder). Top-k as
    ``Scorer``'s.
    """

    def __init__(self, prepared: PreparedModel, flatbuffer: bytes, threads: int) -> None:
        import tensorflow as tf

        from image_transfer.imaging.graph import decode_batch
        from image_transfer.models.lite import interpreter_class, interpreter_name
        from image_transfer.models.load import preprocess_fn

        info = prepared.info
        height, width = info.height, info.width
        preprocess = preprocess_fn(info.preprocess)
        signature = [tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)]

        @tf.function(input_signature=signature, reduce_retracing=True)
        def decode(encoded: Any, orientations: Any) -> Any:
            count(traces=1)  # the one traced function of this engine
            return preprocess(decode_batch(encoded, height, width, orientations))

        @tf.function(input_signature=signature, reduce_retracing=True)
        def decode_only(encoded: Any, orientations: Any) -> Any:  # traced only if a batch fails
            return tf.shape(decode_batch(encoded, height, width, orientations))

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
        self._pool = None

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

    def _call(self, payloads: list[bytes], orientations: list[int]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        images = self._decode(tf.constant(payloads), tf.constant(orientations, tf.int32)).numpy()
        with self._lock:
            outputs = self._invoke(images)
        if self.mode == "embed":
            return {"embedding": outputs.reshape(len(outputs), -1)}
        top = tf.math.top_k(outputs, k=self.k)  # as the TensorFlow engine's (ties: the lower index)
        return {"probabilities": top.values.numpy(), "indices": top.indices.numpy()}


_PREPARE_LOCK = threading.Lock()  # held while this worker is being readied


def prepare_worker() -> None:
    """Ready this Python worker for TensorFlow: pinned to its task's GPU, threads set, TensorFlow imported.

    Runs in the task (it reads the task's resources); what is already done stays as it is.
    """
    from image_transfer import devices

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    devices.pin_worker(set_worker_fact)  # before TensorFlow is imported in the process (configure_threads imports it)
    cores = _task_cores()
    with _PREPARE_LOCK:
        _import_tensorflow(cores)


def _import_tensorflow(cores: int) -> None:
    from image_transfer import devices
    from image_transfer.models.load import configure_threads

    configure_threads(cores)
    devices.enable_memory_growth()


def _scorer(prepared: PreparedModel, shipped: Any) -> Scorer:
    """The worker's cached Scorer for this model and mode, loading it on a miss.

    Threads asking for one model wait for a single load (a lock per cache key); different models load
    side by side.
    """
    key = prepared.cache_key
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _CACHE_LOCK:
            if key in _CACHE:  # another thread loaded it meanwhile
                _CACHE.move_to_end(key)
                return _CACHE[key]
        try:
            scorer = _load_scorer(prepared, shipped)
            with _CACHE_LOCK:
                _CACHE[key] = scorer
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
        finally:
            with _CACHE_LOCK:
                _LOADING.pop(key, None)
    return scorer


def _load_scorer(prepared: PreparedModel, shipped: Any) -> Scorer:
    """Load the model of ``prepared`` into a Scorer (LiteRT's or TensorFlow's)."""
    from image_transfer.models.artifact import unpack

    prepare_worker()
    info = prepared.info
    if prepared.compute.engine == "litert":
        return _lite_scorer(prepared, shipped)
    if shipped is None:
        path = info.path
    else:
        data = shipped.value if hasattr(shipped, "value") else shipped  # a broadcast, or bytes in the closure
        path = unpack(data, info.kind, prepared.digest)
    return Scorer(prepared, path)


def _lite_scorer(prepared: PreparedModel, shipped: Any) -> LiteScorer:
    """The LiteRT scorer from the shipped flatbuffer, or converted here (once per machine) from the shared path."""
    from image_transfer.scoring.engine import converted

    if shipped is None:
        flatbuffer, _ = converted(prepared)
    else:
        flatbuffer = shipped.value if hasattr(shipped, "value") else shipped
    return LiteScorer(prepared, flatbuffer, _task_cores())


def make_predict_fn_factory(
    prepared: PreparedModel, shipped: Any, limits: ImageLimits
) -> Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """The closure factory handed to ``predict_batch_udf`` (it runs once per Python worker and UDF)."""
    classes = prepared.info.output_width if prepared.mode == "classify" else 0
    names = np.array([prepared.info.label(i) for i in range(classes)], dtype=object)

    def make_predict_fn() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        from image_transfer.devices import note_task

        reporter = BatchReporter()  # before loading: the load belongs to this UDF's first report
        try:
            scorer = _scorer(prepared, shipped)
        except UserError as exc:  # the driver checked the config; the weights only load here
            raise ModelFailure(f"{MODEL_ERROR} to load on a worker: {exc}") from exc
        lite = isinstance(scorer, LiteScorer)
        set_worker_fact("engine", "litert-xnnpack" if lite else "tensorflow")
        set_worker_fact("interpreter", scorer.interpreter_name if lite else None)
        k = prepared.width

        def predict(encoded: np.ndarray) -> dict[str, np.ndarray]:
            note_task(set_worker_fact)
            n = len(encoded)
            screened = screen_batch(encoded, limits)
            errors = list(screened.errors)
            outputs, graph_errors = scorer.run(screened.payloads, screened.orientations)
            ok_rows = [row for j, row in enumerate(screened.kept) if j not in graph_errors]
            for j, message in graph_errors.items():
                errors[screened.kept[j]] = message
            arrow_bytes = sum(len(v) for v in encoded if v is not None)  # what crossed from the JVM
            report = reporter.report(batch_bytes=arrow_bytes)
            stats = stats_columns(n, report, screened.warnings)  # rows are counted in Spark
            error_col = np.array(errors, dtype=object)
            if prepared.mode == "embed":
                emb = np.zeros((n, prepared.width), np.float32)
                if ok_rows:
                    emb[ok_rows] = outputs["embedding"]
                return {"embedding": emb, "error": error_col, **stats}
            labels = np.full((n, k), None, dtype=object)
            probs = np.zeros((n, k), np.float32)
            prediction = np.full(n, None, dtype=object)
            probability = np.full(n, np.nan, np.float32)
            if ok_rows:
                labels[ok_rows] = names[outputs["indices"]]
                probs[ok_rows] = outputs["probabilities"]
                prediction[ok_rows] = labels[ok_rows, 0]
                probability[ok_rows] = probs[ok_rows, 0]
            return {
                "prediction": prediction,
                "probability": probability,
                "top_k_labels": labels,
                "top_k_probabilities": probs,
                "error": error_col,
                **stats,
            }

        return predict

    return make_predict_fn
