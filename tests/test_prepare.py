"""prepare: folder -> labelled Parquet dataset with a stable split; bad files reported, never dropped."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hostile_images import corpus

from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.training.prepare import class_names, prepare, usable

CLASSES = ["circle", "cross", "ring", "square", "star", "triangle"]


def _copy_classes(fixtures_dir: Path, dest: Path, classes=CLASSES, per_class: int = 40) -> None:
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        for f in sorted((fixtures_dir / "images" / cls).iterdir())[:per_class]:
            shutil.copy(f, dest / cls / f.name)


@pytest.fixture(scope="module")
def messy_folder(fixtures_dir, tmp_path_factory) -> Path:
    """Three fixture classes with 10 images each, plus every hostile file the corpus has under ``junk/``,
    an image outside any class folder and a file with an extension that is not read."""
    root = tmp_path_factory.mktemp("messy") / "images"
    _copy_classes(fixtures_dir, root, CLASSES[:3], per_class=10)
    (root / "junk").mkdir()
    for name, (data, _) in corpus().items():
        (root / "junk" / name).write_bytes(data)
    shutil.copy(fixtures_dir / "images" / "circle" / "circle_000.png", root / "loose.png")
    (root / "circle" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def messy(spark, messy_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy-out") / "dataset.parquet"
    result = prepare(spark, str(messy_folder), str(out), extensions=["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif"])
    return result, spark.read.parquet(str(out))


def test_bad_files_are_listed_and_kept_out_of_training_not_dropped(messy):
    result, df = messy
    hostile = corpus()
    bad = {f"junk/{n}" for n, (_, ok) in hostile.items() if not ok}
    rejected = {r["path"].split("/images/", 1)[1]: r["reason"] for r in result.rejected}
    assert bad <= set(rejected), f"not reported: {bad - set(rejected)}"
    assert rejected["loose.png"] == "no label"
    assert "not an image" in rejected["junk/text.png"] and "truncated" in rejected["junk/truncated.jpg"]
    assert rejected["junk/empty.jpg"] == "empty image"
    # Every file read is a row; every reported file is out of the usable rows.
    assert df.count() == result.rows == 3 * 10 + len(hostile) + 1
    usable_paths = {r["path"] for r in usable(df).select("path").collect()}
    assert not usable_paths & {r["path"] for r in result.rejected}
    assert all(not p.endswith(".txt") for p in usable_paths)


def test_readable_oddities_are_usable_and_decodable_by_tensorflow(messy):
    import tensorflow as tf

    _, df = messy
    junk = usable(df).where("label = 'junk'").select("path", "content").collect()
    names = {r["path"].rsplit("/", 1)[1] for r in junk}
    assert names == {n for n, (_, ok) in corpus().items() if ok}
    for r in junk:  # WebP and TIFF were re-encoded so the training graph can decode them
        assert tf.io.decode_image(bytes(r["content"]), channels=3, expand_animations=False).shape[-1] == 3


def test_labels_counts_and_label_index(messy):
    result, df = messy
    assert result.class_names == ("circle", "cross", "junk", "ring") or result.class_names == tuple(
        sorted(result.counts)
    )
    assert class_names(df) == result.class_names
    for label, counts in result.counts.items():
        n = usable(df).where(f"label = '{label}'").count()
        assert sum(counts.values()) == n
    assert {r["label_index"] for r in usable(df).select("label_index").distinct().collect()} == set(
        range(len(result.class_names))
    )
    assert sum(result.counts["circle"].values()) == 10


def test_split_is_stable_when_the_folder_moves_and_follows_the_fraction(spark, fixtures_dir, tmp_path):
    splits = []
    for where in ("a", "b/deeper"):
        root = tmp_path / where / "imgs"
        _copy_classes(fixtures_dir, root, CLASSES[:2], per_class=40)
        out = tmp_path / where / "ds.parquet"
        prepare(spark, str(root), str(out), validation_fraction=0.25)
        rows = spark.read.parquet(str(out)).select("path", "split").collect()
        splits.append({r["path"].split("/imgs/", 1)[1]: r["split"] for r in rows})
    assert splits[0] == splits[1]
    share = sum(s == "validation" for s in splits[0].values()) / len(splits[0])
    assert 0.12 <= share <= 0.38, share
    assert set(splits[0].values()) == {"train", "validation"}


def test_labels_csv_joined_on_relative_or_absolute_paths(spark, fixtures_dir, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    expected = {}
    for cls in ("star", "ring"):
        for f in sorted((fixtures_dir / "images" / cls).iterdir())[:6]:
            shutil.copy(f, root / f.name)
            expected[f.name] = f"{cls}-label"
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, (name, label) in enumerate(sorted(expected.items())):
            if name.startswith("star_000"):
                continue  # one image without a label
            w.writerow([name if i % 2 else str(root / name), label])
    result = prepare(spark, str(root), str(tmp_path / "ds.parquet"), labels=str(labels))
    got = {
        r["path"].rsplit("/", 1)[1]: r["label"]
        for r in usable(spark.read.parquet(str(tmp_path / "ds.parquet"))).select("path", "label").collect()
    }
    del expected[next(n for n in expected if n.startswith("star_000"))]
    assert got == expected
    assert [r["reason"] for r in result.rejected] == ["no label"]


def test_cli_prepare_prints_counts_and_writes_summary(spark, fixtures_dir, tmp_path, capsys):
    root = tmp_path / "imgs"
    _copy_classes(fixtures_dir, root, CLASSES[:2], per_class=8)
    (root / "square").mkdir()
    (root / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    summary = tmp_path / "summary.json"
    code = cli.run(
        ["prepare", "--images", str(root), "--output", str(tmp_path / "ds"), "--summary", str(summary)]
        + ["--validation-fraction", "0.5", "--extensions", "png,jpg"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "circle" in out and "cross" in out and "broken.png" in out
    data = json.loads(summary.read_text())
    assert data["class_names"] == ["circle", "cross"]
    assert sum(data["counts"]["circle"].values()) == 8
    assert data["rejected_count"] == 1 and data["rejected"][0]["path"].endswith("square/broken.png")


def test_clear_errors(spark, tmp_path):
    with pytest.raises(UserError, match="validation-fraction"):
        prepare(spark, str(tmp_path), str(tmp_path / "o"), validation_fraction=1.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        prepare(spark, str(tmp_path / "empty"), str(tmp_path / "o"))
    df = spark.createDataFrame([("p", b"x")], "path string, content binary")
    with pytest.raises(UserError, match="not a prepared dataset"):
        usable(df)


def test_training_runs_over_a_folder_mixing_hostile_files(messy, backbone_model, tmp_path):
    from image_transfer.training.train import TrainConfig, train

    result, df = messy
    config = TrainConfig(backbone=str(backbone_model), epochs=1, batch_size=8, augment=False, cache_dir=str(tmp_path))
    trained = train(df, config, output_model=str(tmp_path / "m.keras"))
    # Every usable row is trained or validated on; the rejected ones never reach TensorFlow.
    assert trained.train_rows == usable(df, "train").count()
    assert trained.validation_rows == usable(df, "validation").count()
    assert trained.train_rows + trained.validation_rows + result.rejected_count == result.rows
    assert sorted(trained.class_names) == sorted(result.class_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "m.metrics.json", "m.metrics.png"]  # no cache


def _rotated_copy(src: Path, orientation: int) -> bytes:
    """``src`` as a phone stores it: pixels turned, and an EXIF orientation saying how to turn them back."""
    import io

    from PIL import Image

    store = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    upright = Image.open(src).convert("RGB").resize((90, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    upright.transpose(store[orientation]).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_images_are_prepared_upright(spark, fixtures_dir, tmp_path):
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image, ImageOps

    root = tmp_path / "imgs"
    _copy_classes(fixtures_dir, root, CLASSES[:2], per_class=3)
    src = sorted((fixtures_dir / "images" / "star").iterdir())[0]
    (root / "star").mkdir()
    for o in (3, 6, 8):
        (root / "star" / f"phone_{o}.jpg").write_bytes(_rotated_copy(src, o))
    result = prepare(spark, str(root), str(tmp_path / "ds"))
    assert result.rejected_count == 0
    rows = spark.read.parquet(str(tmp_path / "ds")).where("label = 'star'").collect()
    assert len(rows) == 3
    for r in rows:
        original = (root / "star" / Path(r["path"]).name).read_bytes()
        expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(original))).convert("RGB"))
        # Training decodes without looking at EXIF: the stored pixels must already be upright.
        decoded = tf.io.decode_image(bytes(r["content"]), channels=3, expand_animations=False).numpy()
        assert decoded.shape == (60, 90, 3) == expected.shape
        assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


def test_prepare_persists_nothing_and_bounds_the_rejected_sample(spark, fixtures_dir, tmp_path):
    from image_transfer.training import prepare as prepare_module

    root = tmp_path / "imgs"
    _copy_classes(fixtures_dir, root, CLASSES[:3], per_class=20)
    (root / "junk").mkdir()
    for i in range(130):  # rejected files: more than the summary lists
        (root / "junk" / f"note_{i:03d}.png").write_bytes(b"not an image %d" % i)
    persisted = spark.sparkContext._jsc.getPersistentRDDs().size()
    result = prepare(spark, str(root), str(tmp_path / "ds"), rejected_file=str(tmp_path / "rejected.csv"))
    assert spark.sparkContext._jsc.getPersistentRDDs().size() == persisted  # no image bytes kept in memory

    assert result.rejected_count == 130 and len(result.rejected) == prepare_module.REJECTED_SAMPLE
    assert [r["path"] for r in result.rejected] == sorted(r["path"] for r in result.rejected)
    with open(tmp_path / "rejected.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert len(listed) == 130 and {r["reason"] for r in listed} == {"not an image (unrecognised format)"}
    assert "(all in" in result.describe() and len(result.describe().splitlines()) < 40
    df = spark.read.parquet(str(tmp_path / "ds"))
    assert result.class_names == class_names(df) == ("circle", "cross", "ring")
    assert df.count() == result.rows == 60 + 130


def test_a_class_whose_every_file_is_rejected_is_left_out_and_label_index_renumbered(spark, fixtures_dir, tmp_path):
    root = tmp_path / "imgs"
    _copy_classes(fixtures_dir, root, ["circle", "ring"], per_class=4)
    (root / "lost").mkdir()  # sorts between circle and ring: would leave a gap in label_index
    (root / "lost" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = prepare(spark, str(root), str(tmp_path / "ds"))
    df = spark.read.parquet(str(tmp_path / "ds"))
    assert result.class_names == class_names(df) == ("circle", "ring")
    assert [r["path"].rsplit("/", 2)[1] for r in result.rejected] == ["lost"]
    assert df.count() == 9 and not list(tmp_path.glob(".ds.*"))


@pytest.mark.slow
def test_prepare_replaces_only_its_own_table(spark, fixtures_dir, tmp_path):
    """``--output-table`` saves the dataset as a table marked as prepare's; a table that is not (here another
    dataset) is refused before any image is read, unless overwrite."""
    spark.range(3).write.mode("overwrite").saveAsTable("prepare_foreign")
    try:
        with pytest.raises(UserError, match="prepare_foreign exists and is not an output of image-transfer"):
            prepare(spark, str(fixtures_dir / "images"), str(tmp_path / "a"), output_table="prepare_foreign")
        assert spark.table("prepare_foreign").count() == 3 and not (tmp_path / "a").exists()
        result = prepare(spark, str(fixtures_dir / "images"), str(tmp_path / "b"), output_table="prepare_mine")
        again = prepare(spark, str(fixtures_dir / "images"), str(tmp_path / "c"), output_table="prepare_mine")
        assert spark.table("prepare_mine").count() == result.rows == again.rows
    finally:
        spark.sql("DROP TABLE IF EXISTS prepare_foreign")
        spark.sql("DROP TABLE IF EXISTS prepare_mine")
