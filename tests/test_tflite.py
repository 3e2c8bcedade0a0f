"""LiteRT flatbuffers as models (``.tflite`` with a ``.json`` sidecar) and the shared conversion cache."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from image_transfer.errors import UserError
from image_transfer.models.artifact import model_kind, read_metadata
from image_transfer.models.inspection import inspect_model
from image_transfer.scoring.engine import choose_engine
from image_transfer.scoring.engines import litert_convert as engine
from image_transfer.scoring.engines.litert_convert import CACHE_ENV, converted, shared_cache
from image_transfer.scoring.options import Compute, ScoringOptions, prepare_model, with_compute


def _write_tflite(keras_model: Path, out: Path, **sidecar: object) -> Path:
    """``keras_model`` converted by the engine's own converter, with a sidecar of its metadata."""
    data, _ = converted(prepare_model(str(keras_model), mode="classify"))
    out.write_bytes(data)
    meta = read_metadata(keras_model)
    side = {"class_names": meta["class_names"], "preprocess": meta.get("preprocess", "none"), **sidecar}
    Path(f"{out}.json").write_text(json.dumps(side))
    return out


@pytest.fixture(scope="module")
def shapes_tflite(shapes_model, tmp_path_factory) -> Path:
    return _write_tflite(shapes_model, tmp_path_factory.mktemp("tflite") / "shapes.tflite")


def test_a_tflite_file_is_a_model_with_its_sidecar(shapes_tflite, shapes_model, tmp_path):
    assert model_kind(shapes_tflite) == "tflite"
    info = inspect_model(str(shapes_tflite), classify=True)
    keras_info = inspect_model(str(shapes_model), classify=True)
    assert (info.kind, info.height, info.width, info.output_width) == ("tflite", 64, 64, 6)
    assert (info.class_names, info.preprocess) == (keras_info.class_names, keras_info.preprocess)
    assert info.probabilities is True  # tried on random images through the interpreter
    assert inspect_model(str(shapes_tflite), embed=True).output_width == 6  # featurize takes its output

    with pytest.raises(UserError, match="cannot be cut at a layer"):
        inspect_model(str(shapes_tflite), embed=True, layer="shapes_backbone")
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="not a LiteRT flatbuffer .no TFL3 identifier"):
        model_kind(fake)
    wrong = tmp_path / "wrong.tflite"
    wrong.write_bytes(shapes_tflite.read_bytes())
    Path(f"{wrong}.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    with pytest.raises(UserError, match="6 outputs but its metadata names 2 classes"):
        inspect_model(str(wrong), classify=True)


def test_a_tflite_model_runs_only_on_litert(shapes_tflite, capsys):
    prepared = with_compute(prepare_model(str(shapes_tflite), mode="classify"), ScoringOptions())
    engine_name, data, now = choose_engine(prepared, "auto")
    assert (engine_name, data, now) == ("litert", shapes_tflite.read_bytes(), False)  # the file itself
    with pytest.raises(UserError, match="runs only on LiteRT, not on --engine tensorflow"):
        choose_engine(prepared, "tensorflow")
    for settings, said in (({"jit": True}, "--jit"), ({"overlap": "on"}, "--overlap on")):
        with pytest.raises(UserError, match=f"runs only on LiteRT, and {said}"):
            choose_engine(with_compute(prepared, ScoringOptions(**settings)), "auto")
    with pytest.raises(UserError, match="precision float16 needs a Keras .* not a .tflite model"):
        with_compute(prepared, ScoringOptions(precision="float16"))

    class GpuSession:
        class conf:  # noqa: N801 - as a SparkSession's
            @staticmethod
            def get(name, default=None):
                return "1" if name == "spark.executor.resource.gpu.amount" else default

    capsys.readouterr()
    assert choose_engine(prepared, "auto", GpuSession())[0] == "litert"
    lines = [line for line in capsys.readouterr().err.splitlines() if "engine auto" in line]
    assert lines == ["image-transfer: engine auto runs LiteRT on the CPUs: a .tflite model runs only on LiteRT"]


def test_the_shared_cache_is_the_option_else_the_environment(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "/from/env")
    assert shared_cache(None) == "/from/env" and shared_cache("/option") == "/option"
    monkeypatch.delenv(CACHE_ENV)
    assert shared_cache(None) is None
    options = ScoringOptions(litert_cache="/shared")
    assert Compute.of(options).litert_cache == "/shared"
    assert Compute.of(options) == Compute.of(ScoringOptions())  # where conversions are kept: not what runs


def _fresh_machine(monkeypatch, folder: Path) -> None:
    """A machine whose private conversion cache (and this process's memory of conversions) is empty."""
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    engine._CONVERTED.clear()


def test_a_shared_cache_converts_once_for_every_machine_and_checks_what_it_reads(
    shapes_model, tmp_path, monkeypatch, capsys
):
    from test_engine import fresh_network

    model = fresh_network(shapes_model, tmp_path)  # no machine converted it before
    shared = tmp_path / "shared"
    prepared = with_compute(prepare_model(str(model), mode="classify"), ScoringOptions(litert_cache=str(shared)))

    _fresh_machine(monkeypatch, tmp_path / "one")
    data, now = converted(prepared)
    assert now and sorted(p.suffix for p in shared.iterdir()) == [".alias", ".tflite"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in shared.iterdir())  # other users' runs read them

    _fresh_machine(monkeypatch, tmp_path / "two")
    assert converted(prepared) == (data, False)  # from the shared folder, kept on this machine too
    assert {p.suffix for p in Path(engine.private_dir(engine.LITE_DIR)).iterdir()} == {".alias", ".tflite"}

    planted = next(shared.glob("*.tflite"))
    planted.write_bytes(planted.read_bytes()[:100])  # damaged, or another user's file: checked, not used
    _fresh_machine(monkeypatch, tmp_path / "three")
    capsys.readouterr()
    again, now = converted(prepared)
    assert now and again == data
    assert f"ignoring {planted.stem}.tflite in the LiteRT cache {shared}" in capsys.readouterr().err


def test_a_shared_cache_that_cannot_be_used_is_said_once_and_left_out(shapes_model, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    options = ScoringOptions(litert_cache=str(blocked / "cache"))  # cannot be created
    prepared = with_compute(prepare_model(str(shapes_model), mode="classify"), options)
    _fresh_machine(monkeypatch, tmp_path / "one")
    data, _ = converted(prepared)
    assert "the LiteRT cache" in capsys.readouterr().err and data

    real = engine._store

    def read_only(root, name, data, *, keep, shared=False):
        if shared:
            raise PermissionError(13, "Read-only file system")
        real(root, name, data, keep=keep, shared=shared)

    monkeypatch.setattr(engine, "_store", read_only)
    prepared = replace(prepared, compute=Compute.of(ScoringOptions(litert_cache=str(tmp_path / "ro"))))
    _fresh_machine(monkeypatch, tmp_path / "two")
    assert converted(prepared)[0] == data
    err = capsys.readouterr().err
    assert err.count("cannot write to the LiteRT cache") == 1 and "kept on this machine only" in err


DRIVER = """
import json, sys
from image_transfer.api import read_images, score_images, scoring_run
from image_transfer.runtime import get_spark

spark = get_spark("image-transfer no-tf driver", master="local[1]")
images, tflite, keras_model, cache = sys.argv[1:5]
df = read_images(spark, images)
out = {}
for name, model, keywords in [("tflite", tflite, {}), ("keras", keras_model, {"litert_cache": cache})]:
    scored = score_images(df, model, top_k=2, **keywords)
    rows = {r["path"]: [r["prediction"], r["probability"], r["error"]] for r in scored.collect()}
    run = scoring_run(scored)
    out[name] = {"rows": rows, "conversions": run.totals()["conversions"], "engine": run.engine,
                 "tensorflow": "tensorflow" in sys.modules}
print(json.dumps(out))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is None, reason="tf.lite, the fallback interpreter, is TensorFlow"
)
def test_a_driver_given_a_tflite_or_a_shared_conversion_imports_no_tensorflow(
    shapes_model, shapes_tflite, fixtures_dir, tmp_path
):
    """A fresh driver (its private cache empty) scores the ``.tflite``, then the ``.keras`` whose conversion
    a first run left in the shared cache: no conversion, no TensorFlow on the driver (the workers decode
    in TensorFlow), and the same predictions."""
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    for shape in ("circle", "star", "triangle"):
        for src in sorted((fixtures_dir / "images" / shape).glob("*.png"))[:2]:
            shutil.copy(src, images / src.name)
    cache = tmp_path / "shared"
    options = ScoringOptions(litert_cache=str(cache))
    converted(with_compute(prepare_model(str(shapes_model), mode="classify"), options))  # the first run's
    assert list(cache.glob("*.alias"))
    machine = tmp_path / "driver-tmp"
    machine.mkdir()
    env = {**os.environ, "TMPDIR": str(machine)}  # its private conversion cache starts empty
    args = [str(images), str(shapes_tflite), str(shapes_model), str(cache)]
    done = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("tflite", "keras"):
        assert out[name]["tensorflow"] is False, name
        assert (out[name]["engine"], out[name]["conversions"]) == ("litert-xnnpack", 0), name
    assert len(out["tflite"]["rows"]) == 6 and all(row[2] is None for row in out["tflite"]["rows"].values())
    assert out["tflite"]["rows"] == out["keras"]["rows"]


def test_the_cli_checks_a_tflite_before_spark(shapes_tflite, tmp_path, capsys, no_spark):
    from image_transfer.jobs import cli

    base = ["--input", str(tmp_path / "in"), "--model", str(shapes_tflite), "--output", str(tmp_path / "o")]
    assert cli.run(["featurize", *base, "--layer", "shapes_backbone"]) == 2
    assert "cannot be cut at a layer" in capsys.readouterr().err
    assert cli.run(["score", *base, "--engine", "tensorflow", "--litert-cache", str(tmp_path / "c")]) == 2
    assert "runs only on LiteRT" in capsys.readouterr().err
    assert cli.run(["inspect", "--model", str(shapes_tflite)]) == 0
    assert "circle" in capsys.readouterr().out


@pytest.mark.parametrize(("model", "layer"), [("shapes", None), ("shapes", "shapes_backbone"), ("backbone", None)])
def test_embedding_conversions_pass_the_shared_cache_check(shapes_model, backbone_model, model, layer):
    prepared = prepare_model(str(shapes_model if model == "shapes" else backbone_model), mode="embed", layer=layer)
    info = prepared.info
    engine.check_flatbuffer(converted(prepared)[0], info.height, info.width, outputs=info.output_width)
