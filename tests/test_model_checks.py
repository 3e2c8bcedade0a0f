"""What the driver checks of a model before any work (a backbone is no classifier, outputs that are not
probabilities, configs read without TensorFlow, registry URIs without a server), and the model files a worker
leaves: no autograph files, a bounded shipped-model cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from image_transfer import UserError
from image_transfer.jobs import cli
from image_transfer.models import artifact
from image_transfer.scoring.options import prepare_model

ROOT = Path(__file__).resolve().parents[1]


def _images(fixtures_dir: Path, n: int) -> list[Path]:
    return sorted((fixtures_dir / "images").rglob("*.*"))[:n]


def _python(code: str, *, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- a headless backbone is not a classifier --------------------------------------------------------


def test_a_backbone_is_refused_as_a_classifier_without_tensorflow(backbone_model, shapes_model):
    code = f"""
        import sys
        from image_transfer.errors import UserError
        from image_transfer.scoring.options import prepare_model
        try:
            prepare_model({str(backbone_model)!r}, mode="classify")
        except UserError as exc:
            print("REFUSED", exc)
        assert prepare_model({str(shapes_model)!r}, mode="classify").info.probabilities is True
        assert prepare_model({str(backbone_model)!r}, mode="embed", layer="embedding").width == 64
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
    """
    done = _python(code, cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REFUSED" in done.stdout and "featurize" in done.stdout and "not a classifier" in done.stdout


def test_cli_refuses_a_backbone_for_score(spark, backbone_model, tmp_path, capsys):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    argv = ["score", "--images", str(incoming), "--checkpoint", str(tmp_path / "c"), "--model", str(backbone_model)]
    assert cli.run([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a classifier" in err and "featurize" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _keras_head(tmp_path: Path, name: str, head, *, class_names=("a", "b", "c")) -> Path:
    import keras

    from image_transfer.models.artifact import save_model

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    return save_model(keras.Model(inputs, head(x)), tmp_path / f"{name}.keras", class_names=class_names)


def test_only_probabilities_are_classified(tmp_path):
    import keras

    layers = keras.layers
    accepted = {
        "softmax": lambda x: layers.Dense(3, activation="softmax")(x),
        "sigmoid": lambda x: layers.Dense(3, activation="sigmoid")(x),
        "softmax_layer": lambda x: layers.Softmax()(layers.Dense(3)(x)),
        "then_dropout": lambda x: layers.Dropout(0.2)(layers.Activation("softmax")(layers.Dense(3)(x))),
        "nested": lambda x: keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="softmax")])(x),
    }
    for name, head in accepted.items():
        assert prepare_model(str(_keras_head(tmp_path, name, head)), mode="classify").info.probabilities, name
    refused = {
        "logits": lambda x: layers.Dense(3)(x),
        "relu": lambda x: layers.Dense(3, activation="relu")(x),
        "normalized": lambda x: layers.LayerNormalization()(layers.Dense(3, activation="softmax")(x)),
    }
    for name, head in refused.items():
        path = _keras_head(tmp_path, name, head)
        with pytest.raises(UserError, match="has class names but its outputs are not probabilities"):
            prepare_model(str(path), mode="classify")
        assert prepare_model(str(path), mode="embed").mode == "embed"  # featurize still works
    headless = _keras_head(tmp_path, "headless", lambda x: layers.Dense(3)(x), class_names=None)
    with pytest.raises(UserError, match="not a classifier.*featurize"):
        prepare_model(str(headless), mode="classify")


def test_a_model_saved_by_this_keras_is_checked_from_its_config_without_tensorflow(tmp_path):
    """Keras 3.12+ writes a single input or output flat (``["dense", 0, 0]``), Keras 3.3 nested: the driver
    reads both from the config, so neither a classifier's shapes nor its softmax needs TensorFlow there."""
    import keras

    from image_transfer.models.artifact import save_model

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    for name, head in {
        "softmax": keras.layers.Dense(3, activation="softmax"),
        "relu": keras.layers.Dense(3, "relu"),
    }.items():
        save_model(keras.Model(inputs, head(x)), tmp_path / f"{name}.keras", class_names=("a", "b", "c"))
    code = f"""
        import sys
        from image_transfer.errors import UserError
        from image_transfer.scoring.options import prepare_model
        info = prepare_model({str(tmp_path / "softmax.keras")!r}, mode="classify").info
        print("SHAPES", info.height, info.width, info.output_width, info.probabilities)
        try:
            prepare_model({str(tmp_path / "relu.keras")!r}, mode="classify")
        except UserError as exc:
            print("REFUSED", exc)
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
    """
    done = _python(code, cwd=ROOT, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SHAPES 16 16 3 True" in done.stdout and "REFUSED" in done.stdout and "not probabilities" in done.stdout


def _savedmodel(path: Path, output) -> Path:
    import tensorflow as tf

    class Module(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.random.stateless_normal([3, 4], seed=[1, 2]) * 100.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def serve(self, x):
            return {"scores": output(tf.reduce_mean(x, axis=[1, 2]) @ self.w)}

    module = Module()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def _hand_softmax(y):
    import tensorflow as tf

    e = tf.exp(y - tf.reduce_max(y, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def test_savedmodels_are_checked_from_their_graph_or_outputs(shapes_model, backbone_model, tmp_path):
    import keras
    import tensorflow as tf

    from image_transfer.models.load import load_model

    keras.models.load_model(shapes_model, compile=False).export(str(tmp_path / "shapes"))
    keras.models.load_model(backbone_model, compile=False).export(str(tmp_path / "backbone"))
    assert load_model(str(tmp_path / "shapes"), "savedmodel").output_op() == "Softmax"  # through the call ops
    assert load_model(str(tmp_path / "backbone"), "savedmodel").output_op() == "Mean"  # global average pooling
    assert prepare_model(str(tmp_path / "shapes"), mode="classify").info.probabilities is True
    with pytest.raises(UserError, match="not a classifier.*featurize"):
        prepare_model(str(tmp_path / "backbone"), mode="classify")
    cases = {
        "softmax": (tf.nn.softmax, True),  # from the graph
        "linear": (lambda y: y, False),
        "hand_softmax": (_hand_softmax, True),  # tried on random images
        "clipped": (lambda y: tf.clip_by_value(y, -5.0, 5.0), False),  # tried: values outside 0..1
    }
    ops = {"softmax": "Softmax", "linear": "MatMul", "hand_softmax": "RealDiv", "clipped": "Maximum"}
    for name, (output, ok) in cases.items():
        path = _savedmodel(tmp_path / name, output)
        assert load_model(str(path), "savedmodel").output_op() == ops[name]
        if ok:
            assert prepare_model(str(path), mode="classify").info.probabilities is True, name
        else:
            with pytest.raises(UserError, match="not a classifier"):
                prepare_model(str(path), mode="classify")


# ---- a registry URI without a tracking server ------------------------------------------------------


def test_a_models_uri_without_tracking_server_says_so_and_creates_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DATABRICKS_"))}
    code = """
        from image_transfer.errors import UserError
        from image_transfer.models.uris import resolve_model
        for uri in ("models:/shapes@champion", "models:/shapes/3", "runs:/0123abcd/model"):
            try:
                resolve_model(uri)
            except UserError as exc:
                print("USERERROR", exc)
    """
    done = _python(code, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("USERERROR")]
    assert len(lines) == 3, done.stdout
    for line in lines:
        assert "no MLflow tracking server is configured" in line and "MLFLOW_TRACKING_URI" in line
        assert "not found" not in line
    assert list(tmp_path.iterdir()) == [], "created in the current folder: " + ", ".join(os.listdir(tmp_path))


# ---- no autograph files left behind ----------------------------------------------------------------


@pytest.mark.slow
def test_scoring_leaves_no_autograph_files(fixtures_dir, shapes_model, tmp_path):
    """Spark's Python workers end without running atexit: TensorFlow's own clean-up never ran there."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    for f in _images(fixtures_dir, 6):
        shutil.copyfile(f, images / f.name)
    code = f"""
        from image_transfer import read_images, score_images
        from image_transfer.runtime import get_spark
        spark = get_spark("autograph leftovers", master="local[2]")
        # TensorFlow traces in the workers (LiteRT, auto's choice on CPU, traces nothing there)
        rows = score_images(
            read_images(spark, {str(images)!r}), {str(shapes_model)!r}, batch_size=4, engine="tensorflow"
        ).collect()
        assert len(rows) == 6 and all(r.error is None for r in rows), rows
        spark.stop()
    """
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYSPARK_PYTHON": sys.executable}
    done = _python(code, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    time.sleep(1)  # the daemon's workers end on SIGHUP after the driver stops
    cache = private_tmp / f"image-transfer-models-{os.getuid()}"
    assert cache.is_dir(), "the workers did not use the private temp folder"
    left = sorted(p.name for p in private_tmp.glob("__autograph_generated_file*"))
    assert left == [], f"{len(left)} autograph files left"


def test_autograph_files_go_once_loaded_and_their_source_stays_for_tracebacks():
    import linecache

    import tensorflow as tf

    from image_transfer.models.load import tidy_autograph

    tidy_autograph()
    tidy_autograph()  # idempotent

    @tf.function
    def doubled_when_positive(x):
        # Python control flow on a tensor: autograph converts the function. No closure (``tf`` is not used
        # inside): in a process that converted other closures, TF 2.16's autograph could report a
        # "closure mismatch" for this one and run it unconverted (seen under pytest-xdist).
        if x[0] > 0:
            return x * 2.0
        return x

    assert doubled_when_positive(tf.constant([1.0])).numpy().tolist() == [2.0]
    files = [m.__file__ for name, m in list(sys.modules.items()) if name.startswith("__autograph_generated_file")]
    ours = [f for f in files if "def tf__doubled_when_positive" in "".join(linecache.getlines(f))]
    assert ours  # the source is still there for tracebacks...
    assert not [f for f in ours if os.path.exists(f)]  # ...but not the file


# ---- the shipped-model cache stays bounded ---------------------------------------------------------


def _entry(root: Path, name: str, *, size: int, age: float) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "model.keras").write_bytes(b"x" * size)
    stamp = time.time() - age
    os.utime(entry, (stamp, stamp))
    return entry


def test_the_model_cache_keeps_the_recently_used_within_its_limits(tmp_path):
    root = tmp_path / artifact.CACHE_DIR
    hour = 3600.0
    for i, age in enumerate([5 * hour, 4 * hour, 3 * hour, 2 * hour, 60.0]):
        _entry(root, f"m{i}", size=100, age=age)
    stale = root / ".0123456789abcdef-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - hour, time.time() - hour))
    removed = artifact.trim_cache(root, max_entries=2, max_bytes=10**9, min_age=600)
    assert sorted(removed) == ["m0", "m1", "m2"]  # oldest first, down to the limit
    assert sorted(p.name for p in root.iterdir()) == ["m3", "m4"]  # and the killed unpack's leftovers
    # By size: entries used within min_age stay even over the limit (another job may be loading one).
    _entry(root, "m5", size=100, age=30.0)
    assert artifact.trim_cache(root, max_entries=10, max_bytes=150, min_age=600) == ["m3"]
    assert sorted(p.name for p in root.iterdir()) == ["m4", "m5"]


def test_unpack_touches_on_use_and_bounds_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    root = artifact.cache_root()
    first = Path(artifact.unpack(b"model 0", "keras"))
    old = time.time() - 7200
    os.utime(first.parent, (old, old))
    assert Path(artifact.unpack(b"model 0", "keras")) == first  # reused, and marked as used
    assert first.parent.stat().st_mtime > old + 3600
    for i in range(1, 6):  # five more, each used two hours ago
        path = Path(artifact.unpack(f"model {i}".encode(), "keras"))
        os.utime(path.parent, (old + i, old + i))
    os.utime(first.parent, (time.time() - 1000, time.time() - 1000))  # model 0: the most recently used
    monkeypatch.setattr(artifact, "CACHE_MAX_ENTRIES", 3)
    path = Path(artifact.unpack(b"model 6", "keras"))
    assert path.read_bytes() == b"model 6"
    assert {p.name for p in root.iterdir()} == {first.parent.name, path.parent.name, _digest(b"model 5")}
    assert Path(artifact.unpack(b"model 1", "keras")).read_bytes() == b"model 1"  # evicted: unpacked again


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]
