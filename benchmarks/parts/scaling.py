"""Part 3, scaling: ``score_images`` on growing inputs, one fresh session (child process) per size.

Start-up (session, the driver's model check, a warm-up scoring of 8 images) is reported apart from
the timed scoring, with the driver's and the workers' peak memory; a least-squares line through the
scoring times gives ms/image and the fixed cost.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from data import CACHE, MODEL_PATH, data_files
from harness import BATCH, jvm_peak_mb, load_average, python_peak_mb, run_child, spark_session

NAME = "scaling"


def run(sizes: list[int], per_file: int) -> dict[str, Any]:
    runs = []
    for n in sizes:
        cfg = {"files": data_files(per_file, n // per_file), "model": str(MODEL_PATH), "images": n}
        runs.append(run_child("scaling", cfg))
    raw: dict[str, Any] = {"runs": runs, "per_file": per_file}
    if len(runs) >= 2:
        raw["fit"] = fit([r["images"] for r in runs], [r["seconds"] for r in runs])
    return raw


def fit(xs: list[int], ys: list[float]) -> dict[str, float]:
    """Least-squares line of scoring seconds over images, and the largest relative deviation from it."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    resid = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys, strict=False))
    return {"ms_per_image": 1000 * slope, "intercept_seconds": intercept, "max_relative_residual": resid}


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from pyspark.sql import functions as F

    from image_transfer import score_images, scoring_run
    from image_transfer.scoring.options import prepare_model
    from image_transfer.storage.outputs import write_output

    spark = spark_session("bench scaling")
    spark.range(1).count()
    session_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepare_model(cfg["model"], mode="classify", top_k=5)
    check_seconds = time.perf_counter() - t0

    out_root = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=CACHE))
    t0 = time.perf_counter()
    warm = score_images(spark.read.parquet(cfg["files"][0]).limit(8).repartition(2), cfg["model"], batch_size=BATCH)
    with scoring_run(warm) as warm_run, warm_run.settings():
        write_output(warm, str(out_root / "warm")).count()
    warm_seconds = time.perf_counter() - t0
    after_warm = warm_run.workers()

    df = spark.read.parquet(*cfg["files"]).select("path", "content")
    partitions = df.rdd.getNumPartitions()
    load = load_average()
    scored = score_images(df, cfg["model"], batch_size=BATCH)  # the workers' cached model: no load, no trace
    t0 = time.perf_counter()
    with scoring_run(scored) as run, run.settings():
        written = write_output(scored, str(out_root / "scored"))
    seconds = time.perf_counter() - t0
    rows = written.count()
    failed = written.where(F.col("error").isNotNull()).count()
    result = {
        "images": cfg["images"],
        "partitions": partitions,
        "session_seconds": session_seconds,
        "model_check_seconds": check_seconds,
        "warmup_seconds": warm_seconds,
        "seconds": seconds,
        "rows_out": rows,
        "rows_failed": failed,
        "workers_after_warmup": after_warm,
        "workers": run.workers(),
        "driver_python_peak_mb": python_peak_mb(),
        "driver_jvm_peak_mb": jvm_peak_mb(spark),
        "load_average_before": load,
    }
    print(f"[scaling] {json.dumps(result)}", flush=True)
    spark.stop()
    shutil.rmtree(out_root, ignore_errors=True)
    return result
