"""Feeds: Petastorm and Arrow stream the same rows into tf.data; their caches never outlive the block."""

from __future__ import annotations

import numpy as np
import pytest
from training_data import fixture_dataset

from image_transfer.errors import UserError
from image_transfer.training.feed import cache_location, choose_path, open_feed, petastorm_available
from image_transfer.training.prepare import usable

PATHS = ["arrow", pytest.param("petastorm", marks=pytest.mark.skipif(not petastorm_available(), reason="no Petastorm"))]
SIZE = (64, 64)


@pytest.fixture(scope="module")
def dataset(spark):
    return spark.read.parquet(fixture_dataset(spark))


def _batches(df, path, cache_dir, **options):
    with open_feed(df, path=path, cache_dir=str(cache_dir), columns=("path", "content", "label_index")) as feed:
        with feed.make_tf_dataset(batch_size=16, image_size=SIZE, keys=("path",), **options) as ds:
            return [(x.numpy(), y.numpy(), [p.decode() for p in k["path"].numpy()]) for x, y, k in ds]


@pytest.mark.skipif(not petastorm_available(), reason="no Petastorm here (pyarrow > 14): Arrow path only")
def test_both_paths_give_the_same_batches(dataset, tmp_path):
    df = usable(dataset, "validation")
    arrow = _batches(df, "arrow", tmp_path)
    peta = _batches(df, "petastorm", tmp_path)
    assert [len(b[1]) for b in arrow] == [len(b[1]) for b in peta]
    for (ax, ay, ap), (px, py, pp) in zip(arrow, peta, strict=True):
        assert ap == pp
        np.testing.assert_array_equal(ay, py)
        np.testing.assert_array_equal(ax, px)
    # Training order and augmentation differ per path, but one epoch holds the same rows.
    a = _batches(df, "arrow", tmp_path, training=True)
    p = _batches(df, "petastorm", tmp_path, training=True)
    assert sorted(x for b in a for x in b[2]) == sorted(x for b in p for x in b[2])


@pytest.mark.parametrize("path", PATHS)
def test_evaluation_batches_are_every_row_once_decoded_and_labelled(dataset, tmp_path, path):
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize

    df = usable(dataset, "validation")
    expected = {r["path"]: (r["label_index"], bytes(r["content"])) for r in df.collect()}
    batches = _batches(df, path, tmp_path)
    assert all(len(b[1]) == 16 for b in batches[:-1]) and 0 < len(batches[-1][1]) <= 16
    seen = [p for b in batches for p in b[2]]
    assert sorted(seen) == sorted(expected)
    x, y, paths = batches[0]
    assert x.shape == (16, 64, 64, 3) and x.dtype == np.float32 and y.dtype == np.int32
    for i in (0, 7):
        label, content = expected[paths[i]]
        assert y[i] == label
        np.testing.assert_allclose(x[i], decode_resize(tf.constant(content), 64, 64).numpy(), atol=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_training_batches_shuffle_augment_and_repeat(dataset, tmp_path, path):
    df = usable(dataset, "validation")
    plain = _batches(df, path, tmp_path)
    trained = _batches(df, path, tmp_path, training=True, num_epochs=2, seed=3)
    rows = [p for b in trained for p in b[2]]
    plain_rows = [p for b in plain for p in b[2]]
    assert len(rows) == 2 * len(plain_rows) and set(rows) == set(plain_rows)
    assert rows[: len(plain_rows)] != plain_rows  # shuffled
    images = np.concatenate([b[0] for b in trained])
    assert images.min() >= 0.0 and images.max() <= 255.0
    by_path = {p: img for b in plain for p, img in zip(b[2], b[0], strict=True)}
    first = trained[0]
    changed = [not np.allclose(by_path[p], img) for p, img in zip(first[2], first[0], strict=True)]
    assert sum(changed) >= len(changed) - 1  # augmented (a crop/flip/brightness draw is rarely a no-op)


@pytest.mark.parametrize("path", PATHS)
def test_cache_is_deleted_after_success_and_after_failure(dataset, tmp_path, path):
    df = usable(dataset, "validation")
    with open_feed(df, path=path, cache_dir=str(tmp_path)) as feed:
        assert any(tmp_path.iterdir()) and feed.rows == df.count() and feed.path == path
    assert not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="boom"):
        with open_feed(df, path=path, cache_dir=f"file://{tmp_path}") as feed:
            with feed.make_tf_dataset(batch_size=4, image_size=SIZE, training=True, num_epochs=None) as ds:
                next(iter(ds))
                raise RuntimeError("boom")
    assert not any(tmp_path.iterdir())


def test_empty_input_is_a_clear_error_and_leaves_no_cache(dataset, tmp_path):
    with pytest.raises(UserError, match="no rows"):
        with open_feed(dataset.limit(0), path="arrow", cache_dir=str(tmp_path)):
            pass
    assert not any(tmp_path.iterdir())
    with pytest.raises(UserError, match="no column"):
        with open_feed(dataset.select("path"), path="arrow", cache_dir=str(tmp_path)):
            pass


def test_path_choice():
    assert choose_path("auto") == ("petastorm" if petastorm_available() else "arrow")
    assert choose_path("arrow") == "arrow"
    with pytest.raises(UserError, match="unknown data path"):
        choose_path("parquet")
    if not petastorm_available():
        with pytest.raises(UserError, match="arrow"):
            choose_path("petastorm")


def test_cache_locations(spark):
    loc = cache_location("file:///dbfs/ml/cache", spark)
    assert loc.local.startswith("/dbfs/ml/cache/image-transfer-feed-") and loc.url == "file://" + loc.local
    assert cache_location("dbfs:/ml/cache", spark).local.startswith("/dbfs/ml/cache/")
    assert cache_location("/Volumes/c/s/v/tmp", spark).local.startswith("/Volumes/c/s/v/tmp/")
    assert cache_location(None, spark).local != cache_location(None, spark).local
    with pytest.raises(UserError, match="mounts"):
        cache_location("s3://bucket/cache", spark)
