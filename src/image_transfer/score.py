"""Scoring and featurizing with ``predict_batch_udf``: the model shipped once, loaded and traced once per worker.

Driver side: ``prepare_model`` checks the model (nothing is scheduled when it is unusable) and
``scored_frame`` builds the lazy scored DataFrame and its ``ScoringRun`` handle. Worker side:
``make_predict_fn`` finds the model's traced scoring function in a per-process cache keyed by the
model's content digest and the scoring mode (a second run in the same session, or a later
micro-batch, neither loads nor traces again), and each batch only screens headers in Python.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from image_transfer.errors import TooManyFailures, UserError
from image_transfer.images import ImageLimits, screen_batch
from image_transfer.model import ModelInfo, content_digest, inspect_model
from image_transfer.stats import STATS_FIELD, BatchReporter, WorkerStats, count, is_connect

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
ARROW_BYTES_CONF = "spark.sql.execution.arrow.maxBytesPerBatch"  # Spark >= 4.0
ARROW_BATCH_BYTES = 1536 * 1024 * 1024  # encoded bytes per Arrow batch: under Arrow's 2 GB binary limit
CLOSURE_MAX_BYTES = 64 * 1024 * 1024  # Spark Connect: models up to this size travel in the UDF itself
OUTPUT_COLUMNS = {"classify": ("prediction", "probability", "top_k"), "embed": ("embedding",)}
RESERVED = {"prediction", "probability", "top_k", "error", "embedding", "model_version"}
MODEL_ERROR = "image-transfer: the model failed"
OVERLAP = ("auto", "on", "off")
OVERLAP_CHUNKS = 4  # an overlapped batch is decoded and run in this many chunks, decode i+1 beside model i


class ModelFailure(RuntimeError):
    """The model itself raised while scoring (not an undecodable image): the run fails with this reason."""


@dataclass(frozen=True)
class ScoringOptions:
    """How to score: input columns, batching, limits and shipping (the API's keyword options)."""

    image_column: str = "content"
    key_columns: tuple[str, ...] = ("path",)
    batch_size: int = 64
    limits: ImageLimits = field(default_factory=ImageLimits.default)
    broadcast_max_bytes: int = 256 * 1024 * 1024
    max_batch_bytes: int = ARROW_BATCH_BYTES
    partitions: int | None = None
    precision: str = "float32"  # the model's compute: float32, float16 or bfloat16 (outputs stay float32)
    jit: bool = False  # XLA-compile the model on a fixed batch shape (once per worker)
    overlap: str = "auto"  # decode the next chunk while the model runs: on, off, auto (when a GPU is visible)

    def __post_init__(self) -> None:
        from image_transfer.gpu import check_precision

        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        check_precision(self.precision)
        if self.overlap not in OVERLAP:
            raise UserError(f"overlap must be one of {', '.join(OVERLAP)}, not {self.overlap!r}")
        if self.partitions is not None and self.partitions < 1:
            raise UserError(f"partitions must be at least 1, got {self.partitions}")
        if self.limits.max_bytes > self.max_batch_bytes:
            raise UserError(
                f"the image size limit ({self.limits.max_bytes} bytes) is over the bytes per batch "
                f"({self.max_batch_bytes}): one image would not fit in a batch"
            )
        clash = RESERVED & set(self.key_columns)
        if clash:
            raise UserError(f"key columns may not be named like output columns: {', '.join(sorted(clash))}")


@dataclass(frozen=True)
class Compute:
    """How a worker runs the model: precision, XLA on a fixed batch shape, decode/model overlap."""

    precision: str = "float32"
    jit: bool = False
    overlap: str = "auto"
    batch_size: int = 0  # the fixed batch of the XLA path (0 without jit)

    @classmethod
    def of(cls, options: ScoringOptions) -> Compute:
        """The compute settings of scoring options."""
        return cls(options.precision, options.jit, options.overlap, options.batch_size if options.jit else 0)


@dataclass(frozen=True)
class PreparedModel:
    """A model checked on the driver, with the scoring mode: ``classify`` (top-k) or ``embed``."""

    info: ModelInfo
    mode: str
    digest: str
    top_k: int = 5
    layer: str | None = None
    width: int = 0  # classify: k actually reported; embed: embedding size
    version: str = ""  # what output rows carry as ``model_version``
    compute: Compute = field(default_factory=Compute)

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """What identifies the traced scoring function in a worker's cache (a new precision: a new one)."""
        return (self.digest, self.mode, self.layer, self.width, self.info.preprocess, self.compute)


def with_compute(prepared: PreparedModel, options: ScoringOptions) -> PreparedModel:
    """``prepared`` with the options' compute settings; UserError when the model cannot run that way."""
    compute = Compute.of(options)
    if compute.precision != "float32" and prepared.info.kind != "keras":
        raise UserError(f"precision {compute.precision} needs a Keras (.keras) model, not a SavedModel")
    return replace(prepared, compute=compute)


def prepare_model(
    model_path: str,
    *,
    mode: str,
    top_k: int = 5,
    layer: str | None = None,
    version: str | None = None,
) -> PreparedModel:
    """Check the model on the driver (``inspect_model``); raises UserError before any Spark work is scheduled."""
    if mode not in OUTPUT_COLUMNS:
        raise ValueError(f"mode must be classify or embed, not {mode!r}")
    if mode == "classify" and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    info = inspect_model(model_path, layer=layer, embed=mode == "embed")
    width = min(top_k, info.output_width) if mode == "classify" else info.output_width
    digest = content_digest(info.path)
    return PreparedModel(
        info=info,
        mode=mode,
        digest=digest,
        top_k=top_k,
        layer=layer,
        width=width,
        version=version or f"sha256:{digest[:12]}",
    )


def validate_columns(df: Any, options: ScoringOptions) -> None:
    """Check the image and key columns exist with the right types (from the schema: no Spark job)."""
    from pyspark.sql.types import BinaryType

    fields = {f.name: f.dataType for f in df.schema.fields}
    if options.image_column not in fields:
        raise UserError(
            f"no image column {options.image_column!r} in the input (columns: {', '.join(fields) or 'none'})"
        )
    if not isinstance(fields[options.image_column], BinaryType):
        raise UserError(
            f"image column {options.image_column!r} must be binary (encoded image bytes), "
            f"not {fields[options.image_column].simpleString()}"
        )
    missing = [k for k in options.key_columns if k not in fields]
    if missing:
        raise UserError(f"no key column {', '.join(missing)} in the input (columns: {', '.join(fields)})")


# ---- the worker side -------------------------------------------------------------------------------

_CACHE_SIZE = 2  # traced scoring functions kept per worker process (least recently used goes)
_CACHE: OrderedDict[tuple[Any, ...], Scorer] = OrderedDict()
_CACHE_LOCK = threading.Lock()


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

        from image_transfer import gpu
        from image_transfer.images import decode_batch
        from image_transfer.model import embedding_model, load_model, preprocess_fn

        info, compute = prepared.info, prepared.compute
        model = load_model(path, info.kind)
        if prepared.mode == "embed":
            model = embedding_model(model, prepared.layer)
        if compute.precision != "float32":
            model = gpu.with_policy(model, gpu.keras_policy(compute.precision))
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

        self.overlap = compute.overlap == "on" or (compute.overlap == "auto" and gpu.visible_gpus() > 0)
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
        self._settled = False

    def run(self, payloads: list[bytes], orientations: list[int]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Outputs for the payloads that decode (in order) and, by payload position, decode errors.

        A failing batch is bisected with the decode-only function to find the images that do not
        decode; an error the model raises on decodable images is a ``ModelFailure`` (not a per-row one).
        """
        import tensorflow as tf

        if not payloads:
            return {}, {}
        try:
            outputs = self._call(payloads, orientations)
        except tf.errors.InvalidArgumentError as exc:
            first = exc
        else:
            if not self._settled:  # loaded and traced: what stays from here on is long-lived
                self._settled = True
                settle_worker()
            return outputs, {}
        errors: dict[int, str] = {}
        self._bisect(payloads, orientations, 0, len(payloads), errors)
        good = [i for i in range(len(payloads)) if i not in errors]
        if not errors:
            raise ModelFailure(f"{MODEL_ERROR}: {_first_line(first)}") from first
        if not good:
            return {}, errors
        try:
            return self._call([payloads[i] for i in good], [orientations[i] for i in good]), errors
        except tf.errors.InvalidArgumentError as exc:
            raise ModelFailure(f"{MODEL_ERROR}: {_first_line(exc)}") from exc

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
                errors[lo] = f"could not decode image: {_first_line(exc)[:200]}"
                return
        mid = (lo + hi) // 2
        self._bisect(payloads, orientations, lo, mid, errors)
        self._bisect(payloads, orientations, mid, hi, errors)


def settle_worker() -> None:
    """Make PySpark's work between two tasks of this worker cheap, once its model is loaded and traced.

    After every task PySpark's worker runs a full ``gc.collect()`` and ``importlib.invalidate_caches()``.
    The collection walks TensorFlow's and the traced model's ~300k objects (~0.17 s a task, ~6% of a
    128-image task): they are frozen, so it skips them; unfreezing first lets this collection free what
    became garbage since the last freeze, such as a model the cache let go. On Python < 3.12 the cache
    invalidation re-reads the whole archive of every zip importer: Spark puts ``pyspark.zip``, py4j's
    zip and its own core jar (5,000 entries) on the workers' path, and each package imported from them
    has an importer of its own (~65 ms a task). Those archives are part of the installation and do
    not change while the worker lives: their importers skip the re-read.
    """
    import gc
    import sys
    import zipimport

    if sys.version_info < (3, 12):
        for finder in list(sys.path_importer_cache.values()):
            if isinstance(finder, zipimport.zipimporter) and _spark_archive(finder.archive):
                finder.invalidate_caches = _unchanged  # type: ignore[method-assign]
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _spark_archive(path: str) -> bool:
    name = os.path.basename(path)
    return (
        name == "pyspark.zip"
        or (name.startswith("py4j-") and name.endswith(".zip"))
        or (name.startswith("spark-core") and name.endswith(".jar"))
    )


def _unchanged() -> None:
    """``invalidate_caches`` of an importer whose archive does not change."""


def _first_line(exc: Any) -> str:
    """The line of an error that says what went wrong (for TensorFlow's "Graph execution error:", its last)."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if lines and lines[0].rstrip(":") == "Graph execution error":
        reasons = [ln for ln in lines[1:] if not ln.startswith(("[[", "Detected at node", "File "))]
        lines = reasons[-1:] or lines
    return lines[0][:500] if lines else type(exc).__name__


_PREPARE_LOCK = threading.Lock()  # held while this worker is being readied (possibly on a background thread)


def prepare_worker() -> None:
    """Ready this Python worker for TensorFlow: pinned to its task's GPU, threads set, TensorFlow imported.

    Runs in the task (it reads the task's resources); what is already done stays as it is. Waits for a
    preparation ``start_preparing_worker`` began.
    """
    from image_transfer import gpu

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    gpu.pin_worker()  # before TensorFlow is imported in the process (configure_threads imports it)
    cores = _task_cores()
    with _PREPARE_LOCK:
        _import_tensorflow(cores)


def start_preparing_worker() -> threading.Thread:
    """``prepare_worker`` with the import on a background thread, so the task (and its slot) is free at once.

    The GPU pin is taken here, in the task; a later ``prepare_worker`` (the first scoring task) waits
    for the import to finish, and does it itself if it failed.
    """
    from image_transfer import gpu

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    gpu.pin_worker()
    cores = _task_cores()
    _PREPARE_LOCK.acquire()  # taken before the thread starts: no task can slip in before it

    def run() -> None:
        try:
            _import_tensorflow(cores)
            import pandas  # noqa: F401 - and what the scoring task's Arrow UDF imports first
            import pyarrow  # noqa: F401
        except BaseException:  # noqa: BLE001 - the scoring task's own prepare_worker repeats it and raises
            pass
        finally:
            _PREPARE_LOCK.release()

    thread = threading.Thread(target=run, name="image-transfer-prepare-worker", daemon=True)
    thread.start()
    return thread


def _import_tensorflow(cores: int) -> None:
    from image_transfer import gpu
    from image_transfer.model import configure_threads

    configure_threads(cores)
    gpu.enable_memory_growth()


def _scorer(prepared: PreparedModel, shipped: Any) -> Scorer:
    """The worker's cached Scorer for this model and mode, loading it on a miss."""
    key = prepared.cache_key
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    from image_transfer.model import unpack

    prepare_worker()
    info = prepared.info
    if shipped is None:
        path = info.path
    else:
        data = shipped.value if hasattr(shipped, "value") else shipped  # a broadcast, or bytes in the closure
        path = unpack(data, info.kind, prepared.digest)
    scorer = Scorer(prepared, path)
    with _CACHE_LOCK:
        _CACHE[key] = scorer
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return scorer


def _make_predict_fn_factory(
    prepared: PreparedModel, shipped: Any, sink: Any, limits: ImageLimits
) -> Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """The closure factory handed to ``predict_batch_udf`` (it runs once per Python worker and UDF)."""
    classes = prepared.info.output_width if prepared.mode == "classify" else 0
    names = np.array([prepared.info.label(i) for i in range(classes)], dtype=object)

    def make_predict_fn() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        from image_transfer.gpu import note_task

        reporter = BatchReporter(sink)  # before loading: the load belongs to this UDF's first report
        try:
            scorer = _scorer(prepared, shipped)
        except UserError as exc:  # the driver checked the config; the weights only load here
            raise ModelFailure(f"{MODEL_ERROR} to load on a worker: {exc}") from exc
        k = prepared.width

        def predict(encoded: np.ndarray) -> dict[str, np.ndarray]:
            note_task()
            n = len(encoded)
            screened = screen_batch(encoded, limits)
            errors = list(screened.errors)
            outputs, graph_errors = scorer.run(screened.payloads, screened.orientations)
            ok_rows = [row for j, row in enumerate(screened.kept) if j not in graph_errors]
            for j, message in graph_errors.items():
                errors[screened.kept[j]] = message
            stats_col = np.full(n, None, dtype=object)
            arrow_bytes = sum(len(v) for v in encoded if v is not None)  # what crossed from the JVM
            stats_col[0] = reporter.report(
                rows=n,
                rows_failed=n - len(ok_rows),
                batch_bytes=sum(len(p) for p in screened.payloads),
                peak_batch_bytes=arrow_bytes,
            )
            error_col = np.array(errors, dtype=object)
            if prepared.mode == "embed":
                emb = np.zeros((n, prepared.width), np.float32)
                if ok_rows:
                    emb[ok_rows] = outputs["embedding"]
                return {"embedding": emb, "error": error_col, STATS_FIELD: stats_col}
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
                STATS_FIELD: stats_col,
            }

        return predict

    return make_predict_fn


# ---- the driver side -------------------------------------------------------------------------------


def return_type(prepared: PreparedModel) -> Any:
    """The UDF's struct type (top-k comes back as two parallel arrays, zipped in Spark)."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    tail = [StructField("error", StringType()), StructField(STATS_FIELD, StringType())]
    if prepared.mode == "embed":
        return StructType([StructField("embedding", ArrayType(FloatType())), *tail])
    return StructType(
        [
            StructField("prediction", StringType()),
            StructField("probability", FloatType()),
            StructField("top_k_labels", ArrayType(StringType())),
            StructField("top_k_probabilities", ArrayType(FloatType())),
            *tail,
        ]
    )


SHARED_PREFIXES = ("/Volumes/", "/dbfs/", "/Workspace/")  # mounted on the driver and on every executor


def _is_local_master(master: str | None) -> bool:
    """Whether the executors run on the driver's machine (``local``, ``local[4]``, ``local-cluster[...]``).

    A Databricks single-node cluster's master is ``local[*, 4]``; an unknown master counts as a cluster.
    """
    return master is not None and (master == "local" or master.startswith(("local[", "local-cluster[")))


def _master(spark: Any) -> str | None:
    try:
        return str(spark.sparkContext.master) if not is_connect(spark) else spark.conf.get("spark.master", None)
    except Exception:  # noqa: BLE001 - a Connect server that does not say counts as a cluster
        return None


def check_shared_path(path: str, master: str | None) -> None:
    """Refuse, up front, a model path that executors cannot read when the model is not shipped as bytes.

    With a local master every path works. On a cluster the path must be on storage every node mounts:
    ``/Volumes/...``, ``/dbfs/...`` or ``/Workspace/...`` (a relative path, ``/tmp``, ``/local_disk0`` or
    any other driver-local path exists only on the driver).
    """
    if _is_local_master(master):
        return
    bare = "/" + path[len("file:") :].lstrip("/") if path.startswith("file:") else path
    if os.path.isabs(bare) and os.path.normpath(bare).startswith(tuple(p.rstrip("/") + "/" for p in SHARED_PREFIXES)):
        return
    where = "a relative path (resolved on the driver only)" if not os.path.isabs(bare) else "on the driver's disk"
    raise UserError(
        f"the model {path} is too large to broadcast, so executors read it from its path, but it is {where} "
        f"and executors cannot see it (master {master or 'unknown'}): put it on a Volume (/Volumes/...), "
        f"/dbfs/ or /Workspace/, or raise --broadcast-max-mb (broadcast_max_mb) above its size"
    )


def ship(spark: Any, prepared: PreparedModel, broadcast_max_bytes: int) -> tuple[Any, str]:
    """How the model reaches the workers: (payload, description); a None payload means the shared path.

    Classic sessions broadcast models up to ``broadcast_max_bytes``; Spark Connect has no broadcasts,
    so small models travel inside the UDF (Spark ships it with each task) and larger ones by path,
    which must then be one executors can read (``check_shared_path``: a UserError before any work).
    """
    from image_transfer.model import pack

    size = prepared.info.size_bytes
    if is_connect(spark):
        if size <= min(broadcast_max_bytes, CLOSURE_MAX_BYTES):
            return pack(prepared.info.path, prepared.info.kind), "in the UDF"
        check_shared_path(prepared.info.path, _master(spark))
        return None, "shared path"
    if size > broadcast_max_bytes:
        check_shared_path(prepared.info.path, _master(spark))
        return None, "shared path"
    return spark.sparkContext.broadcast(pack(prepared.info.path, prepared.info.kind)), "broadcast"


SPREAD_BELOW = 4  # inputs with fewer read partitions per task slot than this are spread evenly


def _spread(df: Any, options: ScoringOptions) -> tuple[Any, bool]:
    """Give every task slot an equal share of a small input: a round-robin shuffle into one partition per slot.

    File sources split files at read time, but only at row-group boundaries: a file of one row group
    read as 3 splits gives one task every row (the other splits are empty), and 3 even partitions on 2
    slots leave a slot idle for the last third. So an input with fewer than ``SPREAD_BELOW`` partitions
    per slot is redistributed round-robin into exactly one partition per slot (or ``partitions``): even
    shares in one wave, whatever the layout. A ``repartition(n)`` is not coalesced by adaptive
    execution, and the shuffle moves each encoded image once in the JVM, little beside scoring it.
    Larger inputs keep their partitions (over many waves the tail is short). Under Spark Connect the
    partition count is not visible without running a job: pass ``partitions`` there to spread an input.
    """
    spark = df.sparkSession
    if is_connect(spark) or df.isStreaming:  # a stream's micro-batches are planned per trigger: no RDD here
        return (df.repartition(options.partitions), True) if options.partitions else (df, False)
    slots = spark.sparkContext.defaultParallelism
    wanted = options.partitions or slots
    have = df.rdd.getNumPartitions()
    spread = have < wanted if options.partitions else have < SPREAD_BELOW * slots
    return (df.repartition(wanted), True) if spread else (df, False)


def _arrow_batches(spark: Any, options: ScoringOptions) -> None:
    """One Arrow batch = one model call, and never more encoded bytes than ``max_batch_bytes``."""
    records = options.batch_size
    if int(str(spark.version).split(".")[0]) >= 4:
        # Spark closes a batch once it reaches the byte size: leave room for one more image.
        spark.conf.set(ARROW_BYTES_CONF, str(max(1, options.max_batch_bytes - options.limits.max_bytes)))
    else:  # Spark 3.5 batches by records only: few enough that the largest images still fit
        records = max(1, min(records, options.max_batch_bytes // options.limits.max_bytes))
    spark.conf.set(ARROW_BATCH_CONF, str(records))


@dataclass
class ScoringRun:
    """The handle of one scoring call: the model, how it was shipped, and worker statistics after an action.

    ``stats`` is empty before an action has run. On a classic session it adds up every action on the
    returned DataFrame; under Spark Connect it describes the first action (Spark's ``Observation``).
    ``close`` releases the model's broadcast (also on ``with``).
    """

    model: PreparedModel
    options: ScoringOptions
    shipped: str
    stats: WorkerStats
    max_failed_fraction: float = 1.0
    _payload: Any = None
    source: str | None = None  # the model as the caller named it (a path, or an MLflow URI)
    spread: bool = False  # the input was spread by a shuffle before scoring (scoring is the second stage)

    @property
    def model_version(self) -> str:
        """What the output's ``model_version`` column says."""
        return self.model.version

    def workers(self) -> dict[str, dict[str, Any]]:
        """Per ``host:pid`` worker: model_loads, traces, batches, rows, rows_failed, peak_rss_mb, ..."""
        return self.stats.by_worker()

    def totals(self) -> dict[str, int]:
        """rows, rows_failed, batches, model_loads and traces over all workers."""
        names = ("rows", "rows_failed", "batches", "model_loads", "traces")
        workers = self.workers().values()
        return {n: int(sum(w.get(n, 0) for w in workers)) for n in names}

    def check(self, *, rows: int | None = None, failed: int | None = None, sample: Sequence[str] = ()) -> None:
        """Raise ``TooManyFailures`` when more than ``max_failed_fraction`` of the rows failed.

        Counts default to the worker statistics (after an action); a job passes the written output's.
        """
        if rows is None or failed is None:
            totals = self.totals()
            rows, failed = totals["rows"], totals["rows_failed"]
        if rows and failed / rows > self.max_failed_fraction:
            reasons = "".join(f"\n  {s}" for s in sample)
            raise TooManyFailures(
                f"{failed} of {rows} rows failed ({failed / rows:.1%}), over the allowed "
                f"{self.max_failed_fraction:.1%} (max_failed_fraction){reasons}"
            )

    def close(self) -> None:
        """Release the broadcast model bytes (workers keep the loaded model in their cache)."""
        if self._payload is not None and hasattr(self._payload, "unpersist"):
            try:
                self._payload.unpersist()
            except Exception:  # noqa: BLE001 - a stopped context has nothing left to release
                pass
        self._payload = None

    def __enter__(self) -> ScoringRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scored_frame(
    df: Any, prepared: PreparedModel, options: ScoringOptions, *, shipment: tuple[Any, str] | None = None
) -> tuple[Any, ScoringRun]:
    """The lazy scored DataFrame (keys, outputs, ``error``, ``model_version``) and its run handle.

    ``shipment`` is what ``ship`` returned, for callers that score several DataFrames with one model
    shipped once (micro-batches); the handle then does not release it on ``close``.
    """
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F

    validate_columns(df, options)
    prepared = with_compute(prepared, options)
    spark = df.sparkSession
    _arrow_batches(spark, options)
    stats = WorkerStats.create(spark)
    owned = shipment is None
    payload, shipped = ship(spark, prepared, options.broadcast_max_bytes) if owned else shipment
    factory = _make_predict_fn_factory(prepared, payload, stats.sink, options.limits)
    udf = predict_batch_udf(factory, return_type=return_type(prepared), batch_size=options.batch_size)

    image = F.col(options.image_column)
    too_big = F.length(image) > F.lit(options.limits.max_bytes)
    # Oversized images never cross into Python (nor into an Arrow batch): refused here by length.
    guarded = F.when(too_big, F.lit(None).cast("binary")).otherwise(image)
    oversize = F.when(
        too_big,
        F.format_string(f"encoded size %d bytes exceeds the limit of {options.limits.max_bytes}", F.length(image)),
    )
    keys = [F.col(k) for k in options.key_columns]
    spread, shuffled = _spread(df, options)
    scored = spread.select(*keys, udf(guarded).alias("_r"), oversize.alias("_oversize"))
    scored = stats.attach(scored, F.col(f"_r.{STATS_FIELD}"))
    error = F.coalesce(F.col("_oversize"), F.col("_r.error"))
    ok = error.isNull()
    if prepared.mode == "embed":
        outputs = [F.when(ok, F.col("_r.embedding")).alias("embedding")]
    else:
        top_k = F.when(
            ok,
            F.arrays_zip(F.col("_r.top_k_labels"), F.col("_r.top_k_probabilities")).cast(
                "array<struct<label:string,probability:float>>"
            ),
        )
        outputs = [
            F.when(ok, F.col("_r.prediction")).alias("prediction"),
            F.when(ok, F.col("_r.probability")).alias("probability"),
            top_k.alias("top_k"),
        ]
    result = scored.select(
        *options.key_columns, *outputs, error.alias("error"), F.lit(prepared.version).alias("model_version")
    )
    run = ScoringRun(
        model=prepared,
        options=options,
        shipped=shipped,
        stats=stats,
        _payload=payload if owned else None,
        spread=shuffled,
    )
    return result, run


def label_accuracy(scored: Any) -> float:
    """Share of scored rows whose prediction equals the image's parent folder name (demo check)."""
    from pyspark.sql import functions as F

    label = F.element_at(F.split(F.col("path"), "/"), -2)
    row = (
        scored.where(F.col("error").isNull())
        .agg(F.avg((F.col("prediction") == label).cast("double")).alias("acc"))
        .first()
    )
    return float(row["acc"] or 0.0)


def columns(mode: str, key_columns: Sequence[str]) -> list[str]:
    """The output columns of a scoring mode, in order."""
    return [*key_columns, *OUTPUT_COLUMNS[mode], "error", "model_version"]
