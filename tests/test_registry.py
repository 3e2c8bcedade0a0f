"""The model lifecycle against a real MLflow tracking server (SQLite store, loopback port, temp dir).

Train and register two versions, promote the first, refuse a clearly worse second, score by alias,
move the alias. Where MLflow (or its server) is not installed those tests skip; the checks that the
package works without MLflow run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from training_data import fixture_dataset

from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.lifecycle.tracking import loggable_params
from image_transfer.models.uris import parse_models_uri, resolve_model
from image_transfer.training.promotion import decide

ROOT = Path(__file__).resolve().parents[1]
NAME = "shapes"


def _server_missing() -> str | None:
    missing = [m for m in ("mlflow", "flask", "sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    return f"the MLflow tracking server is not installed here (missing {', '.join(missing)})" if missing else None


needs_server = pytest.mark.skipif(_server_missing() is not None, reason=_server_missing() or "")


# ---- without a server ----------------------------------------------------------------------------


def test_model_uris_parse_and_plain_paths_pass_through(shapes_model):
    assert parse_models_uri("models:/shapes@champion") == ("shapes", "champion", None)
    assert parse_models_uri("models:/main.ml.shapes/12") == ("main.ml.shapes", None, "12")
    for bad in ("models:/shapes", "models:/shapes/latest", "models:/@x"):
        with pytest.raises(UserError, match="not a model URI"):
            parse_models_uri(bad)
    resolved = resolve_model(str(shapes_model))
    assert (resolved.path, resolved.version, resolved.downloaded) == (str(shapes_model), None, False)


def test_promotion_rule():
    assert decide(0.8, None, min_accuracy=0.5, tolerance=0.0)[0]
    assert not decide(0.4, None, min_accuracy=0.5, tolerance=0.0)[0]
    assert decide(0.78, 0.8, min_accuracy=0.5, tolerance=0.02)[0]
    refused, reason = decide(0.7, 0.8, min_accuracy=0.5, tolerance=0.02, champion_version="shapes/1")
    assert not refused and "worse than the current version shapes/1" in reason


def test_long_parameter_values_are_cut():
    names = [f"class_{i:04d}_with_a_long_name" for i in range(300)]
    params = loggable_params({"classes": ",".join(names), "epochs": 3, "cache_dir": None})
    assert params["epochs"] == "3" and "cache_dir" not in params
    assert len(params["classes"]) <= 250 and params["classes"].endswith("chars)")


def test_package_works_without_mlflow(shapes_model):
    """With MLflow unimportable: everything imports, paths score, a models:/ URI is a clear UserError."""
    code = f"""
import sys
sys.modules["mlflow"] = None  # import mlflow -> ImportError
from image_transfer import api
from image_transfer.errors import UserError
from image_transfer.api import writing
from image_transfer.jobs import cli
from image_transfer.lifecycle import tracking
from image_transfer.models import uris
from image_transfer.scoring import frame
from image_transfer.training import evaluate, promotion, train
assert not uris.tracking_configured() and not train.mlflow_enabled()
assert uris.resolve_model({str(shapes_model)!r}).version is None
try:
    uris.resolve_model("models:/shapes@champion")
except UserError as exc:
    print("USERERROR", exc)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "USERERROR" in out.stdout and "needs MLflow, which is not installed" in out.stdout
    # The runtime dependencies of the wheel do not include MLflow.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "mlflow" in d]


# ---- against a server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """``mlflow server`` over SQLite on a loopback port for this module; MLFLOW_TRACKING_URI points at it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the MLflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield uri
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
    log.close()


@pytest.fixture(scope="module")
def dataset_path(spark):
    return fixture_dataset(spark)


@pytest.fixture(scope="module")
def versions(spark, tracking_uri, dataset_path, backbone_model, tmp_path_factory):
    """Version 1: a short training run through the CLI. Version 2: one epoch on shuffled labels (the API)."""
    import numpy as np

    from image_transfer.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("versions")
    good = cli.run(
        ["train", "--data", dataset_path, "--output-model", str(out / "v1.keras"), "--backbone", str(backbone_model)]
        + ["--epochs", "8", "--batch-size", "16", "--learning-rate", "0.01", "--cache-dir", str(out)]
        + ["--metrics", str(out / "v1.json"), "--register-as", NAME]
    )
    assert good == 0
    data = spark.read.parquet(dataset_path)
    frame = data.toPandas()
    train_rows = frame.index[frame["split"] == "train"]
    order = np.random.default_rng(1).permutation(train_rows)
    for column in ("label", "label_index"):
        frame.loc[train_rows, column] = frame.loc[order, column].to_numpy()
    shuffled = out / "shuffled.parquet"
    spark.createDataFrame(frame, schema=data.schema).write.parquet(str(shuffled))
    bad = train(
        spark.read.parquet(str(shuffled)),
        TrainConfig(backbone=str(backbone_model), epochs=1, batch_size=32, augment=False, cache_dir=str(out)),
        output_model=str(out / "v2.keras"),
        register_as=NAME,
    )
    return json.loads((out / "v1.json").read_text()), bad, out


@needs_server
def test_training_is_logged_and_registered(versions):
    import mlflow

    first, second, _ = versions
    assert first["registered_version"] == f"{NAME}/1" and second.registered_version == f"{NAME}/2"
    assert second.model_uri == f"models:/{NAME}/2"
    client = mlflow.MlflowClient()
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["epochs"] == "8" and run.data.params["num_classes"] == "6"
    assert len([m for m in client.get_metric_history(run.info.run_id, "val_accuracy")]) == len(first["epochs"])
    assert run.data.metrics["final_validation_accuracy"] == pytest.approx(first["final_validation_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "v1.json", "v1.png"} <= artifacts
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id
    assert float(version.tags["final_validation_accuracy"]) == pytest.approx(first["final_validation_accuracy"])


@needs_server
def test_long_class_lists_log(tracking_uri):
    import mlflow

    names = [f"class_{i:04d}_with_a_long_name" for i in range(300)]
    with mlflow.start_run() as run:
        mlflow.log_params(loggable_params({"classes": ",".join(names)}))
    assert mlflow.get_run(run.info.run_id).data.params["classes"].startswith("class_0000")


@needs_server
def test_mlflow_model_loads_with_mlflows_loader_and_predicts_like_score(spark, versions, fixtures_dir):
    import mlflow
    import pandas as pd

    from image_transfer import api

    images = api.read_images(spark, str(fixtures_dir / "images")).orderBy("path").limit(24)
    scored = api.score_images(images, f"models:/{NAME}/1", top_k=1).orderBy("path").collect()
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    rows = images.collect()
    predicted = loaded.predict(pd.DataFrame({"content": [bytes(r["content"]) for r in rows] + [b"not an image"]}))
    assert list(predicted["prediction"][:-1]) == [r["prediction"] for r in scored]
    assert predicted["probability"][:-1].to_numpy() == pytest.approx([r["probability"] for r in scored], abs=1e-5)
    assert predicted["error"].iloc[-1] and predicted["prediction"].iloc[-1] is None
    assert {r["model_version"] for r in scored} == {f"{NAME}/1"}


@needs_server
def test_promote_the_first_refuse_a_worse_second(versions, dataset_path, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient()
    evaluate = ["evaluate", "--data", dataset_path, "--promote-to", "champion"]
    code = cli.run(
        [*evaluate, "--model", f"models:/{NAME}/1", "--min-accuracy", "0.3", "--metrics", str(tmp_path / "1.j")]
    )
    assert code == 0, capsys.readouterr().err
    first = json.loads((tmp_path / "1.j").read_text())
    assert first["promotion"]["promoted"] and first["promotion"]["champion_version"] is None
    assert first["model_version"] == f"{NAME}/1"
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"

    code = cli.run(
        [*evaluate, "--model", f"models:/{NAME}/2", "--tolerance", "0.05", "--metrics", str(tmp_path / "2.j")]
    )
    assert code == 1
    assert "not promoted to @champion" in capsys.readouterr().err
    second = json.loads((tmp_path / "2.j").read_text())["promotion"]
    assert not second["promoted"] and second["champion_version"] == "1"
    assert second["champion_accuracy"] == pytest.approx(first["accuracy"])
    assert second["candidate_accuracy"] < first["accuracy"] - 0.05
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    run = client.get_run(client.get_model_version(NAME, "2").run_id)
    assert run.data.tags["promotion_champion_decision"] == "refused"
    assert run.data.metrics["promotion_champion_champion_validation_accuracy"] == pytest.approx(first["accuracy"])
    assert float(client.get_model_version(NAME, "1").tags["validation_accuracy"]) == pytest.approx(first["accuracy"])


@needs_server
def test_score_by_alias_then_move_the_alias(spark, versions, dataset_path, tmp_path, capsys):
    import mlflow

    from image_transfer import api

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    source = spark.read.parquet(dataset_path).select("path", "content").limit(40)
    source.write.parquet(str(tmp_path / "in.parquet"))
    summary = tmp_path / "summary.json"
    args = ["score", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.parquet")]
    code = cli.run([*args, "--model", f"models:/{NAME}@champion", "--summary", str(summary), "--top-k", "2"])
    assert code == 0, capsys.readouterr().err
    written = spark.read.parquet(str(tmp_path / "out.parquet"))
    assert {r["model_version"] for r in written.select("model_version").distinct().collect()} == {f"{NAME}/1"}
    report = json.loads(summary.read_text())
    assert report["model_version"] == f"{NAME}/1" and report["model"] == f"models:/{NAME}@champion"

    # The alias moves: the next run uses the new version. One run never mixes: resolved once, up front.
    client.set_registered_model_alias(NAME, "champion", "2")
    scored = api.score_images(source, f"models:/{NAME}@champion")
    client.set_registered_model_alias(NAME, "champion", "1")
    assert {r["model_version"] for r in scored.select("model_version").distinct().collect()} == {f"{NAME}/2"}
    embedded = api.featurize_images(source, f"models:/{NAME}@champion").select("model_version").distinct()
    assert [r["model_version"] for r in embedded.collect()] == [f"{NAME}/1"]


@needs_server
def test_run_uris_and_unknown_models(spark, versions):
    import mlflow

    from image_transfer import api

    run_id = mlflow.MlflowClient().get_model_version(NAME, "1").run_id
    resolved = resolve_model(f"runs:/{run_id}/model")
    assert resolved.version == f"runs:/{run_id}/model" and resolved.path.endswith(".keras")
    with pytest.raises(UserError, match="cannot resolve models:/no_such_model@champion"):
        api.score_images(
            spark.createDataFrame([("a", b"")], "path string, content binary"), "models:/no_such_model@champion"
        )
    with pytest.raises(UserError, match="cannot resolve"):
        resolve_model(f"models:/{NAME}@no_such_alias")


@needs_server
def test_a_champion_that_cannot_be_compared_keeps_the_alias(versions, dataset_path, tmp_path, capsys):
    """The alias points to a model of other classes: no automatic promotion, a clear error, the alias stays."""
    import keras
    import mlflow

    from image_transfer.lifecycle.tracking import log_model, register
    from image_transfer.models.artifact import save_model

    inputs = keras.Input((64, 64, 3))
    other = keras.Model(
        inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    )
    path = save_model(other, tmp_path / "other.keras", class_names=["a", "b"])
    with mlflow.start_run():
        number = register(log_model(str(path), class_names=["a", "b"]), NAME)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "other", number)
    code = cli.run(["evaluate", "--data", dataset_path, "--model", f"models:/{NAME}/1", "--promote-to", "other"])
    assert code == 2
    assert f"cannot evaluate the current @other version {NAME}/{number}" in capsys.readouterr().err
    assert client.get_model_version_by_alias(NAME, "other").version == number


@needs_server
def test_an_alias_moved_during_the_evaluation_is_not_overwritten(spark, tracking_uri, dataset_path, shapes_model):
    """Compare and set: another promotion lands while the candidate is scored; the alias keeps its move."""
    import mlflow
    from pyspark.sql import functions as F

    from image_transfer.lifecycle.tracking import log_model, register
    from image_transfer.training.promotion import promote

    name, classes = "shapes_moving", ["circle", "cross", "ring", "square", "star", "triangle"]
    with mlflow.start_run():
        first, candidate, moved_to = (register(log_model(str(shapes_model), class_names=classes), name) for _ in "123")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "champion", first)

    @F.udf("binary")
    def moving(content: bytes) -> bytes:  # runs on a worker, between promote's read and its set
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
            name, "champion", moved_to
        )
        return content

    data = spark.read.parquet(dataset_path).withColumn("content", moving("content"))
    _, decision = promote(spark, data, model=f"models:/{name}/{candidate}", alias="champion")
    assert not decision.promoted  # the same model as the champion: only the move refuses it
    assert f"@champion moved from {name}/{first} to {name}/{moved_to} while {name}/{candidate}" in decision.reason
    assert client.get_model_version_by_alias(name, "champion").version == moved_to

    client.set_registered_model_alias(name, "champion", first)  # no move meanwhile: the same call promotes
    _, decision = promote(
        spark, spark.read.parquet(dataset_path), model=f"models:/{name}/{candidate}", alias="champion"
    )
    assert decision.promoted and client.get_model_version_by_alias(name, "champion").version == candidate


BLOCK_INSTALLED = """
import importlib.machinery, os, sys

PACKAGE = {package!r}  # the installed image_transfer (editable or not): not importable from here on


def _outside(entry):
    return os.path.realpath(os.path.join(entry or os.getcwd(), "image_transfer")) != PACKAGE


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name != "image_transfer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if _outside(p)])
        if spec is None:
            raise ModuleNotFoundError("No module named 'image_transfer' (the installed one is blocked)", name=name)
        return spec


sys.meta_path.insert(0, Blocked())
try:
    import image_transfer
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("image_transfer is importable: " + image_transfer.__file__)
"""


@needs_server
def test_the_logged_model_loads_and_predicts_where_image_transfer_is_not_installed(
    tracking_uri, shapes_model, fixtures_dir, tmp_path
):
    """The pyfunc carries the package's source (``code_paths``): MLflow's loader needs nothing installed."""
    import mlflow
    import pandas as pd

    import image_transfer
    from image_transfer.lifecycle.tracking import log_model

    with mlflow.start_run():
        uri = log_model(str(shapes_model), class_names=None)
    images = [str(p) for p in sorted((fixtures_dir / "images").rglob("*.jpg"))[:3]]
    frame = pd.DataFrame({"content": [Path(p).read_bytes() for p in images] + [b"not an image"]})
    expected = mlflow.pyfunc.load_model(uri).predict(frame)
    package = os.path.realpath(Path(image_transfer.__file__).parent)
    script = (
        BLOCK_INSTALLED.format(package=package)
        + f"""
import json
import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model({uri!r})
import image_transfer

assert _outside(os.path.dirname(os.path.dirname(image_transfer.__file__))), image_transfer.__file__
images = {images!r}
frame = pd.DataFrame({{"content": [open(p, "rb").read() for p in images] + [b"not an image"]}})
predicted = model.predict(frame)
print(json.dumps({{"from": image_transfer.__file__, **{{c: predicted[c].tolist() for c in predicted.columns}}}}))
"""
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/image_transfer/" in got["from"]  # the copy logged with the model
    assert got["prediction"][:-1] == list(expected["prediction"][:-1]) and got["prediction"][-1] is None
    assert got["probability"][:-1] == pytest.approx(list(expected["probability"][:-1]), abs=1e-5)
    assert got["error"][-1] and not any(got["error"][:-1])


def test_the_registry_uri_is_set_for_a_block_and_blocks_never_interleave(monkeypatch):
    """MLflow keeps one registry URI per process: ``using_registry`` sets it for a block under one lock and
    puts the previous back, whatever the block raised, so threads registering to two registries never mix."""
    import threading

    mlflow = pytest.importorskip("mlflow")
    from image_transfer.models.uris import using_registry

    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: state["uri"])
    monkeypatch.setattr(mlflow, "set_registry_uri", lambda uri: state.update(uri=uri))
    state = {"uri": "sqlite:///before.db"}
    seen: list[tuple[str, str]] = []

    def register(target: str) -> None:
        for _ in range(200):
            with using_registry(target):
                time.sleep(0)  # let the other thread run while this block holds the setting
                seen.append((target, state["uri"]))

    threads = [threading.Thread(target=register, args=(t,)) for t in ("databricks-uc", "sqlite:///other.db")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and all(target == uri for target, uri in seen)
    assert state["uri"] == "sqlite:///before.db"
    with pytest.raises(RuntimeError), using_registry("databricks-uc"):
        raise RuntimeError("the block failed")
    assert state["uri"] == "sqlite:///before.db"
    with using_registry(None):  # no target: nothing changes
        assert state["uri"] == "sqlite:///before.db"
