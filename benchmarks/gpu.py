"""GPU benchmark: end-to-end scoring images/s per GPU against the model alone on the same GPU, with utilisation.

    uv run python benchmarks/gpu.py                                   # 1024 images, float32, this machine
    uv run python benchmarks/gpu.py --precision float32,float16 --jit --images 4096
    uv run python benchmarks/gpu.py --precision float32,float32+xla,bfloat16 --skip-spark --threads 1
    python benchmarks/gpu.py --model /Volumes/.../m.keras             # in a Databricks notebook's %sh, or a job

Three measurements per compute setting (precision x jit), each over the same synthetic JPEGs
(``data.py``'s generator, as ``bench.py``, MobileNetV2 224 with random weights unless ``--model``):

- model alone: the scoring function's model part (``TensorFlowEngine``'s ``infer``) over batches already decoded
  and resident on the device, in this process: the ceiling of what the GPU can do with the model.
- in-process: ``TensorFlowEngine.score`` on encoded batches (decode, preprocess, model, top-k), overlap off and on:
  what one Python worker can feed the GPU.
- end-to-end: ``image_transfer.score_images`` written to Parquet on Spark (``--master``, ``--conf``;
  on Databricks the cluster's session), divided by the GPUs used (``--gpus``, default: this machine's).

GPU utilisation (mean and peak of ``nvidia-smi``'s utilization.gpu, sampled every 0.2 s on this
machine) is reported for each timed phase; without ``nvidia-smi`` (a CPU machine) it is left out and
the same figures are CPU figures. Results are printed as a table and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Utilisation:
    """Samples ``nvidia-smi`` utilisation in a thread while a phase runs (no-op without nvidia-smi)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.available = shutil.which("nvidia-smi") is not None
        self.interval = interval
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                self.samples.append([float(v) for v in out.stdout.split()])
            self._stop.wait(self.interval)

    def __enter__(self) -> Utilisation:
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        per_gpu = list(zip(*self.samples, strict=False))
        return {
            "mean_percent": [round(statistics.mean(s), 1) for s in per_gpu],
            "peak_percent": [max(s) for s in per_gpu],
        }


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True)
    return len([line for line in out.stdout.splitlines() if line.strip()])


def synthetic_images(n: int) -> list[bytes]:
    from data import make_jpeg

    return [make_jpeg(i) for i in range(n)]


def default_model() -> str:
    from data import MODEL_PATH, make_model

    if not MODEL_PATH.exists():
        make_model()
    return str(MODEL_PATH)


def timed(fn: Any, repeats: int) -> tuple[float, dict[str, Any] | None]:
    """Best seconds of ``repeats`` runs of ``fn`` and the GPU utilisation over all of them."""
    best = float("inf")
    with Utilisation() as util:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
    return best, util.summary()


def in_process(model: str, contents: list[bytes], batch: int, precision: str, jit: bool, repeats: int) -> dict:
    """Model alone and Scorer.score (overlap off / on) in this process, for one compute setting."""
    import tensorflow as tf

    from image_transfer.imaging.screen import ImageLimits, screen_batch
    from image_transfer.scoring.engines import TensorFlowEngine as Scorer
    from image_transfer.scoring.options import Compute, prepare_model

    prepared = prepare_model(model, mode="classify", top_k=5)
    batches = [contents[i : i + batch] for i in range(0, len(contents), batch)]
    screened = [screen_batch(b, ImageLimits.default()) for b in batches]
    results: dict[str, Any] = {}
    for overlap in ("off", "on"):
        compute = Compute(precision=precision, jit=jit, overlap=overlap, batch_size=batch if jit else 0)
        scorer = Scorer(replace(prepared, compute=compute), model)
        if overlap == "off":  # the model alone: decoded, preprocessed batches already on the device
            if scorer.split:
                decoded = [scorer._decode(tf.constant(s.payloads), tf.constant(s.orientations)) for s in screened]
                size = scorer.fixed or batch
                chunks = [d[i : i + size] for d in decoded for i in range(0, len(d), size)]
                run_model = lambda sc=scorer, cs=chunks: [sc._run_model(c, len(c)) for c in cs]  # noqa: E731
            else:  # the single graph has no separate model function: trace one on the same model
                infer_scorer = Scorer(replace(prepared, compute=replace(compute, overlap="on")), model)
                decoded = [infer_scorer._decode(tf.constant(s.payloads), tf.constant(s.orientations)) for s in screened]
                run_model = lambda sc=infer_scorer, ds=decoded: [sc._run_model(d, len(d)) for d in ds]  # noqa: E731
            run_model()  # trace and compile outside the timing
            seconds, util = timed(run_model, repeats)
            results["model_alone"] = {"images_per_second": len(contents) / seconds, "gpu_utilisation": util}
        full = lambda sc=scorer: [sc.score(s.payloads, s.orientations) for s in screened]  # noqa: E731
        full()
        seconds, util = timed(full, repeats)
        results[f"in_process_overlap_{overlap}"] = {
            "images_per_second": len(contents) / seconds,
            "gpu_utilisation": util,
        }
    return results


def end_to_end(args: argparse.Namespace, model: str, contents: list[bytes], precision: str, jit: bool) -> dict:
    """score_images over the images on Spark, written to Parquet; one warm-up run on a few images first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from image_transfer import api
    from image_transfer.runtime import get_spark, parse_conf

    spark = get_spark("image-transfer gpu benchmark", master=args.master, conf=parse_conf(args.conf))
    with tempfile.TemporaryDirectory(prefix="image-transfer-gpu-bench-", dir=args.workdir) as tmp:
        data = Path(tmp) / "images.parquet"
        data.mkdir()
        per_file = max(1, len(contents) // args.partitions)
        for k in range(0, len(contents), per_file):
            part = contents[k : k + per_file]
            table = pa.table({"path": [f"img/{k + i:06d}.jpg" for i in range(len(part))], "content": part})
            pq.write_table(table, data / f"part-{k:06d}.parquet")
        source = spark.read.parquet(str(data))
        options = dict(batch_size=args.batch_size, precision=precision, jit=jit, overlap=args.overlap)
        # Warm-up: starts the Python workers, imports TensorFlow, loads and traces (not timed).
        warm = api.score_images(source.limit(args.batch_size), model, **options)
        with api.scoring_run(warm).settings():
            warm.write.mode("overwrite").parquet(str(Path(tmp) / "warm"))
        scored = api.score_images(source, model, **options)
        started = time.perf_counter()
        with Utilisation() as util, api.scoring_run(scored).settings():
            scored.write.mode("overwrite").parquet(str(Path(tmp) / "out"))
        seconds = time.perf_counter() - started
        workers = api.scoring_run(scored).workers()
    gpus = args.gpus if args.gpus is not None else gpu_count()
    ips = len(contents) / seconds
    return {
        "images_per_second": ips,
        "images_per_second_per_gpu": ips / gpus if gpus else None,
        "gpus": gpus,
        "gpu_utilisation": util.summary(),
        "workers": {
            w: {k: v for k, v in c.items() if k in ("rows", "gpu", "gpu_assigned")} for w, c in workers.items()
        },
    }


def render(results: dict[str, Any]) -> str:
    rows = [
        "| precision | jit | model alone (img/s) | in-process, overlap off | in-process, overlap on | end-to-end (img/s) | per GPU | GPU util (mean %) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in results["settings"].items():
        precision, jit = key.split("/")
        e2e = r.get("end_to_end") or {}
        util = (e2e.get("gpu_utilisation") or {}).get("mean_percent")
        per_gpu = e2e.get("images_per_second_per_gpu")
        ips = e2e.get("images_per_second")
        rows.append(
            f"| {precision} | {jit} | {r['model_alone']['images_per_second']:.1f} "
            f"| {r['in_process_overlap_off']['images_per_second']:.1f} "
            f"| {r['in_process_overlap_on']['images_per_second']:.1f} "
            f"| {'-' if ips is None else f'{ips:.1f}'} "
            f"| {'-' if per_gpu is None else f'{per_gpu:.1f}'} | {util if util else '-'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a .keras model (default: MobileNetV2 224, random weights, generated)")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--precision", default="float32", help="comma-separated: float32,float16,bfloat16; p+xla: only with XLA"
    )
    parser.add_argument("--jit", action="store_true", help="also measure each precision with XLA")
    parser.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="end-to-end overlap")
    parser.add_argument("--repeats", type=int, default=3, help="in-process runs per measurement (best counts)")
    parser.add_argument("--skip-spark", action="store_true", help="only the in-process measurements")
    parser.add_argument("--master", help="Spark master off Databricks (default local[*])")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="Spark setting")
    parser.add_argument("--partitions", type=int, default=8, help="input files (= partitions) end-to-end")
    parser.add_argument("--gpus", type=int, help="GPUs the end-to-end run uses (default: nvidia-smi here)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow threads in-process (0: TF's default)")
    parser.add_argument("--workdir", help="temp folder for the end-to-end input and output")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from image_transfer import devices as gpu
    from image_transfer.models.load import configure_threads

    if args.threads:
        configure_threads(args.threads)
    gpu.enable_memory_growth()
    model = args.model or default_model()
    contents = synthetic_images(args.images)
    results: dict[str, Any] = {"images": args.images, "batch_size": args.batch_size, "gpus_here": gpu_count()}
    results["settings"] = {}
    settings = []
    for entry in args.precision.split(","):  # "float16" or "float16+xla"
        precision, _, xla = entry.partition("+")
        settings += [(precision, True)] if xla else [(precision, False)] + ([(precision, True)] if args.jit else [])
    for precision, jit in settings:
        key = f"{precision}/{'xla' if jit else 'no'}"
        print(f"gpu benchmark: {key}", flush=True)
        r = in_process(model, contents, args.batch_size, precision, jit, args.repeats)
        if not args.skip_spark:
            r["end_to_end"] = end_to_end(args, model, contents, precision, jit)
        results["settings"][key] = r
        print(f"gpu benchmark: {key} " + json.dumps(r), flush=True)
    table = render(results)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
