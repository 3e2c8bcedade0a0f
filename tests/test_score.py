"""Scoring on a local[2] SparkSession: once-per-worker loading and tracing, exact predictions, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hostile_images import corpus
from PIL import Image
from pyspark.sql import functions as F

from image_transfer import featurize_images, read_images, score_images, scoring_run
from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.models.artifact import save_model
from image_transfer.storage.outputs import check_table, write_output

FIXTURE_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "model" / "shapes.keras"


@pytest.fixture(scope="module")
def fixture_images(spark, fixtures_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "images.parquet"
    read_images(spark, str(fixtures_dir / "images")).write.parquet(str(out))
    return str(out)


def fresh_copy(model: Path, folder: Path) -> Path:
    """The same network under a new digest, so no worker has it cached from an earlier test."""
    import uuid

    import keras

    from image_transfer.models.artifact import read_metadata

    meta = read_metadata(model)
    return save_model(
        keras.models.load_model(model, compile=False),
        folder / f"model-{uuid.uuid4().hex[:8]}.keras",
        class_names=meta.get("class_names"),
        preprocess=meta.get("preprocess", "none"),
        extra={"copy": uuid.uuid4().hex},
    )


def assert_each_worker_loads_once(runs) -> int:
    """Over runs of one model in order: a worker's first run loads and traces it once, its later runs
    neither; returns how many runs met a worker that an earlier run had loaded.

    Spark's idle Python workers are first in, first out: when earlier work left more idle workers than
    task slots (a task that held two Python workers at once), the next runs take turns over all of
    them, so a worker new to the model may still join a later run. It loads once, as promised.
    """
    seen: set[str] = set()
    warm_runs = 0
    for run in runs:
        workers = run.workers()
        assert workers, "no worker reported"
        for worker, counts in workers.items():
            expected = (0, 0) if worker in seen else (1, 1)
            assert (counts["model_loads"], counts["traces"]) == expected, (worker, counts, sorted(seen))
        warm_runs += bool(seen & workers.keys())
        seen |= workers.keys()
    return warm_runs


def _score(spark, source, tmp_path: Path, model: Path, **options):
    """Score (or featurize, with mode="embed") through the API and write; returns (run, written)."""
    mode = options.pop("mode", "classify")
    if mode == "embed":
        scored = featurize_images(source, str(model), **options)
    else:
        scored = score_images(source, str(model), top_k=options.pop("top_k", 3), **options)
    out = tmp_path / "out.parquet"
    with scoring_run(scored) as run:
        scored.write.parquet(str(out))
    return run, spark.read.parquet(str(out))


def _resize(image: np.ndarray, h: int, w: int):
    import tensorflow as tf

    return tf.image.resize(image, [h, w], method="bilinear", antialias=True)


def _expected_probabilities(model_path: Path, contents: list[bytes]) -> np.ndarray:
    """The model's own predictions, computed eagerly outside Spark, decoding with Pillow."""
    import keras
    import tensorflow as tf

    model = keras.models.load_model(model_path, compile=False)
    _, h, w, _ = model.inputs[0].shape
    arrays = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB"), dtype=np.float32) for c in contents]
    batch = tf.stack([_resize(a, h, w) for a in arrays])
    return model(batch, training=False).numpy()


@pytest.mark.connect
def test_loads_and_traces_once_per_worker_across_partitions_batches_and_actions(
    spark, fixture_images, shapes_model, tmp_path
):
    model = fresh_copy(shapes_model, tmp_path)
    source = spark.read.parquet(fixture_images).repartition(9)  # 9 partitions of ~27 rows
    scored = score_images(source, str(model), top_k=2, batch_size=13)  # 13: batches of uneven sizes
    run = scoring_run(scored)

    first = scored.collect()
    scored.write.parquet(str(tmp_path / "second.parquet"))  # a second action on the same DataFrame

    workers = run.workers()
    assert len(first) == 240
    assert 1 <= len(workers) < 9, workers  # the 2 task slots' Python workers (or the idle pool's), not one per task
    assert all(":" in w for w in workers)  # host:pid
    # An Observation describes one action: the first (classic session) or the latest (Spark Connect)
    from image_transfer.runtime import is_connect

    # Under Spark Connect, the latest action's workers loaded the model then or, on pyspark >= 4.1 (where
    # the UDF keeps its cache key across a Connect DataFrame's actions), already in the first: once either way.
    loads = (0, 1) if is_connect(spark) else (1,)
    for worker, counts in workers.items():
        assert counts["model_loads"] in loads, (worker, counts)
        assert counts["traces"] == counts["model_loads"], (worker, counts)
    assert run.totals()["rows"] == 240
    # 9 partitions x ceil(~27/13) batches: many more batches than loads or traces
    assert run.totals()["batches"] >= 9 * 2


@pytest.mark.connect
def test_a_second_run_in_the_session_neither_loads_nor_traces(spark, fixture_images, shapes_model, tmp_path):
    model = fresh_copy(shapes_model, tmp_path)
    source = spark.read.parquet(fixture_images)
    runs, results = [], []
    for _ in range(4):  # until a run meets workers an earlier run loaded (at once, unless the idle pool is large)
        scored = score_images(source, str(model), top_k=2)
        with scoring_run(scored) as run:
            results.append({r["path"]: r["probability"] for r in scored.collect()})
        runs.append(run)
        assert run.totals()["rows"] == 240
        assert run._payload is None  # the broadcast was released
        if assert_each_worker_loads_once(runs):
            break
    assert assert_each_worker_loads_once(runs) >= 1, [r.workers() for r in runs]
    assert all(r == results[0] for r in results)


def test_a_one_file_input_is_scored_by_every_task_slot(spark, fixture_images, shapes_model, tmp_path):
    one = tmp_path / "one.parquet"
    spark.read.parquet(fixture_images).coalesce(1).write.parquet(str(one))
    assert len(list(one.glob("*.parquet"))) == 1
    run, out = _score(spark, spark.read.parquet(str(one)), tmp_path, shapes_model)
    assert out.count() == 240
    rows = sorted(c["rows"] for c in run.workers().values())
    assert len(rows) == 2 and sum(rows) == 240, run.workers()
    assert rows[0] >= 0.3 * 240, rows  # roughly half each, not one worker scoring everything


def test_a_file_split_into_empty_read_partitions_is_still_shared(spark, fixture_images, shapes_model, tmp_path):
    """One row group read as several splits: every row lands in one split, yet both workers score half."""
    one = tmp_path / "one.parquet"
    spark.read.parquet(fixture_images).coalesce(1).write.parquet(str(one))
    (file,) = one.glob("*.parquet")
    keys = ("spark.sql.files.maxPartitionBytes", "spark.sql.files.openCostInBytes")
    before = {k: spark.conf.get(k) for k in keys}
    spark.conf.set(keys[0], str(file.stat().st_size // 3))
    spark.conf.set(keys[1], "0")
    try:
        source = spark.read.parquet(str(one))
        per_split = source.groupBy(F.spark_partition_id().alias("p")).count().collect()
        assert source.rdd.getNumPartitions() >= 3 and len(per_split) == 1, per_split  # 1 split holds every row
        run, out = _score(spark, source, tmp_path, shapes_model)
    finally:
        for k, v in before.items():
            spark.conf.set(k, v)
    assert out.count() == 240
    rows = sorted(c["rows"] for c in run.workers().values())
    assert len(rows) == 2 and sum(rows) == 240, run.workers()
    assert rows[0] >= 0.3 * 240, rows


def test_three_partitions_on_two_slots_become_two_even_ones(spark, fixture_images, shapes_model, tmp_path):
    """3 read partitions on 2 slots would leave one slot idle for the last third: spread into 2 even ones."""
    source = spark.read.parquet(fixture_images).repartition(3)
    scored = score_images(source, str(shapes_model))
    scan = scored._jdf.queryExecution().executedPlan().toString()
    assert "RoundRobinPartitioning(2)" in scan, scan
    with scoring_run(scored) as run:
        assert len(scored.collect()) == 240
    assert sorted(c["rows"] for c in run.workers().values()) == [120, 120], run.workers()


@pytest.mark.connect
def test_predictions_equal_the_models_own(spark, fixture_images, shapes_model, tmp_path):
    run, out = _score(spark, spark.read.parquet(fixture_images), tmp_path, shapes_model, top_k=6, batch_size=32)
    rows = {r["path"]: r for r in out.collect()}
    source = {r["path"]: r["content"] for r in spark.read.parquet(fixture_images).collect()}
    assert run.totals()["rows"] == len(rows) == 240
    assert run.totals()["rows_failed"] == 0
    assert {r["model_version"] for r in rows.values()} == {run.model_version}
    assert run.model_version.startswith("sha256:")

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


@pytest.mark.connect
def test_every_bad_input_class_is_a_row_with_an_error(spark, shapes_model, tmp_path):
    cases = corpus()
    data = [(name, content) for name, (content, _) in cases.items()] + [("null.jpg", None)]
    source = spark.createDataFrame(data, "path string, content binary").repartition(3)
    run, out = _score(spark, source, tmp_path, shapes_model, batch_size=8)
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
    assert run.totals()["rows_failed"] == sum(1 for _, ok in cases.values() if not ok) + 1
    workers = run.workers().values()
    assert all(c["model_loads"] <= 1 and c["traces"] <= 1 for c in workers), run.workers()
    # The bombs declare 900 Mpx (2.7 GB as RGB): refused from the header, memory stays bounded.
    assert all(c["peak_rss_mb"] < 2000 for c in workers), run.workers()


@pytest.mark.connect
def test_limits_refuse_per_row(spark, shapes_model, tmp_path):
    cases = corpus()
    plain = io.BytesIO()
    Image.new("RGB", (1200, 1000), (40, 90, 200)).save(plain, "PNG")  # 1.2 Mpx, a few KB encoded
    data = [(n, cases[n][0]) for n in ("good.jpg", "good.png")] + [("plain.png", plain.getvalue())]
    assert len(plain.getvalue()) < len(cases["good.png"][0])
    source = spark.createDataFrame(data, "path string, content binary")
    _, out = _score(
        spark, source, tmp_path, shapes_model, max_pixels=1_000_000, max_image_bytes=len(cases["good.png"][0]) - 1
    )
    errors = {r["path"]: r["error"] for r in out.collect()}
    assert errors["good.jpg"] is None
    assert "1200x1000 = 1200000 pixels, over the limit of 1000000" in errors["plain.png"]
    assert "exceeds the limit" in errors["good.png"]


@pytest.mark.connect
def test_featurize_outputs_the_pooled_embedding(spark, fixture_images, shapes_model, tmp_path):
    source = spark.read.parquet(fixture_images).limit(20)
    run, out = _score(spark, source, tmp_path, shapes_model, mode="embed")
    assert out.schema["embedding"].dataType.simpleString() == "array<float>"
    rows = out.collect()
    assert len(rows) == 20 and run.totals()["rows_failed"] == 0
    assert all(len(r["embedding"]) == 64 and r["error"] is None for r in rows)

    # the same as the backbone's output (the layer named "shapes_backbone" in the classifier)
    import keras

    model = keras.models.load_model(shapes_model, compile=False)
    contents = {r["path"]: r["content"] for r in source.collect()}
    backbone = model.get_layer("shapes_backbone")
    first = rows[0]
    image = np.asarray(Image.open(io.BytesIO(contents[first["path"]])).convert("RGB"), dtype=np.float32)

    want = backbone(_resize(image, 64, 64)[None], training=False).numpy()[0]
    np.testing.assert_allclose(first["embedding"], want, atol=2e-2 if first["path"].endswith(".jpg") else 1e-4)

    _, named = _score(spark, source, tmp_path / "named", shapes_model, mode="embed", layer="shapes_backbone")
    assert {len(r["embedding"]) for r in named.collect()} == {64}


@pytest.mark.connect
def test_savedmodel_from_the_shared_path_without_class_names(spark, fixture_images, shapes_model, tmp_path):
    import keras

    exported = tmp_path / "exported"
    keras.models.load_model(shapes_model, compile=False).export(str(exported))
    source = spark.read.parquet(fixture_images).limit(30)
    # broadcast_max_mb=0: workers load from the path instead of broadcast bytes
    run, out = _score(spark, source, tmp_path, exported, broadcast_max_mb=0)
    assert run.shipped == "shared path"
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
    assert data["workers"] and all(w["model_loads"] <= 1 and w["traces"] <= 1 for w in data["workers"].values())
    assert sum(w["rows"] for w in data["workers"].values()) == 240
    written = spark.read.parquet(str(out))
    assert written.columns == ["path", "prediction", "probability", "top_k", "error", "model_version"]
    assert data["model_version"] == written.first()["model_version"]
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


def test_the_driver_checks_a_keras_model_without_tensorflow(shapes_model, fixtures_dir, tmp_path):
    """The config settles shapes as loading would, in a process that never imports TensorFlow."""
    import subprocess
    import sys

    backbone = fixtures_dir / "model" / "backbone.keras"
    cases = [
        (shapes_model, None, False),
        (shapes_model, None, True),
        (backbone, None, False),
        (backbone, "embedding", True),
    ]
    code = f"""
import sys
from image_transfer.models.inspection import inspect_model
for path, layer, embed in {[(str(p), layer, embed) for p, layer, embed in cases]!r}:
    info = inspect_model(path, layer=layer, embed=embed)
    print(info.height, info.width, info.output_width, info.class_names)
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import embedding_model, io_shapes, load_model

    for (path, layer, embed), line in zip(cases, done.stdout.splitlines(), strict=True):
        model = load_model(str(path), "keras")
        (_, h, w, _), (_, width) = io_shapes(embedding_model(model, layer) if embed else model)
        names = tuple(read_metadata(path).get("class_names") or ()) or None
        assert line == f"{h} {w} {width} {names}", (path, layer, line)


def test_weights_that_do_not_fit_the_config_fail_the_run_with_one_line(
    spark, fixture_images, shapes_model, fixtures_dir, tmp_path, capsys
):
    """The driver's config check passes; the worker's load fails: exit 1, the reason, nothing written."""
    import zipfile

    mixed = tmp_path / "mixed.keras"
    with zipfile.ZipFile(shapes_model) as src, zipfile.ZipFile(fixtures_dir / "model" / "backbone.keras") as other:
        with zipfile.ZipFile(mixed, "w") as dst:
            for name in src.namelist():
                dst.writestr(name, (other if name == "model.weights.h5" else src).read(name))
    out = tmp_path / "pred.parquet"
    code = cli.run(["score", "--input", fixture_images, "--model", str(mixed), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "the model failed to load on a worker: cannot load Keras model" in err
    assert err.count("failed:") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.connect
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
        assert table.count() == 12
        assert table.columns == ["path", "prediction", "probability", "top_k", "error", "model_version"]
        # A table is replaced only when it is the same command's output: another table (here the input) is
        # refused before anything is scored or written, and --overwrite is the way to replace it.
        base = ["score", "--input-table", "it_images", "--model", str(shapes_model)]
        assert cli.run([*base, "--output", str(tmp_path / "again.parquet"), "--output-table", "it_predictions"]) == 0
        capsys.readouterr()
        refused = tmp_path / "refused.parquet"
        assert cli.run([*base, "--output", str(refused), "--output-table", "it_images"]) == 2
        assert "--output-table it_images exists and is not an output of image-transfer" in capsys.readouterr().err
        assert spark.table("it_images").count() == 12 and not refused.exists()
        with pytest.raises(UserError, match="is the output of image-transfer score, not featurize"):
            check_table(spark, "it_predictions", command="featurize")
        check_table(spark, "it_images", command="score", overwrite=True)
        with pytest.raises(UserError, match="give a table name"):
            check_table(spark, "a.b.c.d", command="score")
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


def test_the_api_returns_what_the_cli_writes(spark, fixture_images, shapes_model, tmp_path):
    out = tmp_path / "cli.parquet"
    assert cli.run(["score", "--input", fixture_images, "--model", str(shapes_model), "--output", str(out)]) == 0
    scored = score_images(spark.read.parquet(fixture_images), str(shapes_model))  # lazy: nothing has run
    assert scored.columns == spark.read.parquet(str(out)).columns
    api_rows = {r["path"]: r for r in scored.collect()}
    cli_rows = {r["path"]: r for r in spark.read.parquet(str(out)).collect()}
    assert sorted(api_rows) == sorted(cli_rows) and len(api_rows) == 240
    for path, want in cli_rows.items():
        got = api_rows[path]
        assert (got["prediction"], got["error"], got["model_version"]) == (
            want["prediction"],
            want["error"],
            want["model_version"],
        )
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]


def test_the_api_checks_the_model_before_anything_is_scheduled(spark, fixture_images, tmp_path):
    from image_transfer.errors import UserError

    source = spark.read.parquet(fixture_images)
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup(None) or [])
    with pytest.raises(UserError, match="model not found"):
        score_images(source, str(tmp_path / "missing.keras"))
    with pytest.raises(UserError, match="no image column 'image'"):
        featurize_images(source, str(FIXTURE_MODEL), image_column="image")
    assert set(tracker.getJobIdsForGroup(None) or []) == before  # no Spark job ran


def test_long_runs_report_progress(fixture_images, shapes_model, tmp_path, capsys):
    args = ["score", "--input", fixture_images, "--model", str(shapes_model), "--output", str(tmp_path / "p.parquet")]
    assert cli.run([*args, "--batch-size", "8", "--progress-interval", "0.2"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("score: [")]
    assert len(lines) >= 2, err[-2000:]  # periodic lines, then the final one
    assert all("tasks" in ln and "images/s" in ln and "ETA" in ln for ln in lines)
    assert "/240 images" in lines[-1] and "~240/240" in lines[-1]


def test_conf_options_reach_the_session(spark, fixtures_dir, tmp_path, capsys):
    out = tmp_path / "images.parquet"
    args = ["ingest", "--images", str(fixtures_dir / "images" / "star"), "--output", str(out)]
    assert cli.run([*args, "--conf", "spark.sql.shuffle.partitions=7", "--conf", "spark.sql.session.timeZone=UTC"]) == 0
    assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
    spark.conf.set("spark.sql.shuffle.partitions", "200")
    assert cli.run([*args, "--conf", "no-equals-sign"]) == 2
    assert "--conf takes key=value" in capsys.readouterr().err
