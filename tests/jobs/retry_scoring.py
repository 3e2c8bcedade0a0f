"""Score with a fault injected on a task's first attempt, on local[2,2] (each task may fail once).

    python tests/jobs/retry_scoring.py IMAGES_PARQUET MODEL OUTPUT MARKER_DIR

Run as a separate process by tests/test_failures.py: it needs its own SparkContext with task
retries, which the test session (local[2]) does not have. Prints the result as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(images: str, model: str, output: str, markers: str) -> int:
    from pyspark.sql import functions as F

    from image_transfer import score
    from image_transfer.cli import _spark
    from image_transfer.io import write_output

    spark = _spark("retry test", "local[2,2]")

    def fail_first_attempt(path: str) -> str:
        # Defined here so that it is pickled by value: workers cannot import this script.
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if path.endswith("star_016.png") and ctx.attemptNumber() == 0:
            Path(markers, f"fault-{ctx.partitionId()}-{ctx.attemptNumber()}").touch()
            raise RuntimeError("injected fault on the first attempt")
        return path

    flaky = F.udf(fail_first_attempt, "string")
    request = score.ScoringRequest(model_path=model, batch_size=16)
    prepared = score.prepare_model(request, mode="classify", top_k=2)
    source = spark.read.parquet(images)
    result = score.run(
        spark,
        source,
        request,
        prepared,
        partitions=4,
        writer=lambda df: write_output(df.withColumn("path", flaky("path")), output),
    )
    written = spark.read.parquet(output)
    print(
        "RESULT "
        + json.dumps(
            {
                "rows_in": result.rows_in,
                "rows_out": written.count(),
                "distinct_paths": written.select("path").distinct().count(),
                "failed": result.rows_failed,
            }
        )
    )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
