"""Embeddings from headless models: a backbone's own output, a spatial feature map pooled by its global average."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from image_transfer import featurize_images, read_images
from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.models.inspection import inspect_model


@pytest.fixture(scope="module")
def spatial_model(backbone_model, tmp_path_factory) -> Path:
    """The fixture backbone cut before its global average pooling: outputs (None, 8, 8, 64)."""
    import keras

    from image_transfer.models.artifact import read_metadata, save_model

    backbone = keras.saving.load_model(backbone_model, compile=False)
    cut = keras.Model(backbone.inputs, backbone.get_layer("conv3").output)
    path = tmp_path_factory.mktemp("spatial") / "spatial.keras"
    return save_model(cut, path, class_names=None, preprocess=read_metadata(str(backbone_model)).get("preprocess"))


def test_a_spatial_feature_map_is_pooled_and_says_so(spatial_model, backbone_model):
    info = inspect_model(str(spatial_model), embed=True)
    assert info.output_width == 64 and info.pooled_from == (None, 8, 8, 64)
    assert "global average of the (None, 8, 8, 64) feature map" in info.embedding_note()
    headless = inspect_model(str(backbone_model), embed=True)  # ends in its own pooling: its output as it is
    assert headless.output_width == 64 and headless.pooled_from is None
    with pytest.raises(UserError, match=r"its output \(None, 64\) is not class probabilities"):
        inspect_model(str(backbone_model), classify=True)


def test_an_output_that_is_neither_an_embedding_nor_a_feature_map_names_the_option(tmp_path):
    import keras

    from image_transfer.models.artifact import save_model

    inputs = keras.Input((8, 8, 3))
    tokens = keras.layers.Reshape((64, 3))(inputs)  # (None, 64, 3): a sequence, not an image feature map
    path = save_model(keras.Model(inputs, tokens), tmp_path / "tokens.keras", class_names=None)
    with pytest.raises(UserError, match=r"\(None, 64, 3\) is neither a batch of embeddings.*--layer"):
        inspect_model(str(path), embed=True)


def test_featurize_a_backbone_and_its_feature_map(spark, fixtures_dir, backbone_model, spatial_model, tmp_path, capsys):
    images = read_images(spark, str(fixtures_dir / "images" / "circle"))
    own = {r["path"]: r["embedding"] for r in featurize_images(images, str(backbone_model)).collect()}
    assert len(own) > 10 and all(len(e) == 64 for e in own.values())
    summary = tmp_path / "summary.json"
    ingested = tmp_path / "in"
    assert cli.run(["ingest", "--images", str(fixtures_dir / "images" / "circle"), "--output", str(ingested)]) == 0
    argv = ["featurize", "--input", str(ingested), "--model", str(spatial_model), "--output", str(tmp_path / "out")]
    assert cli.run([*argv, "--summary", str(summary)]) == 0
    assert "embedding: global average of the (None, 8, 8, 64) feature map" in capsys.readouterr().out
    assert "global average" in json.loads(summary.read_text())["embedding"]
    pooled = {r["path"]: r["embedding"] for r in spark.read.parquet(str(tmp_path / "out")).collect()}
    assert pooled.keys() == own.keys()
    for path, embedding in own.items():  # the backbone's own pooling, computed by ours
        assert np.allclose(pooled[path], embedding, atol=1e-4), path
