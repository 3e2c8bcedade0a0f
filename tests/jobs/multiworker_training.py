"""Train on the fixtures across two MultiWorkerMirroredStrategy workers on ``local-cluster[2,1,2048]``.

    python tests/jobs/multiworker_training.py WORKDIR

Run as a separate process by tests/test_train.py (a local-cluster session of its own). Three runs
from the same data, seed and epochs: one worker (the single-node path), two workers over loopback,
and two workers where task 1 exits after epoch 1 on its first attempt (the stage retries and resumes
from the backup). Prints ``RESULT {...}`` with each run's epochs, worker steps, accuracy and the
workers' weight digests.

Run by tests/test_train.py (both environments: Keras 3.3 and 3.10). ``MULTIWORKER_RUNS=two`` runs
one of the three.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path


def main(workdir: str) -> int:
    from image_transfer.session import get_spark
    from image_transfer.training import distributed
    from image_transfer.training.prepare import prepare
    from image_transfer.training.train import TrainConfig, train

    work = Path(workdir)
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    spark = get_spark(
        "multi-worker training test",
        master="local-cluster[2,1,2048]",
        conf={"spark.python.worker.reuse": "false", "spark.executor.memory": "1g"},
    )
    prepare(spark, str(fixtures / "images"), str(work / "data.parquet"))
    data = spark.read.parquet(str(work / "data.parquet"))
    config = TrainConfig(
        backbone=str(fixtures / "model" / "backbone.keras"),
        epochs=3,
        batch_size=8,
        learning_rate=1e-2,
        dropout=0.0,
        augment=False,
        patience=20,
        head_input="images",
        cache_dir=str(work),
    )
    results = {}
    reports: dict[str, list] = {}
    original = distributed.run_stage

    def recording(spark, workers, spec, main):
        out = original(spark, workers, spec, main)
        reports[spec["model_path"]] = out
        return out

    distributed.run_stage = recording
    runs = [
        ("one", config, None),
        ("two", replace(config, workers=2), None),
        ("killed", replace(config, workers=2), "1:1"),
    ]
    only = os.environ.get("MULTIWORKER_RUNS")
    for name, cfg, kill in [r for r in runs if not only or r[0] in only.split(",")]:
        if kill:
            os.environ[distributed.KILL_ENV] = kill
        result = train(data, cfg, output_model=str(work / f"{name}.keras"))
        os.environ.pop(distributed.KILL_ENV, None)
        stage = next(iter(reports.values()), []) if cfg.workers > 1 else []
        reports.clear()
        results[name] = {
            "workers": result.workers,
            "worker_steps": result.worker_steps,
            "epochs": [(e["epoch"], e.get("attempt", 0)) for e in result.epochs],
            "accuracy": result.final_validation_accuracy,
            "digests": [r["weights_sha256"] for r in stage],
            "metrics": json.loads(Path(result.metrics_path).read_text())["workers"],
        }
    spark.stop()
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
