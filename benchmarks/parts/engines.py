"""Engines: ``score`` on TensorFlow and on LiteRT (XNNPACK), against plain ``predict_batch_udf`` and a floor.

Standalone (``uv run python benchmarks/parts/engines.py``). Per model (MobileNetV2 224 on 2,048
images, ResNet50 224 on a quarter of them: random weights, BatchNorm statistics from data), each in a
process and ``local[2]`` session of its own (so no Python worker holds two models):

- warm (each variant run once untimed first, then timed rounds interleaved):
  - ``floor``: no Spark, 2 plain processes, each half of the images: the TF decode graph then the
    XNNPACK interpreter with 1 thread (the fastest engine) on chunks of 8 (its fastest call size
    here, as ``score``'s), timed after their warm-up;
  - ``score (tensorflow)`` and ``score (litert)``: ``score_images(..., engine=...)``, written to Parquet.
    A warm job of 2,048 images: each job also pays a fixed ~0.7 s here (planning, task launch, the
    Parquet commit), a fifth of a 512-image job's wall time and a sixteenth of this one's;
  - ``predict_batch_udf``: plain ``predict_batch_udf`` with a simple ``make_predict_fn`` (Keras model,
    ``tf.io.decode_jpeg`` + resize per image, ``model(batch)``): the anchor this project builds on. In
    a process and session of its own, after the others (its eager ResNet50 worker peaks at ~10 GB on
    batches of 64, more than two fit in this machine's memory: for ResNet50, 256 images in batches of 16);
- cold (``--cold-images``, default 4,096, one Parquet file): the whole ``python -m image_transfer score
  --engine E`` command per engine in a fresh process (fresh session, Python workers), against a cold
  floor (2 fresh plain processes: imports, interpreter, decode + model over half the images each);
  the converted model is already in the driver's cache (it converts once per network), as the
  floor's is. The peak worker memory per engine comes from these fresh workers.

Ratios are from one run on a shared machine. Writes ``benchmarks/results/engines.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from data import CACHE, MODEL_PATH, data_files, make_jpeg, make_model  # noqa: E402

BATCH = 64
RESNET_PATH = CACHE / "resnet50-224.keras"


def make_resnet(path: Path = RESNET_PATH) -> None:
    """ResNet50 224, random weights, BatchNorm statistics from calibration images (one pass, momentum 0)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize
    from image_transfer.models.artifact import save_model
    from image_transfer.models.load import preprocess_fn

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=1000)
    pixels = np.stack([decode_resize(tf.constant(make_jpeg(10_000_000 + i)), 224, 224).numpy() for i in range(32)])
    norms = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(preprocess_fn("caffe")(tf.constant(pixels)), training=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, class_names=None, preprocess="caffe")


def _floor_worker(args: tuple[str, list[bytes], str, Any]) -> None:
    model_path, images, flat_path, queue = args
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from image_transfer.imaging.graph import decode_batch
    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import preprocess_fn
    from image_transfer.scoring.engines.litert import LITE_CHUNK

    preprocess = preprocess_fn(read_metadata(model_path).get("preprocess", "none"))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode(encoded: Any) -> Any:
        return preprocess(decode_batch(encoded, 224, 224, tf.ones_like(tf.strings.length(encoded))))

    interpreter = tf.lite.Interpreter(model_path=flat_path, num_threads=1)
    index = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    sizes: set[int] = set()

    def run(batch: list[bytes]) -> None:
        images = decode(tf.constant(batch)).numpy()
        for lo in range(0, len(images), LITE_CHUNK):  # the interpreter's fastest call size here, as score's
            x = images[lo : lo + LITE_CHUNK]
            if len(x) not in sizes:
                interpreter.resize_tensor_input(index, [len(x), 224, 224, 3])
                interpreter.allocate_tensors()
                sizes.clear()
                sizes.add(len(x))
            interpreter.set_tensor(index, x)
            interpreter.invoke()
            np.argmax(interpreter.get_tensor(out), axis=1)

    run(images[:BATCH])  # warm-up
    queue.put("ready")
    start = time.perf_counter()
    for lo in range(0, len(images), BATCH):
        run(images[lo : lo + BATCH])
    queue.put(time.perf_counter() - start)


def floor(model_path: str, images: list[bytes], flat_path: str, *, cold: bool = False) -> float:
    """Images per second of 2 plain processes (TF decode, XNNPACK model, 1 thread each): timed after their
    warm-up, or ``cold``, from their start (imports, interpreter, warm-up batch included) to the last image."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    halves = [images[: len(images) // 2], images[len(images) // 2 :]]
    procs = [ctx.Process(target=_floor_worker, args=((model_path, h, flat_path, queue),)) for h in halves]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in range(4)]
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return len(images) / (wall if cold else max(r for r in results if r != "ready"))


def cold_score(model_path: Path, file: str, engine: str, images: int) -> dict[str, Any]:
    """``python -m image_transfer score --engine ENGINE`` as a scheduled job runs it: a fresh process."""
    import shutil
    import subprocess

    out_root = Path(tempfile.mkdtemp(prefix="bench-cold-engine-"))
    summary = out_root / "summary.json"
    command = [
        sys.executable, "-m", "image_transfer", "score", "--input", file, "--model", str(model_path),
        "--output", str(out_root / "out.parquet"), "--summary", str(summary), "--master", "local[2]",
        "--batch-size", str(BATCH), "--engine", engine, "--progress-interval", "600",
    ]  # fmt: skip
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    data = json.loads(summary.read_text())
    shutil.rmtree(out_root, ignore_errors=True)
    assert data["rows_out"] == images, data
    workers = data["workers"].values()
    return {
        "img_per_s": round(images / seconds, 1),
        "seconds": round(seconds, 1),
        "peak_rss_mb": max(w["peak_rss_mb"] for w in workers),
        "loads_traces": sorted((w["model_loads"], w["traces"]) for w in workers),
        "engine_used": data["compute"]["engine_used"],
    }


def plain_udf(df: Any, model_path: str, batch: int = BATCH) -> Any:
    """Plain ``predict_batch_udf`` with a simple ``make_predict_fn``, on batches of ``batch``."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import IntegerType

    def make_predict_fn() -> Any:
        import keras
        import numpy as np
        import tensorflow as tf

        from image_transfer.models.artifact import read_metadata
        from image_transfer.models.load import preprocess_fn

        model = keras.models.load_model(model_path, compile=False)
        preprocess = preprocess_fn(read_metadata(model_path).get("preprocess", "none"))

        def predict(contents: np.ndarray) -> np.ndarray:
            images = [tf.image.resize(tf.io.decode_jpeg(c, channels=3), (224, 224)) for c in contents]
            return np.argmax(model(preprocess(tf.stack(images)), training=False).numpy(), axis=1).astype(np.int32)

        return predict

    udf = predict_batch_udf(make_predict_fn, return_type=IntegerType(), batch_size=batch)
    return df.select("path", udf("content").alias("prediction"))


def plain_rates(
    model_path: Path, file: str, count: int, rounds: int, batch: int = BATCH
) -> tuple[float | None, int | None]:
    """(median warm images/s, peak worker RSS MB) of plain ``predict_batch_udf``, in a process and
    session of its own: its eager Keras model (about 10 GB per ResNet50 worker here) shares no worker
    with ours, and its workers end with that session."""
    import subprocess

    command = [sys.executable, __file__, "--plain", str(model_path), "--file", file, "--images", str(count)]
    command += ["--udf-batch", str(batch)]
    done = subprocess.run([*command, "--rounds", str(rounds)], capture_output=True, text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:  # recorded, not fatal: the other variants' figures stand (its worker can run out of memory)
        crashed = "Python worker exited unexpectedly" in done.stderr
        print(f"plain predict_batch_udf failed{' (a worker crashed)' if crashed else ''}", file=sys.stderr)
        return None, None
    data = json.loads(line[len("RESULT ") :])
    return statistics.median(data["rates"]), data["peak_rss_mb"]


def plain_child(model_path: str, file: str, count: int, rounds: int, batch: int = BATCH) -> dict[str, Any]:
    """One untimed pass, then ``rounds`` timed ones, with the Python workers' peak RSS sampled."""
    import threading

    import psutil

    from image_transfer.runtime import get_spark

    spark = get_spark("engines benchmark: plain predict_batch_udf", master="local[2]")
    df = spark.read.parquet(file).repartition(2).cache()
    df.count()
    me, peak, done = psutil.Process(), [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "python" in child.name():
                        peak[0] = max(peak[0], child.memory_info().rss)

    threading.Thread(target=watch, daemon=True).start()
    out_dir = Path(tempfile.mkdtemp(prefix="engines-bench-udf-"))
    rates = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        plain_udf(df, model_path, batch).write.mode("overwrite").parquet(str(out_dir / "udf"))
        if r:
            rates.append(count / (time.perf_counter() - start))
    done.set()
    spark.stop()
    return {"rates": rates, "peak_rss_mb": round(peak[0] / 2**20)}


def bench_model(
    spark: Any,
    label: str,
    model_path: Path,
    count: int,
    rounds: int,
    out_dir: Path,
    cold_images: int = 0,
    udf_images: int | None = None,
    udf_batch: int = BATCH,
) -> dict[str, Any]:
    """One model's warm figures: the floor, plain predict_batch_udf, score on both engines."""
    import pyarrow.parquet as pq

    from image_transfer import score_images, scoring_run
    from image_transfer.models.artifact import private_dir
    from image_transfer.scoring.engines.litert_convert import LITE_DIR, converted
    from image_transfer.scoring.options import prepare_model

    files = data_files(count, 1)  # one file of `count` images
    images = list(pq.read_table(files[0], columns=["content"]).column("content").to_pylist())
    df = spark.read.parquet(files[0]).repartition(2).cache()
    df.count()
    prepared = prepare_model(str(model_path), mode="classify", top_k=5)
    flat, _ = converted(prepared)
    flat_path = str(private_dir(LITE_DIR) / f"bench-{prepared.digest[:16]}.tflite")
    Path(flat_path).write_bytes(flat)

    def score(engine: str) -> tuple[float, dict[str, Any]]:
        scored = score_images(df, str(model_path), top_k=5, engine=engine)
        start = time.perf_counter()
        with scoring_run(scored) as run:
            scored.write.mode("overwrite").parquet(str(out_dir / f"score-{engine}"))
        return count / (time.perf_counter() - start), run.workers()

    variants = {
        "floor": lambda: floor(str(model_path), images, flat_path),
        "score (tensorflow)": lambda: score("tensorflow")[0],
        "score (litert)": lambda: score("litert")[0],
    }
    for fn in variants.values():  # warm-up: load, trace, convert
        fn()
    timed: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        names = list(variants)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timed[name].append(variants[name]())
    rates = {name: statistics.median(v) for name, v in timed.items()}
    _, lite_workers = score("litert")
    df.unpersist()
    udf_count = min(count, udf_images or count)
    udf_rate, udf_peak = plain_rates(model_path, data_files(udf_count, 1)[0], udf_count, rounds, udf_batch)
    if udf_rate is not None:
        rates["predict_batch_udf"] = udf_rate
    result = {
        "images": count,
        "predict_batch_udf_images": udf_count,
        "predict_batch_udf_batch": udf_batch,
        "img_per_s": {k: round(v, 1) for k, v in rates.items()},
        "litert_vs_tensorflow": round(rates["score (litert)"] / rates["score (tensorflow)"], 2),
        "litert_vs_floor": round(rates["score (litert)"] / rates["floor"], 2),
        "litert_vs_predict_batch_udf": round(rates["score (litert)"] / udf_rate, 2) if udf_rate else None,
        "tflite_mb": round(len(flat) / 2**20, 1),
        "predict_batch_udf_peak_rss_mb": udf_peak,
        "engines": sorted({w["engine"] for w in lite_workers.values()}),
    }
    if cold_images:
        cold_file = data_files(cold_images, 1)[0]
        cold_bytes = list(pq.read_table(cold_file, columns=["content"]).column("content").to_pylist())
        floor_rate = floor(str(model_path), cold_bytes, flat_path, cold=True)
        cold = {"images": cold_images, "floor_img_per_s": round(floor_rate, 1)}
        for engine in ("tensorflow", "litert"):
            cold[engine] = cold_score(model_path, cold_file, engine, cold_images)
        cold["litert_vs_floor"] = round(cold["litert"]["img_per_s"] / floor_rate, 2)
        cold["litert_vs_tensorflow"] = round(cold["litert"]["img_per_s"] / cold["tensorflow"]["img_per_s"], 2)
        result["cold"] = cold
        result["peak_rss_mb"] = {e: cold[e]["peak_rss_mb"] for e in ("tensorflow", "litert")}
    print(label, json.dumps(result), flush=True)
    return result


MODELS = {"MobileNetV2": (MODEL_PATH, 1), "ResNet50": (RESNET_PATH, 4)}  # path, image divisor
UDF_IMAGES = {"ResNet50": 256}  # plain predict_batch_udf's images and batch: its eager ResNet50 worker
UDF_BATCH = {"ResNet50": 16}  # peaks at ~10 GB on batches of 64 (two are more than this machine has)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="MobileNetV2 images (ResNet50: a quarter)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--cold-images", type=int, default=4096, help="one file, cold runs (ResNet50: a quarter); 0: none"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--keep", action="store_true", help="keep the other models' figures in engines.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one model, in this process
    parser.add_argument("--plain", help=argparse.SUPPRESS)  # plain predict_batch_udf of this model path
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--udf-batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        print(
            "RESULT " + json.dumps(plain_child(args.plain, args.file, args.images, args.rounds, args.udf_batch)),
            flush=True,
        )
        return
    if args.child:
        from image_transfer.runtime import get_spark

        path, divisor = MODELS[args.child]
        spark = get_spark("engines benchmark", master="local[2]")
        out_dir = Path(tempfile.mkdtemp(prefix="engines-bench-"))
        result = bench_model(
            spark,
            args.child,
            path,
            args.images // divisor,
            args.rounds,
            out_dir,
            args.cold_images // divisor,
            UDF_IMAGES.get(args.child),
            UDF_BATCH.get(args.child, BATCH),
        )
        spark.stop()
        print("RESULT " + json.dumps(result), flush=True)
        return
    import subprocess

    if not MODEL_PATH.exists():
        make_model()
    if not RESNET_PATH.exists():
        make_resnet()
    target = HERE / "results" / "engines.json"
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    if args.keep and target.exists():  # the other models' figures of an earlier run, kept as they were
        results.update({k: v for k, v in json.loads(target.read_text()).items() if k in MODELS})
    for label in args.models.split(","):
        command = [sys.executable, __file__, "--child", label, "--images", str(args.images)]
        command += ["--rounds", str(args.rounds), "--cold-images", str(args.cold_images)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{label}: the benchmark process failed\n{done.stderr[-3000:]}")
        results[label] = json.loads(line[len("RESULT ") :])
        results[label]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(label, json.dumps(results[label]), flush=True)
    results["load_after"] = os.getloadavg()
    target.write_text(json.dumps(results, indent=1) + "\n")
    from render import engines_chart

    engines_chart(results, target.with_suffix(".png"))
    print(f"wrote {target} and {target.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
