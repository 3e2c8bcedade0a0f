"""Spark's streaming checkpoint and file-sink layout, read through ``scoring.streaming`` (the one adapter):
checked on a real ``binaryFile`` stream on every Spark version CI runs."""

from __future__ import annotations

import pytest

from image_transfer.errors import UserError
from image_transfer.scoring import streaming


@pytest.fixture(scope="module")
def one_run(spark, tmp_path_factory):
    """Two AvailableNow runs of a binaryFile stream (no model): 3 files, then 2 more with awkward names."""
    root = tmp_path_factory.mktemp("stream")
    images, checkpoint, output = root / "in", root / "ckpt", root / "out"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (images / name).write_bytes(b"x" * 10)

    def run() -> None:
        stream = streaming.read_new_images(spark, str(images), source="binaryFile", max_files_per_trigger=2)
        query = (
            stream.select("path")
            .writeStream.option("checkpointLocation", str(checkpoint))
            .trigger(availableNow=True)
            .format("parquet")
            .start(str(output))
        )
        try:
            query.awaitTermination(120)
        finally:
            streaming.stop(query)

    run()
    first = streaming.last_batch(spark, f"{checkpoint}/commits")
    for name in ("with space.png", "plus+sign.png"):
        (images / name).write_bytes(b"y" * 5)
    run()
    return {"images": images, "checkpoint": str(checkpoint), "output": str(output), "first": first}


def test_the_checkpoint_says_which_batches_committed_and_which_files_each_took(spark, one_run):
    checkpoint = one_run["checkpoint"]
    first, last = one_run["first"], streaming.last_batch(spark, f"{checkpoint}/commits")
    assert first >= 1 and last > first  # two files per trigger: 3 files are two micro-batches
    assert streaming.last_batch(spark, f"{checkpoint}/offsets") == last
    before, after = (
        streaming.source_log_offset(spark, checkpoint, first),
        streaming.source_log_offset(spark, checkpoint, last),
    )
    assert streaming.source_log_offset(spark, checkpoint, -1) == -1
    assert 0 <= before < after

    def taken(lo: int, hi: int) -> list[str]:
        return sorted(r.path.rsplit("/", 1)[1] for r in streaming.files_taken(spark, checkpoint, lo, hi).collect())

    assert taken(-1, before) == ["a.png", "b.png", "c.png"]
    assert taken(before, after) == ["plus+sign.png", "with space.png"]  # decoded as the path column has them
    # The paths are the binaryFile column's own: they join with the rows the sink wrote.
    written = {r.path for r in spark.read.parquet(one_run["output"]).collect()}
    assert {r.path for r in streaming.files_taken(spark, checkpoint, -1, after).collect()} == written


def test_the_query_id_and_the_file_sink_log(spark, one_run, tmp_path):
    ident = streaming.checkpoint_id(spark, one_run["checkpoint"])
    assert ident and len(ident) == 36  # a UUID, the same for every run of the checkpoint
    assert streaming.checkpoint_id(spark, str(tmp_path / "never-ran")) is None
    assert streaming.last_batch(spark, f"{one_run['output']}/_spark_metadata") >= 1
    assert streaming.last_batch(spark, str(tmp_path / "missing")) == -1


def test_an_output_no_batch_committed_to_reads_as_empty_with_its_columns(spark, tmp_path):
    output = tmp_path / "out"
    (output / "_spark_metadata").mkdir(parents=True)  # what the file sink leaves before its first commit
    schema = spark.createDataFrame([("p",)], "path string").schema
    streaming.readable_when_empty(spark, str(output), schema)
    df = spark.read.parquet(str(output))
    assert df.columns == ["path"] and df.count() == 0
    assert not (output / "_spark_metadata").exists()


def test_sources(monkeypatch):
    assert streaming.resolve_source("auto", databricks=True) == "cloudFiles"
    assert streaming.resolve_source("auto", databricks=False) == "binaryFile"
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    assert streaming.resolve_source("auto") == "cloudFiles"  # asked of runtime, the one place that knows
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION")
    assert streaming.resolve_source("auto") == "binaryFile"
    with pytest.raises(UserError, match="source must be one of"):
        streaming.resolve_source("kafka")
