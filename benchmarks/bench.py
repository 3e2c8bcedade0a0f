"""Benchmark: image scoring against the usual Spark approaches and the compute floor; training input; scaling; layout.

    uv run python benchmarks/bench.py [--quick] [--parts 1,4] [--repeats N] [--images 1024]

Data (deterministic 320x240 JPEGs) and the model (MobileNetV2 224x224, random weights, seed 0) are
generated once into ``benchmarks/.cache``. Each measurement runs in a child process of this script
(fresh Spark session, fresh memory high-water marks). Results go to ``benchmarks/results/`` (``--quick``:
``benchmarks/results/quick/``, which is not committed) as ``NAME.json`` and ``NAME.md``, and
``scoring.png``; nothing else is written. See ``benchmarks/README.md``.

Part 1 (scoring): the floor, the usual Spark UDFs and ``score_images`` on the same data, model and cores.
Part 2 (training input): ``image_transfer.training.feed`` over Petastorm and over Arrow against tf.data in memory.
Part 3 (scaling): ``score_images`` on 1x, 4x, 16x the images, start-up and peak memory apart.
Part 4 (input layout, cold and warm): one unsplittable file and 8 files; the whole CLI command in a
fresh process against a cold floor, and warm re-runs against the in-process floor.
Part 5 (frozen head): ``train``'s frozen phase from features against from images, same data and epochs
(``--parts 5``; not in the default set: at 1,024 images the images path takes long on two cores).

The modules: ``data.py`` (images and model), ``harness.py`` (child processes, session, floor, probes),
``variants.py`` (the usual UDFs, shipped to the workers), ``parts/`` (one module per part),
``render.py`` (tables and chart); this file is the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import data  # the modules beside this script: its folder is first on sys.path
import harness
import render

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
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
    return p, p.parse_args(argv)


def child(name: str, cfg: dict[str, Any], out: str) -> int:
    """In a child process: run one measurement and write its result as JSON."""
    if name == "prepare":
        data.make_model()
        result: dict[str, Any] = {}
    else:
        from parts import CHILDREN

        result = CHILDREN[name](cfg)
    Path(out).write_text(json.dumps(result, indent=1))
    return 0


def prepare_model() -> None:
    """The model, written by a child process (TensorFlow stays out of this one)."""
    if not data.MODEL_PATH.exists():
        subprocess.run(harness.child_command("prepare", {}, os.devnull), check=True, env=harness.child_env())


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.config), args.child_out)

    from parts import layout, scaling, scoring, training

    images = args.images or (128 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    per_file = max(1, images // args.partitions)  # one Parquet file per partition
    if images % per_file:
        p.error(f"--images must be a multiple of --partitions ({args.partitions}), got {images}")
    factors = (1, 2, 4) if args.quick else (1, 4, 16)
    sizes = [int(s) for s in args.scaling.split(",")] if args.scaling else [images * f for f in factors]
    counts = [int(x) for x in (args.layout_images or ("128" if args.quick else "1024,4096")).split(",")]
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    if unknown := parts - {1, 2, 3, 4, 5}:
        p.error(f"--parts: no part {', '.join(map(str, sorted(unknown)))} (parts are 1-5)")
    if 3 in parts and any(n % per_file for n in sizes):
        p.error(f"part 3 sizes must be multiples of {per_file}")
    if 4 in parts and any(n % 8 for n in counts):
        p.error("part 4 image counts must be multiples of 8")
    folder = HERE / "results" / ("quick" if args.quick else "")
    folder.mkdir(parents=True, exist_ok=True)
    data.CACHE.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    files = data.data_files(per_file, images // per_file)
    if 3 in parts:
        data.data_files(per_file, math.ceil(max(sizes) / per_file))
    prepare_model()
    print(f"data and model ready in {time.perf_counter() - t0:.0f}s ({data.CACHE})", flush=True)

    where = harness.machine()
    for number, name, measure in (
        (1, scoring.NAME, lambda: scoring.run(files, repeats)),
        (2, training.NAME, lambda: training.run(files, repeats)),
        (3, scaling.NAME, lambda: scaling.run(sizes, per_file)),
        (4, layout.NAME, lambda: layout.run(counts, repeats)),
        (5, training.HEAD_NAME, lambda: training.run_head(files)),
    ):
        if number in parts:
            raw = measure()
            raw["machine"] = where
            print(render.write(name, raw, folder), flush=True)
    print(f"done in {time.perf_counter() - t0:.0f}s; results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
