"""Scoped Arrow settings: building a scored DataFrame changes no session setting; each frame's actions
run with its own Arrow batches inside ``scoring_run(df).settings()``, and the session's come back after.

The batches are observed from the worker side: the statistics count the model calls (one per Arrow
batch when a batch holds at most ``batch_size`` rows) and the largest batch's encoded bytes.
"""

from __future__ import annotations

import pytest

from image_transfer import read_images, score_images, scoring_run
from image_transfer.scoring.options import ARROW_BATCH_CONF, ARROW_BYTES_CONF

pytestmark = pytest.mark.connect

MAX_IMAGE = 16 * 1024  # the fixture images are 1.2-14.8 KB
SMALL_MB = 2 * MAX_IMAGE / 2**20  # two of the largest images per Arrow batch
LARGER_MB = 16 * MAX_IMAGE / 2**20


@pytest.fixture(scope="module")
def images(spark, fixtures_dir):
    return read_images(spark, str(fixtures_dir / "images")).repartition(2).cache()


def _keys(spark) -> tuple[str, ...]:
    return (ARROW_BATCH_CONF, ARROW_BYTES_CONF) if int(spark.version.split(".")[0]) >= 4 else (ARROW_BATCH_CONF,)


def _rows_per_batch(scored) -> tuple[float, int, int]:
    """(rows per model call, rows, the largest batch's bytes) of the action that just ran."""
    workers = scoring_run(scored).workers().values()
    rows = sum(w["rows"] for w in workers)
    return rows / sum(w["batches"] for w in workers), rows, max(w["peak_batch_bytes"] for w in workers)


def test_building_and_running_a_scored_frame_leaves_the_users_settings(spark, images, shapes_model):
    keys = _keys(spark)
    spark.conf.set(ARROW_BATCH_CONF, "5000")
    for key in keys[1:]:
        spark.conf.unset(key)
    try:
        scored = score_images(images, str(shapes_model), batch_size=64, max_image_bytes=MAX_IMAGE, max_batch_mb=1)
        assert spark.conf.get(ARROW_BATCH_CONF) == "5000"
        assert all(spark.conf.get(k, None) is None for k in keys[1:])  # unset stays unset
        run = scoring_run(scored)
        with run.settings():
            assert spark.conf.get(ARROW_BATCH_CONF) == run.arrow[ARROW_BATCH_CONF] != "5000"
            assert scored.count() == 240
        assert spark.conf.get(ARROW_BATCH_CONF) == "5000"
        assert all(spark.conf.get(k, None) is None for k in keys[1:])
        with pytest.raises(ZeroDivisionError), run.settings():  # restored when the block fails too
            _ = 1 / 0
        assert spark.conf.get(ARROW_BATCH_CONF) == "5000"
        assert all(spark.conf.get(k, None) is None for k in keys[1:])
    finally:
        spark.conf.unset(ARROW_BATCH_CONF)
    with run.settings():  # an unset setting is unset again
        pass
    assert spark.conf.get(ARROW_BATCH_CONF, None) is None


def test_two_frames_each_run_their_own_batches(spark, images, shapes_model):
    small = score_images(images, str(shapes_model), batch_size=64, max_image_bytes=MAX_IMAGE, max_batch_mb=SMALL_MB)
    larger = score_images(images, str(shapes_model), batch_size=64, max_image_bytes=MAX_IMAGE, max_batch_mb=LARGER_MB)
    # The frame built first runs its own budget, not the last built one's.
    with scoring_run(small).settings():
        assert small.where("error IS NULL").count() == 240
    per_batch, rows, peak = _rows_per_batch(small)
    assert rows == 240 and peak <= SMALL_MB * 2**20 and per_batch <= 4, (per_batch, peak)

    with scoring_run(larger).settings():
        assert larger.where("error IS NULL").count() == 240
    per_batch_larger, rows, peak = _rows_per_batch(larger)
    assert rows == 240 and peak <= LARGER_MB * 2**20
    assert per_batch_larger >= 8 > per_batch, (per_batch_larger, per_batch)

    # Without the block, an action gets the session's batches: model calls of batch_size rows, uncapped bytes.
    unscoped = score_images(images, str(shapes_model), batch_size=64, max_image_bytes=MAX_IMAGE, max_batch_mb=SMALL_MB)
    assert unscoped.count() == 240
    per_batch_session, _, peak = _rows_per_batch(unscoped)
    assert per_batch_session >= 30 and peak > SMALL_MB * 2**20, (per_batch_session, peak)
