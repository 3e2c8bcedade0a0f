"""The Databricks notebook runs as-is on local Spark: its cells, executed in order, against the fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "score_and_featurize.py"


def cells(path: Path) -> list[str]:
    """The notebook's code cells (``# COMMAND ----------`` separated; ``# MAGIC`` cells are markdown)."""
    text = path.read_text()
    assert text.startswith("# Databricks notebook source\n")
    parts = text.split("# COMMAND ----------")
    code = []
    for part in parts:
        lines = [ln for ln in part.splitlines() if ln.strip() and ln != "# Databricks notebook source"]
        if lines and not all(ln.startswith("# MAGIC") for ln in lines):
            code.append(part)
    return code


def test_the_notebook_cells_run_on_the_fixtures(spark, fixtures_dir, shapes_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "predictions.parquet"
    monkeypatch.setenv("IMAGE_TRANSFER_IMAGES", str(fixtures_dir / "images"))
    monkeypatch.setenv("IMAGE_TRANSFER_MODEL", str(shapes_model))
    monkeypatch.setenv("IMAGE_TRANSFER_OUTPUT", str(out))
    namespace = {"spark": spark, "__name__": "__notebook__"}
    code = cells(NOTEBOOK)
    assert len(code) == 5
    for i, cell in enumerate(code):
        exec(compile(cell, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)  # noqa: S102

    assert namespace["spark"] is spark  # the platform's session is used as-is
    printed = capsys.readouterr().out
    assert namespace["totals"]["rows"] == 240 and namespace["totals"]["rows_failed"] == 0
    written = spark.read.parquet(str(out))
    assert written.count() == 240 and written.where("error is not null").count() == 0
    assert namespace["accuracy"] > 0.6, namespace["accuracy"]  # chance is 1/6
    neighbours = namespace["neighbours"].collect()
    assert len(neighbours) == 5 and neighbours[0]["path"] == namespace["query"]["path"]
    assert "nearest neighbours of" in printed and "logistic regression on the embeddings" in printed
    namespace["scored"].unpersist()
    namespace["features"].unpersist()


@pytest.mark.slow
def test_the_notebook_runs_as_a_script(fixtures_dir, shapes_model, tmp_path):
    """``python notebooks/score_and_featurize.py``: a local session of its own, workers on this interpreter."""
    import pyarrow.parquet as pq

    out = tmp_path / "predictions.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    here = str(Path(sys.executable).parent)  # without it on PATH, "python3" is not this interpreter
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if d != here)
    env.update(
        IMAGE_TRANSFER_IMAGES=str(fixtures_dir / "images"),
        IMAGE_TRANSFER_MODEL=str(shapes_model),
        IMAGE_TRANSFER_OUTPUT=str(out),
        IMAGE_TRANSFER_MASTER="local[2]",
    )
    done = subprocess.run(
        [sys.executable, str(NOTEBOOK)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "240 images, 0 failed" in done.stdout and "nearest neighbours of" in done.stdout
    written = pq.read_table(out)
    assert written.num_rows == 240 and written.column("error").null_count == 240


def test_the_bundle_deploys_the_notebook_with_its_widgets_as_job_parameters():
    import re

    import yaml

    root = NOTEBOOK.parents[1]
    job_file = root / "resources" / "score_and_featurize_notebook.job.yml"
    job = yaml.safe_load(job_file.read_text())["resources"]["jobs"]["score_and_featurize_notebook"]
    (task,) = job["tasks"]
    assert (job_file.parent / task["notebook_task"]["notebook_path"]).resolve() == NOTEBOOK
    widgets = set(re.findall(r'widget\("(\w+)"', NOTEBOOK.read_text()))
    assert {p["name"] for p in job["parameters"]} == widgets == {"images", "model", "output"}
