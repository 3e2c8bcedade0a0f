"""Scoring on a local[2] SparkSession: once-per-worker loading and tracing, exact predictions, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hostile_images import corpus
from PIL import Image

from image_transfer import cli, score
from image_transfer.images import ImageLimits, read_image_files
from image_transfer.io import write_output
from image_transfer.score import ScoringRequest
from image_transfer.stats import WorkerStats


@pytest.fixture(scope="module")
def fixture_images(spark, fixtures_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "images.parquet"
    write_output(read_image_files(spark, str(fixtures_dir / "images")), str(out))
    return str(out)


def _score(spark, source, tmp_path: Path, model: Path, **request_options):
    mode = request_options.pop("mode", "classify")
    top_k = request_options.pop("top_k", 3)
    layer = request_options.pop("layer", None)
    request = ScoringRequest(model_path=str(model), **request_options)
    prepared = score.prepare_model(request, mode=mode, top_k=top_k, layer=layer)
    out = tmp_path / "out.parquet"
    result = score.run(spark, source, request, prepared, writer=lambda df: write_output(df, str(out)))
    return result, spark.read.parquet(str(out))


def _expected_probabilities(model_path: Path, contents: list[bytes]) -> np.ndarray:
    """The model's own predictions, computed eagerly outside Spark, decoding with Pillow."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path, compile=False)
    _, h, w, _ = model.inputs[0].shape
    arrays = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB"), dtype=np.float32) for c in contents]
    batch = tf.stack([tf.image.resize(a, [h, w], method="bilinear") for a in arrays])
    return model(batch, training=False).numpy()


def test_loads_and_traces_once_per_worker_across_partitions_batches_and_actions(
    spark, fixture_images, shapes_model, tmp_path
):
    request = ScoringRequest(model_path=str(shapes_model), batch_size=13)  # 13: batches of uneven sizes
    prepared = score.prepare_model(request, mode="classify", top_k=2)
    source = spark.read.parquet(fixture_images).repartition(9)  # 9 partitions of ~27 rows
    stats = WorkerStats.create(spark.sparkContext)
    scored = score.score_frame(source, request, prepared, score.scoring_udf(spark, request, prepared, stats))

    first = scored.collect()
    scored.write.parquet(str(tmp_path / "second.parquet"))  # a second action on the same UDF

    workers = stats.by_worker()
    assert len(first) == 240
    assert 1 <= len(workers) <= 3, workers
    for pid, counts in workers.items():
        assert counts["model_loads"] == 1, (pid, counts)
        assert counts["traces"] == 1, (pid, counts)
    assert sum(c["rows"] for c in workers.values()) == 2 * 240
    # 9 partitions x ceil(~27/13) batches per action: many more batches than loads or traces
    assert sum(c["batches"] for c in workers.values()) >= 2 * 9 * 2


def test_predictions_equal_the_models_own(spark, fixture_images, shapes_model, tmp_path):
    result, out = _score(spark, spark.read.parquet(fixture_images), tmp_path, shapes_model, top_k=6, batch_size=32)
    rows = {r["path"]: r for r in out.collect()}
    source = {r["path"]: r["content"] for r in spark.read.parquet(fixture_images).collect()}
    assert result.rows_in == result.rows_out == len(rows) == 240
    assert result.rows_failed == 0

    paths = sorted(source)
    expected = _expected_probabilities(shapes_model, [source[p] for p in paths])
    names = ["circle", "cross", "ring", "square", "star", "triangle"]
    for path, probs in zip(paths, expected, strict=True):
        row = rows[path]
        assert row["error"] is None
        got = {e["label"]: e["probability"] for e in row["top_k"]}
        assert set(got) == set(names)  # top_k=6 reports every class
        tolerance = 1e-4 if path.endswith(".png") else 2e-2  # JPEG: Pillow's and TF's IDCT differ slightly
        np.testing.assert_allclose([got[n] for n in names], probs, atol=tolerance)
        if path.endswith(".png"):
            assert row["prediction"] == names[int(np.argmax(probs))]
        assert row["probability"] == pytest.approx(max(got.values()))
        assert [e["probability"] for e in row["top_k"]] == sorted(got.values(), reverse=True)


def test_every_bad_input_class_is_a_row_with_an_error(spark, shapes_model, tmp_path):
    cases = corpus()
    data = [(name, content) for name, (content, _) in cases.items()] + [("null.jpg", None)]
    source = spark.createDataFrame(data, "path string, content binary").repartition(3)
    result, out = _score(spark, source, tmp_path, shapes_model, batch_size=8)
    rows = {r["path"]: r for r in out.collect()}

    assert sorted(rows) == sorted(name for name, _ in data)  # every input row, exactly once
    assert out.count() == len(data)
    for name, (_, should_score) in cases.items():
        row = rows[name]
        if should_score:
            assert row["error"] is None, (name, row["error"])
            assert row["prediction"] in {"circle", "cross", "ring", "square", "star", "triangle"}
            assert len(row["top_k"]) == 3
        else:
            assert row["error"], name
            assert row["prediction"] is None and row["probability"] is None and row["top_k"] is None
    assert rows["null.jpg"]["error"] == "null image"
    assert rows["empty.jpg"]["error"] == "empty image"
    assert "truncated" in rows["truncated.png"]["error"]
    assert "not an image" in rows["html_named.jpg"]["error"]
    for bomb in ("bomb.png", "bomb.jpg"):
        assert "refused before decoding" in rows[bomb]["error"], rows[bomb]["error"]
    assert result.rows_failed == sum(1 for _, ok in cases.values() if not ok) + 1
    workers = result.workers.values()
    assert all(c["model_loads"] == 1 and c["traces"] == 1 for c in workers), result.workers
    # The bombs declare 900 Mpx (2.7 GB as RGB): refused from the header, memory stays bounded.
    assert all(c["peak_rss_mb"] < 2000 for c in workers), result.workers


def test_limits_refuse_per_row(spark, shapes_model, tmp_path):
    cases = corpus()
    plain = io.BytesIO()
    Image.new("RGB", (1200, 1000), (40, 90, 200)).save(plain, "PNG")  # 1.2 Mpx, a few KB encoded
    data = [(n, cases[n][0]) for n in ("good.jpg", "good.png")] + [("plain.png", plain.getvalue())]
    assert len(plain.getvalue()) < len(cases["good.png"][0])
    source = spark.createDataFrame(data, "path string, content binary")
    limits = ImageLimits.default().replace(max_pixels=1_000_000, max_bytes=len(cases["good.png"][0]) - 1)
    _, out = _score(spark, source, tmp_path, shapes_model, limits=limits)
    errors = {r["path"]: r["error"] for r in out.collect()}
    assert errors["good.jpg"] is None
    assert "1200x1000 = 1200000 pixels, over the limit of 1000000" in errors["plain.png"]
    assert "exceeds the limit" in errors["good.png"]


def test_featurize_outputs_the_pooled_embedding(spark, fixture_images, shapes_model, tmp_path):
    source = spark.read.parquet(fixture_images).limit(20)
    result, out = _score(spark, source, tmp_path, shapes_model, mode="embed")
    assert out.schema["embedding"].dataType.simpleString() == "array<float>"
    rows = out.collect()
    assert len(rows) == 20 and result.rows_failed == 0
    assert all(len(r["embedding"]) == 64 and r["error"] is None for r in rows)

    # the same as the backbone's output (the layer named "shapes_backbone" in the classifier)
    import keras

    model = keras.models.load_model(shapes_model, compile=False)
    contents = {r["path"]: r["content"] for r in source.collect()}
    backbone = model.get_layer("shapes_backbone")
    first = rows[0]
    image = np.asarray(Image.open(io.BytesIO(contents[first["path"]])).convert("RGB"), dtype=np.float32)
    import tensorflow as tf

    want = backbone(tf.image.resize(image, [64, 64])[None], training=False).numpy()[0]
    np.testing.assert_allclose(first["embedding"], want, atol=2e-2 if first["path"].endswith(".jpg") else 1e-4)

    _, named = _score(spark, source, tmp_path / "named", shapes_model, mode="embed", layer="shapes_backbone")
    assert {len(r["embedding"]) for r in named.collect()} == {64}


def test_savedmodel_from_the_shared_path_without_class_names(spark, fixture_images, shapes_model, tmp_path):
    import keras

    exported = tmp_path / "exported"
    keras.models.load_model(shapes_model, compile=False).export(str(exported))
    source = spark.read.parquet(fixture_images).limit(30)
    # broadcast_max_bytes=0: workers load from the path instead of broadcast bytes
    result, out = _score(spark, source, tmp_path, exported, broadcast_max_bytes=0)
    assert result.shipped == "shared path"
    rows = out.collect()
    assert len(rows) == 30 and all(r["error"] is None for r in rows)
    assert {r["prediction"] for r in rows} <= {str(i) for i in range(6)}  # no names: class indices

    _, keras_out = _score(spark, source, tmp_path / "k", shapes_model)
    by_path = {r["path"]: r["probability"] for r in keras_out.collect()}
    for r in rows:
        assert r["probability"] == pytest.approx(by_path[r["path"]], abs=1e-5)


def test_cli_score_writes_output_and_summary(fixture_images, shapes_model, tmp_path, capsys, spark):
    out, summary = tmp_path / "pred.parquet", tmp_path / "summary.json"
    code = cli.run(
        [
            "score",
            "--input",
            fixture_images,
            "--model",
            str(shapes_model),
            "--output",
            str(out),
            "--summary",
            str(summary),
            "--top-k",
            "2",
            "--batch-size",
            "40",
            "--master",
            "local[2]",
        ]
    )
    assert code == 0
    data = json.loads(summary.read_text())
    assert data["rows_in"] == data["rows_out"] == 240 and data["rows_failed"] == 0
    assert data["images_per_second"] > 0
    assert data["workers"] and all(w["model_loads"] == 1 and w["traces"] == 1 for w in data["workers"].values())
    assert sum(w["rows"] for w in data["workers"].values()) == 240
    written = spark.read.parquet(str(out))
    assert written.columns == ["path", "prediction", "probability", "top_k", "error"]
    assert {len(r["top_k"]) for r in written.select("top_k").collect()} == {2}
    assert "240 rows in, 240 out, 0 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a, t: a.__setitem__(a.index("--model") + 1, str(t / "missing.keras")), "model not found"),
        (lambda a, t: a.extend(["--image-column", "nope"]), "no image column 'nope'"),
        (lambda a, t: a.extend(["--image-column", "path"]), "must be binary"),
        (lambda a, t: a.extend(["--key-column", "id"]), "no key column id"),
        (lambda a, t: a.__setitem__(a.index("--input") + 1, str(t / "nothing")), "cannot read input"),
    ],
    ids=["missing-model", "missing-column", "wrong-type", "missing-key", "missing-input"],
)
def test_cli_clear_errors_before_any_output(fixture_images, shapes_model, tmp_path, capsys, change, message):
    out = tmp_path / "pred.parquet"
    args = ["score", "--input", fixture_images, "--model", str(shapes_model), "--output", str(out)]
    change(args, tmp_path)
    assert cli.run(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not out.exists()
    assert not any(p.name.startswith(".pred.parquet") for p in tmp_path.iterdir())


def test_cli_empty_input_and_unusable_models(spark, shapes_model, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    spark.createDataFrame([], "path string, content binary").write.parquet(str(empty))
    out = tmp_path / "pred.parquet"
    assert cli.run(["score", "--input", str(empty), "--model", str(shapes_model), "--output", str(out)]) == 2
    assert "the input has no rows" in capsys.readouterr().err
    assert not out.exists()

    import keras

    inputs = keras.Input((8, 8, 3))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    not_image = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    not_image.save(tmp_path / "vector.keras")
    (tmp_path / "corrupt.keras").write_bytes(b"PK\x03\x04 not really a zip")
    cases = {
        "unsafe.keras": "safe mode",
        "vector.keras": "not a batch of fixed-size RGB images",
        "corrupt.keras": "not a valid .keras file",
    }
    for name, message in cases.items():
        code = cli.run(["score", "--input", str(empty), "--model", str(tmp_path / name), "--output", str(out)])
        assert code == 2
        assert message in capsys.readouterr().err, name
    assert not out.exists()


def test_failed_write_keeps_previous_output(spark, tmp_path):
    from pyspark.sql import functions as F

    out = tmp_path / "out.parquet"
    write_output(spark.range(5), str(out))
    bad = spark.range(10).repartition(3).withColumn("x", F.expr("if(id < 7, id, cast(raise_error('boom') as bigint))"))
    with pytest.raises(Exception, match="boom"):
        write_output(bad, str(out))
    assert sorted(r["id"] for r in spark.read.parquet(str(out)).collect()) == list(range(5))
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # no staging or backup left behind
    assert write_output(spark.range(3), str(out)).count() == 3


def test_tables_in_and_out(spark, fixture_images, shapes_model, tmp_path, capsys):
    spark.read.parquet(fixture_images).limit(12).write.mode("overwrite").saveAsTable("it_images")
    try:
        out = tmp_path / "pred.parquet"
        code = cli.run(
            [
                "score",
                "--input-table",
                "it_images",
                "--model",
                str(shapes_model),
                "--output",
                str(out),
                "--output-table",
                "it_predictions",
            ]
        )
        assert code == 0
        table = spark.table("it_predictions")
        assert table.count() == 12 and table.columns == ["path", "prediction", "probability", "top_k", "error"]
        assert (
            cli.run(
                [
                    "score",
                    "--input-table",
                    "no_such_table",
                    "--model",
                    str(shapes_model),
                    "--output",
                    str(tmp_path / "x.parquet"),
                ]
            )
            == 2
        )
        assert "cannot read input no_such_table" in capsys.readouterr().err
    finally:
        spark.sql("DROP TABLE IF EXISTS it_images")
        spark.sql("DROP TABLE IF EXISTS it_predictions")
