"""The LiteRT (XNNPACK) engine: the same outputs as TensorFlow on real architectures, fallbacks, statistics."""

from __future__ import annotations

import io
import json
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_score import assert_each_worker_loads_once, fresh_copy

from image_transfer import featurize_images, read_images, score_images, scoring_run
from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.models.artifact import save_model
from image_transfer.scoring.engine import choose_engine
from image_transfer.scoring.engines import LiteRTEngine, TensorFlowEngine
from image_transfer.scoring.engines.base import Engine, head
from image_transfer.scoring.engines.litert_convert import converted
from image_transfer.scoring.options import Compute, ScoringOptions, prepare_model, with_compute

SIZE = 96  # small inputs keep CI time low; the layers are the architectures' own


def _images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` different JPEGs: gradients, shapes and noise, so each network's outputs differ per image."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-2, 2, (2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 20 + i % 30, (SIZE, SIZE, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _batchnorm_from_data(model, images: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics from a batch of data (one training-mode pass, momentum 0)."""
    import keras

    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer in norms:
        layer.momentum = 0.99


ARCHITECTURES = {  # name: (keras.applications constructor, its preprocessing)
    "MobileNetV2": ("MobileNetV2", "scale_-1_1"),
    "ResNet50": ("ResNet50", "caffe"),
    "EfficientNetB0": ("EfficientNetB0", "none"),
}


@pytest.fixture(scope="session")
def architectures(tmp_path_factory) -> dict[str, Path]:
    """Each architecture once per session, random weights and BatchNorm statistics from data, saved as .keras."""
    import keras
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_batch
    from image_transfer.models.load import preprocess_fn

    folder = tmp_path_factory.mktemp("architectures")
    encoded = _images(32, seed=1)
    pixels = decode_batch(tf.constant(encoded), SIZE, SIZE, tf.zeros([len(encoded)], tf.int32))
    paths = {}
    for name, (builder, preprocess) in ARCHITECTURES.items():
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, builder)(input_shape=(SIZE, SIZE, 3), weights=None, classes=10)
        _batchnorm_from_data(model, preprocess_fn(preprocess)(pixels))
        paths[name] = save_model(
            model, folder / f"{name}.keras", class_names=[f"c{i}" for i in range(10)], preprocess=preprocess
        )
    return paths


def _both(prepared, images: list[bytes]) -> tuple[dict, dict]:
    tf_out, _ = TensorFlowEngine(prepared, prepared.info.path).score(images, [1] * len(images))
    flatbuffer, _ = converted(prepared)
    lite_out, _ = LiteRTEngine(replace_engine(prepared), flatbuffer, 2).score(images, [1] * len(images))
    return tf_out, lite_out


def replace_engine(prepared):
    from dataclasses import replace

    return replace(prepared, compute=Compute(engine="litert"))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n != "MobileNetV2" else n for n in ARCHITECTURES]
)
def test_litert_matches_tensorflow_on_real_architectures(architectures, name):
    prepared = prepare_model(str(architectures[name]), mode="classify", top_k=10)
    images = _images(96, seed=2)
    tf_out, lite_out = _both(prepared, images)
    tf_probs = np.take_along_axis(np.zeros((96, 10)), tf_out["indices"], 1)  # shape check only
    assert tf_probs.shape == lite_out["probabilities"].shape
    # Full probability vectors (k = all classes), put back in class order, compared per image.
    dense_tf = np.zeros((96, 10), np.float32)
    dense_lite = np.zeros((96, 10), np.float32)
    np.put_along_axis(dense_tf, tf_out["indices"], tf_out["probabilities"], 1)
    np.put_along_axis(dense_lite, lite_out["indices"], lite_out["probabilities"], 1)
    assert np.abs(dense_tf - dense_lite).max() < 1e-4
    assert dense_tf.std(axis=0).max() > 1e-3  # outputs differ per image: the comparison means something
    same_top1 = np.mean(tf_out["indices"][:, 0] == lite_out["indices"][:, 0])
    assert same_top1 >= 0.999


@pytest.mark.slow
def test_litert_embeddings_match_tensorflow(architectures):
    prepared = prepare_model(str(architectures["MobileNetV2"]), mode="embed")
    tf_out, lite_out = _both(prepared, _images(40, seed=3))
    assert tf_out["embedding"].shape == lite_out["embedding"].shape == (40, prepared.width)
    assert np.abs(tf_out["embedding"] - lite_out["embedding"]).max() < 1e-4
    assert tf_out["embedding"].std(axis=0).max() > 1e-3


@pytest.fixture(scope="module")
def images_df(spark, fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-data") / "images.parquet"
    read_images(spark, str(fixtures_dir / "images")).write.parquet(str(out))
    return spark.read.parquet(str(out))


def _rows(scored, key="path"):
    return {r[key]: r for r in scored.collect()}


def fresh_network(model: Path, folder: Path) -> Path:
    """A network no earlier test (or run) converted: ``model`` with every weight scaled a little."""
    import uuid

    import keras

    from image_transfer.models.artifact import read_metadata

    meta = read_metadata(model)
    net = keras.models.load_model(model, compile=False)
    rng = np.random.default_rng(uuid.uuid4().int % 2**32)
    net.set_weights([w * (1 + rng.normal(0, 1e-3, w.shape)).astype(w.dtype) for w in net.get_weights()])
    return save_model(
        net,
        folder / f"net-{uuid.uuid4().hex[:8]}.keras",
        class_names=meta.get("class_names"),
        preprocess=meta.get("preprocess", "none"),
    )


@pytest.mark.connect
def test_score_engines_agree_and_warm_rerun_converts_loads_traces_nothing(spark, images_df, shapes_model, tmp_path):
    model = str(fresh_network(shapes_model, tmp_path))
    out = tmp_path / "tf.parquet"
    tf_scored = score_images(images_df, model, top_k=3, engine="tensorflow")
    with scoring_run(tf_scored) as tf_run:
        tf_scored.write.parquet(str(out))
    assert {w["engine"] for w in tf_run.workers().values()} == {"tensorflow"}
    assert tf_run.totals()["conversions"] == 0
    runs = []
    for i in range(4):  # until a run meets workers an earlier run loaded (at once, unless the idle pool is large)
        scored = score_images(images_df, model, top_k=3)  # auto: LiteRT on these CPU workers
        with scoring_run(scored) as run:
            scored.write.parquet(str(tmp_path / f"lite{i}.parquet"))
        runs.append(run)
        if assert_each_worker_loads_once(runs):
            break
    first, warm = runs[0], runs[-1]
    assert assert_each_worker_loads_once(runs) >= 1, [r.workers() for r in runs]
    assert first.engine == "litert-xnnpack" and "LiteRT" in first.shipped
    assert {w["engine"] for w in first.workers().values()} == {"litert-xnnpack"}
    assert first.totals()["conversions"] == 1  # on the driver, once for the model
    assert sum(w["conversions"] for w in first.workers().values()) == 0  # workers convert nothing
    assert [r.totals()["conversions"] for r in runs[1:]] == [0] * (len(runs) - 1)  # the driver's cache
    assert warm.totals()["rows"] == images_df.count()
    tf_rows = _rows(spark.read.parquet(str(out)))
    lite_rows = _rows(spark.read.parquet(str(tmp_path / f"lite{len(runs) - 1}.parquet")))
    assert tf_rows.keys() == lite_rows.keys()
    for path, row in tf_rows.items():
        other = lite_rows[path]
        assert other["error"] is None and row["error"] is None
        assert other["prediction"] == row["prediction"]
        assert abs(other["probability"] - row["probability"]) < 1e-4


def test_a_network_is_converted_once_whatever_file_holds_it(shapes_model, tmp_path):
    """The conversion cache finds a network by its content too: a re-saved copy (a new file digest), or
    the same network built again in this process (its layers named ``dense_1`` for ``dense``), converts
    nothing; other weights, or another layer cut for ``featurize``, convert anew."""
    import keras

    def prepared(path, **kw):
        return with_compute(prepare_model(str(path), **kw), ScoringOptions())

    original = fresh_network(shapes_model, tmp_path)
    data, now = converted(prepared(original, mode="classify"))
    assert now
    copy = fresh_copy(original, tmp_path)
    again, now = converted(prepared(copy, mode="classify"))
    assert (again, now) == (data, False)
    assert converted(prepared(copy, mode="embed"))[1]  # the embedding sub-model: another network
    assert not converted(prepared(fresh_copy(original, tmp_path), mode="embed"))[1]

    def build(weights=None):
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        net = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
        if weights is not None:
            net.set_weights(weights)
        return net

    first = build()
    second = build(first.get_weights())
    assert [layer.name for layer in first.layers] != [layer.name for layer in second.layers]
    names = ["a", "b", "c"]
    paths = [save_model(net, tmp_path / f"built{i}.keras", class_names=names) for i, net in enumerate([first, second])]
    assert converted(prepared(paths[0], mode="classify"))[1]
    assert not converted(prepared(paths[1], mode="classify"))[1]
    moved = [w + 0.01 for w in first.get_weights()]
    other = save_model(build(moved), tmp_path / "moved.keras", class_names=names)
    moved_data, now = converted(prepared(other, mode="classify"))
    assert now and moved_data != converted(prepared(paths[0], mode="classify"))[0]


@pytest.mark.parametrize("layer", [None, "shapes_backbone"])
def test_featurize_litert_matches_tensorflow(spark, images_df, shapes_model, layer):
    results = {}
    for engine in ("tensorflow", "litert"):
        scored = featurize_images(images_df, str(shapes_model), layer=layer, engine=engine)
        run = scoring_run(scored)
        results[engine] = {r["path"]: np.array(r["embedding"]) for r in scored.collect()}
        assert run.engine == ("litert-xnnpack" if engine == "litert" else "tensorflow")
    for path, embedding in results["tensorflow"].items():
        assert np.abs(embedding - results["litert"][path]).max() < 1e-4


@pytest.mark.parametrize(
    ("settings", "said"),
    [({"precision": "float16"}, "precision float16"), ({"jit": True}, "--jit"), ({"overlap": "on"}, "--overlap on")],
)
def test_tensorflow_only_settings_fall_back_with_one_line_or_refuse_litert(shapes_model, capsys, settings, said):
    prepared = with_compute(prepare_model(str(shapes_model), mode="classify"), ScoringOptions(**settings))
    engine, flatbuffer, _ = choose_engine(prepared, "auto")
    assert (engine, flatbuffer) == ("tensorflow", None)
    lines = [line for line in capsys.readouterr().err.splitlines() if "engine auto" in line]
    assert len(lines) == 1 and said in lines[0]
    with pytest.raises(UserError, match="--engine litert cannot run"):
        choose_engine(prepared, "litert")


def test_no_interpreter_installed_falls_back_with_one_line_or_refuses_litert(shapes_model, capsys, monkeypatch):
    import importlib.util

    from image_transfer.scoring.engines.litert import interpreter_available

    real, absent = importlib.util.find_spec, ("ai_edge_litert", "tensorflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert interpreter_available() is False
    prepared = prepare_model(str(shapes_model), mode="classify")
    assert choose_engine(prepared, "auto")[:2] == ("tensorflow", None)
    assert "engine auto runs TensorFlow: no LiteRT interpreter is installed" in capsys.readouterr().err
    with pytest.raises(UserError, match="--engine litert cannot run this model here: no LiteRT interpreter"):
        choose_engine(prepared, "litert")


def test_the_driver_picks_litert_for_a_converted_model_without_importing_tensorflow(shapes_model):
    """A driver that only ships the flatbuffer (converted before: found by the file's digest) imports no
    TensorFlow: seconds of every cold job on a Databricks driver."""
    import subprocess
    import sys

    import tensorflow as tf

    converted(prepare_model(str(shapes_model), mode="classify"))  # on disk for the fresh process
    code = (
        "import sys, json\n"
        "from image_transfer.scoring.engine import choose_engine\n"
        "from image_transfer.scoring.engines.tensorflow import tensorflow_version\n"
        "from image_transfer.scoring.options import prepare_model\n"
        f"engine, data, now = choose_engine(prepare_model({str(shapes_model)!r}, mode='classify'), 'auto')\n"
        "print(json.dumps([engine, len(data), now, tensorflow_version(), 'tensorflow' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    engine, size, now, version, imported = json.loads(out.strip().splitlines()[-1])
    assert (engine, now, version, imported) == ("litert", False, tf.__version__, False)
    assert size == len(converted(prepare_model(str(shapes_model), mode="classify"))[0])


@pytest.fixture(scope="module")
def unconvertible_model(tmp_path_factory) -> Path:
    """A SavedModel whose graph uses string ops, which LiteRT's builtin ops do not have."""
    import tensorflow as tf

    class Odd(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, x):
            rounded = tf.strings.to_number(tf.strings.as_string(tf.reduce_mean(x, axis=[1, 2]), precision=3))
            return {"probabilities": tf.nn.softmax(rounded)}

    path = tmp_path_factory.mktemp("odd") / "odd"
    module = Odd()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


@pytest.mark.connect
def test_unconvertible_model_falls_back_and_scores(spark, images_df, unconvertible_model, capsys):
    scored = score_images(images_df, str(unconvertible_model), top_k=1)
    err = capsys.readouterr().err
    assert "engine auto runs TensorFlow: the LiteRT converter cannot take the model" in err
    rows = scored.collect()
    assert rows and all(r["error"] is None for r in rows)
    assert scoring_run(scored).engine == "tensorflow"
    with pytest.raises(UserError, match="--engine litert cannot run"):
        score_images(images_df, str(unconvertible_model), engine="litert")


def test_cli_refuses_litert_where_it_cannot_run_and_summary_names_the_engine(
    spark, images_df, shapes_model, tmp_path, capsys
):
    source = tmp_path / "in.parquet"
    images_df.write.parquet(str(source))
    args = ["score", "--input", str(source), "--model", str(shapes_model), "--output", str(tmp_path / "o.parquet")]
    assert cli.run([*args, "--engine", "litert", "--precision", "float16"]) == 2
    assert "--engine litert cannot run" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
    summary = tmp_path / "summary.json"
    assert cli.run([*args, "--engine", "litert", "--summary", str(summary)]) == 0
    assert "engine per worker ['litert-xnnpack'" in capsys.readouterr().out
    data = json.loads(summary.read_text())
    assert (data["compute"]["engine"], data["compute"]["engine_used"]) == ("litert", "litert-xnnpack")
    assert {w["engine"] for w in data["workers"].values()} == {"litert-xnnpack"}
    # The workers say which LiteRT interpreter ran: ai_edge_litert wherever it is installed (a dependency of
    # the wheel; the Runtime 18-like environment), TensorFlow's tf.lite only where it is not.
    from image_transfer.models.lite import interpreter_name

    reported = {w["interpreter"] for w in data["workers"].values()}
    assert reported == {interpreter_name()}
    if find_spec("ai_edge_litert") is not None:
        assert reported == {f"ai_edge_litert {version('ai-edge-litert')}"}
    else:
        assert next(iter(reported)).startswith("tf.lite (tensorflow ")


def test_pyfunc_takes_the_engine_choice(shapes_model, fixtures_dir):
    import types

    import pandas as pd

    pytest.importorskip("mlflow")
    from image_transfer.lifecycle.pyfunc import ImageClassifier
    from image_transfer.models.uris import KERAS_ARTIFACT

    images = [p.read_bytes() for p in sorted((fixtures_dir / "images").rglob("*.png"))[:12]]
    assert images
    context = types.SimpleNamespace(artifacts={KERAS_ARTIFACT: str(shapes_model)})
    outputs = {}
    for engine in ("tensorflow", "litert"):
        model = ImageClassifier(engine=engine)
        model.load_context(context)
        outputs[engine] = model.predict(context, pd.DataFrame({"content": images}))
        assert model._prepared.compute.engine == engine
    assert list(outputs["tensorflow"]["prediction"]) == list(outputs["litert"]["prediction"])
    assert np.abs(outputs["tensorflow"]["probability"] - outputs["litert"]["probability"]).max() < 1e-4
    auto = ImageClassifier()  # auto, on this CPU machine: LiteRT; params pick another per call
    auto.load_context(context)
    auto.predict(context, pd.DataFrame({"content": images}), params={"engine": "tensorflow"})
    assert auto._prepared.compute.engine == "tensorflow"


def test_bundle_cpu_target_scores_on_cpu_nodes_with_engine_auto():
    import yaml

    bundle = yaml.safe_load((Path(__file__).resolve().parents[1] / "databricks.yml").read_text())
    job = bundle["targets"]["cpu"]["resources"]["jobs"]["batch_inference_cpu"]
    (cluster,) = job["job_clusters"]
    spec = cluster["new_cluster"]
    assert spec["spark_version"] == "${var.cpu_spark_version}"
    assert "-cpu-ml-" in bundle["variables"]["cpu_spark_version"]["default"]
    assert "gpu" not in json.dumps(spec).lower()  # no GPU resource settings, no GPU allocator
    (task,) = job["tasks"]
    params = [str(p) for p in task["python_wheel_task"]["parameters"]]
    assert params[params.index("--engine") + 1] == "auto"
    assert task["job_cluster_key"] == cluster["job_cluster_key"]
    assert spec["spark_conf"]["spark.sql.execution.arrow.maxRecordsPerBatch"] == "${var.scoring_batch_size}"
    assert params[params.index("--batch-size") + 1] == "${var.scoring_batch_size}"
    parsed = cli.build_parser().parse_args([p.replace("${var.scoring_batch_size}", "64") for p in params])
    assert parsed.engine == "auto" and parsed.batch_size == 64


def test_the_worker_names_no_engine_and_the_options_list_the_registered_ones():
    """``scoring/worker.py`` reaches engines only through the registry: no engine's class, no framework
    import, no engine name in its code; ``--engine``'s choices are ``auto`` and the registered names."""
    import ast

    from image_transfer.scoring import engines, options, worker

    source = Path(worker.__file__).read_text()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("tensorflow" in m or "keras" in m or "litert" in m for m in imported), imported
    words = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    words += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
    words += [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    for name in ("litert", "tensorflow", "xnnpack", "lite", "keras"):
        assert not [w for w in words if name in w.lower()], name
    assert "LiteScorer" not in source and "import tensorflow" not in source
    assert options.ENGINES[0] == "auto" and sorted(options.ENGINES[1:]) == sorted(engines.ENGINES)


class ToyEngine(Engine):
    """A third engine in one class: NumPy only, decoding with Pillow, a linear model of the mean colour."""

    name, label, title = "toy", "numpy-toy", "Toy"
    decode_failures = (OSError, ValueError)  # Pillow's UnidentifiedImageError is an OSError

    @classmethod
    def payload(cls, prepared):
        rng = np.random.default_rng(0)
        return rng.normal(0, 1, (3, prepared.info.output_width)).astype(np.float32).tobytes(), True

    @classmethod
    def load(cls, prepared, shipped, cores):
        from image_transfer.scoring.stats import count

        if shipped is None:
            shipped, _ = cls.payload(prepared)
        count(model_loads=1)
        return cls(prepared, np.frombuffer(shipped, np.float32).reshape(3, -1))

    def __init__(self, prepared, weights):
        self.prepared, self.weights, self.warmed = prepared, weights, 0

    def warm_up(self):
        self.warmed += 1

    def decode(self, payloads, orientations):
        info = self.prepared.info
        images = []
        for data in payloads:
            with Image.open(io.BytesIO(data)) as img:
                images.append(np.asarray(img.convert("RGB").resize((info.width, info.height)), np.float32))
        return np.stack(images) / 255.0

    def run(self, images):
        logits = images.mean(axis=(1, 2)) @ self.weights
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return head(probs / probs.sum(axis=1, keepdims=True), self.prepared.mode, self.prepared.width)

    def describe(self):
        return {"engine": self.label, "interpreter": "numpy"}


def test_a_third_engine_registered_in_one_class_is_chosen_and_run_by_the_worker(
    shapes_model, fixtures_dir, monkeypatch
):
    """The worker path (``make_predict_fn_factory``, without Spark) loads, warms and runs whatever engine
    the driver chose by name; its facts are the worker's; ``choose_engine`` takes it by name too."""
    from dataclasses import replace
    from types import SimpleNamespace

    from image_transfer.imaging.screen import ImageLimits
    from image_transfer.scoring import engines, stats, worker
    from image_transfer.scoring.run import ScoringRun

    toy = ToyEngine
    monkeypatch.setitem(engines.ENGINES, toy.name, toy)
    monkeypatch.setattr(worker, "_CACHE", type(worker._CACHE)())
    monkeypatch.setattr(stats, "_WORKER_EXTRA", {})
    prepared = prepare_model(str(shapes_model), mode="classify", top_k=3)
    chosen, shipped, now = choose_engine(prepared, "toy")
    assert (chosen, now) == ("toy", True) and len(shipped) == 3 * prepared.info.output_width * 4
    prepared = replace(prepared, compute=Compute(engine=chosen))

    files = sorted((fixtures_dir / "images").rglob("*.png"))[:5]
    encoded = np.array([f.read_bytes() for f in files] + [b"not an image"], dtype=object)
    predict = worker.make_predict_fn_factory(prepared, shipped, ImageLimits.default())()
    out = predict(encoded)
    loaded = worker._CACHE[prepared.cache_key]
    assert isinstance(loaded, toy) and loaded.warmed == 1
    assert stats._WORKER_EXTRA["engine"] == "numpy-toy" and stats._WORKER_EXTRA["interpreter"] == "numpy"
    want = loaded.run(loaded.decode([f.read_bytes() for f in files], [1] * len(files)))
    assert list(out["prediction"][:5]) == [prepared.info.label(int(i)) for i in want["indices"][:, 0]]
    np.testing.assert_allclose(out["probability"][:5], want["probabilities"][:, 0])
    assert out["top_k_labels"].shape == (6, 3)
    assert list(out["error"][:5]) == [None] * 5 and out["error"][5]  # screened out before the engine
    predict(encoded[:2])
    assert worker._CACHE[prepared.cache_key] is loaded and loaded.warmed == 1  # one load per worker and model
    assert ScoringRun.engine.fget(SimpleNamespace(model=prepared)) == "numpy-toy"  # the run's summary
