"""prepare, evaluate and the training feed on either session kind (CI runs these under Spark Connect too)."""

from __future__ import annotations

import pytest

from image_transfer.errors import UserError
from image_transfer.runtime import is_connect
from image_transfer.training.evaluate import evaluate
from image_transfer.training.feed import cache_location, choose_path
from image_transfer.training.prepare import prepare


@pytest.mark.connect
def test_prepare_then_evaluate(spark, fixtures_dir, shapes_model, tmp_path):
    dataset = tmp_path / "dataset.parquet"
    result = prepare(spark, str(fixtures_dir / "images"), str(dataset))
    assert result.rows == 240 and len(result.class_names) == 6
    data = spark.read.parquet(str(dataset))
    assert data.where("error is null").count() == 240
    assert {r["split"] for r in data.select("split").distinct().collect()} == {"train", "validation"}
    metrics = evaluate(spark, data, model_path=str(shapes_model), split="validation")
    assert metrics.rows == data.where("split = 'validation'").count() and metrics.rows_failed == 0
    assert metrics.accuracy > 0.5  # the fixture classifier on its own kind of images (chance: 1/6)


@pytest.mark.connect
def test_the_training_feed_says_what_spark_connect_needs(spark):
    if is_connect(spark):
        with pytest.raises(UserError, match="needs a SparkContext"):
            choose_path("petastorm", connect=True)
        assert choose_path("auto", connect=True) == "arrow"
        with pytest.raises(UserError, match="give --cache-dir under Spark Connect"):
            cache_location(None, spark)
    else:
        assert cache_location(None, spark).local  # a local session: a temp dir will do
    assert cache_location("/tmp", spark).url.startswith("file:///tmp/image-transfer-feed-")
