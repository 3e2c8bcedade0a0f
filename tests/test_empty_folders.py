"""An empty incoming folder (or one without new files) is a normal run: API, CLI, featurize, tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from image_transfer import featurize_new_images, score_new_images
from image_transfer.jobs import cli

CLASSIFY_COLUMNS = ["path", "prediction", "probability", "top_k", "error", "model_version", "scored_at"]


def _images(fixtures_dir: Path, n: int) -> list[Path]:
    return sorted((fixtures_dir / "images").rglob("*.*"))[:n]


# ---- an empty folder (or no new files) is a normal run --------------------------------------------


def test_an_empty_folder_is_a_normal_run(spark, fixtures_dir, shapes_model, tmp_path):
    incoming, checkpoint, output = tmp_path / "incoming", tmp_path / "checkpoint", tmp_path / "scored"
    incoming.mkdir()
    result = score_new_images(spark, str(incoming), str(shapes_model), checkpoint=str(checkpoint), output=str(output))
    assert (result.files_new, result.rows_out, result.rows_failed, result.batches) == (0, 0, 0, [])
    assert result.to_dict()["files_new"] == 0 and not result.threshold_exceeded
    empty = spark.read.parquet(str(output))  # readable: no rows, the output's columns
    assert empty.columns == CLASSIFY_COLUMNS and empty.count() == 0

    # The next run scores the files that arrived, exactly once, and readers see only those.
    files = _images(fixtures_dir, 3)
    for f in files:
        shutil.copyfile(f, incoming / f.name)
    result = score_new_images(spark, str(incoming), str(shapes_model), checkpoint=str(checkpoint), output=str(output))
    assert (result.files_new, result.rows_out, result.rows_failed) == (3, 3, 0)
    assert sorted(r.path for r in spark.read.parquet(str(output)).collect()) == sorted(
        f"file:{incoming / f.name}" for f in files
    )

    # No new files: a normal run too, the output unchanged.
    result = score_new_images(spark, str(incoming), str(shapes_model), checkpoint=str(checkpoint), output=str(output))
    assert (result.files_new, result.rows_out) == (0, 0)
    assert spark.read.parquet(str(output)).count() == 3


def test_an_empty_folder_featurized_or_into_a_table(spark, shapes_model, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "notes.txt").write_text("not an image")  # matches no image extension
    result = featurize_new_images(
        spark, str(incoming), str(shapes_model), checkpoint=str(tmp_path / "c1"), output=str(tmp_path / "emb")
    )
    assert (result.files_new, result.rows_out) == (0, 0)
    assert "embedding" in spark.read.parquet(str(tmp_path / "emb")).columns
    result = score_new_images(
        spark, str(incoming), str(shapes_model), checkpoint=str(tmp_path / "c2"), output_table="new_user_empty"
    )
    assert (result.files_new, result.rows_out) == (0, 0)
    assert spark.table("new_user_empty").count() == 0
    spark.sql("DROP TABLE IF EXISTS new_user_empty")


def test_cli_on_an_empty_folder_exits_0_with_a_summary(spark, shapes_model, tmp_path, capsys):
    incoming, output, summary = tmp_path / "incoming", tmp_path / "scored", tmp_path / "summary.json"
    incoming.mkdir()
    argv = ["score", "--images", str(incoming), "--checkpoint", str(tmp_path / "checkpoint")]
    argv += ["--model", str(shapes_model), "--output", str(output), "--summary", str(summary)]
    assert cli.run(argv) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
    written = json.loads(summary.read_text())
    assert (written["files_new"], written["rows_out"], written["rows_failed"]) == (0, 0, 0)
    assert spark.read.parquet(str(output)).columns == CLASSIFY_COLUMNS
    assert cli.run(argv) == 0  # and again, still nothing new
    assert json.loads(summary.read_text())["files_new"] == 0
