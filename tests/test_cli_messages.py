"""What the CLI tells a user: option names as typed, sizes with units, every failure counted, one line on
Ctrl-C, model files checked before Spark starts, and no model replaced without --overwrite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.scoring.options import ScoringOptions
from image_transfer.storage.outputs import write_output

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("given", "expected"),
    [("24MiB", 24 * 2**20), ("24 MiB", 24 * 2**20), ("10MB", 10_000_000), ("2M", 2 * 2**20), ("5000", 5000)],
)
def test_sizes_take_units_as_the_help_prints_them(given, expected):
    args = cli.build_parser().parse_args(["score", "--input", "i", "--model", "m", "--output", "o"])
    args.max_image_bytes = ScoringOptions.build(max_image_bytes=given).max_image_bytes
    assert args.max_image_bytes == expected
    parsed = cli.build_parser().parse_args(["prepare", "--images", "i", "--output", "o", "--max-image-bytes", given])
    assert parsed.max_image_bytes == expected
    parsed = cli.build_parser().parse_args(["score", "--input", "i", "--model", "m", "--max-pixels", "64M"])
    assert parsed.max_pixels == 64_000_000
    assert "24 MiB" in cli.build_parser()._subparsers._group_actions[0].choices["score"].format_help()


def test_a_size_that_is_not_one_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["score", "--input", "i", "--model", "m", "--max-image-bytes", "lots"])
    assert exit_.value.code == 2 and "--max-image-bytes" in capsys.readouterr().err
    with pytest.raises(UserError, match="max_image_bytes"):
        ScoringOptions.build(max_image_bytes="24 parsecs")


@pytest.mark.parametrize(
    ("flags", "typed"),
    [
        (["--max-image-bytes", "0"], "--max-image-bytes must be at least 1, got 0"),
        (["--max-failed-fraction", "2"], "--max-failed-fraction must be between 0 and 1"),
        (["--broadcast-max-mb", "-1"], "--broadcast-max-mb must be at least 0"),
    ],
)
def test_errors_name_the_flag_the_user_typed(no_spark, capsys, flags, typed):
    assert cli.run(["score", "--input", "i", "--model", "m", "--output", "o", *flags]) == 2
    err = capsys.readouterr().err
    assert typed in err and "_" not in err.split("error:")[1].split(",")[0], err
    assert "{'max_bytes'" not in err


def test_a_missing_or_broken_model_is_refused_before_spark(no_spark, tmp_path, capsys):
    for command in ("score", "featurize"):
        argv = [command, "--input", "i", "--model", str(tmp_path / "nope.keras"), "--output", str(tmp_path / "o")]
        assert cli.run(argv) == 2
        assert "model not found" in capsys.readouterr().err
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK not really")
    assert cli.run(["score", "--input", "i", "--model", str(broken), "--output", str(tmp_path / "o")]) == 2
    assert "not a valid .keras file" in capsys.readouterr().err
    data = ["--data", "d"]
    assert cli.run(["evaluate", *data, "--model", str(tmp_path / "nope.keras")]) == 2
    assert "model not found" in capsys.readouterr().err
    model = str(tmp_path / "m.keras")
    assert cli.run(["train", *data, "--output-model", model, "--backbone", str(tmp_path / "bb.keras")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_train_refuses_an_existing_model_unless_overwrite(no_spark, shapes_model, backbone_model, tmp_path, capsys):
    existing = tmp_path / "shapes.keras"
    shutil.copyfile(shapes_model, existing)
    argv = ["train", "--data", "d", "--output-model", str(existing), "--backbone", str(backbone_model)]
    assert cli.run([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "exists: not replaced (--overwrite replaces it)" in err and err.count("\n") == 1, err
    assert existing.read_bytes() == shapes_model.read_bytes()
    with pytest.raises(AssertionError, match="SparkSession"):  # past the checks: it would train now
        cli.run([*argv, "--overwrite"])


def test_the_demo_replaces_only_a_model_it_trained(fixtures_dir, shapes_model, tmp_path):
    from image_transfer.jobs.demo import check_workdir, demo_model

    check_workdir(tmp_path, fixtures_dir)
    shutil.copyfile(shapes_model, tmp_path / "model.keras")  # the user's model, by the demo's name
    assert not demo_model(tmp_path / "model.keras")
    with pytest.raises(UserError, match="not a model the demo trained"):
        check_workdir(tmp_path, fixtures_dir)
    check_workdir(tmp_path, fixtures_dir, overwrite=True)


def test_every_failure_is_counted_and_the_threshold_names_its_flag(spark, fixtures_dir, tmp_path, capsys):
    good = sorted((fixtures_dir / "images").rglob("*.png"))[0].read_bytes()
    rows = [(f"bad{i}.jpg", b"not an image %d" % i) for i in range(7)] + [("good.png", good)]
    source = tmp_path / "in"
    write_output(spark.createDataFrame(rows, "path string, content binary"), str(source))
    model = str(fixtures_dir / "model" / "shapes.keras")
    code = cli.run(["score", "--input", str(source), "--model", model, "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert captured.out.count("  failed: bad") == 5 and "  ... and 2 more (all in the output's error column)" in (
        captured.out
    )
    assert "(--max-failed-fraction)" in captured.err and "max_failed_fraction" not in captured.err
    assert "... and 2 more" in captured.err
    # The README's "least confident first" puts the failed rows last, not first.
    scored = spark.read.parquet(str(tmp_path / "out"))
    first = scored.orderBy(scored.probability.asc_nulls_last()).first()
    assert first["error"] is None and first["path"] == "good.png"
    assert "asc_nulls_last()" in (ROOT / "README.md").read_text()


def test_ctrl_c_is_one_line_exit_130_and_the_previous_output_intact(spark, fixtures_dir, tmp_path):
    """A real interrupt (SIGINT to the CLI's process) in the middle of scoring."""
    from pyspark.sql import functions as F

    images = spark.read.format("binaryFile").load(str(fixtures_dir / "images" / "*" / "*.png"))
    many = images.crossJoin(spark.range(12).withColumnRenamed("id", "copy"))
    many = many.select(F.concat("path", F.lit("#"), F.col("copy").cast("string")).alias("path"), "content")
    source, out = tmp_path / "in", tmp_path / "out"
    write_output(many.repartition(4), str(source))
    write_output(spark.range(3).selectExpr("cast(id as string) as path"), str(out), command="score")
    before = sorted(p.name for p in out.iterdir())
    argv = ["score", "--input", str(source), "--model", str(fixtures_dir / "model" / "shapes.keras")]
    argv += ["--output", str(out), "--master", "local[2]", "--batch-size", "4", "--progress-interval", "0.2"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "image_transfer", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    scoring = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("score: ") and "tasks" in line:
                scoring.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert scoring.wait(240), "".join(lines[-20:])
    time.sleep(1.0)
    sent = len(lines)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130, "".join(lines[-30:])
    reader.join(10)
    after = [line for line in lines[sent:] if not line.startswith("score: ")]
    assert after == ["image-transfer score: interrupted; the previous output is intact\n"], "".join(after)
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(r["path"] for r in spark.read.parquet(str(out)).collect()) == ["0", "1", "2"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging data, no lease
