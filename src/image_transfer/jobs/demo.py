"""The demo: the pipeline end to end on the bundled fixtures.

Its outputs in the work folder are its own: a second run replaces them; anything else there of the
same name is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.runtime import get_spark, parse_conf, quiet_interrupts

# Each output in the work folder, and the command its marker records.
OUTPUTS = {
    "images.parquet": "demo",
    "predictions.parquet": "demo",
    "dataset.parquet": "prepare",
    "validation_predictions.parquet": "demo",
}


def check_workdir(workdir: Path, fixtures: Path, *, overwrite: bool = False) -> None:
    """Refuse (UserError) a work folder whose outputs would overlap the fixture images or replace what
    the demo did not write (``outputs.check_output``); run before Spark starts."""
    from image_transfer.api.checks import check_output

    for name, command in OUTPUTS.items():
        check_output(
            str(workdir / name),
            command=command,
            inputs=[str(fixtures / "images")],
            overwrite=overwrite,
            flag="--workdir",
        )
    model = workdir / "model.keras"
    if not overwrite and not demo_model(model):
        raise UserError(f"{model} is not a model the demo trained: not replaced (--overwrite replaces it)")


def _demo_training(spark: Any, fixtures: Path, workdir: Path, *, overwrite: bool = False) -> None:
    """prepare -> train (the fixture backbone, 64x64) -> score the validation split with the new model."""
    from image_transfer import api

    dataset = workdir / "dataset.parquet"
    print(api.prepare_dataset(spark, str(fixtures / "images"), str(dataset), overwrite=overwrite).describe())
    model = workdir / "model.keras"
    ours = overwrite or demo_model(model)
    trained = api.train_model(
        spark.read.parquet(str(dataset)),
        output_model=str(model),
        overwrite=ours,
        backbone=str(fixtures / "model" / "backbone.keras"),
        epochs=12,
        fine_tune_layers=1,
        fine_tune_epochs=8,
        batch_size=16,
        learning_rate=1e-2,
        patience=20,
    )
    print(trained.describe())
    out = workdir / "validation_predictions.parquet"
    source = api.dataset_rows(spark.read.parquet(str(dataset)), "validation").select("path", "label", "content")
    scored = api.score_images(source, str(model), key_columns=("path", "label"), top_k=3)
    api.write_scored(scored, str(out), command=OUTPUTS[out.name], overwrite=overwrite)
    print(f"validation accuracy of the trained model: {trained.final_validation_accuracy:.3f}")
    print(f"trained model: {model}\nvalidation predictions: {out}")


def label_accuracy(scored: Any) -> float:
    """Share of scored rows whose prediction equals the image's parent folder name (demo check)."""
    from pyspark.sql import functions as F

    label = F.element_at(F.split(F.col("path"), "/"), -2)
    row = (
        scored.where(F.col("error").isNull())
        .agg(F.avg((F.col("prediction") == label).cast("double")).alias("acc"))
        .first()
    )
    return float(row["acc"] or 0.0)


def demo_model(path: Path) -> bool:
    """Whether the model file at ``path`` is missing or one that ``train`` wrote (the demo replaces it)."""
    from image_transfer.api.checks import model_metadata

    if not path.exists():
        return True
    try:
        return model_metadata(str(path)).get("trained_by") == "image-transfer train"
    except Exception:  # noqa: BLE001 - not a model we can read: not ours
        return False


def default_fixtures() -> Path:
    """The repo's ``fixtures/`` folder (next to ``src/``), or ``./fixtures``."""
    here = Path(__file__).resolve().parents[2] / "fixtures"
    return here if here.is_dir() else Path.cwd() / "fixtures"


def run_demo(args: argparse.Namespace) -> int:
    """``image-transfer demo``: ingest and score the fixtures, then prepare, train and score again."""
    from image_transfer import api

    fixtures = Path(args.fixtures) if args.fixtures else default_fixtures()
    workdir = Path(args.workdir).resolve()
    model_path = fixtures / "model" / "shapes.keras"
    if not model_path.exists():
        raise UserError(f"no fixture model at {model_path}; run `python fixtures/make_fixtures.py`")
    overwrite = bool(getattr(args, "overwrite", False))
    check_workdir(workdir, fixtures, overwrite=overwrite)
    spark = get_spark("image-transfer demo", master=args.master or "local[2]", conf=parse_conf(args.conf))
    quiet_interrupts(spark)
    images = workdir / "images.parquet"
    n = api.write_output(
        api.read_images(spark, str(fixtures / "images")), str(images), command="demo", overwrite=overwrite
    ).count()
    print(f"ingested {n} fixture images into {images}")
    out, summary = workdir / "predictions.parquet", workdir / "summary.json"
    source = spark.read.parquet(str(images))
    scored = api.score_images(source, str(model_path), top_k=3)
    api.write_scored(scored, str(out), command="demo", overwrite=overwrite, summary_path=str(summary))
    scored = spark.read.parquet(str(out))
    scored.orderBy("path").show(5, truncate=60)
    accuracy = label_accuracy(scored)
    print(f"accuracy against the folder labels: {accuracy:.3f}")
    print(f"predictions: {out}\nsummary: {summary}")
    _demo_training(spark, fixtures, workdir, overwrite=overwrite)
    return 0
