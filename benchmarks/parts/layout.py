"""Part 4, input layout, cold and warm: ``score`` on one unsplittable Parquet file and on 8 files.

- Cold: the whole ``python -m image_transfer score`` command in a fresh process (what a scheduled job
  runs), the median of ``repeats`` runs, against the cold floor: fresh plain Python processes (no
  Spark), one per core, each importing TensorFlow, loading the model, scoring its share in one traced
  graph and writing Parquet (median of ``repeats`` as well).
- Warm: in one session (child ``warm``), score once, then time new ``score_images`` calls whose
  workers hold the traced model, against the in-process floor of Part 1; also Arrow batches of 4x the
  model batch, where the time goes (CPU seconds by process kind), decoding alone and the model alone
  (the limit), and header screening per image.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from data import CACHE, MODEL_PATH, SIZE, data_files, one_file, own_folder
from harness import (
    BATCH,
    FLOOR_THREADS,
    Floor,
    child_command,
    child_env,
    configure_tf,
    process_tree_cpu,
    read_local,
    run_child,
    spark_session,
)

NAME = "layout"


def run(counts: list[int], repeats: int) -> dict[str, Any]:
    results = []
    for n in counts:
        files8 = own_folder(data_files(n // 8, 8), f"eight-files-{n}")
        single = one_file(files8, f"one-file-{n}")
        floors = [cold_floor(single) for _ in range(repeats)]
        floor = dict(floors[0], seconds=statistics.median(f["seconds"] for f in floors), runs=floors)
        print(f"[layout] cold floor {n}: {[round(f['seconds'], 1) for f in floors]}", flush=True)
        for layout, files in (("1 file", [single]), ("8 files", files8)):
            # A cold run's time swings by several seconds on a shared VM: the median of `repeats` runs.
            runs = [cold_score(files, n) for _ in range(repeats)]
            cold = dict(runs[0], seconds=statistics.median(r["seconds"] for r in runs), runs=runs)
            print(f"[layout] cold score {layout} {n}: {[round(r['seconds'], 1) for r in runs]}", flush=True)
            warm = run_child("warm", {"files": files, "model": str(MODEL_PATH), "repeats": repeats})
            print(
                f"[layout] warm {layout} {n}: {[r['seconds'] for r in warm['runs']]} floor {warm['floor_seconds']}",
                flush=True,
            )
            result = {"images": n, "layout": layout, "cold": cold, "cold_floor": floor, "warm": warm}
            result["ratios"] = ratios(result)
            results.append(result)
    return {"results": results}


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Cold images/s over the cold floor's, warm (median) over the warm floor's (median)."""
    n, w = r["images"], r["warm"]
    warm_s = statistics.median(x["seconds"] for x in w["runs"])
    return {
        "cold": (n / r["cold"]["seconds"]) / (n / r["cold_floor"]["seconds"]),
        "warm": (n / warm_s) / (n / statistics.median(w["floor_seconds"])),
    }


def cold_score(files: list[str], images: int) -> dict[str, Any]:
    """``python -m image_transfer score`` as a scheduled job runs it: a fresh process, session and Python workers."""
    out_root = Path(tempfile.mkdtemp(prefix="bench-cold-score-", dir=CACHE))
    summary = out_root / "summary.json"
    env = dict(child_env(), PYSPARK_PYTHON=sys.executable)
    inputs = files[0] if len(files) == 1 else str(Path(files[0]).parent)
    command = [
        sys.executable,
        "-m",
        "image_transfer",
        "score",
        "--input",
        inputs,
        "--model",
        str(MODEL_PATH),
        "--output",
        str(out_root / "out.parquet"),
        "--summary",
        str(summary),
        "--master",
        "local[2]",
        "--batch-size",
        str(BATCH),
        "--progress-interval",
        "600",
    ]
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    data = json.loads(summary.read_text())
    shutil.rmtree(out_root, ignore_errors=True)
    assert data["rows_out"] == images, data
    return {"seconds": seconds, "action_seconds": data["seconds"], "workers": data["workers"]}


def cold_floor(file: str, shards: int = 2) -> dict[str, Any]:
    """Fresh plain processes (no Spark), one per core, each scoring its share: wall time of them all."""
    out_root = Path(tempfile.mkdtemp(prefix="bench-cold-floor-", dir=CACHE))
    t0 = time.perf_counter()
    procs = []
    for k in range(shards):
        cfg = {
            "file": file,
            "model": str(MODEL_PATH),
            "shard": k,
            "shards": shards,
            "out": str(out_root / f"{k}.parquet"),
        }
        procs.append(subprocess.Popen(child_command("floor_worker", cfg, str(out_root / f"{k}.json")), env=child_env()))
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("a cold floor process failed")
    seconds = time.perf_counter() - t0
    rows = sum(json.loads((out_root / f"{k}.json").read_text())["rows"] for k in range(shards))
    shutil.rmtree(out_root, ignore_errors=True)
    return {"seconds": seconds, "rows": rows}


def child_floor_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One of the cold floor's fresh processes: import TF, load, decode + score its share in one graph, write."""
    t0 = time.perf_counter()
    configure_tf(1)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize
    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import load_keras, preprocess_fn

    table = pq.read_table(cfg["file"], columns=["path", "content"])
    rows = table.slice(cfg["shard"] * table.num_rows // cfg["shards"], table.num_rows // cfg["shards"])
    model = load_keras(cfg["model"])
    preprocess = preprocess_fn(read_metadata(cfg["model"]).get("preprocess", "none"))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(encoded: Any) -> Any:
        images = tf.map_fn(lambda e: preprocess(decode_resize(e, SIZE, SIZE)), encoded, fn_output_signature=tf.float32)
        top = tf.math.top_k(tf.cast(model(images, training=False), tf.float32), k=5)
        return top.values, top.indices

    contents = rows.column("content").to_pylist()
    probs, idx = [], []
    for i in range(0, len(contents), BATCH):
        v, k = serve(tf.constant(contents[i : i + BATCH]))
        probs.append(v.numpy()[:, 0])
        idx.append(k.numpy()[:, 0])
    out = pa.table(
        {"path": rows.column("path"), "prediction": np.concatenate(idx), "probability": np.concatenate(probs)}
    )
    pq.write_table(out, cfg["out"])
    return {"rows": out.num_rows, "seconds": time.perf_counter() - t0}


def child_warm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm: in one session, score once (workers start, load, trace), then time a second scoring and the floor."""
    configure_tf(FLOOR_THREADS)
    import tensorflow as tf

    from image_transfer import score_images, scoring_run
    from image_transfer.imaging.graph import decode_resize
    from image_transfer.imaging.screen import ImageLimits, screen_batch
    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import load_keras, preprocess_fn
    from image_transfer.scoring.options import ARROW_BATCH_CONF
    from image_transfer.storage.outputs import write_output

    spark = spark_session("bench warm")
    out_root = Path(tempfile.mkdtemp(prefix="bench-warm-", dir=CACHE))
    df = spark.read.parquet(*cfg["files"]).select("path", "content")
    read_partitions = df.rdd.getNumPartitions()
    first = score_images(df, cfg["model"], batch_size=BATCH)
    with scoring_run(first) as run, run.settings():
        write_output(first, str(out_root / "first"))
    cold_in_session = run.workers()
    runs = []
    for k in range(cfg["repeats"]):
        scored = score_images(df, cfg["model"], batch_size=BATCH)
        cpu0 = process_tree_cpu(os.getpid())
        t0 = time.perf_counter()
        with scoring_run(scored) as run, run.settings():
            write_output(scored, str(out_root / f"run{k}"))
        seconds = time.perf_counter() - t0
        cpu1 = process_tree_cpu(os.getpid())
        runs.append({"seconds": seconds, "workers": run.workers(), "cpu": {c: cpu1[c] - cpu0[c] for c in cpu0}})
    # Larger Arrow batches than model batches (fewer JVM <-> Python round trips): predict_batch_udf then
    # splits each Arrow batch into model calls of BATCH images.
    big_arrow = []
    for k in range(cfg["repeats"]):
        scored = score_images(df, cfg["model"], batch_size=BATCH)
        spark.conf.set(ARROW_BATCH_CONF, str(4 * BATCH))  # the session's: no settings() around this write
        t0 = time.perf_counter()
        with scoring_run(scored):
            write_output(scored, str(out_root / f"arrow{k}"))
        big_arrow.append(time.perf_counter() - t0)
    local = read_local(cfg["files"], ["path", "content"])
    floor = Floor(cfg["model"], local["content"])
    floors = [floor.run()[0] for _ in range(cfg["repeats"])]
    # The limit: decoding alone and the model alone, each with both cores.
    encoded = tf.constant(local["content"])
    decode = (
        tf.data.Dataset.from_tensor_slices(encoded)
        .map(lambda e: decode_resize(e, SIZE, SIZE), num_parallel_calls=FLOOR_THREADS)
        .batch(BATCH)
    )
    t0 = time.perf_counter()
    batches = [b for b in decode]
    decode_s = time.perf_counter() - t0
    model = load_keras(cfg["model"])
    preprocess = preprocess_fn(read_metadata(cfg["model"]).get("preprocess", "none"))
    call = tf.function(lambda x: model(preprocess(x), training=False))
    call(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        call(b).numpy()
    model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    limits = ImageLimits.default()
    for i in range(0, len(local["content"]), BATCH):
        screen_batch(local["content"][i : i + BATCH], limits)
    screen_s = time.perf_counter() - t0
    spark.stop()
    shutil.rmtree(out_root, ignore_errors=True)
    n = len(local["content"])
    return {
        "images": n,
        "read_partitions": read_partitions,
        "first_run_workers": cold_in_session,
        "runs": runs,
        "arrow_4x_seconds": big_arrow,
        "floor_seconds": floors,
        "decode_alone_ips": n / decode_s,
        "model_alone_ips": n / model_s,
        "screen_ms_per_image": 1000 * screen_s / n,
    }
