"""Incremental scoring: new files scored exactly once across runs, a SIGKILLed run resumes, one load per worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_images import write_corpus

from image_transfer import UserError, featurize_new_images, score_new_images
from image_transfer.api.incremental import ZERO_BYTES
from image_transfer.jobs import cli
from image_transfer.runtime import is_connect
from image_transfer.scoring.streaming import reader_options, resolve_source
from image_transfer.storage.outputs import write_output

ROOT = Path(__file__).resolve().parents[1]


def _fixture_files(fixtures_dir: Path, n: int, start: int = 0) -> list[Path]:
    files = sorted((fixtures_dir / "images").rglob("*.*"))
    return files[start : start + n]


def _add(folder: Path, files: list[Path]) -> set[str]:
    """Copy files into ``folder/<class>/``; returns their ``path`` column values."""
    added = set()
    for f in files:
        dest = folder / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        added.add(f"file:{dest}")
    return added


def _paths(spark, output: Path) -> list[str]:
    return [r.path for r in spark.read.parquet(str(output)).select("path").collect()]


def test_reader_options_for_each_source():
    fmt, options = reader_options("cloudFiles", extensions=["jpg", "png"], max_files_per_trigger=50)
    assert fmt == "cloudFiles"
    assert options["cloudFiles.format"] == "binaryFile"
    assert options["cloudFiles.maxFilesPerTrigger"] == "50"
    assert options["pathGlobFilter"] == "*.{JPG,PNG,jpg,png}"
    fmt, options = reader_options("binaryFile", extensions=["jpg"], max_files_per_trigger=7)
    assert fmt == "binaryFile"
    assert options == {"recursiveFileLookup": "true", "pathGlobFilter": "*.{JPG,jpg}", "maxFilesPerTrigger": "7"}
    assert resolve_source("auto", databricks=True) == "cloudFiles"
    assert resolve_source("auto", databricks=False) == "binaryFile"
    assert resolve_source("binaryFile", databricks=True) == "binaryFile"
    assert resolve_source("cloudFiles", databricks=False) == "cloudFiles"
    with pytest.raises(UserError):
        resolve_source("kafka")
    with pytest.raises(UserError):
        reader_options("binaryFile", extensions=["jpg"], max_files_per_trigger=0)


def test_cli_incremental_arguments(tmp_path, shapes_model, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["score", "--images", "d", "--checkpoint", "c", "--model", "m", "--output", "o"])
    assert (args.images, args.checkpoint, args.source, args.input) == ("d", "c", "auto", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--images", "d", "--input", "i", "--model", "m", "--output", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--images", "d", "--checkpoint", "c", "--model", "m", "--source", "s3"])
    model = str(shapes_model)
    # Refused before a Spark session is created: exit 2 with a message.
    assert cli.run(["score", "--images", str(tmp_path), "--model", model, "--output", "o"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    base = ["score", "--images", str(tmp_path), "--checkpoint", "c", "--model", model]
    assert cli.run([*base, "--output", "o", "--output-table", "t"]) == 2
    assert cli.run(base) == 2
    assert cli.run(["score", "--input", "i", "--checkpoint", "c", "--model", model, "--output", "o"]) == 2


@pytest.mark.connect
def test_three_runs_score_exactly_the_new_files(spark, fixtures_dir, shapes_model, tmp_path):
    images, checkpoint, output = tmp_path / "incoming", tmp_path / "checkpoint", tmp_path / "predictions"
    images.mkdir()

    def run():
        return score_new_images(
            spark,
            str(images),
            str(shapes_model),
            checkpoint=str(checkpoint),
            output=str(output),
            source="auto",
            max_files_per_trigger=4,
            batch_size=4,
        )

    first = _add(images, _fixture_files(fixtures_dir, 10))
    r1 = run()
    second = _add(images, _fixture_files(fixtures_dir, 6, start=100))
    (images / "late" / "empty.png").parent.mkdir()
    (images / "late" / "empty.png").write_bytes(b"")
    (images / "late" / "notes.txt").write_text("not an image: not matched")
    r2 = run()
    third = _add(images, _fixture_files(fixtures_dir, 5, start=200))
    r3 = run()
    r4 = run()  # nothing new

    assert (r1.files_new, r1.rows_out, r1.rows_failed, r1.not_scored) == (10, 10, 0, [])
    assert [b["rows"] for b in r1.batches] == [4, 4, 2]
    assert (r2.files_new, r2.rows_out) == (7, 6)
    assert r2.not_scored == [{"path": f"file:{images}/late/empty.png", "reason": ZERO_BYTES}]
    assert (r3.files_new, r3.rows_out, r3.not_scored) == (5, 5, [])
    assert (r4.files_new, r4.rows_out, r4.batches) == (0, 0, [])
    with pytest.raises(UserError, match="another checkpoint"):  # the file sink would skip its batch ids
        score_new_images(spark, str(images), str(shapes_model), checkpoint=str(tmp_path / "new"), output=str(output))
    with pytest.raises(UserError, match="holds an incremental output"):  # a batch write would replace it
        write_output(spark.range(1), str(output), command="score")

    paths = _paths(spark, output)
    assert sorted(paths) == sorted(first | second | third)  # every file once, nothing re-scored
    written = spark.read.parquet(str(output))
    assert written.columns == [
        "path",
        "prediction",
        "probability",
        "top_k",
        "error",
        "model_version",
        "scored_at",
    ]
    assert written.where("error IS NOT NULL OR scored_at IS NULL").count() == 0
    assert {r.model_version for r in written.select("model_version").distinct().collect()} == {r1.model_version}
    for result in (r1, r2, r3):
        assert result.shipped.startswith("in the UDF" if is_connect(spark) else "broadcast")  # Connect: no broadcasts
        # One model load and one trace at most per worker and run, across all its micro-batches
        # (0 when a worker kept the model from an earlier run in this session).
        assert result.workers and all(w["model_loads"] <= 1 and w["traces"] <= 1 for w in result.workers.values())
        assert sum(w["batches"] for w in result.workers.values()) >= len(result.batches)


def test_incremental_into_a_table(spark, fixtures_dir, shapes_model, tmp_path):
    images, checkpoint = tmp_path / "incoming", tmp_path / "checkpoint"
    table = "incremental_predictions"
    spark.sql(f"DROP TABLE IF EXISTS {table}")
    first = _add(images, _fixture_files(fixtures_dir, 3, start=50))
    options = dict(checkpoint=str(checkpoint), output_table=table, source="binaryFile", max_files_per_trigger=2)
    r1 = score_new_images(spark, str(images), str(shapes_model), **options)
    second = _add(images, _fixture_files(fixtures_dir, 2, start=150))
    r2 = score_new_images(spark, str(images), str(shapes_model), **options)
    assert (r1.rows_out, r2.rows_out) == (3, 2)
    assert sorted(r.path for r in spark.table(table).select("path").collect()) == sorted(first | second)
    with pytest.raises(UserError, match="another checkpoint"):
        score_new_images(spark, str(images), str(shapes_model), **{**options, "checkpoint": str(tmp_path / "new")})
    assert not (tmp_path / "new").exists()
    spark.sql(f"DROP TABLE {table}")


@pytest.mark.connect
def test_featurize_new_images(spark, fixtures_dir, shapes_model, tmp_path):
    images, output = tmp_path / "incoming", tmp_path / "embeddings"
    added = _add(images, _fixture_files(fixtures_dir, 3, start=70))
    result = featurize_new_images(
        spark, str(images), str(shapes_model), checkpoint=str(tmp_path / "ck"), output=str(output), source="binaryFile"
    )
    written = spark.read.parquet(str(output))
    assert written.columns == ["path", "embedding", "error", "model_version", "scored_at"]
    assert (result.mode, result.files_new, result.rows_out) == ("featurize", 3, 3)
    assert {r.path for r in written.collect() if r.embedding and r.error is None} == added


def _committed(checkpoint: Path, log: str) -> set[int]:
    folder = checkpoint / log
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, IMAGE_TRANSFER_DRIVER_MEMORY="1g", PYSPARK_PYTHON=sys.executable)
    return subprocess.Popen(
        [sys.executable, "-m", "image_transfer", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group: the JVM and Python workers die with it
    )


@pytest.mark.slow
def test_killed_run_resumes_every_file_exactly_once(spark, fixtures_dir, shapes_model, tmp_path):
    images, checkpoint, output = tmp_path / "incoming", tmp_path / "checkpoint", tmp_path / "predictions"
    expected = write_corpus(images / "hostile")
    good = _add(images, _fixture_files(fixtures_dir, 15, start=30))
    hostile = {f"file:{images}/hostile/{name}": ok for name, ok in expected.items()}
    empty = {p for p in hostile if (Path(p.removeprefix("file:"))).stat().st_size == 0}
    args = [
        "score",
        "--images",
        str(images),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
        "--model",
        str(shapes_model),
        "--max-files-per-trigger",
        "5",
        "--batch-size",
        "2",
        "--master",
        "local[2]",
    ]
    process = _cli(args, tmp_path / "killed.log")
    deadline = time.monotonic() + 600
    try:
        while True:  # kill while a micro-batch is being scored, after at least one has committed
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no micro-batch committed in time"
            commits, offsets = _committed(checkpoint, "commits"), _committed(checkpoint, "offsets")
            if commits and offsets - commits:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    batches = -(-(len(good) + len(hostile)) // 5)
    assert 0 < len(_committed(checkpoint, "commits")) < batches, "the kill did not land mid-run"
    partial = _paths(spark, output)
    assert len(partial) == len(set(partial)) < len(good) + len(hostile)

    summary = tmp_path / "summary.json"
    done = _cli([*args, "--summary", str(summary)], tmp_path / "rerun.log")
    assert done.wait(timeout=900) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    result = json.loads(summary.read_text())

    written = spark.read.parquet(str(output))
    paths = [r.path for r in written.select("path").collect()]
    assert len(paths) == len(set(paths))  # exactly once
    assert set(paths) == (good | set(hostile)) - empty  # none missing
    assert {n["path"]: n["reason"] for n in result["not_scored"]} == dict.fromkeys(empty, ZERO_BYTES)
    # The rerun accounts for every file since the last finished run (the killed run's batches too).
    assert result["files_new"] == len(good) + len(hostile)
    assert result["rows_out"] == len(paths)
    errors = {r.path: r.error for r in written.select("path", "error").collect()}
    for path, ok in hostile.items():
        if path not in empty:
            assert (errors[path] is None) == ok, (path, errors[path])
    assert result["rows_failed"] == sum(1 for p, ok in hostile.items() if not ok and p not in empty)
    # A fresh process: each worker loaded and traced the model once across all its micro-batches.
    assert len(result["batches"]) >= 3
    assert result["workers"]
    for worker in result["workers"].values():
        assert (worker["model_loads"], worker["traces"]) == (1, 1), result["workers"]


def test_batch_inference_job_scores_incrementally():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((ROOT / "resources" / "batch_inference.job.yml").read_text())["resources"]["jobs"]
    job = job["batch_inference"]
    assert [t["task_key"] for t in job["tasks"]] == ["score"]  # no separate ingest copy
    params = job["tasks"][0]["python_wheel_task"]["parameters"]
    args = cli.build_parser().parse_args([p.replace("${var.scoring_batch_size}", "64") for p in params])
    assert args.images == "{{job.parameters.images}}" and args.input is None
    assert args.checkpoint == "{{job.parameters.checkpoint}}" and args.source == "auto"
    defaults = {p["name"]: p["default"] for p in job["parameters"]}
    assert defaults["checkpoint"].startswith("/Volumes/")


def _batch_output(spark, where: Path, command: str) -> None:
    rows = spark.createDataFrame([(f"file:/old/{i}.png", None) for i in range(86)], "path string, error string")
    write_output(rows, str(where), command=command)


@pytest.mark.parametrize("command", ["score", "featurize"])
def test_an_incremental_run_refuses_a_batch_output_it_would_hide(
    spark, fixtures_dir, shapes_model, tmp_path, capsys, command
):
    """The file sink's log would hide a batch output's rows from readers: refused before any work, exit 2."""
    images, checkpoint, output = tmp_path / "incoming", tmp_path / "checkpoint", tmp_path / "scored"
    _add(images, _fixture_files(fixtures_dir, 2, start=20))
    _batch_output(spark, output, command)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    base = [command, "--images", str(images), "--checkpoint", str(checkpoint), "--model", str(shapes_model)]
    assert cli.run([*base, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"holds a batch output of `image-transfer {command}`" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert not checkpoint.exists() and spark.read.parquet(str(output)).count() == 86

    other = tmp_path / "other"  # Parquet files of something else: hidden the same way
    spark.range(5).write.parquet(str(other))
    assert cli.run([*base, "--output", str(other)]) == 2
    assert "holds other data" in capsys.readouterr().err
    assert not checkpoint.exists() and spark.read.parquet(str(other)).count() == 5


def test_an_incremental_run_refuses_a_table_it_would_hide(spark, fixtures_dir, shapes_model, tmp_path):
    """An existing batch table, or a table of other rows, is refused: the stream's log would hide its rows."""
    images, checkpoint = tmp_path / "incoming", tmp_path / "checkpoint"
    _add(images, _fixture_files(fixtures_dir, 2, start=20))
    table = "incremental_over_batch"
    spark.sql(f"DROP TABLE IF EXISTS {table}")
    _batch_output(spark, tmp_path / "batch", "score")
    write_output(spark.read.parquet(str(tmp_path / "batch")), str(tmp_path / "batch"), table=table, command="score")
    try:
        with pytest.raises(UserError, match="holds a batch output of `image-transfer score`"):
            score_new_images(spark, str(images), str(shapes_model), checkpoint=str(checkpoint), output_table=table)
        spark.sql(f"DROP TABLE {table}")
        spark.range(86).write.saveAsTable(table)
        with pytest.raises(UserError, match="holds other data"):
            score_new_images(spark, str(images), str(shapes_model), checkpoint=str(checkpoint), output_table=table)
        assert not checkpoint.exists() and spark.table(table).count() == 86
    finally:
        spark.sql(f"DROP TABLE IF EXISTS {table}")


def test_the_query_stops_when_the_run_is_interrupted(spark, fixtures_dir, shapes_model, tmp_path):
    """Ctrl-C (or any error) while the run waits on its query: the query is stopped, the interrupt goes on."""
    images = tmp_path / "incoming"
    _add(images, _fixture_files(fixtures_dir, 8, start=60))
    active: list[int] = []

    def interrupt(line: str) -> None:
        active.append(len(spark.streams.active))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_new_images(
            spark,
            str(images),
            str(shapes_model),
            checkpoint=str(tmp_path / "checkpoint"),
            output=str(tmp_path / "scored"),
            source="binaryFile",
            max_files_per_trigger=1,
            print_fn=interrupt,
        )
    assert active == [1]  # it was interrupted while its query ran
    assert spark.streams.active == []
