"""Building the lazy scored DataFrame: validation, shipping, spreading, return type, Arrow batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from image_transfer.errors import UserError
from image_transfer.runtime import is_connect
from image_transfer.scoring.engine import choose_engine
from image_transfer.scoring.options import (
    ARROW_BATCH_CONF,
    ARROW_BYTES_CONF,
    CLOSURE_MAX_BYTES,
    OUTPUT_COLUMNS,
    PreparedModel,
    ScoringOptions,
    validate_columns,
    with_compute,
)
from image_transfer.scoring.run import ScoringRun
from image_transfer.scoring.stats import STATS_PREFIX, WorkerStats, struct_fields
from image_transfer.scoring.worker import make_predict_fn_factory

# ---- the driver side -------------------------------------------------------------------------------


def return_type(prepared: PreparedModel) -> Any:
    """The UDF's struct type (top-k comes back as two parallel arrays, zipped in Spark)."""
    from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

    tail = [StructField("error", StringType()), *struct_fields()]  # statistics: the batch's first row
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


def _master(spark: Any, connect: bool) -> str | None:
    try:
        return str(spark.sparkContext.master) if not connect else spark.conf.get("spark.master", None)
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


def ship(
    spark: Any,
    prepared: PreparedModel,
    broadcast_max_bytes: int,
    lite: bytes | None = None,
    *,
    connect: bool | None = None,
) -> tuple[Any, str]:
    """How the model reaches the workers: (payload, description); a None payload means the shared path.

    Classic sessions broadcast models up to ``broadcast_max_bytes``; Spark Connect has no broadcasts,
    so small models travel inside the UDF (Spark ships it with each task) and larger ones by path,
    which must then be one executors can read (``check_shared_path``: a UserError before any work).
    ``lite``, the converted model of the LiteRT engine, is shipped instead of the model when given
    (by path, a worker converts once per machine). ``connect``: whether ``spark`` is a Spark Connect
    session, when the caller knows.
    """
    from image_transfer.models.artifact import pack

    size = prepared.info.size_bytes if lite is None else len(lite)

    def data() -> bytes:
        return lite if lite is not None else pack(prepared.info.path, prepared.info.kind)

    what = ", LiteRT" if lite is not None else ""  # the summary: "model sha256:... (broadcast, LiteRT)"
    connect = is_connect(spark) if connect is None else connect
    if connect:
        if size <= min(broadcast_max_bytes, CLOSURE_MAX_BYTES):
            return data(), "in the UDF" + what
        check_shared_path(prepared.info.path, _master(spark, connect))
        return None, "shared path"
    if size > broadcast_max_bytes:
        check_shared_path(prepared.info.path, _master(spark, connect))
        return None, "shared path"
    return spark.sparkContext.broadcast(data()), "broadcast" + what


SPREAD_BELOW = 4  # inputs with fewer read partitions per task slot than this are spread evenly


def _spread(df: Any, options: ScoringOptions, connect: bool) -> tuple[Any, bool]:
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
    if connect or df.isStreaming:  # a stream's micro-batches are planned per trigger: no RDD here
        return (df.repartition(options.partitions), True) if options.partitions else (df, False)
    slots = spark.sparkContext.defaultParallelism
    wanted = options.partitions or slots
    have = df.rdd.getNumPartitions()
    spread = have < wanted if options.partitions else have < SPREAD_BELOW * slots
    return (df.repartition(wanted), True) if spread else (df, False)


def _arrow_batches(spark: Any, options: ScoringOptions) -> dict[str, str]:
    """The Arrow batch settings of one scored frame: one Arrow batch = one model call, and never more
    encoded bytes than ``max_batch_bytes``.

    Spark has no per-UDF or per-plan Arrow batch size (3.5 and 4.0 read the session's
    ``maxRecordsPerBatch``, and 4.0's ``maxBytesPerBatch``, when an action plans and runs): these are
    set only around an action, by ``ScoringRun.settings()``; building the frame changes no setting.
    """
    records = options.batch_size
    arrow: dict[str, str] = {}
    if int(str(spark.version).split(".")[0]) >= 4:
        # Spark closes a batch once it reaches the byte size: leave room for one more image.
        arrow[ARROW_BYTES_CONF] = str(max(1, options.max_batch_bytes - options.limits.max_bytes))
    else:  # Spark 3.5 batches by records only: few enough that the largest images still fit
        records = max(1, min(records, options.max_batch_bytes // options.limits.max_bytes))
    arrow[ARROW_BATCH_CONF] = str(records)
    return arrow


def scored_frame(
    df: Any,
    prepared: PreparedModel,
    options: ScoringOptions,
    *,
    shipment: tuple[Any, str] | None = None,
    connect: bool | None = None,
) -> tuple[Any, ScoringRun]:
    """The lazy scored DataFrame (keys, outputs, ``error``, ``model_version``) and its run handle.

    ``shipment`` is what ``ship`` returned, for callers that score several DataFrames with one model
    shipped once (micro-batches); the handle then does not release it on ``close``. ``connect`` is the
    session kind when the caller asked already (else asked here, once).
    """
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F

    validate_columns(df, options)
    prepared = with_compute(prepared, options)
    spark = df.sparkSession
    connect = is_connect(spark) if connect is None else connect
    engine, lite, converted = choose_engine(prepared, options.engine, spark)  # before any Spark work
    prepared = replace(prepared, compute=replace(prepared.compute, engine=engine))
    arrow = _arrow_batches(spark, options)
    stats = WorkerStats.create(spark, connect=connect)
    owned = shipment is None
    payload, shipped = ship(spark, prepared, options.broadcast_max_bytes, lite, connect=connect) if owned else shipment
    factory = make_predict_fn_factory(prepared, payload, options.limits)
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
    spread, shuffled = _spread(df, options, connect)
    scored = spread.select(*keys, udf(guarded).alias("_r"), oversize.alias("_oversize"))
    # The observed node also keeps whatever the caller chains after scoring above the model call: the
    # optimizer pushes no filter through it, so no copy of the UDF lands in a filter and each row is
    # scored once (a filter on the keys too: filter the input to score fewer rows).
    scored = stats.attach(scored, lambda name: F.col(f"_r.{STATS_PREFIX}{name}"), F.col("_r.error").isNotNull())
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
        conversions=int(converted),
        arrow=arrow,
        session=spark,
    )
    return result, run


def columns(mode: str, key_columns: Sequence[str]) -> list[str]:
    """The output columns of a scoring mode, in order."""
    return [*key_columns, *OUTPUT_COLUMNS[mode], "error", "model_version"]
