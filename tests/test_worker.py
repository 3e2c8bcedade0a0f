"""What a scoring worker does to itself: the TensorFlow import on a background thread, and cheap task switches."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys
import weakref
import zipfile
import zipimport
from pathlib import Path

import pytest

from image_transfer import read_images, score_images, scoring_run
from image_transfer.score import settle_worker


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_settling_freezes_what_lives_and_frees_what_died_since_the_last_freeze():
    try:
        node = _Node()
        ref = weakref.ref(node)
        settle_worker()  # node is alive: frozen, so collections skip it
        del node
        gc.collect()
        assert ref() is not None, "a frozen cycle was collected"
        assert gc.get_freeze_count() > 0
        settle_worker()  # the next settle (a new model loaded) unfreezes first and collects the dead cycle
        assert ref() is None
    finally:
        gc.unfreeze()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12 re-reads a zip only when it is next used")
def test_settling_stops_rereading_sparks_own_archives_only(tmp_path):
    def archive(name: str) -> str:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("module_in_zip.py", "X = 1\n")
        return str(path)

    spark_zip, other_zip = archive("pyspark.zip"), archive("other.zip")
    importers = {p: zipimport.zipimporter(p) for p in (spark_zip, other_zip)}
    sys.path_importer_cache.update(importers)
    try:
        before = {p: imp._files for p, imp in importers.items()}
        settle_worker()
        importlib.invalidate_caches()  # what PySpark's worker runs after every task
        assert importers[spark_zip]._files is before[spark_zip]  # not read again
        assert importers[other_zip]._files is not before[other_zip]  # a user's zip: re-read as before
    finally:
        gc.unfreeze()
        for p in importers:
            sys.path_importer_cache.pop(p, None)


BACKGROUND = """
import json, sys
from image_transfer import score

calls = []
real = score._import_tensorflow

def failing_once(cores):
    calls.append(cores)
    if len(calls) == 1:
        raise RuntimeError("the background import failed")
    real(cores)

score._import_tensorflow = failing_once if sys.argv[1] == "fail" else real
thread = score.start_preparing_worker()
score.prepare_worker()  # waits for the background thread; repeats the import if it failed
print(json.dumps({"alive": thread.is_alive(), "tf": "tensorflow" in sys.modules, "calls": len(calls)}))
"""


@pytest.mark.parametrize("case", ["ok", "fail"])
def test_the_first_task_waits_for_the_background_import_and_repeats_a_failed_one(case):
    done = subprocess.run(
        [sys.executable, "-c", BACKGROUND, case], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["alive"] is False and out["tf"] is True
    assert out["calls"] == (2 if case == "fail" else 0)


def test_a_worker_that_scored_skips_the_costs_between_tasks(spark, fixtures_dir, shapes_model, tmp_path):
    """After scoring, PySpark's per-task collection and cache invalidation have nothing large left to do."""
    from image_transfer.stats import is_connect

    if is_connect(spark):
        pytest.skip("the probe reads the worker's own state: classic session")
    scored = score_images(read_images(spark, str(fixtures_dir / "images")), str(shapes_model), top_k=1)
    with scoring_run(scored) as run:
        scored.write.mode("overwrite").parquet(str(Path(tmp_path) / "out"))

    def probe(batches: object) -> object:  # defined here: shipped by value, tests/ is not on the workers' path
        import gc
        import importlib
        import sys
        import zipimport

        import pandas as pd

        from image_transfer.stats import worker_id

        for _ in batches:
            pass
        spark_zips = [f for f in sys.path_importer_cache.values() if isinstance(f, zipimport.zipimporter)]
        before = [id(f._files) for f in spark_zips]
        importlib.invalidate_caches()
        reread = sum(a != id(f._files) for a, f in zip(before, spark_zips, strict=True))
        yield pd.DataFrame({"worker": [worker_id()], "frozen": [gc.get_freeze_count()], "reread": [reread]})

    probes = spark.range(4, numPartitions=4).mapInPandas(probe, "worker string, frozen long, reread long").collect()
    scorers = [p for p in probes if p["worker"] in run.workers()]
    assert scorers, (probes, run.workers())
    for p in scorers:
        assert p["frozen"] > 100_000, p  # TensorFlow and the model are out of the collector's sight
        if sys.version_info < (3, 12):
            assert p["reread"] == 0, p  # no Spark archive was read again
