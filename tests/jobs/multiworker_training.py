"""Train on the fixtures across two MultiWorkerMirroredStrategy workers on ``local-cluster[2,1,2048]``.

    python tests/jobs/multiworker_training.py WORKDIR

Run as a separate process by tests/test_train.py (a local-cluster session of its own). Four runs with
the defaults a user gets (dropout 0.2, augmentation, the head on cached features, then fine-tuning
its top layers at a tenth of the learning rate) from the same data, seed and epochs: one worker (the
single-node path); two workers through the CLI, with paths relative to the repo (the executors run
in other directories); two workers where task 1 exits after its first fine-tuning epoch on its first
attempt (a test callback shipped to the workers; the stage retries and resumes from the backup); and
two workers whose backbone file is gone when the stage starts (a user error: one line, no retries).
Prints ``RESULT {...}`` with each run's epochs, worker steps, accuracy and the workers' weight digests.

Run by tests/test_train.py (both environments: Keras 3.3 and 3.10). ``MULTIWORKER_RUNS=two`` runs
one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

MASTER = "local-cluster[2,1,2048]"


def kill_task_1_after_its_first_epoch(index: int, attempt: int) -> list:
    """Worker callbacks (``train(worker_callbacks=...)``): task 1 exits after its first epoch, first attempt only.
    Defined in ``__main__``, so it travels to the executors by value."""
    import keras

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if index == 1 and attempt == 0 and epoch == 0:
                os._exit(17)

    return [Kill()]


def main(workdir: str) -> int:
    import keras

    from image_transfer.errors import UserError
    from image_transfer.jobs import cli
    from image_transfer.runtime import get_spark
    from image_transfer.training import distributed
    from image_transfer.training.prepare import prepare
    from image_transfer.training.train import TrainConfig, train

    work = Path(workdir).resolve()
    repo = Path(__file__).resolve().parents[2]
    fixtures = repo / "fixtures"
    spark = get_spark(
        "multi-worker training test",
        master=MASTER,
        conf={"spark.python.worker.reuse": "false", "spark.executor.memory": "1g"},
    )
    prepare(spark, str(fixtures / "images"), str(work / "data.parquet"))
    data = spark.read.parquet(str(work / "data.parquet"))
    # What `train --epochs 2 --fine-tune-layers 50 --learning-rate 0.01 --batch-size 8` builds: the rest defaults.
    config = TrainConfig(
        backbone=str(fixtures / "model" / "backbone.keras"),
        epochs=2,
        fine_tune_layers=50,
        batch_size=8,
        learning_rate=1e-2,
        cache_dir=str(work),
    )
    results: dict[str, dict] = {}
    reports: dict[str, list] = {}
    original = distributed.run_stage

    def recording(spark, workers, spec, main, check=None):
        out = original(spark, workers, spec, main, check)
        reports[spec["model_path"]] = out
        return out

    distributed.run_stage = recording

    def record(name: str, metrics: dict) -> None:
        stage = next(iter(reports.values()), []) if metrics["workers"] > 1 else []
        reports.clear()
        results[name] = {
            "workers": metrics["workers"],
            "worker_steps": metrics["worker_steps"],
            "epochs": [(e["epoch"], e.get("attempt", 0)) for e in metrics["epochs"]],
            "phases": [e["phase"] for e in metrics["epochs"]],
            "accuracy": metrics["final_validation_accuracy"],
            "digests": [r["weights_sha256"] for r in stage],
            "config": metrics["config"],
        }

    only = os.environ.get("MULTIWORKER_RUNS")

    def wanted(name: str) -> bool:
        return not only or name in only.split(",")

    if wanted("one"):
        record("one", train(data, config, output_model=str(work / "one.keras")).to_dict())
    if wanted("two"):  # through the CLI, every path relative to the repo, as the issue ran it
        os.chdir(repo)
        rel = {name: os.path.relpath(work / name, repo) for name in ("data.parquet", "two.keras", "two.json")}
        argv = ["train", "--data", rel["data.parquet"], "--output-model", rel["two.keras"]]
        argv += ["--backbone", "fixtures/model/backbone.keras", "--epochs", "2", "--fine-tune-layers", "50"]
        argv += ["--learning-rate", "0.01", "--batch-size", "8", "--workers", "2", "--master", MASTER]
        argv += ["--cache-dir", os.path.relpath(work, repo), "--metrics", rel["two.json"]]
        code = cli.run(argv)
        if code:
            raise SystemExit(f"train through the CLI exited {code}")
        record("two", json.loads((work / "two.json").read_text()))
    if wanted("killed"):
        result = train(
            data,
            replace(config, workers=2),
            output_model=str(work / "killed.keras"),
            worker_callbacks=kill_task_1_after_its_first_epoch,
        )
        record("killed", result.to_dict())
    if wanted("gone"):  # the backbone file vanishes once the driver's head phase is done: the workers refuse
        gone = work / "gone-backbone.keras"
        shutil.copyfile(config.backbone, gone)

        class Remove(keras.callbacks.Callback):
            def on_train_end(self, logs: dict | None = None) -> None:
                gone.unlink(missing_ok=True)

        try:
            train(
                data,
                replace(config, workers=2, epochs=1, backbone=str(gone)),
                output_model=str(work / "gone.keras"),
                callbacks=[Remove()],
            )
            results["gone"] = {"error": None}
        except UserError as exc:
            results["gone"] = {"error": str(exc)}
    spark.stop()
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
