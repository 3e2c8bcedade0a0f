"""Model trust: a .keras naming code outside Keras is refused unimported; the worker's unpack folder is safe."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from image_transfer.errors import UserError
from image_transfer.jobs import cli
from image_transfer.models import artifact
from image_transfer.models.trust import keras_fixed, untrusted_code

MODULE = "it_marker_layer"
REFUSAL = f"layer doubler (Doubler): module '{MODULE}'"
LAYER_SOURCE = '''
"""A custom layer whose import leaves a marker: importing it is running the model's code."""
from pathlib import Path

import keras

Path(__file__).with_name("IMPORTED").write_text("the model's code ran")


@keras.saving.register_keras_serializable(package="it_marker")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return x * 2.0
'''


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> tuple[Path, Path]:
    """(a classifier .keras with a custom layer, the folder of its module); the marker is removed."""
    folder = tmp_path_factory.mktemp("custom")
    (folder / "code").mkdir()
    (folder / "code" / f"{MODULE}.py").write_text(LAYER_SOURCE)
    path = folder / "custom.keras"
    build = f"""
import keras
from {MODULE} import Doubler
from image_transfer.models.artifact import save_model
inputs = keras.Input((16, 16, 3))
x = Doubler(name="doubler")(inputs)
x = keras.layers.GlobalAveragePooling2D()(x)
outputs = keras.layers.Dense(2, activation="softmax")(x)
save_model(keras.Model(inputs, outputs), {str(path)!r}, class_names=["a", "b"])
"""
    env = {**os.environ, "PYTHONPATH": str(folder / "code")}
    done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder / "code" / "IMPORTED").unlink()
    return path, folder / "code"


def _marker(code: Path) -> Path:
    return code / "IMPORTED"


def test_score_featurize_inspect_refuse_a_custom_layer_without_importing_it(
    spark, custom_model, tmp_path, monkeypatch, capsys
):
    from image_transfer.models.load import load_model
    from image_transfer.scoring.options import prepare_model
    from image_transfer.training.train import build_backbone

    path, code = custom_model
    monkeypatch.syspath_prepend(str(code))  # importable: if anything imported it, the marker would show
    empty = tmp_path / "empty.parquet"
    spark.createDataFrame([], "path string, content binary").write.parquet(str(empty))
    messages = []
    for command in (["score"], ["featurize"]):
        out = tmp_path / f"{command[0]}.parquet"
        argv = [*command, "--input", str(empty), "--model", str(path), "--output", str(out)]
        assert cli.run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert REFUSAL in err and "--trust-model-code" in err and len(err.splitlines()) == 1
        messages.append(err.split("error: ", 1)[1])
        assert not out.exists()
    assert cli.run(["inspect", "--model", str(path)]) == 2
    messages.append(capsys.readouterr().err.strip().split("error: ", 1)[1])
    assert len(set(messages)) == 1  # one message, whatever the command
    for call in (
        lambda: prepare_model(str(path), mode="classify"),
        lambda: prepare_model(str(path), mode="embed"),
        lambda: load_model(str(path), "keras"),
        lambda: build_backbone(str(path), weights="none", image_size=None),  # train --backbone FILE
    ):
        with pytest.raises(UserError) as refused:
            call()
        assert str(refused.value) == messages[0]  # deterministic
    assert not _marker(code).exists() and MODULE not in sys.modules


def test_a_trusted_custom_layer_loads_and_scores(custom_model, fixtures_dir):
    """In a fresh process: ``inspect --trust-model-code`` passes, and the TensorFlow engine loads it trusted."""
    path, code = custom_model
    images = sorted((fixtures_dir / "images").rglob("*.jpg"))[:2]
    script = f"""
import json, sys
from image_transfer.jobs import cli
assert cli.run(["inspect", "--model", {str(path)!r}, "--trust-model-code"]) == 0
from image_transfer.scoring.options import prepare_model
from image_transfer.scoring.engines import TensorFlowEngine
prepared = prepare_model({str(path)!r}, mode="classify", top_k=1, trust=True)
assert prepared.trusted
payloads = [open(p, "rb").read() for p in {[str(p) for p in images]!r}]
outputs, errors = TensorFlowEngine(prepared, {str(path)!r}).score(payloads, [1] * len(payloads))
assert not errors and outputs["probabilities"].shape == (2, 1), (outputs, errors)
"""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{") : done.stdout.rindex("}") + 1])
    assert report["class_names"] == ["a", "b"] and report["input"] == [16, 16, 3]
    assert _marker(code).exists()  # trusted: its code ran
    _marker(code).unlink()


def _keras_file(path: Path, config: dict, members: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        zf.writestr("config.json", json.dumps(config))
        for name, data in (members or {}).items():
            zf.writestr(name, data)
    return path


def _functional(*layers: dict) -> dict:
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "registered_name": "Functional",
        "config": {"name": "m", "layers": list(layers)},
    }


def _function(module: str, name: str) -> dict:
    return {"module": module, "class_name": "function", "config": name, "registered_name": "function"}


@pytest.mark.parametrize(
    ("layer", "refusal"),
    [
        (  # CVE-2025-1550: any module and function through a config
            {"module": "os", "class_name": "system", "config": {"name": "evil"}, "registered_name": None},
            "layer evil (system): module 'os'",
        ),
        (  # CVE-2025-9906: safe mode switched off from inside the config
            {
                "module": "keras.layers",
                "class_name": "Lambda",
                "config": {"name": "lam", "function": _function("keras.config", "enable_unsafe_deserialization")},
            },
            "layer lam (Lambda): keras.config.enable_unsafe_deserialization",
        ),
        (  # CVE-2025-8747: a Keras function that fetches files
            {
                "module": "keras.layers",
                "class_name": "Lambda",
                "config": {"name": "fetch", "function": _function("keras.utils", "get_file")},
            },
            "layer fetch (Lambda): keras.utils.get_file",
        ),
        (
            {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d"}, "registered_name": "x>Dense"},
            "layer d (Dense): registered class 'x>Dense'",
        ),
        (
            {"module": "keras.layers", "class_name": "TFSMLayer", "config": {"name": "sm", "filepath": "/x"}},
            "layer sm (TFSMLayer): keras.layers.TFSMLayer",
        ),
    ],
)
def test_configs_that_would_run_code_are_refused(tmp_path, layer, refusal):
    from image_transfer.models.inspection import inspect_model

    path = _keras_file(tmp_path / "m.keras", _functional(layer))
    assert untrusted_code(path) == refusal
    with pytest.raises(UserError, match="refused to load") as refused:
        inspect_model(str(path))
    assert refusal in str(refused.value)


def test_our_own_models_pass_untrusted(shapes_model, backbone_model, tmp_path):
    assert untrusted_code(shapes_model) is None and untrusted_code(backbone_model) is None
    relu = {"module": "keras.layers", "class_name": "Activation", "config": {"name": "a"}, "registered_name": None}
    relu["config"]["activation"] = _function("keras.src.activations.activations", "relu")
    assert untrusted_code(_keras_file(tmp_path / "relu.keras", _functional(relu))) is None
    relu["config"]["name"] = "target_file.get_files"  # names that merely contain a forbidden one
    assert untrusted_code(_keras_file(tmp_path / "named.keras", _functional(relu))) is None
    relu["config"]["note"] = "keras.utils.get_file"
    assert untrusted_code(_keras_file(tmp_path / "dotted.keras", _functional(relu))) == (
        "layer target_file.get_files (Activation): names 'keras.utils.get_file'"
    )
    assert keras_fixed("3.11.3") and keras_fixed("3.12.0") and not keras_fixed("3.10.0") and not keras_fixed("3.3.3")


def test_a_keras_archive_with_a_link_or_an_escaping_member_is_refused(tmp_path):
    from image_transfer.models.inspection import inspect_model

    escaping = _keras_file(tmp_path / "escape.keras", _functional(), {"../../evil.py": b"x"})
    with pytest.raises(UserError, match=r"\.\./\.\./evil\.py leaves its folder"):
        inspect_model(str(escaping))
    linked = tmp_path / "link.keras"
    _keras_file(linked, _functional())
    with zipfile.ZipFile(linked, "a") as zf:
        info = zipfile.ZipInfo("assets/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UserError, match="assets/link is a link"):
        inspect_model(str(linked))


def _tar(members: list[tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("model/link", tarfile.SYMTYPE, "/etc/passwd"), "model/link is a link"),
        (_member("model/hard", tarfile.LNKTYPE, "model/saved_model.pb"), "model/hard is a link"),
        (_member("model/../../evil.py"), "leaves its folder"),
        (_member("/tmp/evil.py"), "leaves its folder"),
        (_member("model/fifo", tarfile.FIFOTYPE), "is not a file or folder"),
    ],
)
def test_a_packed_savedmodel_with_a_link_or_an_escaping_member_is_refused(tmp_path, monkeypatch, member, message):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    data = _tar([_member("model", tarfile.DIRTYPE), _member("model/saved_model.pb"), member])
    with pytest.raises(UserError, match=message):
        artifact.unpack(data, "savedmodel")
    assert not (tmp_path / "evil.py").exists()
    assert [p.name for p in artifact.cache_root().iterdir()] == []  # nothing left behind


def test_the_unpack_folder_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = Path(artifact.unpack(b"model bytes", "keras"))
    root = path.parent.parent
    assert root == artifact.cache_root() and root.name == f"{artifact.CACHE_DIR}-{os.getuid()}"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
    os.chmod(root, 0o755)  # opened up (by hand, an old umask): closed again on the next use
    artifact.unpack(b"model bytes", "keras")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    other = tmp_path / "elsewhere"
    other.mkdir()
    for name in os.listdir(root):
        os.rename(root / name, other / name)
    root.rmdir()
    root.symlink_to(other)  # a link planted where the folder goes
    with pytest.raises(UserError, match="not a folder of this user's"):
        artifact.unpack(b"model bytes", "keras")


def test_a_tampered_unpacked_model_is_unpacked_again(shapes_model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    failing_savedmodel = tmp_path / "saved"  # unpack copies files: they need not be a real graph
    (failing_savedmodel / "variables").mkdir(parents=True)
    (failing_savedmodel / "saved_model.pb").write_bytes(b"graph")
    (failing_savedmodel / "variables" / "variables.index").write_bytes(b"index")
    data = artifact.pack(str(shapes_model), "keras")
    digest = artifact.content_digest(shapes_model)
    path = Path(artifact.unpack(data, "keras", digest))
    path.write_bytes(b"swapped")
    assert Path(artifact.unpack(data, "keras", digest)) == path and path.read_bytes() == data
    packed = artifact.pack(str(failing_savedmodel), "savedmodel")
    saved_digest = artifact.content_digest(failing_savedmodel)
    saved = Path(artifact.unpack(packed, "savedmodel", saved_digest))
    (saved / "saved_model.pb").write_bytes(b"swapped")
    again = Path(artifact.unpack(packed, "savedmodel", saved_digest))
    assert again == saved and artifact.content_digest(again) == saved_digest
    with pytest.raises(UserError, match="does not match its digest"):
        artifact.unpack(data, "keras", "0" * 64)
    assert not [p for p in artifact.cache_root().iterdir() if p.name.startswith(".")]


def test_the_trust_flag_reaches_every_command_that_loads_a_model(capsys):
    parser = cli.build_parser()
    for command in ("score", "featurize", "evaluate", "train", "inspect"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--trust-model-code" in capsys.readouterr().out, command
