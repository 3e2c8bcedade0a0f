"""Failure semantics: killed runs, retried tasks, re-runs, mismatched models, secrets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from image_transfer import read_images, score_images
from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.models.artifact import save_model
from image_transfer.storage.outputs import write_output

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images_parquet(spark, fixtures_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("failures") / "images.parquet"
    write_output(read_images(spark, str(fixtures_dir / "images")), str(out))
    return str(out)


def _rows(spark, path) -> list[tuple]:
    return sorted(
        (r["path"], r["prediction"], round(r["probability"], 5)) for r in spark.read.parquet(str(path)).collect()
    )


def _score_in_process(spark, images, model, out, wait: float | None = None) -> None:
    write_output(score_images(spark.read.parquet(images), str(model), batch_size=16, top_k=2), str(out), wait=wait)


@pytest.mark.slow
def test_killed_run_keeps_previous_output_and_a_rerun_completes(
    spark, images_parquet, shapes_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("IMAGE_TRANSFER_LEASE_TTL", "3")  # the killed run's lease expires 3 s after its last beat
    out = tmp_path / "predictions.parquet"
    _score_in_process(spark, images_parquet, shapes_model, out)
    before = _rows(spark, out)
    assert len(before) == 240

    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    command = [
        sys.executable,
        "-m",
        "image_transfer",
        "score",
        "--input",
        images_parquet,
        "--model",
        str(shapes_model),
        "--output",
        str(out),
        "--batch-size",
        "16",
        # One file per row: the write after scoring (240 tasks) lasts long enough to be killed mid-way.
        "--rows-per-file",
        "1",
        "--master",
        "local[2]",
    ]
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        staging: list[Path] = []
        while not any(len(list(d.rglob("*.parquet"))) >= 5 for d in staging):  # some files written, not all
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
            staging = list(tmp_path.glob(".predictions.parquet.staging-*"))
        assert proc.poll() is None, "the run finished before it was killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its JVM and its Python workers
        proc.wait(timeout=60)

    assert _rows(spark, out) == before  # the previous output is intact
    assert list(tmp_path.glob(".predictions.parquet.staging-*"))  # the killed run's partial data
    assert list(tmp_path.glob(".predictions.parquet.lease"))  # and its lease, live until it expires

    _score_in_process(spark, images_parquet, shapes_model, out, wait=120)  # rerun: takes over, complete
    assert _rows(spark, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.parquet"]


@pytest.mark.slow
def test_a_task_retried_after_a_fault_duplicates_no_rows(images_parquet, shapes_model, tmp_path):
    out, markers = tmp_path / "out.parquet", tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    job = REPO / "tests" / "jobs" / "retry_scoring.py"
    proc = subprocess.run(
        [sys.executable, str(job), images_parquet, str(shapes_model), str(out), str(markers)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert [p.name for p in markers.iterdir()][0].endswith("-0")  # the fault hit a first attempt
    assert result == {"rows_in": 240, "rows_out": 240, "distinct_paths": 240, "failed": 0}


def test_class_names_must_match_the_output_width(spark, shapes_model, tmp_path):
    import keras

    model = keras.models.load_model(shapes_model, compile=False)
    wrong = save_model(model, tmp_path / "wrong.keras", class_names=["a", "b"])
    with pytest.raises(UserError, match="6 outputs but its metadata names 2 classes"):
        score_images(spark.createDataFrame([], "path string, content binary"), str(wrong))


def test_secrets_stay_out_of_bundle_summary_and_logs(images_parquet, shapes_model, tmp_path, capsys, monkeypatch):
    secret = "dapi0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("DATABRICKS_TOKEN", secret)
    summary = tmp_path / "summary.json"
    code = cli.run(
        [
            "score",
            "--input",
            images_parquet,
            "--model",
            str(shapes_model),
            "--output",
            str(tmp_path / "o.parquet"),
            "--summary",
            str(summary),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert secret not in summary.read_text() + captured.out + captured.err
    token_like = re.compile(r"dapi[0-9a-f]{32}|\btoken\s*:\s*\S+", re.IGNORECASE)
    for f in [REPO / "databricks.yml", *(REPO / "resources").glob("*.yml")]:
        assert not token_like.search(f.read_text()), f


@pytest.mark.slow
def test_cli_scores_a_folder_of_hostile_files(spark, shapes_model, tmp_path, capsys):
    from hostile_images import write_corpus

    expected = write_corpus(tmp_path / "incoming")
    images, out, summary = tmp_path / "images.parquet", tmp_path / "pred.parquet", tmp_path / "s.json"
    assert cli.run(["ingest", "--images", str(tmp_path / "incoming"), "--output", str(images)]) == 0
    code = cli.run(
        [
            "score",
            "--input",
            str(images),
            "--model",
            str(shapes_model),
            "--output",
            str(out),
            "--summary",
            str(summary),
            "--batch-size",
            "5",
        ]
    )
    assert code == 0
    rows = {Path(r["path"]).name: r for r in spark.read.parquet(str(out)).collect()}
    assert sorted(rows) == sorted(expected)  # every file is a row
    for name, should_score in expected.items():
        assert (rows[name]["error"] is None) == should_score, (name, rows[name]["error"])
    data = json.loads(summary.read_text())
    assert data["rows_failed"] == sum(not ok for ok in expected.values())
    assert len(data["errors_sample"]) == 5
    assert "failed:" in capsys.readouterr().out
