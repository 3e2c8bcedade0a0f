"""Part 1, scoring: the floor, the usual Spark variants and ``score_images`` on the same data, model and cores.

One child process, one local[2] session. The floor (no Spark: one process, tf.data decoding in
parallel into a traced model call, 2 intra-op threads), the row UDFs, the Series pandas UDF, the
iterator pandas UDF with ``model.predict`` (``variants.py``) and this project's ``score_images``,
each timed on its scoring action (write of the scored Parquet) only. Cheap variants are repeated
(median), all run interleaved, after an untimed warm-up round.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from data import CACHE, MODEL_PATH
from harness import (
    BATCH,
    FLOOR_THREADS,
    HERE,
    WORKER_THREADS,
    Floor,
    configure_tf,
    load_average,
    read_local,
    run_child,
    spark_session,
)

NAME = "scoring"
VARIANTS = {  # name: (label, description)
    "floor": ("floor (no Spark)", "one process, tf.data parallel decode/resize/preprocess, traced model, 2 threads"),
    "row_udf_closure": ("row udf, model in closure", "udf per image, model pickled with the task, model.predict"),
    "row_udf_broadcast": ("row udf, model broadcast", "udf per image, broadcast model, model.predict"),
    "series_udf": ("Series pandas_udf", "Pillow decode per image, eager model call per Arrow batch"),
    "iterator_udf": ("iterator pandas_udf + predict", "model per iterator, Pillow decode, model.predict per batch"),
    "score": ("image_transfer score", "predict_batch_udf, one tf.function: decode..top-k"),
}
CHEAP = ("floor", "score", "iterator_udf")  # repeated --repeats times; the others run once
ORDER = ("floor", "score", "iterator_udf", "series_udf", "row_udf_broadcast", "row_udf_closure")


def run(files: list[str], repeats: int) -> dict[str, Any]:
    raw = run_child("scoring", {"files": files, "model": str(MODEL_PATH), "repeats": repeats})
    raw["summary"] = summarize(raw)
    return raw


def schedule(repeats: int) -> list[str]:
    """Interleaved order: the cheap variants every round (rotated), the slow ones in the middle round."""
    plan: list[str] = []
    middle = repeats // 2
    for r in range(repeats):
        active = [v for v in ORDER if v in CHEAP or r == middle]
        k = r % len(active)
        plan += active[k:] + active[:k]
    return plan


def warm_workers(spark: Any, threads: int) -> list[dict[str, Any]]:
    """Start both Python workers, import TensorFlow there and fix its threads (not timed)."""
    import pandas as pd
    import variants

    def warm(batches: Any) -> Any:  # nested: pickled by value (the workers cannot import this module)
        for _ in batches:
            pid, applied = variants.warm_worker(threads)
            time.sleep(1.0)  # keep both tasks running at once, so they get two workers
            yield pd.DataFrame({"pid": [pid], "applied": [applied]})

    rows = spark.range(2, numPartitions=2).mapInPandas(warm, "pid long, applied boolean").collect()
    return [r.asDict() for r in rows]


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    configure_tf(FLOOR_THREADS)  # the driver process hosts the floor
    from pyspark.sql import functions as F

    from image_transfer import score_images, scoring_run
    from image_transfer.scoring.options import ARROW_BATCH_CONF
    from image_transfer.storage.outputs import write_output

    started = time.perf_counter()
    spark = spark_session("bench scoring")
    sc = spark.sparkContext
    sc.addPyFile(str(HERE / "variants.py"))  # the workers import the variants from it
    sys.path.insert(0, str(HERE))
    import variants

    files = cfg["files"]
    df = spark.read.parquet(*files).select("path", "content")
    partitions = df.rdd.getNumPartitions()
    warmed = warm_workers(spark, WORKER_THREADS)
    session_seconds = time.perf_counter() - started
    print(f"[scoring] session + warm workers {session_seconds:.1f}s: {warmed}", flush=True)

    local = read_local(files, ["path", "content"])
    n = len(local["path"])
    floor = Floor(cfg["model"], local["content"])
    model_bytes = Path(cfg["model"]).read_bytes()
    out_root = Path(tempfile.mkdtemp(prefix="bench-scoring-", dir=CACHE))

    def spark_variant(name: str, frame: Any, out: str) -> tuple[float, dict[str, Any], Any, int]:
        """Score ``frame`` with one variant: (seconds of the scoring action, per-worker stats, written, failed)."""
        spark.conf.set(ARROW_BATCH_CONF, str(BATCH))
        if name == "score":
            scored = score_images(frame, cfg["model"], batch_size=BATCH, top_k=5)
            t0 = time.perf_counter()
            with scoring_run(scored) as run, run.settings():
                written = write_output(scored, out)
            seconds = time.perf_counter() - t0
            return seconds, run.workers(), written, written.where(F.col("error").isNotNull()).count()
        acc = variants.counters(sc)
        broadcast = None
        if name == "row_udf_closure":
            fn = variants.row_udf_closure(variants.ShippedModel(model_bytes), acc)
        elif name == "row_udf_broadcast":
            broadcast = sc.broadcast(variants.ShippedModel(model_bytes))
            fn = variants.row_udf_broadcast(broadcast, acc)
        elif name == "series_udf":
            broadcast = sc.broadcast(variants.ShippedModel(model_bytes))
            fn = variants.series_udf(broadcast, acc)
        else:
            broadcast = sc.broadcast(model_bytes)
            fn = variants.iterator_udf(broadcast, acc)
        scored = frame.select("path", fn("content").alias("r")).select("path", "r.prediction", "r.probability")
        t0 = time.perf_counter()
        written = write_output(scored, out)
        seconds = time.perf_counter() - t0
        failed = written.where(F.col("prediction").isNull()).count()
        if broadcast is not None:
            broadcast.destroy()
        return seconds, {w: dict(c) for w, c in sorted(acc.value.items())}, written, failed

    # Warm-up round, not timed: every variant once on 2 full batches (one per worker), so one-time process
    # costs (first TensorFlow execution, Keras and Pillow code paths) fall on no variant in particular.
    tiny = spark.read.parquet(files[0]).select("path", "content").limit(2 * BATCH).repartition(2)
    warmup = {}
    for name in ORDER[1:]:
        seconds, workers, _, _ = spark_variant(name, tiny, str(out_root / f"warm-{name}"))
        warmup[name] = {"seconds": seconds, "workers": sorted(workers)}
    print(f"[scoring] warm-up round: {warmup}", flush=True)

    runs = []
    for k, name in enumerate(schedule(cfg["repeats"])):
        load = load_average()
        out = str(out_root / f"{k:02d}-{name}")
        record: dict[str, Any] = {"variant": name, "order": k, "images": n, "load_average_before": load}
        if name == "floor":
            seconds, top1 = floor.run()
            record.update(seconds=seconds, workers={str(os.getpid()): {"model_loads": 1, "traces": floor.traces}})
            record["predictions"] = dict(zip(local["path"], top1, strict=False))
        else:
            seconds, workers, written, failed = spark_variant(name, df, out)
            rows = {r["path"]: r["prediction"] for r in written.select("path", "prediction").collect()}
            record.update(seconds=seconds, workers=workers, rows_failed=failed)
            record["predictions"] = {p: int(v) if v is not None else None for p, v in rows.items()}
        record["images_per_second"] = n / record["seconds"]
        runs.append(record)
        print(
            f"[scoring] {name:18s} {record['seconds']:7.1f}s {record['images_per_second']:6.1f} img/s "
            f"workers {record['workers']} (load {load})",
            flush=True,
        )
    # Correctness: every image scored once, and top-1 agreement with the floor (same model).
    reference = runs[[r["variant"] for r in runs].index("floor")]["predictions"]
    for r in runs:
        preds = r.pop("predictions")
        r["rows_out"] = len(preds)
        r["all_rows_scored"] = sorted(preds) == sorted(reference) and all(v is not None for v in preds.values())
        r["top1_agrees_with_floor"] = sum(preds.get(p) == v for p, v in reference.items()) / len(reference)
    shutil.rmtree(out_root, ignore_errors=True)
    return {
        "images": n,
        "partitions": partitions,
        "files": len(files),
        "repeats": cfg["repeats"],
        "arrow_batch": BATCH,
        "floor_threads": FLOOR_THREADS,
        "worker_threads": WORKER_THREADS,
        "warmed_workers": warmed,
        "warmup_round": warmup,
        "session_seconds": session_seconds,
        "runs": runs,
    }


def summarize(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant, in ``ORDER``: median images/s, x floor, loads and traces of its median run."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in raw["runs"]:
        by.setdefault(r["variant"], []).append(r)
    floor_ips = raw["images"] / statistics.median(r["seconds"] for r in by["floor"])
    rows = []
    for name in ORDER:
        if name not in by:
            continue
        runs = by[name]
        med = statistics.median(r["seconds"] for r in runs)
        median_run = min(runs, key=lambda r: abs(r["seconds"] - med))
        workers = median_run["workers"]
        ips = raw["images"] / med
        rows.append(
            {
                "variant": name,
                "label": VARIANTS[name][0],
                "description": VARIANTS[name][1],
                "runs": len(runs),
                "seconds": med,
                "images_per_second": ips,
                "all_ips": [raw["images"] / r["seconds"] for r in runs],
                "ratio_to_floor": ips / floor_ips,
                "workers": len(workers),
                "loads": [w.get("model_loads", 0) for w in workers.values()],
                "traces": [w.get("traces", 0) for w in workers.values()],
                "all_rows_scored": all(r["all_rows_scored"] for r in runs),
                "top1_agrees_with_floor": statistics.median(r["top1_agrees_with_floor"] for r in runs),
            }
        )
    return rows
