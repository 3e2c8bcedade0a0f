"""Score the fixtures on local-cluster Spark whose worker announces two fake GPUs, once per task GPU amount.

    python tests/jobs/gpu_scoring.py FIXTURES WORKDIR AMOUNT [AMOUNT ...]

Run as a separate process by tests/test_gpu.py: GPU resources are fixed when a SparkContext starts,
and only a standalone worker (``local-cluster``) runs a discovery script. Each amount gets a fresh
session on ``local-cluster[1,2,1024]`` (one executor, 2 cores, GPUs "0" and "1"). Prints one line
``RESULT {amount: {"rows": n, "workers": {...}, "tasks": [...]}}`` with the scoring run's per-worker
statistics and, from a plain job, the addresses Spark assigns to tasks.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path


def discovery_script(folder: Path) -> Path:
    script = folder / "gpus.sh"
    script.write_text('#!/usr/bin/env bash\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def task_addresses(_: object) -> list[list[str]]:
    from pyspark import TaskContext

    info = TaskContext.get().resources().get("gpu")
    return [sorted(info.addresses) if info else []]


def main(fixtures: str, workdir: str, *amounts: str) -> int:
    from image_transfer import api
    from image_transfer.runtime import get_spark
    from image_transfer.storage.outputs import write_output

    work = Path(workdir)
    script = discovery_script(work)
    results = {}
    for amount in amounts:
        conf = {
            "spark.worker.resource.gpu.amount": "2",
            "spark.worker.resource.gpu.discoveryScript": str(script),
            "spark.executor.resource.gpu.amount": "2",
            "spark.task.resource.gpu.amount": amount,
        }
        spark = get_spark(f"gpu test {amount}", master="local-cluster[1,2,1024]", conf=conf)
        tasks = spark.sparkContext.parallelize(range(4), 4).mapPartitions(task_addresses).collect()
        images = api.read_images(spark, str(Path(fixtures) / "images"))
        scored = api.score_images(images, str(Path(fixtures) / "model" / "shapes.keras"), batch_size=16, partitions=6)
        out = work / f"scored-{amount}.parquet"
        rows = write_output(scored, str(out)).count()
        results[amount] = {"rows": rows, "workers": api.scoring_run(scored).workers(), "tasks": tasks}
        spark.stop()
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
