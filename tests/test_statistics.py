"""Worker statistics: one Observation path on classic and Connect sessions, bounded by workers, not images.

Also: the model runs once per row whatever is chained after scoring, and partial reads (``show``,
``first``, ``limit``) report what they scored.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from image_transfer import featurize_images, read_images, score_images, scoring_run
from image_transfer.session import is_connect

SCORING = Path(__file__).resolve().parents[1] / "src" / "image_transfer" / "scoring"


@pytest.fixture(scope="module")
def images(spark, fixtures_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("statistics") / "images.parquet"
    read_images(spark, str(fixtures_dir / "images")).write.parquet(str(out))
    return str(out)


def python_udf_nodes(df, capsys) -> list[str]:
    """The Python UDF nodes of ``df``'s physical plan, from ``explain(mode="formatted")``."""
    capsys.readouterr()
    df.explain(mode="formatted")
    plan = capsys.readouterr().out
    return re.findall(r"^\(\d+\) ((?:Arrow|Batch)EvalPython)", plan, flags=re.M)


def reports(spark, rows: list[dict]):
    """A DataFrame whose ``_stats_*`` columns carry the given reports (one row each, then a null row)."""
    from pyspark.sql.types import StructType

    from image_transfer.scoring.stats import STATS_FIELDS, struct_fields

    data = [row for r in rows for row in ([r.get(n) for n in STATS_FIELDS], [None] * len(STATS_FIELDS))]
    return spark.createDataFrame(data, StructType(struct_fields())).repartition(3)


def report(worker: str, batches: int, **facts: str) -> dict:
    """A worker's report after ``batches`` batches of 8 rows."""
    counts = {"batches": batches, "rows": 8 * batches, "rows_failed": batches // 2, "model_loads": 1, "traces": 1}
    peaks = {"batch_bytes": 100 * batches, "peak_batch_bytes": 50 + batches, "peak_rss_mb": 300 + batches}
    return {"worker": worker, **counts, **peaks, **facts}


@pytest.mark.connect
@pytest.mark.parametrize("legacy", [False, True])
def test_the_observed_metric_keeps_each_workers_latest_report(spark, legacy):
    from image_transfer.scoring.stats import STATS_PREFIX, WorkerStats

    interleaved = [report("host-b:7", n) for n in (1, 2, 3)] + [report("host-a:12", n) for n in (2, 1)]
    interleaved += [report("host-a:9", 1, gpu="0,1", cuda_visible_devices="0, 1")]
    key = "spark.sql.legacy.castComplexTypesToString.enabled"
    before = spark.conf.get(key, "false")
    spark.conf.set(key, str(legacy).lower())
    try:
        stats = WorkerStats.create(spark)
        observed = stats.attach(reports(spark, interleaved), lambda name: F.col(f"{STATS_PREFIX}{name}"))
        assert observed.count() == 2 * len(interleaved)
        workers = stats.by_worker()
    finally:
        spark.conf.set(key, before)
    assert sorted(workers) == ["host-a:12", "host-a:9", "host-b:7"]
    assert workers["host-b:7"] == {
        "model_loads": 1,
        "traces": 1,
        "batches": 3,
        "rows": 24,
        "rows_failed": 1,
        "peak_rss_mb": 303,
        "peak_batch_bytes": 53,
        "batch_bytes": 300,
        "gpu": None,
        "cuda_visible_devices": None,
    }
    assert workers["host-a:12"]["batches"] == 2 and workers["host-a:12"]["rows"] == 16  # the latest, not the last seen
    assert (workers["host-a:9"]["gpu"], workers["host-a:9"]["cuda_visible_devices"]) == (["0", "1"], "0, 1")
    assert stats.metrics().keys() == {"workers"}
    assert len(stats.metrics()["workers"].splitlines()) == 3  # one line per worker


@pytest.mark.connect
def test_what_reaches_the_driver_is_one_line_per_worker(spark, images, shapes_model):
    scored = score_images(spark.read.parquet(images), str(shapes_model), batch_size=8, partitions=2)
    run = scoring_run(scored)
    assert len(scored.collect()) == 240
    metrics = run.stats.metrics()
    workers = run.workers()
    assert metrics.keys() == {"workers"}, metrics  # one string metric, whatever the session kind
    lines = metrics["workers"].splitlines()
    assert 1 <= len(lines) == len(workers) <= 2, lines  # per worker, not per batch (30 batches)
    assert len(metrics["workers"]) < 400 * len(workers)
    totals = run.totals()
    assert (totals["rows"], totals["rows_failed"]) == (240, 0)
    assert totals["batches"] >= 30
    assert all(w["model_loads"] <= 1 and w["traces"] <= 1 for w in workers.values()), workers
    assert all(w["peak_rss_mb"] > 0 and 0 < w["peak_batch_bytes"] <= w["batch_bytes"] for w in workers.values())


def test_the_statistics_use_no_private_pyspark_api():
    private = re.compile(r"_accumulatorRegistry|\._jdf\b|\._jvm\b|\._jsc\b|\._sc\b|\._jo\b")
    for name in ("stats.py", "frame.py", "run.py", "worker.py"):
        text = (SCORING / name).read_text()
        assert not private.search(text), (name, private.search(text))


@pytest.mark.connect
@pytest.mark.parametrize(
    "mode, condition",
    [
        ("embed", "error IS NULL"),
        ("classify", "probability > 0.5"),
        ("classify", "path LIKE '%circle%'"),  # on the keys: still every row scored, once
    ],
)
def test_a_filter_after_scoring_runs_the_model_once_per_row(spark, images, shapes_model, capsys, mode, condition):
    source = spark.read.parquet(images)
    make = featurize_images if mode == "embed" else score_images
    scored = make(source, str(shapes_model), batch_size=16)
    filtered = scored.where(F.expr(condition))
    assert python_udf_nodes(filtered, capsys) == ["ArrowEvalPython"]
    run = scoring_run(scored)
    assert 0 < len(filtered.collect()) <= 240
    assert run.totals()["rows"] == 240, run.workers()  # every image scored once, not once more for the filter
    assert all(w["model_loads"] <= 1 for w in run.workers().values()), run.workers()


@pytest.mark.connect
@pytest.mark.parametrize("action", ["show", "first", "limit"])
def test_a_partial_read_reports_the_batches_spark_read(spark, images, shapes_model, action, capsys):
    scored = score_images(spark.read.parquet(images), str(shapes_model), batch_size=8, partitions=2)
    run = scoring_run(scored)
    if action == "show":
        scored.show(5)
        wanted = 6  # show(n) reads n + 1 rows
    elif action == "first":
        assert scored.first() is not None
        wanted = 1
    else:
        assert len(scored.limit(20).collect()) == 20
        wanted = 20
    totals = run.totals()
    assert wanted <= totals["rows"] <= 240, run.workers()
    assert totals["batches"] >= math.ceil(wanted / 8), run.workers()
    assert totals["rows_failed"] == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_partial_read_stops_the_python_workers_it_did_not_read_to_the_end(spark, images, shapes_model):
    """What the README says: Spark stops the Python worker of a task whose output it did not read to the end."""
    if is_connect(spark):
        pytest.skip("worker pids are only visible to a local classic session")
    source = spark.read.parquet(images)
    warm = score_images(source, str(shapes_model), batch_size=8, partitions=2)
    warm.collect()
    partial = score_images(source, str(shapes_model), batch_size=8, partitions=2)
    partial.limit(5).collect()
    stopped = scoring_run(partial).workers()
    assert stopped, "a partial read reports the worker that scored it"
    deadline = time.monotonic() + 30
    pids = {int(w.rsplit(":", 1)[1]) for w in stopped}
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), stopped
    after = score_images(source, str(shapes_model), batch_size=8, partitions=2)
    after.collect()
    workers = scoring_run(after).workers()
    assert not set(workers) & set(stopped)
    assert sum(w["model_loads"] for w in workers.values()) >= 1, workers  # a new worker loads the model again
    # A few rows of a limited input: every task is read to the end, no worker stops.
    few = score_images(source.limit(20), str(shapes_model), batch_size=8, partitions=2)
    few.show(20)
    kept = scoring_run(few).workers()
    assert sum(w["rows"] for w in kept.values()) == 20, kept
    time.sleep(2)
    assert all(_alive(int(w.rsplit(":", 1)[1])) for w in kept), kept


@pytest.mark.connect
def test_a_stream_adds_up_its_micro_batches(spark, fixtures_dir, shapes_model, tmp_path):
    from image_transfer.scoring.incremental import score_new_images

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for path in sorted((fixtures_dir / "images").rglob("*.png"))[:12]:
        shutil.copy(path, incoming / f"{path.parent.name}-{path.name}")
    result = score_new_images(
        spark,
        str(incoming),
        str(shapes_model),
        checkpoint=str(tmp_path / "checkpoint"),
        output=str(tmp_path / "out"),
        max_files_per_trigger=4,
        batch_size=2,
    )
    assert [b["rows"] for b in result.batches] == [4, 4, 4]
    workers = result.workers
    assert sum(w["rows"] for w in workers.values()) == 12, workers
    assert sum(w["batches"] for w in workers.values()) == 6, workers
    assert all(w["model_loads"] <= 1 and w["traces"] <= 1 for w in workers.values()), workers
