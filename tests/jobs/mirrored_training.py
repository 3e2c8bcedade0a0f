"""Train on the fixtures with one device, then mirrored over two logical CPU devices, then mixed precision.

    python tests/jobs/mirrored_training.py WORKDIR

Run as a separate process by tests/test_gpu.py: logical devices must be configured before TensorFlow
initialises. Single-device training uses batch 16; the mirrored one 8 per replica (global 16), the
same seed and data order, no augmentation or dropout, so both should follow the same curve. Prints
``RESULT {...}`` with each run's per-epoch losses, final validation accuracy, replicas and batch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path


def main(workdir: str) -> int:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from image_transfer import devices as gpu
    from image_transfer.models.load import load_keras
    from image_transfer.runtime import get_spark
    from image_transfer.training.prepare import prepare
    from image_transfer.training.train import TrainConfig, train

    work = Path(workdir)
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    spark = get_spark("mirrored training test", master="local[1]")
    prepare(spark, str(fixtures / "images"), str(work / "data.parquet"))
    data = spark.read.parquet(str(work / "data.parquet"))
    config = TrainConfig(
        backbone=str(fixtures / "model" / "backbone.keras"),
        epochs=4,
        batch_size=16,
        learning_rate=1e-2,
        dropout=0.0,
        augment=False,
        patience=20,
        cache_dir=str(work),
        head_input="images",  # the strategies' own image path: the features head trains on the driver alone
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    runs = {
        "single": (config, tf.distribute.OneDeviceStrategy(devices[0])),
        "mirrored": (replace(config, batch_size=8), tf.distribute.MirroredStrategy(devices)),
    }
    results = {}
    for name, (cfg, strategy) in runs.items():
        result = train(data, cfg, output_model=str(work / f"{name}.keras"), strategy=strategy)
        results[name] = {
            "loss": [e["loss"] for e in result.epochs],
            "accuracy": result.final_validation_accuracy,
            "replicas": result.replicas,
            "global_batch_size": result.global_batch_size,
        }
    gpu.visible_gpus = lambda: 1  # pretend: mixed_float16 runs on CPU too, slowly
    result = train(data, replace(config, epochs=2, mixed_precision=True), output_model=str(work / "mixed.keras"))
    saved = load_keras(str(work / "mixed.keras"))
    results["mixed"] = {
        "precision": result.precision,
        "loss": [e["loss"] for e in result.epochs],
        "saved_policies": sorted({layer.dtype_policy.name for layer in saved.layers}),
    }
    spark.stop()
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
