"""LiteRT's interpreter: warm ``score --engine litert`` through ``ai_edge_litert`` against TensorFlow's ``tf.lite``.

Standalone (``uv run python benchmarks/parts/interpreters.py``). Before issue 33 the default environment
(TensorFlow 2.16) ran LiteRT through ``tf.lite.Interpreter``; now ``ai_edge_litert`` is a dependency of the
wheel and runs instead. Per model (MobileNetV2 224 on 2,048 images, ResNet50 224 on a quarter of them,
the engines benchmark's models), two processes, each with a ``local[2]`` session of its own, live at the
same time: one with ``ai_edge_litert`` hidden from itself and its Python workers (a package on
``PYTHONPATH`` that refuses to import: the engine falls back to ``tf.lite``), one as installed. Each scores
the same cached DataFrame once untimed (load, trace), then the timed rounds interleave (the order
alternates). The workers report which interpreter ran; the run fails if it is not the one intended.

Ratios are from one run on a shared machine. Writes ``benchmarks/results/interpreters.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "parts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from data import MODEL_PATH, data_files, make_model  # noqa: E402
from engines import RESNET_PATH, make_resnet  # noqa: E402

MODELS = {"MobileNetV2": (MODEL_PATH, 1), "ResNet50": (RESNET_PATH, 4)}  # path, image divisor
HIDDEN = "ai_edge_litert hidden by the interpreters benchmark: the engine falls back to tf.lite"


def child(label: str, images: int) -> None:
    """Score the model once per ``go`` line on stdin; print ``RATE img/s`` and, at ``end``, the interpreters."""
    from image_transfer import score_images, scoring_run
    from image_transfer.runtime import get_spark

    path, divisor = MODELS[label]
    count = images // divisor
    spark = get_spark("interpreters benchmark", master="local[2]")
    df = spark.read.parquet(data_files(count, 1)[0]).repartition(2).cache()
    df.count()
    out = Path(tempfile.mkdtemp(prefix="interpreters-bench-"))
    interpreters: set[str] = set()

    def score() -> float:
        scored = score_images(df, str(path), top_k=5, engine="litert")
        start = time.perf_counter()
        with scoring_run(scored) as run:
            scored.write.mode("overwrite").parquet(str(out / "scored"))
        rate = count / (time.perf_counter() - start)
        interpreters.update(str(w.get("interpreter")) for w in run.workers().values())
        return rate

    score()  # warm-up: load, trace (the conversion is in the driver's cache after the first process)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "go":
            print(f"RATE {score()}", flush=True)
        elif line.strip() == "end":
            break
    print("INTERPRETERS " + json.dumps(sorted(interpreters)), flush=True)
    spark.stop()


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise SystemExit(f"a benchmark process ended before {prefix.strip()}: exit {proc.wait()}")


def bench(label: str, images: int, rounds: int, shim: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", label, "--images", str(images)]
    envs = {
        "tf.lite": {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])),
        },
        "ai_edge_litert": dict(os.environ),
    }
    procs = {}
    for name, env in envs.items():  # one after the other: the second finds the conversion cached
        procs[name] = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _expect(procs[name], "READY")
    timed: dict[str, list[float]] = {name: [] for name in procs}
    names = list(procs)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            procs[name].stdin.write("go\n")  # type: ignore[union-attr]
            procs[name].stdin.flush()  # type: ignore[union-attr]
            timed[name].append(float(_expect(procs[name], "RATE ")))
    ran = {}
    for name, proc in procs.items():
        proc.stdin.write("end\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        ran[name] = json.loads(_expect(proc, "INTERPRETERS "))
        proc.wait()
    for name, seen in ran.items():
        if len(seen) != 1 or not seen[0].startswith(name):
            raise SystemExit(f"{label}: the {name} process's workers ran {seen}")
    rates = {name: statistics.median(v) for name, v in timed.items()}
    return {
        "images": images // MODELS[label][1],
        "rounds": rounds,
        "interpreters": {name: seen[0] for name, seen in ran.items()},
        "img_per_s": {name: round(v, 1) for name, v in rates.items()},
        "rounds_img_per_s": {name: [round(x, 1) for x in v] for name, v in timed.items()},
        "ai_edge_litert_vs_tf_lite": round(rates["ai_edge_litert"] / rates["tf.lite"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="MobileNetV2 images (ResNet50: a quarter)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images)
        return
    if not MODEL_PATH.exists():
        make_model()
    if not RESNET_PATH.exists():
        make_resnet()
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="hide-litert-") as shim:
        (Path(shim) / "ai_edge_litert").mkdir()
        (Path(shim) / "ai_edge_litert" / "__init__.py").write_text(f"raise ImportError({HIDDEN!r})\n")
        for label in args.models.split(","):
            results[label] = bench(label, args.images, args.rounds, Path(shim))
            results[label]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            print(label, json.dumps(results[label]), flush=True)
    results["load_after"] = os.getloadavg()
    target = HERE / "results" / "interpreters.json"
    target.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
