"""Benchmark: image scoring against the usual Spark approaches and the compute floor; training input; scaling.

    uv run python benchmarks/bench.py [--images 1024] [--parts 1,2,3] [--quick]

Data (deterministic 320x240 JPEGs) and the model (MobileNetV2 224x224, random weights, seed 0) are
generated once into ``benchmarks/.cache``. Each part runs in its own child process (fresh Spark
session, fresh memory high-water marks); results go to ``benchmarks/results/`` (``--quick``:
``benchmarks/results/quick/``, which is not committed). See ``benchmarks/README.md``.

Part 1 (scoring, local[2], same data and model): the floor (no Spark: one process, tf.data decoding
in parallel into a traced model call, 2 intra-op threads), the row UDFs, the Series pandas UDF, the
iterator pandas UDF with ``model.predict`` and this project's ``score_images``, each timed on its
scoring action (write of the scored Parquet) only. Cheap variants are repeated (median), all run
interleaved in one session.
Part 2 (training input): images/s of ``image_transfer.feed`` over Petastorm and over Arrow, against
the same tf.data pipeline over bytes held in memory; input alone, and one training epoch of the
project's transfer-learning classifier (frozen MobileNetV2 + softmax head).
Part 3 (scaling): ``score`` on 1x, 4x, 16x the images, one fresh session each: start-up reported
separately, then the scoring time, and the driver's and workers' peak memory.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODEL_PATH = CACHE / "mobilenetv2-224.keras"
IMAGE_W, IMAGE_H = 320, 240
SIZE = 224
BATCH = 64  # score's batch size, and the Arrow batch size of every pandas variant
CLASSES = 10  # labels of the synthetic data (training part)
FLOOR_THREADS = 2  # the floor is one process with both cores
WORKER_THREADS = 1  # per Python worker in local[2]: what score sets (the task's cores)

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


# ---- data and model ------------------------------------------------------------------------------


def make_jpeg(i: int) -> bytes:
    """Image ``i``: a smooth random colour field with mild grain, 320x240, JPEG quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(small.resize((IMAGE_W, IMAGE_H), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0.0, 4.0, base.shape).astype(np.int16)
    image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def data_files(per_file: int, count: int) -> list[str]:
    """The first ``count`` Parquet files of ``per_file`` images each (generated on first use)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = CACHE / f"images-{per_file}-per-file"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(count):
        path = folder / f"part-{k:05d}.parquet"
        if not path.exists():
            ids = range(k * per_file, (k + 1) * per_file)
            table = pa.table(
                {
                    "path": pa.array([f"synthetic/{i % CLASSES}/{i:06d}.jpg" for i in ids], pa.string()),
                    "content": pa.array([make_jpeg(i) for i in ids], pa.binary()),
                    "label_index": pa.array([i % CLASSES for i in ids], pa.int32()),
                }
            )
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp)
            tmp.rename(path)
        files.append(str(path))
    return files


def make_model() -> None:
    """MobileNetV2 224x224, 1000 classes, random weights (seed 0), saved with ``scale_-1_1`` metadata."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize
    from image_transfer.models.artifact import save_model

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), classes=1000)
    # Fresh BatchNorm statistics (mean 0, variance 1) make a random MobileNetV2 give the same uniform
    # output for every image; set each BatchNorm's statistics from calibration images (not the
    # benchmark's), in order, so outputs differ per image and "top-1 = floor" is a real check.
    calibration = (
        np.stack([decode_resize(tf.constant(make_jpeg(10_000_000 + i)), SIZE, SIZE).numpy() for i in range(32)]) / 127.5
        - 1.0
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            inputs = np.asarray(keras.Model(model.inputs, layer.input)(calibration, training=False))
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, inputs.mean(axis=(0, 1, 2)), inputs.var(axis=(0, 1, 2)) + 1e-3])
    save_model(model, MODEL_PATH, class_names=None, preprocess="scale_-1_1")


# ---- helpers used in the children ----------------------------------------------------------------


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def spark_session(app: str) -> Any:
    from image_transfer.session import get_spark

    spark = get_spark(app, master="local[2]")
    # One Parquet file = one partition (files are packed while below maxPartitionBytes, each costing
    # openCostInBytes): every variant sees the same partitions, and Part 3 keeps partitions equal-sized.
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(256 * 1024 * 1024))
    spark.conf.set("spark.sql.files.openCostInBytes", str(256 * 1024 * 1024))
    return spark


def jvm_peak_mb(spark: Any) -> int | None:
    """VmHWM of the driver JVM (a child of this Python process)."""
    pids = []
    try:
        pids.append(int(spark.sparkContext._gateway.proc.pid))
    except Exception:  # noqa: BLE001
        pass
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "java":
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            continue
    return None


def python_peak_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def configure_tf(threads: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def read_local(files: list[str], columns: list[str]) -> dict[str, list[Any]]:
    """The files' columns into this process with pyarrow (no Spark)."""
    import pyarrow.parquet as pq

    out: dict[str, list[Any]] = {c: [] for c in columns}
    for f in files:
        table = pq.read_table(f, columns=columns)
        for c in columns:
            out[c] += table.column(c).to_pylist()
    return out


def warm_workers(spark: Any, threads: int) -> list[dict[str, Any]]:
    """Start both Python workers, import TensorFlow there and fix its threads (not timed)."""
    import pandas as pd
    import variants

    def warm(batches: Any) -> Any:
        for _ in batches:
            pid, applied = variants.warm_worker(threads)
            time.sleep(1.0)  # keep both tasks running at once, so they get two workers
            yield pd.DataFrame({"pid": [pid], "applied": [applied]})

    rows = spark.range(2, numPartitions=2).mapInPandas(warm, "pid long, applied boolean").collect()
    return [r.asDict() for r in rows]


class Floor:
    """The compute floor: no Spark, one process, tf.data over the same bytes, model in a tf.function."""

    def __init__(self, model_path: str, contents: list[bytes], *, parallel: int = FLOOR_THREADS) -> None:
        import tensorflow as tf

        from image_transfer.imaging.graph import decode_resize
        from image_transfer.models.artifact import read_metadata
        from image_transfer.models.load import load_keras, preprocess_fn

        model = load_keras(model_path)
        preprocess = preprocess_fn(read_metadata(model_path).get("preprocess", "none"))
        self.traces = 0

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
        def serve(images: Any) -> Any:
            self.traces += 1
            top = tf.math.top_k(tf.cast(model(images, training=False), tf.float32), k=5)
            return top.values, top.indices

        self.serve = serve
        self.encoded = tf.constant(contents)
        self.parallel = parallel
        # Fixed parallelism, not AUTOTUNE: destroying an autotuned iterator can stall for seconds.
        self.dataset = (
            tf.data.Dataset.from_tensor_slices(self.encoded)
            .map(lambda e: preprocess(decode_resize(e, SIZE, SIZE)), num_parallel_calls=parallel, deterministic=True)
            .batch(BATCH)
            .prefetch(2)
        )
        for images in self.dataset.take(1):  # load + trace, not timed
            self.serve(images)

    def run(self) -> tuple[float, list[int]]:
        import numpy as np

        iterator = iter(self.dataset)
        started = time.perf_counter()
        top1 = []
        for images in iterator:
            _, indices = self.serve(images)
            top1.append(indices.numpy()[:, 0])
        seconds = time.perf_counter() - started  # up to the last batch's result
        del iterator
        return seconds, np.concatenate(top1).tolist()


# ---- part 1: scoring -----------------------------------------------------------------------------


def schedule(repeats: int) -> list[str]:
    """Interleaved order: the cheap variants every round (rotated), the slow ones in the middle round."""
    plan: list[str] = []
    middle = repeats // 2
    for r in range(repeats):
        active = [v for v in ORDER if v in CHEAP or r == middle]
        k = r % len(active)
        plan += active[k:] + active[:k]
    return plan


def child_scoring(cfg: dict[str, Any]) -> dict[str, Any]:
    configure_tf(FLOOR_THREADS)  # the driver process hosts the floor
    from pyspark.sql import functions as F

    from image_transfer import score_images, scoring_run
    from image_transfer.jobs.outputs import write_output
    from image_transfer.scoring.options import ARROW_BATCH_CONF
    from image_transfer.scoring.stats import WorkerStats

    started = time.perf_counter()
    spark = spark_session("bench scoring")
    sc = spark.sparkContext
    sc.addPyFile(str(HERE / "variants.py"))
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
            with scoring_run(scored) as run:
                written = write_output(scored, out)
            seconds = time.perf_counter() - t0
            return seconds, run.workers(), written, written.where(F.col("error").isNotNull()).count()
        stats = WorkerStats.create(spark)
        acc = stats.accumulator
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
        return seconds, stats.by_worker(), written, failed

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


def summarize_scoring(raw: dict[str, Any]) -> list[dict[str, Any]]:
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


def render_scoring(raw: dict[str, Any], folder: Path) -> str:
    rows = summarize_scoring(raw)
    score_row = next((r for r in rows if r["variant"] == "score"), None)
    others = [r["images_per_second"] for r in rows if r["variant"] not in ("floor", "score")]
    lines = [
        f"Scoring {raw['images']} JPEGs (320x240) with MobileNetV2 224x224 (random weights) on local[2], "
        f"{raw['partitions']} partitions; {raw.get('machine', '')}",
        "",
        "| variant | how | images/s | x floor | model loads per worker | traces per worker | runs | all rows | top-1 = floor |",
        "|---|---|---:|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        spread = f" ({min(r['all_ips']):.1f}-{max(r['all_ips']):.1f})" if r["runs"] > 1 else ""
        loads = ", ".join(map(str, r["loads"])) if r["variant"] != "floor" else "1 (process)"
        traces = ", ".join(map(str, r["traces"])) if r["variant"] != "floor" else "1 (process)"
        if r["variant"] == "series_udf":
            traces += " (eager)"
        lines.append(
            f"| {r['label']} | {r['description']} | {r['images_per_second']:.1f}{spread} | "
            f"{r['ratio_to_floor']:.2f} | {loads} | {traces} | {r['runs']} | "
            f"{'yes' if r['all_rows_scored'] else 'NO'} | {r['top1_agrees_with_floor']:.0%} |"
        )
    lines += [
        "",
        f"images/s: median of the runs (range in brackets); x floor: against the floor's median in the same "
        f"session. Order of runs (interleaved): {', '.join(r['variant'] for r in raw['runs'])}.",
        f"Timed: the scoring action only (scored Parquet written); the model loads and traces each variant "
        f"does inside that action are included. Not timed: session start, starting the {len(raw['warmed_workers'])} "
        f"Python workers and importing TensorFlow there (done once before all variants, with TensorFlow's "
        f"intra/inter-op threads fixed to {raw['worker_threads']} per worker, what `score` itself sets), "
        f"a warm-up round running every Spark variant once on 2 batches of {BATCH} images, one per worker (so the workers' one-time costs, e.g. "
        f"TensorFlow's first execution, fall on no variant in particular), and the floor's model load and trace.",
        f"Arrow batches: `spark.sql.execution.arrow.maxRecordsPerBatch` = {raw['arrow_batch']} for every pandas "
        f"variant and `score` (the Series UDF runs out of memory with the default 10,000 rows: 10,000 decoded "
        f"224x224 float images are 6 GB per worker). Floor: {raw['floor_threads']} intra-op and inter-op threads, "
        f"tf.data map parallelism {raw['floor_threads']}, batches of {BATCH}.",
        "Top-1 = floor: share of images whose top-1 class equals the floor's (random weights: a sanity check "
        "that the same model ran, not an accuracy; the Python variants resize with Pillow, not TensorFlow).",
    ]
    if score_row:
        ahead = all(score_row["images_per_second"] > x for x in others)
        # The timed runs reuse the model each worker loaded and traced in the warm-up round: 0 and 0.
        one = all(v == 0 for v in score_row["loads"] + score_row["traces"])
        lines += [
            "",
            f"Targets: score >= 0.95x floor (warm): {'met' if score_row['ratio_to_floor'] >= 0.95 else 'MISSED'} "
            f"({score_row['ratio_to_floor']:.2f}); ahead of every other variant: {'met' if ahead else 'MISSED'}; "
            f"no load and no trace in the timed runs (each worker loaded and traced once, in the warm-up "
            f"round): {'met' if one else 'MISSED'}.",
        ]
    text = "\n".join(lines) + "\n"
    (folder / "scoring.md").write_text(text)
    plot_scoring(rows, raw, folder / "scoring.png")
    return text


def plot_scoring(rows: list[dict[str, Any]], raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["images_per_second"])
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.4))
    colors = [
        "#2b7bba" if r["variant"] == "score" else "#7f7f7f" if r["variant"] == "floor" else "#d9a441" for r in rows
    ]
    bars = ax.barh([r["label"] for r in rows], [r["images_per_second"] for r in rows], color=colors)
    for bar, r in zip(bars, rows, strict=False):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {r['images_per_second']:.1f}  ({r['ratio_to_floor']:.2f}x)",
            va="center",
            fontsize=9,
        )
    ax.set_xlabel("images/s (higher is better)")
    ax.set_title(f"Scoring {raw['images']} JPEGs, MobileNetV2 224, 2 cores (local[2])", fontsize=10)
    ax.set_xlim(0, max(r["images_per_second"] for r in rows) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- part 2: training input ----------------------------------------------------------------------


def child_training(cfg: dict[str, Any]) -> dict[str, Any]:
    configure_tf(FLOOR_THREADS)
    import tensorflow as tf

    try:
        from image_transfer.training import feed
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"image_transfer.feed does not import: {type(exc).__name__}: {exc}"}
    from image_transfer.training.train import build_backbone, build_classifier

    files = cfg["files"]
    local = read_local(files, ["content", "label_index"])
    n = len(local["content"])
    spark = spark_session("bench training")
    df = spark.read.parquet(*files).select("content", "label_index")
    batch = 32  # TrainConfig's default
    backbone, preprocess, size = build_backbone("mobilenet_v2", weights="none", image_size=SIZE)
    model = build_classifier(backbone, preprocess, classes=CLASSES, size=size, dropout=0.2)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")

    raw_memory = tf.data.Dataset.from_tensor_slices(
        {"content": tf.constant(local["content"]), "label_index": tf.constant(local["label_index"], tf.int32)}
    ).batch(64)

    def memory_dataset(training: bool) -> Any:
        return feed.image_pipeline(raw_memory, batch_size=batch, image_size=(size, size), training=training, seed=0)

    for x, y in memory_dataset(True).take(1):  # trace the train step, not timed
        model.train_on_batch(x, y)

    def input_pass(ds: Any) -> tuple[float, int]:
        iterator = iter(ds)
        t0 = time.perf_counter()
        count = 0
        for x, _ in iterator:
            count += int(x.shape[0])
        seconds = time.perf_counter() - t0
        del iterator
        return seconds, count

    def train_pass(ds: Any) -> tuple[float, int]:
        iterator = iter(ds)
        t0 = time.perf_counter()
        count = 0
        for x, y in iterator:
            model.train_on_batch(x, y)  # returns the loss as a Python float: synchronous
            count += int(x.shape[0])
        seconds = time.perf_counter() - t0
        del iterator
        return seconds, count

    feeds: dict[str, Any] = {}
    stack = __import__("contextlib").ExitStack()
    out: dict[str, Any] = {"images": n, "batch_size": batch, "paths": {}, "skipped_paths": {}}
    for path in ("petastorm", "arrow"):
        t0 = time.perf_counter()
        try:
            feeds[path] = stack.enter_context(
                feed.open_feed(df, path=path, cache_dir=str(CACHE), columns=("content", "label_index"))
            )
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            out["skipped_paths"][path] = f"{type(exc).__name__}: {exc}"
            print(f"[training] {path} skipped: {exc}", flush=True)
            continue
        out["paths"][path] = {"open_seconds": time.perf_counter() - t0, "rows": feeds[path].rows}
    out["paths"]["floor"] = {"open_seconds": 0.0, "rows": n}

    def dataset(path: str, training: bool) -> Any:
        if path == "floor":
            return __import__("contextlib").nullcontext(memory_dataset(training))
        return feeds[path].make_tf_dataset(batch_size=batch, image_size=(size, size), training=training, num_epochs=1)

    names = ["floor", *feeds]
    with stack:
        for kind, reps in (("input", cfg["repeats"]), ("train", cfg["train_repeats"])):
            for r in range(reps):
                for path in names[r % len(names) :] + names[: r % len(names)]:
                    with dataset(path, True) as ds:
                        seconds, count = (input_pass if kind == "input" else train_pass)(ds)
                    out["paths"][path].setdefault(kind, []).append({"seconds": seconds, "images": count})
                    print(
                        f"[training] {kind:5s} {path:9s} {count} images {seconds:6.1f}s "
                        f"{count / seconds:7.1f} img/s (load {load_average()})",
                        flush=True,
                    )
    return out


def render_training(raw: dict[str, Any], folder: Path) -> str:
    if raw.get("skipped"):
        text = f"Part 2 skipped: {raw['skipped']}\n"
        (folder / "training_input.md").write_text(text)
        return text

    def ips(path: str, kind: str) -> float | None:
        runs = raw["paths"].get(path, {}).get(kind)
        if not runs:
            return None
        return statistics.median(r["images"] / r["seconds"] for r in runs)

    lines = [
        f"Training input over {raw['images']} JPEGs (320x240 -> 224x224, augmentation on, batches of "
        f"{raw['batch_size']}); {raw.get('machine', '')}",
        "",
        "| data path | materialise (s) | input only: images/s | x floor | training epoch: images/s | x floor | runs (input/train) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    floor_in, floor_tr = ips("floor", "input"), ips("floor", "train")
    labels = {"floor": "floor: tf.data over bytes in memory", "petastorm": "Petastorm", "arrow": "Arrow-native"}
    for path in ("floor", "petastorm", "arrow"):
        if path not in raw["paths"]:
            lines.append(f"| {labels[path]} | skipped: {raw['skipped_paths'].get(path, '?')} | | | | | |")
            continue
        p = raw["paths"][path]
        i, t = ips(path, "input"), ips(path, "train")
        lines.append(
            f"| {labels[path]} | {p['open_seconds']:.1f} | {i:.1f} | {i / floor_in:.2f} | "
            f"{t:.1f} | {t / floor_tr:.2f} | {len(p.get('input', []))}/{len(p.get('train', []))} |"
        )
    lines += [
        "",
        "All three run the same `image_transfer.feed.image_pipeline` (shuffle, decode+resize, augmentation, "
        "batch) in one process with 2 intra/inter-op threads; only the source of the encoded rows differs. "
        "Input only: the pipeline drained with no model. Training epoch: `train_on_batch` of the project's "
        "classifier (frozen MobileNetV2, random weights, + softmax head over 10 classes), traced before timing. "
        "Materialise: `open_feed` writing the DataFrame to the Parquet cache (not in the images/s). "
        "Median of the runs; target: both paths >= 0.8x the floor (training).",
    ]
    text = "\n".join(lines) + "\n"
    (folder / "training_input.md").write_text(text)
    return text


# ---- part 3: scaling -----------------------------------------------------------------------------


def child_scaling(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    from pyspark.sql import functions as F

    from image_transfer import score_images, scoring_run
    from image_transfer.jobs.outputs import write_output
    from image_transfer.scoring.options import prepare_model

    spark = spark_session("bench scaling")
    spark.range(1).count()
    session_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepare_model(cfg["model"], mode="classify", top_k=5)
    check_seconds = time.perf_counter() - t0

    out_root = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=CACHE))
    t0 = time.perf_counter()
    warm = score_images(spark.read.parquet(cfg["files"][0]).limit(8).repartition(2), cfg["model"], batch_size=BATCH)
    with scoring_run(warm) as warm_run:
        write_output(warm, str(out_root / "warm")).count()
    warm_seconds = time.perf_counter() - t0
    after_warm = warm_run.workers()

    df = spark.read.parquet(*cfg["files"]).select("path", "content")
    partitions = df.rdd.getNumPartitions()
    load = load_average()
    scored = score_images(df, cfg["model"], batch_size=BATCH)  # the workers' cached model: no load, no trace
    t0 = time.perf_counter()
    with scoring_run(scored) as run:
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


def render_scaling(raw: dict[str, Any], folder: Path) -> str:
    runs = raw["runs"]
    lines = [
        f"`score` on growing inputs, one fresh local[2] session per size, {raw['per_file']} images per "
        f"partition; {raw.get('machine', '')}",
        "",
        "| images | partitions | session start (s) | model check on driver (s) | warm-up: workers, TF, load, trace (s) | scoring (s) | images/s | ms/image | driver Python peak (MB) | driver JVM peak (MB) | worker peak (MB) | loads / traces per worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in runs:
        w = r["workers"]
        lines.append(
            f"| {r['images']} | {r['partitions']} | {r['session_seconds']:.1f} | {r['model_check_seconds']:.1f} | "
            f"{r['warmup_seconds']:.1f} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.1f} | "
            f"{1000 * r['seconds'] / r['images']:.1f} | {r['driver_python_peak_mb']} | {r['driver_jvm_peak_mb']} | "
            f"{', '.join(str(c.get('peak_rss_mb', '?')) for c in w.values())} | "
            f"{', '.join(str(c.get('model_loads', 0)) for c in r['workers_after_warmup'].values())} / "
            f"{', '.join(str(c.get('traces', 0)) for c in r['workers_after_warmup'].values())} (warm-up), "
            f"{', '.join(str(c.get('model_loads', 0)) for c in w.values())} / "
            f"{', '.join(str(c.get('traces', 0)) for c in w.values())} (run) |"
        )
    xs = [r["images"] for r in runs]
    ys = [r["seconds"] for r in runs]
    if len(runs) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=False)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
        resid = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys, strict=False))
        raw["fit"] = {"ms_per_image": 1000 * slope, "intercept_seconds": intercept, "max_relative_residual": resid}
        lines += [
            "",
            f"Least-squares fit of scoring time: {1000 * slope:.1f} ms/image ({1 / slope:.1f} images/s) + "
            f"{intercept:.1f} s; largest deviation from the line {resid:.0%}.",
        ]
    lines += [
        "",
        "Start-up is measured separately from the scoring: session start (JVM), the driver's model check "
        "(`prepare_model`), and a warm-up scoring of 8 images with the same UDF, which starts both Python "
        "workers, imports TensorFlow there, loads the model from the broadcast and traces it. The timed run "
        "is a second `score_images` call: each worker finds the traced model in its cache (keyed by the "
        "model's digest), so it shows 0 loads and 0 traces, and the scoring column is the steady-state cost "
        "(a cold CLI run pays one load + trace per worker inside its action; see Part 4). "
        "Memory: driver Python `ru_maxrss`, driver JVM `VmHWM` (local mode: the JVM is also the executor), "
        "each worker's `ru_maxrss` from score's own per-worker stats. The input is read from Parquet, not "
        "cached, and nothing is collected to the driver.",
    ]
    text = "\n".join(lines) + "\n"
    (folder / "scaling.md").write_text(text)
    return text


# ---- part 4: input layout, cold and warm --------------------------------------------------------


def one_file(files: list[str], name: str) -> str:
    """The images of ``files`` in a single Parquet file with one row group (cannot be split at read time)."""
    import pyarrow.parquet as pq

    path = CACHE / f"{name}.parquet"
    if not path.exists():
        table = pq.ParquetDataset(files).read()
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=table.num_rows)
        tmp.rename(path)
    return str(path)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root``'s descendants: the JVM(s) and the Python workers, by kind."""
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(")", 1)
            pid = int(stat.parent.name)
            children.setdefault(int(rest.split()[1]), []).append(pid)
            comm[pid] = head.split("(", 1)[1]
        except (OSError, IndexError, ValueError):
            continue
    out = {"jvm": 0.0, "python_workers": 0.0}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            kind = (
                "jvm"
                if comm.get(pid) == "java"
                else "python_workers"
                if comm.get(pid, "").startswith("python")
                else None
            )
            if kind:
                out[kind] += proc_cpu_seconds(pid)
        except OSError:
            continue
    return out


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


def cold_floor(file: str, shards: int = 2) -> dict[str, Any]:
    """Fresh plain processes (no Spark), one per core, each scoring its share: wall time of them all."""
    out_root = Path(tempfile.mkdtemp(prefix="bench-cold-floor-", dir=CACHE))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
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
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    "floor_worker",
                    "--config",
                    json.dumps(cfg),
                    "--child-out",
                    str(out_root / f"{k}.json"),
                ],
                env=env,
            )
        )
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("a cold floor process failed")
    seconds = time.perf_counter() - t0
    rows = sum(json.loads((out_root / f"{k}.json").read_text())["rows"] for k in range(shards))
    shutil.rmtree(out_root, ignore_errors=True)
    return {"seconds": seconds, "rows": rows}


def jvm_archive() -> Path | None:
    """The class archive a local CLI session of this setup maps (``image_transfer.jvmcache``), or None."""
    from image_transfer import jvmcache
    from image_transfer.jobs import cli

    return jvmcache.plan(cli.LOCAL_JVM_OPTIONS, {"spark.driver.memory": cli.driver_memory()}).archive


def prime_jvm_archive(file: str, images: int, timeout: float = 180.0) -> bool:
    """Make sure the cold runs find the JVM's class archive, as every run after a machine's first does.

    When there is none, one cold run (not reported) writes it as its JVM exits; this waits for that.
    """
    if jvm_archive() is not None:
        return True
    cold_score([file], images)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jvm_archive() is not None:
            time.sleep(2)  # the JVM closes the file and exits
            return True
        time.sleep(1)
    return False


def cold_score(file_or_dir: list[str], images: int, *, archive: bool = True) -> dict[str, Any]:
    """``image-transfer score`` as a scheduled job runs it: a fresh process, session and Python workers.

    ``archive=False`` runs it without the JVM's class archive, as the first run on a machine does.
    """
    out_root = Path(tempfile.mkdtemp(prefix="bench-cold-score-", dir=CACHE))
    summary = out_root / "summary.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore", PYSPARK_PYTHON=sys.executable)
    if not archive:
        env["IMAGE_TRANSFER_JVM_CACHE"] = "off"
    inputs = file_or_dir[0] if len(file_or_dir) == 1 else str(Path(file_or_dir[0]).parent)
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
    return {"seconds": seconds, "action_seconds": data["seconds"], "workers": data["workers"], "jvm_archive": archive}


def child_warm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm: in one session, score once (workers start, load, trace), then time a second scoring and the floor."""
    configure_tf(FLOOR_THREADS)
    import tensorflow as tf

    from image_transfer import score_images, scoring_run
    from image_transfer.imaging.graph import decode_resize
    from image_transfer.imaging.screen import ImageLimits, screen_batch
    from image_transfer.jobs.outputs import write_output
    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import load_keras, preprocess_fn

    spark = spark_session("bench warm")
    out_root = Path(tempfile.mkdtemp(prefix="bench-warm-", dir=CACHE))
    df = spark.read.parquet(*cfg["files"]).select("path", "content")
    read_partitions = df.rdd.getNumPartitions()
    first = score_images(df, cfg["model"], batch_size=BATCH)
    with scoring_run(first) as run:
        write_output(first, str(out_root / "first"))
    cold_in_session = run.workers()
    runs = []
    for k in range(cfg["repeats"]):
        scored = score_images(df, cfg["model"], batch_size=BATCH)
        cpu0 = process_tree_cpu(os.getpid())
        t0 = time.perf_counter()
        with scoring_run(scored) as run:
            write_output(scored, str(out_root / f"run{k}"))
        seconds = time.perf_counter() - t0
        cpu1 = process_tree_cpu(os.getpid())
        runs.append({"seconds": seconds, "workers": run.workers(), "cpu": {c: cpu1[c] - cpu0[c] for c in cpu0}})
    # Larger Arrow batches than model batches (fewer JVM <-> Python round trips): predict_batch_udf then
    # splits each Arrow batch into model calls of BATCH images.
    from image_transfer.scoring.options import ARROW_BATCH_CONF

    big_arrow = []
    for k in range(cfg["repeats"]):
        scored = score_images(df, cfg["model"], batch_size=BATCH)
        spark.conf.set(ARROW_BATCH_CONF, str(4 * BATCH))  # after the call, which sets it to BATCH
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


def run_layout(images_list: list[int], per_file_8: dict[int, list[str]], repeats: int) -> dict[str, Any]:
    results = []
    smallest = min(images_list)
    primed = prime_jvm_archive(one_file(per_file_8[smallest], f"one-file-{smallest}"), smallest)
    print(f"[layout] JVM class archive: {jvm_archive() if primed else 'none'}", flush=True)
    for n in images_list:
        files8 = per_file_8[n]
        single = one_file(files8, f"one-file-{n}")
        floors = [cold_floor(single) for _ in range(repeats)]
        floor = dict(floors[0], seconds=statistics.median(f["seconds"] for f in floors), runs=floors)
        print(f"[layout] cold floor {n}: {[round(f['seconds'], 1) for f in floors]}", flush=True)
        for layout, files in (("1 file", [single]), ("8 files", files8)):
            # A cold run's time swings by several seconds on a shared VM: the median of `repeats`, and
            # at the largest size runs without the class archive interleaved with those with it.
            runs, plain = [], []
            for _ in range(repeats):
                runs.append(cold_score(files, n, archive=primed))
                if primed and n == max(images_list):
                    plain.append(cold_score(files, n, archive=False))
            cold = dict(runs[0], seconds=statistics.median(r["seconds"] for r in runs), runs=runs)
            print(f"[layout] cold score {layout} {n}: {[round(r['seconds'], 1) for r in runs]}", flush=True)
            if plain:
                cold["without_archive"] = {"seconds": statistics.median(r["seconds"] for r in plain), "runs": plain}
                print(f"[layout] cold score {layout} {n}, no archive: {[round(r['seconds'], 1) for r in plain]}")
            warm = run_child("warm", {"files": files, "model": str(MODEL_PATH), "repeats": repeats})
            print(
                f"[layout] warm {layout} {n}: {[r['seconds'] for r in warm['runs']]} floor {warm['floor_seconds']}",
                flush=True,
            )
            results.append({"images": n, "layout": layout, "cold": cold, "cold_floor": floor, "warm": warm})
    return {"results": results}


def render_layout(raw: dict[str, Any], folder: Path) -> str:
    lines = [
        f"`score` on one Parquet file (one row group: it cannot be split when read) and on 8 files, cold and "
        f"warm, against floors measured the same way; {raw.get('machine', '')}",
        "",
        "| images | input | cold: whole command (s, median) | cold img/s | cold floor img/s | cold x floor | warm img/s | "
        "warm floor img/s | warm x floor | decode+model limit img/s | rows per worker (warm) | loads / traces per worker (cold; warm) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in raw["results"]:
        n, w = r["images"], r["warm"]
        cold_ips = n / r["cold"]["seconds"]
        floor_ips = n / r["cold_floor"]["seconds"]
        warm_s = statistics.median(x["seconds"] for x in w["runs"])
        warm_floor_s = statistics.median(w["floor_seconds"])
        limit = 1 / (1 / w["decode_alone_ips"] + 1 / w["model_alone_ips"])
        last = w["runs"][-1]["workers"]
        cold_w = r["cold"]["workers"]
        r["ratios"] = {"cold": cold_ips / floor_ips, "warm": (n / warm_s) / (n / warm_floor_s)}
        lines.append(
            f"| {n} | {r['layout']} | {r['cold']['seconds']:.1f} | {cold_ips:.1f} | {floor_ips:.1f} | "
            f"{r['ratios']['cold']:.2f} | {n / warm_s:.1f} | {n / warm_floor_s:.1f} | {r['ratios']['warm']:.2f} | "
            f"{limit:.1f} | {', '.join(str(c.get('rows', 0)) for c in last.values())} | "
            f"{', '.join(str(c.get('model_loads', 0)) for c in cold_w.values())} / "
            f"{', '.join(str(c.get('traces', 0)) for c in cold_w.values())}; "
            f"{', '.join(str(c.get('model_loads', 0)) for c in last.values())} / "
            f"{', '.join(str(c.get('traces', 0)) for c in last.values())} |"
        )
    res = raw["results"]
    big = max(r["images"] for r in res)
    warm_ok = all(r["ratios"]["warm"] >= 0.95 for r in res)
    cold_ok = all(r["ratios"]["cold"] >= 0.85 for r in res if r["images"] == big)
    cold_by = {(r["images"], r["layout"]): r["cold"]["seconds"] for r in res}
    gap = max(abs(cold_by[(n, "1 file")] / cold_by[(n, "8 files")] - 1) for n in {r["images"] for r in res})
    loads_ok = all(
        all(
            c.get("model_loads") == 1 and c.get("traces") == 1
            for run in r["cold"].get("runs", [r["cold"]])
            for c in run["workers"].values()
        )
        and all(c.get("model_loads") == 0 and c.get("traces") == 0 for c in r["warm"]["runs"][-1]["workers"].values())
        for r in res
    )
    lines += [
        "",
        f"Targets: warm >= 0.95x the floor: {'met' if warm_ok else 'MISSED'}; cold at {big} images >= 0.85x the "
        f"cold floor: {'met' if cold_ok else 'MISSED'}; one file within noise of 8 files (cold): largest gap "
        f"{gap:.0%}; 1 load / 1 trace per worker cold and 0 / 0 warm: {'met' if loads_ok else 'MISSED'}.",
        "",
    ]
    plain = [r for r in res if "without_archive" in r["cold"]]
    if plain:
        lines += [
            "Cold runs map the JVM's class archive written by an earlier run (`image_transfer/jvmcache.py`); "
            "without it, as on a machine's first run: "
            + "; ".join(
                f"{r['images']} images, {r['layout']}: {r['cold']['without_archive']['seconds']:.1f} s "
                f"({r['cold_floor']['seconds'] / r['cold']['without_archive']['seconds']:.2f}x the cold floor)"
                for r in plain
            )
            + ".",
            "",
        ]
    else:
        lines += ["Cold runs had no JVM class archive (`image_transfer/jvmcache.py`).", ""]
    lines += [
        "Where the warm time goes (median run), and Arrow batches of 4x the model batch:",
        "",
        "| images | input | JVM CPU s | Python workers CPU s | wall s | screening ms/image (one core) | "
        "warm img/s, Arrow batch = model batch | warm img/s, Arrow batch = 4x |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in raw["results"]:
        w = r["warm"]
        run = sorted(w["runs"], key=lambda x: x["seconds"])[len(w["runs"]) // 2]
        n = r["images"]
        lines.append(
            f"| {n} | {r['layout']} | {run['cpu']['jvm']:.1f} | {run['cpu']['python_workers']:.1f} | "
            f"{run['seconds']:.1f} | {w['screen_ms_per_image']:.2f} | "
            f"{n / statistics.median(x['seconds'] for x in w['runs']):.1f} | "
            f"{n / statistics.median(w['arrow_4x_seconds']):.1f} |"
        )
    lines += [
        "",
        "Cold (the median of the runs, each listed in layout.json): the whole `image-transfer score` command "
        "in a fresh process (JVM start, session, Python workers "
        "importing TensorFlow, model check, load and trace, scoring, atomic write, summary), against the cold "
        "floor (median as well): two fresh plain Python processes (no Spark), one per core, each importing TensorFlow, loading the "
        "model, decoding and scoring half the images in one traced graph and writing Parquet. Warm: the same "
        "session scores once, then each timed run is a new `score_images` call whose workers find the model "
        "loaded and traced (0 loads, 0 traces), against the in-process floor of Part 1. The limit: images/s of "
        "decoding alone and of the model alone, each on both cores, combined (1 / (1/decode + 1/model)).",
    ]
    text = "\n".join(lines) + "\n"
    (folder / "layout.md").write_text(text)
    return text


# ---- orchestration -------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}"


def run_child(part: str, cfg: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", dir=CACHE, delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    try:
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                part,
                "--config",
                json.dumps(cfg),
                "--child-out",
                str(out),
            ],
            check=True,
            env=env,
        )
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def update_readme(sections: dict[str, str]) -> None:
    readme = HERE / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    for name, body in sections.items():
        start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{start}\n{body}{end}{tail}"
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="images for parts 1 and 2 (default 1024; --quick 128)")
    p.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run")
    p.add_argument("--layout-images", default=None, help="image counts for part 4 (default 1024,4096; --quick 128)")
    p.add_argument("--quick", action="store_true", help="small and single runs, results to results/quick/")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the part 1/2 input (default 8: 4 per core)")
    p.add_argument("--repeats", type=int, default=None, help="runs of the cheap variants (default 3; --quick 1)")
    p.add_argument(
        "--scaling", default=None, help="image counts for part 3 (default: images x 1,4,16; --quick x 1,2,4)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        sys.path.insert(0, str(HERE))
        cfg = json.loads(args.config)
        if args.child == "prepare":
            make_model()
            result: dict[str, Any] = {}
        else:
            handler = {
                "scoring": child_scoring,
                "training": child_training,
                "scaling": child_scaling,
                "warm": child_warm,
                "floor_worker": child_floor_worker,
            }[args.child]
            result = handler(cfg)
        Path(args.child_out).write_text(json.dumps(result, indent=1))
        return 0

    images = args.images or (128 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    per_file = max(1, images // args.partitions)  # one Parquet file per partition
    if images % per_file:
        p.error(f"--images must be a multiple of --partitions ({args.partitions}), got {images}")
    factors = (1, 2, 4) if args.quick else (1, 4, 16)
    sizes = [int(s) for s in args.scaling.split(",")] if args.scaling else [images * f for f in factors]
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    folder = HERE / "results" / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    files = data_files(per_file, images // per_file)
    if 3 in parts:
        data_files(per_file, math.ceil(max(sizes) / per_file))
    if not MODEL_PATH.exists():
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                "prepare",
                "--config",
                "{}",
                "--child-out",
                os.devnull,
            ],
            check=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        # (the prepare child writes the model; its JSON output is discarded)
    print(f"data and model ready in {time.perf_counter() - t0:.0f}s ({CACHE})", flush=True)

    where = machine()
    sections: dict[str, str] = {}
    if 1 in parts:
        raw = run_child("scoring", {"files": files, "model": str(MODEL_PATH), "repeats": repeats})
        raw["machine"] = where
        sections["scoring"] = render_scoring(raw, folder)
        (folder / "scoring.json").write_text(json.dumps(raw, indent=1))
        print(sections["scoring"], flush=True)
    if 2 in parts:
        raw = run_child(
            "training",
            {"files": files, "model": str(MODEL_PATH), "repeats": repeats, "train_repeats": 1},
        )
        raw["machine"] = where
        sections["training_input"] = render_training(raw, folder)
        (folder / "training_input.json").write_text(json.dumps(raw, indent=1))
        print(sections["training_input"], flush=True)
    if 3 in parts:
        runs = []
        for n in sizes:
            if n % per_file:
                p.error(f"part 3 sizes must be multiples of {per_file}")
            cfg = {"files": data_files(per_file, n // per_file), "model": str(MODEL_PATH), "images": n}
            runs.append(run_child("scaling", cfg))
        raw = {"runs": runs, "per_file": per_file, "machine": where}
        sections["scaling"] = render_scaling(raw, folder)
        (folder / "scaling.json").write_text(json.dumps(raw, indent=1))
        print(sections["scaling"], flush=True)
    if 4 in parts:
        counts = [int(x) for x in (args.layout_images or ("128" if args.quick else "1024,4096")).split(",")]
        per8 = {n: data_files(n // 8, 8) for n in counts}
        raw = run_layout(counts, per8, repeats)
        raw["machine"] = where
        sections["layout"] = render_layout(raw, folder)
        (folder / "layout.json").write_text(json.dumps(raw, indent=1))
        print(sections["layout"], flush=True)
    if not args.quick:
        update_readme(sections)
    print(f"done in {time.perf_counter() - t0:.0f}s; results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
