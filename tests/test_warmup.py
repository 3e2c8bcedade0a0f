"""Python workers started ahead of scoring: the scoring tasks run in the very workers that were readied."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from image_transfer.warmup import start_workers

# A fresh session: the RDD route (Spark 3.5 and 4.0 alike) must reach the very workers that score.
SCRIPT = """
import json, sys
from image_transfer import cli, read_images, score_images, scoring_run
from image_transfer.warmup import start_workers

spark = cli._spark("warm-up test", "local[2]")
readied = start_workers(spark).wait()
scored = score_images(read_images(spark, sys.argv[1]), sys.argv[2], top_k=2)
with scoring_run(scored) as run:
    rows = len(scored.collect())
print(json.dumps({"readied": readied, "workers": run.workers(), "rows": rows}))
"""


def test_scoring_runs_in_the_workers_started_ahead(fixtures_dir, shapes_model):
    """A fresh session: the warm-up readies one worker per slot, and those same workers load and score."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(fixtures_dir / "images"), str(shapes_model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["readied"]) == 2, out
    assert out["rows"] == 240
    assert set(out["workers"]) <= set(out["readied"]), out
    assert all(w["model_loads"] == 1 and w["traces"] == 1 for w in out["workers"].values()), out


@pytest.mark.connect
def test_a_head_start_readies_every_slot_and_none_under_connect(spark):
    from image_transfer.stats import is_connect

    if is_connect(spark):
        assert start_workers(spark) is None
        return
    handle = start_workers(spark)
    assert handle is not None and len(handle.wait(timeout=300)) == 2 and handle.error is None


def test_the_rdd_route_only_where_it_is_known_to_share_the_sql_workers(spark, monkeypatch):
    """Databricks' runtime has runners of its own: there (and as the fallback) the head start is a DataFrame job."""
    from image_transfer.stats import is_connect
    from image_transfer.warmup import WorkerStart, sql_worker_env

    if is_connect(spark):
        pytest.skip("no head start under Spark Connect")
    assert sql_worker_env(spark) == {"SPARK_SIMPLIFIED_TRACEBACK": "1"}
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    assert sql_worker_env(spark) is None
    handle = WorkerStart(spark, 2, rdd_env=None)
    assert handle.wait(timeout=300) and handle.error is None
