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
from image_transfer.runtime import is_connect

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


def batches(
    monkeypatch, worker: str, sizes: list[int], rss: list[int], failed: int = 0, warned: int = 0, **facts: str
) -> list[list]:
    """Rows of 8-image batches as ``BatchReporter`` makes them, with an ``error`` column (``failed`` rows)
    and the first ``warned`` rows with a silenced decoder warning."""
    from image_transfer.scoring import stats

    reporter = stats.BatchReporter()
    reporter.worker, reporter.code = worker, stats.worker_code(worker)
    monkeypatch.setitem(stats._PROCESS, "model_loads", stats._PROCESS["model_loads"] + 1)  # loaded, traced
    monkeypatch.setitem(stats._PROCESS, "traces", stats._PROCESS["traces"] + 1)
    for name, value in facts.items():
        monkeypatch.setitem(stats._WORKER_EXTRA, name, value)
    rows = []
    for size, mb in zip(sizes, rss, strict=True):
        monkeypatch.setattr(stats, "peak_rss_mb", lambda mb=mb: mb)
        if "gpu_assigned" in facts:  # grows from one GPU to both
            monkeypatch.setitem(stats._WORKER_EXTRA, "gpu_assigned", facts["gpu_assigned"][: 1 + 2 * len(rows) // 8])
        warnings = [int(len(rows) + i < warned) for i in range(8)]
        columns = stats.stats_columns(8, reporter.report(batch_bytes=size), warnings)
        for i in range(8):
            error = "bad" if failed and len(rows) < failed else None
            values = [columns[f"{stats.STATS_PREFIX}{n}"][i] for n in stats.STATS_FIELDS]
            rows.append([v.item() if hasattr(v, "item") else v for v in values] + [error])  # numpy to Python
    for name in facts:
        monkeypatch.delitem(stats._WORKER_EXTRA, name)
    return rows


@pytest.mark.connect
@pytest.mark.parametrize("legacy", [False, True])
def test_the_observed_metric_counts_each_worker_exactly(spark, monkeypatch, legacy):
    from pyspark.sql.types import StringType, StructField, StructType

    from image_transfer.scoring.stats import STATS_PREFIX, WorkerStats, struct_fields

    data = batches(monkeypatch, "host-b:7", [100, 300, 200], [500, 520, 540], failed=1, warned=3)
    data += batches(monkeypatch, "host-a:12", [50, 60], [500, 520])  # 520: within 1/16 of the reported 500
    gpus = {"gpu": "0,1", "cuda_visible_devices": "0, 1", "gpu_assigned": "1,0"}
    data += batches(monkeypatch, "host-a:9", [1000, 10], [630, 600], **gpus)
    schema = StructType([*struct_fields(), StructField("error", StringType())])
    frame = spark.createDataFrame([tuple(r) for r in data], schema).repartition(3)
    key = "spark.sql.legacy.castComplexTypesToString.enabled"
    before = spark.conf.get(key, "false")
    spark.conf.set(key, str(legacy).lower())
    try:
        stats = WorkerStats.create(spark)
        field = lambda name: F.col(f"{STATS_PREFIX}{name}")  # noqa: E731
        observed = stats.attach(frame, field, F.col("error").isNotNull())
        assert observed.count() == 56
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
        "peak_rss_mb": 540,
        "rows_warned": 3,
        "peak_batch_bytes": 300,
        "gpu": None,
        "cuda_visible_devices": None,
        "conversions": 0,
        "engine": None,  # these simulated workers report no engine
        "interpreter": None,
    }
    assert (workers["host-a:12"]["batches"], workers["host-a:12"]["rows"]) == (2, 16)
    assert workers["host-a:12"]["peak_rss_mb"] == 500  # reported: raised by 1/16 or more
    host_a9 = workers["host-a:9"]  # the largest batch and memory peak: exact
    assert (host_a9["peak_batch_bytes"], host_a9["peak_rss_mb"]) == (1000, 630)
    assert (host_a9["gpu"], host_a9["cuda_visible_devices"], host_a9["gpu_assigned"]) == (
        ["0", "1"],
        "0, 1",
        ["0", "1"],
    )
    assert stats.metrics().keys() == {"workers"}


@pytest.mark.connect
def test_what_reaches_the_driver_is_bounded_by_the_workers_not_the_batches(spark, images, shapes_model):
    texts = {}
    for batch_size in (4, 60):  # 60 batches, or 4
        scored = score_images(spark.read.parquet(images), str(shapes_model), batch_size=batch_size, partitions=2)
        run = scoring_run(scored)
        assert len(scored.collect()) == 240
        metrics = run.stats.metrics()
        assert metrics.keys() == {"workers"}, metrics  # one string metric, whatever the session kind
        texts[batch_size] = metrics["workers"]
        workers = run.workers()
        totals = run.totals()
        assert (totals["rows"], totals["rows_failed"]) == (240, 0), workers
        assert 240 // batch_size <= totals["batches"] <= 240 // batch_size + 2, workers  # a short batch per task
        assert 1 <= len(workers) <= 2, workers
        assert all(w["model_loads"] <= 1 and w["traces"] <= 1 for w in workers.values()), workers
        assert all(w["peak_rss_mb"] > 0 and w["peak_batch_bytes"] > 0 for w in workers.values()), workers
    from image_transfer.scoring.stats import PEAK_RAISES

    for batch_size, text in texts.items():
        lines = dict(line.split(":", 1) for line in text.splitlines())
        assert lines.keys() == {"rows", "failed", "batches", "warned", "peaks", "reports"}, text
        for name in ("rows", "batches"):  # a bin per worker (and task, until Spark merges them)
            assert 1 <= lines[name].count("}") <= 4, (batch_size, lines[name])
        reports = lines["reports"].split("\t")  # a few per worker: loads, traces, raised peaks
        assert len(reports) <= 2 * (2 * PEAK_RAISES + 4), (batch_size, reports)


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
    from image_transfer.api.incremental import score_new_images

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
