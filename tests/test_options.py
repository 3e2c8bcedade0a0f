"""One options object: every scoring option reaches every entry point, or is refused naming its flag."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import pytest

from image_transfer import UserError, score_images, score_new_images
from image_transfer.jobs import cli
from image_transfer.scoring.options import ScoringOptions


def _subparser(name: str):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["score", "featurize", "evaluate"])
def test_every_option_is_a_flag_of_every_scoring_command(command):
    flags = {s for a in _subparser(command)._actions for s in a.option_strings}
    for spec in fields(ScoringOptions):
        assert ScoringOptions.flag(spec.name) in flags, (command, spec.name)


def test_flags_build_the_same_object_as_keywords():
    argv = [
        "score",
        "--input",
        "x",
        "--model",
        "m",
        "--output",
        "o",
        "--batch-size",
        "8",
        "--precision",
        "float16",
        "--jit",
        "--overlap",
        "on",
        "--max-batch-mb",
        "100",
        "--key-column",
        "path",
        "--key-column",
        "id",
    ]
    args = cli.build_parser().parse_args(argv)
    expected = ScoringOptions.build(
        batch_size=8, precision="float16", jit=True, overlap="on", max_batch_mb=100.0, key_columns=("path", "id")
    )
    assert ScoringOptions.from_args(args) == expected
    assert expected.given() == {
        "key_columns": ("path", "id"),
        "batch_size": 8,
        "max_batch_mb": 100.0,
        "precision": "float16",
        "jit": True,
        "overlap": "on",
    }
    assert expected.compute_summary() == {
        "batch_size": 8,
        "precision": "float16",
        "jit": True,
        "overlap": "on",
        "engine": "auto",
    }
    zero = cli.build_parser().parse_args(
        ["score", "--input", "x", "--model", "m", "--max-failed-fraction", "0", "--broadcast-max-mb", "0"]
    )
    assert ScoringOptions.from_args(zero).given() == {"max_failed_fraction": 0.0, "broadcast_max_mb": 0.0}
    with pytest.raises(UserError, match="batch size"):
        ScoringOptions.from_args(
            cli.build_parser().parse_args(["score", "--input", "x", "--model", "m", "--batch-size", "0"])
        )


def test_an_unknown_or_bad_option_is_a_user_error_before_any_spark_work(spark, fixtures_dir, shapes_model):
    df = spark.createDataFrame([("a", b"")], "path string, content binary")
    with pytest.raises(TypeError, match="batchsize"):  # the keywords are explicit: Python names a misspelt one
        score_images(df, str(shapes_model), batchsize=8)
    with pytest.raises(UserError, match="unknown scoring option batchsize"):
        ScoringOptions.build(batchsize=8)
    with pytest.raises(UserError, match="batch size must be at least 1"):
        score_images(df, str(shapes_model), batch_size=0)
    with pytest.raises(UserError, match="image_column .--image-column. does not apply"):
        score_new_images(spark, str(fixtures_dir), str(shapes_model), checkpoint="c", output="o", image_column="img")


@pytest.fixture(scope="module")
def few_images(fixtures_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("few") / "incoming"
    folder.mkdir()
    for src in sorted((fixtures_dir / "images" / "circle").glob("*.png"))[:6]:
        shutil.copy(src, folder / src.name)
    return folder


@pytest.mark.parametrize(
    "flags, refused",
    [
        (["--image-column", "img"], "--image-column"),
        (["--rows-per-file", "10"], "--rows-per-file"),
        (["--progress-interval", "5"], "--progress-interval"),
        (["--key-column", "id"], "--key-column"),
    ],
)
def test_flags_that_do_not_apply_to_incremental_scoring_are_refused(
    few_images, shapes_model, tmp_path, capsys, flags, refused
):
    code = cli.run(
        [
            "score",
            "--images",
            str(few_images),
            "--checkpoint",
            str(tmp_path / "c"),
            "--model",
            str(shapes_model),
            "--output",
            str(tmp_path / "o"),
            *flags,
        ]
    )
    assert code == 2
    assert refused in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_compute_flags_reach_the_incremental_path_and_its_summary(spark, few_images, shapes_model, tmp_path):
    summary = tmp_path / "summary.json"
    code = cli.run(
        [
            "score",
            "--images",
            str(few_images),
            "--checkpoint",
            str(tmp_path / "c"),
            "--model",
            str(shapes_model),
            "--output",
            str(tmp_path / "o"),
            "--summary",
            str(summary),
            "--batch-size",
            "4",
            "--precision",
            "float16",
            "--jit",
            "--overlap",
            "on",
            "--max-batch-mb",
            "100",
        ]
    )
    assert code == 0
    data = json.loads(summary.read_text())
    assert data["compute"] == {
        "batch_size": 4,
        "precision": "float16",
        "jit": True,
        "overlap": "on",
        "engine": "auto",
        "engine_used": "tensorflow",
    }
    assert data["rows_out"] == 6 and data["rows_failed"] == 0
    rows = spark.read.parquet(str(tmp_path / "o")).collect()
    assert len(rows) == 6 and all(r["error"] is None for r in rows)


def test_the_batch_summary_records_the_compute_settings(spark, few_images, shapes_model, tmp_path):
    images = tmp_path / "images.parquet"
    assert cli.run(["ingest", "--images", str(few_images), "--output", str(images)]) == 0
    summary = tmp_path / "summary.json"
    code = cli.run(
        [
            "score",
            "--input",
            str(images),
            "--model",
            str(shapes_model),
            "--output",
            str(tmp_path / "o"),
            "--summary",
            str(summary),
            "--batch-size",
            "3",
            "--overlap",
            "off",
        ]
    )
    assert code == 0
    data = json.loads(summary.read_text())
    assert data["compute"] == {
        "batch_size": 3,
        "precision": "float32",
        "jit": False,
        "overlap": "off",
        "engine": "auto",
        "engine_used": "litert-xnnpack",  # auto on CPU workers
    }
    assert data["rows_out"] == 6
