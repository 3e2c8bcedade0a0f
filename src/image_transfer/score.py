"""Scoring and featurization with ``predict_batch_udf``: shipped once, loaded and traced once per worker.

The driver inspects the model (clear errors before any work), ships it once (broadcast bytes, or the
shared path when large) and builds one ``predict_batch_udf``. On each executor Python worker,
``make_predict_fn`` runs once (the UDF caches it per worker): it sets TensorFlow's threads from the
task's cores, loads the model in Keras safe mode and traces one ``tf.function`` whose input signature
is a batch of encoded images, so decoding, resizing, preprocessing, the model and top-k all run in
one graph that is traced once whatever the batch sizes. Per batch, Python only screens image headers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from image_transfer.errors import UserError
from image_transfer.images import ImageLimits, screen_batch
from image_transfer.model import ModelInfo, inspect_model
from image_transfer.stats import WorkerStats, peak_rss_mb, record

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


@dataclass(frozen=True)
class ScoringRequest:
    """What to score and how: the model, the input columns, batching, shipping and image limits."""

    model_path: str
    image_column: str = "content"
    key_columns: tuple[str, ...] = ("path",)
    batch_size: int = 64
    broadcast_max_bytes: int = 256 * 1024 * 1024
    limits: ImageLimits = field(default_factory=ImageLimits.default)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class PreparedModel:
    """A model checked on the driver, with the scoring mode: ``classify`` (top-k) or ``embed``."""

    info: ModelInfo
    mode: str
    top_k: int = 5
    layer: str | None = None
    width: int = 0  # classify: k actually reported; embed: embedding size


def prepare_model(request: ScoringRequest, *, mode: str, top_k: int = 5, layer: str | None = None) -> PreparedModel:
    """Load and check the model on the driver; raises UserError before any Spark work is scheduled."""
    if mode not in ("classify", "embed"):
        raise ValueError(f"mode must be classify or embed, not {mode!r}")
    if mode == "classify" and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    info = inspect_model(request.model_path, layer=layer, embed=mode == "embed")
    width = min(top_k, info.output_width) if mode == "classify" else info.output_width
    return PreparedModel(info=info, mode=mode, top_k=top_k, layer=layer, width=width)


def validate_input(df: Any, request: ScoringRequest) -> None:
    """Check the image and key columns exist with the right types, and that there is at least one row."""
    from pyspark.sql.types import BinaryType

    fields = {f.name: f.dataType for f in df.schema.fields}
    if request.image_column not in fields:
        raise UserError(
            f"no image column {request.image_column!r} in the input (columns: {', '.join(fields) or 'none'})"
        )
    if not isinstance(fields[request.image_column], BinaryType):
        raise UserError(
            f"image column {request.image_column!r} must be binary (encoded image bytes), "
            f"not {fields[request.image_column].simpleString()}"
        )
    missing = [k for k in request.key_columns if k not in fields]
    if missing:
        raise UserError(f"no key column {', '.join(missing)} in the input (columns: {', '.join(fields)})")
    clash = {"prediction", "probability", "top_k", "error", "embedding"} & set(request.key_columns)
    if clash:
        raise UserError(f"key columns may not be named like output columns: {', '.join(sorted(clash))}")
    if df.isEmpty():
        raise UserError("the input has no rows")


# ---- the worker side -------------------------------------------------------------------------------


def _task_cores() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else max(1, os.cpu_count() or 1)
    except Exception:  # noqa: BLE001 - older Spark without TaskContext.cpus()
        return 1


def _load_on_worker(prepared: PreparedModel, payload: Any, stats: Any) -> Any:
    """Materialise and load the model, then build the traced scoring function (once per worker)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from image_transfer.model import configure_threads, embedding_model, load_model, preprocess_fn, unpack

    configure_threads(_task_cores())
    import tensorflow as tf

    from image_transfer.images import decode_batch

    info = prepared.info
    path = unpack(payload.value, info.kind) if payload is not None else info.path
    model = load_model(path, info.kind)
    if prepared.mode == "embed":
        model = embedding_model(model, prepared.layer)
    record(stats, model_loads=1)
    preprocess = preprocess_fn(info.preprocess)
    height, width, k = info.height, info.width, prepared.width

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], reduce_retracing=True)
    def serve(encoded: Any) -> Any:
        record(stats, traces=1)  # Python side effect: runs only while tracing
        images = preprocess(decode_batch(encoded, height, width))
        outputs = tf.cast(model(images, training=False), tf.float32)
        if prepared.mode == "embed":
            return {"embedding": outputs}
        top = tf.math.top_k(outputs, k=k)
        return {"probabilities": top.values, "indices": top.indices}

    return serve


def _run_graph(serve: Callable[[Any], Any], payloads: list[bytes]) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Run the graph on the screened payloads; a decode failure is isolated to its rows by bisection.

    Returns the outputs for the rows that decoded (in order) and, by payload position, the errors.
    Every call has the same input signature, so isolating failures never retraces.
    """
    import tensorflow as tf

    def call(lo: int, hi: int) -> tuple[list[dict[str, np.ndarray]], list[int], dict[int, str]]:
        try:
            out = serve(tf.constant(payloads[lo:hi]))
            return [{k: v.numpy() for k, v in out.items()}], list(range(lo, hi)), {}
        except tf.errors.InvalidArgumentError as exc:
            if hi - lo == 1:
                message = str(exc.message).strip().splitlines()[0] if exc.message else "decode failed"
                return [], [], {lo: f"could not decode image: {message[:200]}"}
            mid = (lo + hi) // 2
            a_out, a_ok, a_err = call(lo, mid)
            b_out, b_ok, b_err = call(mid, hi)
            return a_out + b_out, a_ok + b_ok, {**a_err, **b_err}

    if not payloads:
        return {}, {}
    parts, _, errors = call(0, len(payloads))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return merged, errors


def _make_predict_fn_factory(
    prepared: PreparedModel, payload: Any, stats: Any, limits: ImageLimits
) -> Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """The closure factory handed to ``predict_batch_udf`` (it runs once per Python worker)."""
    classes = prepared.info.output_width if prepared.mode == "classify" else 0
    names = np.array([prepared.info.label(i) for i in range(classes)], dtype=object)

    def make_predict_fn() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        serve = _load_on_worker(prepared, payload, stats)
        k = prepared.width

        def predict(encoded: np.ndarray) -> dict[str, np.ndarray]:
            n = len(encoded)
            screened = screen_batch(encoded, limits)
            errors = list(screened.errors)
            outputs, graph_errors = _run_graph(serve, screened.payloads)
            ok_rows = [row for j, row in enumerate(screened.kept) if j not in graph_errors]
            for j, message in graph_errors.items():
                errors[screened.kept[j]] = message
            record(stats, batches=1, rows=n, rows_failed=n - len(ok_rows), peak_rss_mb=peak_rss_mb())
            error_col = np.array(errors, dtype=object)
            if prepared.mode == "embed":
                emb = np.zeros((n, prepared.width), np.float32)
                if ok_rows:
                    emb[ok_rows] = outputs["embedding"]
                return {"embedding": emb, "error": error_col}
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
            }

        return predict

    return make_predict_fn


# ---- the driver side -------------------------------------------------------------------------------


def return_type(prepared: PreparedModel) -> Any:
    """The UDF's struct type (top-k comes back as two parallel arrays, zipped in Spark)."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    if prepared.mode == "embed":
        return StructType([StructField("embedding", ArrayType(FloatType())), StructField("error", StringType())])
    return StructType(
        [
            StructField("prediction", StringType()),
            StructField("probability", FloatType()),
            StructField("top_k_labels", ArrayType(StringType())),
            StructField("top_k_probabilities", ArrayType(FloatType())),
            StructField("error", StringType()),
        ]
    )


def ship(spark: Any, prepared: PreparedModel, broadcast_max_bytes: int) -> Any:
    """Broadcast the model bytes once when small enough; None means workers read the shared path."""
    from image_transfer.model import pack

    if prepared.info.size_bytes > broadcast_max_bytes:
        return None
    return spark.sparkContext.broadcast(pack(prepared.info.path, prepared.info.kind))


def scoring_udf(spark: Any, request: ScoringRequest, prepared: PreparedModel, stats: WorkerStats) -> Any:
    """The ``predict_batch_udf`` column function for this model (build once per run)."""
    from pyspark.ml.functions import predict_batch_udf

    payload = ship(spark, prepared, request.broadcast_max_bytes)
    factory = _make_predict_fn_factory(prepared, payload, stats.accumulator, request.limits)
    return predict_batch_udf(factory, return_type=return_type(prepared), batch_size=request.batch_size)


def score_frame(df: Any, request: ScoringRequest, prepared: PreparedModel, udf: Any) -> Any:
    """Apply the UDF: keys, then ``prediction, probability, top_k, error`` (or ``embedding, error``)."""
    from pyspark.sql import functions as F

    keys = [F.col(k) for k in request.key_columns]
    scored = df.select(*keys, udf(F.col(request.image_column)).alias("_r"))
    if prepared.mode == "embed":
        return scored.select(
            *request.key_columns,
            F.when(F.col("_r.error").isNull(), F.col("_r.embedding")).alias("embedding"),
            F.col("_r.error").alias("error"),
        )
    top_k = F.when(
        F.col("_r.error").isNull(),
        F.arrays_zip(F.col("_r.top_k_labels"), F.col("_r.top_k_probabilities")).cast(
            "array<struct<label:string,probability:float>>"
        ),
    )
    return scored.select(
        *request.key_columns,
        F.col("_r.prediction").alias("prediction"),
        F.col("_r.probability").alias("probability"),
        top_k.alias("top_k"),
        F.col("_r.error").alias("error"),
    )


@dataclass
class RunResult:
    """What a scoring run did; ``to_dict`` is the ``--summary`` JSON."""

    mode: str
    model: str
    rows_in: int
    rows_out: int
    rows_failed: int
    seconds: float
    workers: dict[str, dict[str, int]]
    shipped: str
    errors_sample: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """Output rows per second of the scoring action."""
        return self.rows_out / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = asdict(self)
        out["images_per_second"] = round(self.images_per_second, 2)
        out["seconds"] = round(self.seconds, 3)
        return out

    def describe(self) -> str:
        """A short human summary."""
        loads = sorted(w.get("model_loads", 0) for w in self.workers.values())
        traces = sorted(w.get("traces", 0) for w in self.workers.values())
        lines = [
            f"{self.mode}: {self.rows_in} rows in, {self.rows_out} out, {self.rows_failed} failed, "
            f"{self.seconds:.1f}s ({self.images_per_second:.1f} images/s); model {self.shipped}",
            f"workers: {len(self.workers)}; model loads per worker {loads}; traces per worker {traces}",
        ]
        lines += [f"  failed: {e}" for e in self.errors_sample]
        return "\n".join(lines)


def run(
    spark: Any,
    source: Any,
    request: ScoringRequest,
    prepared: PreparedModel,
    *,
    writer: Callable[[Any], Any],
    partitions: int | None = None,
) -> RunResult:
    """Validate the input, score it and hand the result to ``writer``.

    ``writer`` stores the scored DataFrame and returns it as read back from where it was stored, so
    the counts in the result describe what was written.
    The input is spread over at least ``partitions`` (default: the cluster's parallelism) so every
    worker gets a share, and Arrow batches are aligned with the scoring batch size.
    """
    from pyspark.sql import functions as F

    validate_input(source, request)
    spark.conf.set(ARROW_BATCH_CONF, str(request.batch_size))
    rows_in = source.count()
    wanted = partitions or spark.sparkContext.defaultParallelism
    if source.rdd.getNumPartitions() < wanted:
        source = source.repartition(wanted)
    stats = WorkerStats.create(spark.sparkContext)
    udf = scoring_udf(spark, request, prepared, stats)
    started = time.perf_counter()
    written = writer(score_frame(source, request, prepared, udf))
    seconds = time.perf_counter() - started
    failed = written.where(F.col("error").isNotNull())
    sample = [f"{r[request.key_columns[0]]}: {r['error']}" for r in failed.limit(5).collect()]
    return RunResult(
        mode="score" if prepared.mode == "classify" else "featurize",
        model=prepared.info.path,
        rows_in=rows_in,
        rows_out=written.count(),
        rows_failed=failed.count(),
        errors_sample=sample,
        seconds=seconds,
        workers=stats.by_worker(),
        shipped="broadcast" if prepared.info.size_bytes <= request.broadcast_max_bytes else "shared path",
    )


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
