"""Score with a fault injected on a task's first attempt, on local[2,2] (each task may fail once).

    python tests/jobs/retry_scoring.py IMAGES_PARQUET MODEL OUTPUT MARKER_DIR

Run as a separate process by tests/test_crashes_and_retries.py: it needs its own SparkContext with task
retries, which the test session (local[2]) does not have. Prints the result as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(images: str, model: str, output: str, markers: str) -> int:
    from pyspark.sql import functions as F

    from image_transfer import score_images
    from image_transfer.runtime import get_spark
    from image_transfer.storage.outputs import write_output

    spark = get_spark("retry test", master="local[2,2]")

    def fail_first_attempt(path: str) -> str:
        # Defined here so that it is pickled by value: workers cannot import this script.
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if path.endswith("star_016.png") and ctx.attemptNumber() == 0:
            Path(markers, f"fault-{ctx.partitionId()}-{ctx.attemptNumber()}").touch()
            raise RuntimeError("injected fault on the first attempt")
        return path

    flaky = F.udf(fail_first_attempt, "string")
    scored = score_images(spark.read.parquet(images), model, batch_size=16, top_k=2, partitions=4)
    write_output(scored.withColumn("path", flaky("path")), output)
    written = spark.read.parquet(output)
    print(
        "RESULT "
        + json.dumps(
            {
                "rows_in": spark.read.parquet(images).count(),
                "rows_out": written.count(),
                "distinct_paths": written.select("path").distinct().count(),
                "failed": written.where("error is not null").count(),
            }
        )
    )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
