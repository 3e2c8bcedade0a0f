"""Production gaps of issue 14: failure thresholds, model failures, EXIF, byte-capped batches, model temp
files, driver-local model paths, crash recovery of outputs, and output files sized for readers."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from image_transfer import featurize_images, score_images, scoring_run
from image_transfer.errors import TooManyFailures, UserError
from image_transfer.imaging.files import read_image_files
from image_transfer.jobs import cli
from image_transfer.storage.fs import COMMIT_MARKER
from image_transfer.storage.outputs import _recover, write_output

CLASSES = ["circle", "cross", "ring", "square", "star", "triangle"]


@pytest.fixture(scope="module")
def images_parquet(spark, fixtures_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("robust") / "images.parquet"
    write_output(read_image_files(spark, str(fixtures_dir / "images")), str(out))
    return str(out)


def _parquet_files(path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.suffix == ".parquet")


# ---- too many failures: a broken input is a failed run, the output is still written -----------------


@pytest.fixture(scope="module")
def junk_parquet(spark, tmp_path_factory) -> str:
    """A wrong column: 30 rows whose binary column holds thumbnails' metadata, not images."""
    out = tmp_path_factory.mktemp("junk") / "junk.parquet"
    rows = [(f"img_{i:03d}.jpg", f"exif-blob-{i}".encode() * 8) for i in range(30)]
    spark.createDataFrame(rows, "path string, content binary").write.parquet(str(out))
    return str(out)


@pytest.mark.slow
def test_every_row_failing_fails_the_run_with_output_and_summary_written(junk_parquet, shapes_model, tmp_path, capsys):
    out, summary = tmp_path / "pred.parquet", tmp_path / "summary.json"
    argv = ["score", "--input", junk_parquet, "--model", str(shapes_model), "--output", str(out)]
    code = cli.run([*argv, "--summary", str(summary), "--master", "local[2]"])
    err = capsys.readouterr().err
    assert code == 3
    assert "30 of 30 rows failed (100.0%)" in err and "(--max-failed-fraction)" in err
    assert re.search(r"img_\d+\.jpg: not an image", err)  # a sample of the reasons, with keys
    data = json.loads(summary.read_text())
    assert data["threshold_exceeded"] is True and data["rows_failed"] == 30 and data["max_failed_fraction"] == 0.5
    assert 0 < len(data["errors_sample"]) <= 5
    assert len(_parquet_files(out)) >= 1  # the output is kept: it says which rows failed and why

    # The same run allowed to fail every row succeeds.
    assert cli.run([*argv, "--max-failed-fraction", "1", "--master", "local[2]"]) == 0
    capsys.readouterr()


def test_api_check_raises_after_an_action(spark, junk_parquet, shapes_model):
    scored = score_images(spark.read.parquet(junk_parquet), str(shapes_model), max_failed_fraction=0.2)
    run = scoring_run(scored)
    assert run.max_failed_fraction == 0.2
    assert scored.where("error IS NOT NULL").count() == 30
    with pytest.raises(TooManyFailures, match="30 of 30 rows failed"):
        run.check()
    run.check(rows=10, failed=2)  # 20% is allowed
    with pytest.raises(UserError, match="between 0 and 1"):
        score_images(spark.read.parquet(junk_parquet), str(shapes_model), max_failed_fraction=1.5)


# ---- an error raised by the model is one failure of the run; decode errors stay per row -------------


@pytest.fixture(scope="module")
def failing_savedmodel(tmp_path_factory) -> Path:
    """A SavedModel (64x64 -> 6) whose serving function asserts on its input: real images make it raise."""
    import tensorflow as tf

    class Picky(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32)])
        def serve(self, x):
            tf.debugging.assert_less(tf.reduce_max(x), 1.0, message="pixels must be scaled to 0..1")
            mean = tf.reduce_mean(x, axis=[1, 2])
            return {"scores": tf.nn.softmax(tf.concat([mean, -mean], axis=-1))}

    module = Picky()
    path = tmp_path_factory.mktemp("models") / "picky"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def test_model_error_fails_the_run_in_one_clear_line(spark, images_parquet, failing_savedmodel, tmp_path, capsys):
    out = tmp_path / "pred.parquet"
    argv = ["score", "--input", images_parquet, "--model", str(failing_savedmodel), "--output", str(out)]
    # Shipped by path (broadcast_max_mb 0): the worker reads the SavedModel from its (local) path.
    code = cli.run([*argv, "--broadcast-max-mb", "0", "--batch-size", "32", "--master", "local[2]"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("image-transfer")]
    assert code == 1
    # LiteRT's converter drops the model's assertion: engine auto says so and runs it on TensorFlow.
    assert (
        err[0]
        == "image-transfer: engine auto runs TensorFlow: the model has runtime checks (Assert) that LiteRT would drop"
    )
    err = err[1:]
    assert len(err) == 1, err  # one line (progress lines aside), with the model's own message
    assert err[0].startswith("image-transfer score: failed: image-transfer: the model failed: assertion failed:")
    assert "pixels must be scaled to 0..1" in err[0]
    assert not out.exists()  # nothing written
    assert not list(tmp_path.glob(".pred.parquet.*"))


def _corrupt_png_body(seed: int) -> bytes:
    """A PNG with a valid header, CRCs and end marker whose compressed pixels are garbage: it passes
    screening and fails only inside TensorFlow's decoder."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4 : i])[0]
    for k in range(i + 14, i + 4 + length - 10):
        data[k] ^= 0x5A
    data[i + 4 + length : i + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[i : i + 4 + length])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.slow
def test_undecodable_images_are_isolated_per_row_by_bisection(spark, fixtures_dir, shapes_model, tmp_path):
    folder = tmp_path / "mixed"
    for cls in CLASSES[:2]:
        (folder / cls).mkdir(parents=True)
        for f in sorted((fixtures_dir / "images" / cls).iterdir())[:12]:
            (folder / cls / f.name).write_bytes(f.read_bytes())
    for i in range(3):
        (folder / "circle" / f"corrupt_{i}.png").write_bytes(_corrupt_png_body(i))
    scored = score_images(read_image_files(spark, str(folder)), str(shapes_model), batch_size=8)
    rows = {Path(r["path"]).name: r for r in scored.collect()}
    assert len(rows) == 27
    bad = {n for n, r in rows.items() if r["error"] is not None}
    assert bad == {f"corrupt_{i}.png" for i in range(3)}
    assert all(rows[n]["error"].startswith("could not decode image: Invalid PNG data") for n in bad), rows
    assert all(r["prediction"] in CLASSES for n, r in rows.items() if n not in bad)
    scoring_run(scored).check()  # 3 of 27 is under the default threshold


# ---- EXIF orientation ------------------------------------------------------------------------------

# The stored pixels of an image whose EXIF orientation is ``o``: the inverse of what Pillow applies.
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _tagged(stored: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """``stored`` pixels as they are, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    options = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    stored.save(buf, fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


def _with_orientation(upright: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """What a camera writes for ``upright`` held in ``orientation``: turned pixels and the tag to undo it."""
    return _tagged(upright.transpose(_STORE[orientation]) if orientation != 1 else upright, orientation, fmt)


def test_orient_matches_pillow_exif_transpose_for_all_eight_orientations():
    import tensorflow as tf

    from image_transfer.imaging.graph import orient
    from image_transfer.imaging.screen import exif_orientation

    pixels = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for o in range(1, 9):
        img = Image.open(io.BytesIO(_tagged(Image.fromarray(pixels), o, "PNG")))
        assert exif_orientation(img) == o  # screening reads the tag
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        got = orient(tf.constant(pixels), tf.constant(o)).numpy()
        assert got.shape == expected.shape and (got == expected).all(), f"orientation {o}"
        # and the camera's view: the stored pixels of an upright picture come back upright
        stored = np.asarray(Image.open(io.BytesIO(_with_orientation(Image.fromarray(pixels), o, "PNG"))))
        assert (orient(tf.constant(stored), tf.constant(o)).numpy() == pixels).all(), f"orientation {o}"


def test_exif_rotated_photo_scores_like_its_upright_copy(spark, fixtures_dir, shapes_model):
    rows = []
    for cls in ("triangle", "star", "cross"):
        path = sorted((fixtures_dir / "images" / cls).iterdir())[0]
        upright = Image.open(path).convert("RGB").resize((96, 72))  # not square: rotations change the shape
        buf = io.BytesIO()
        upright.save(buf, "JPEG", quality=100, subsampling=0)
        rows.append((f"{cls}/upright.jpg", buf.getvalue()))
        for o in (3, 6, 8):
            rows.append((f"{cls}/exif_{o}.jpg", _with_orientation(upright, o)))
        stripped = upright.transpose(_STORE[6])  # the sideways pixels without the tag: scored as stored
        buf = io.BytesIO()
        stripped.save(buf, "JPEG", quality=100, subsampling=0)
        rows.append((f"{cls}/sideways.jpg", buf.getvalue()))
    df = spark.createDataFrame(rows, "path string, content binary")
    scored = {r["path"]: r for r in score_images(df, str(shapes_model), top_k=6).collect()}

    def probs(key: str) -> dict[str, float]:
        return {t["label"]: t["probability"] for t in scored[key]["top_k"]}

    for cls in ("triangle", "star", "cross"):
        base = probs(f"{cls}/upright.jpg")
        for o in (3, 6, 8):
            got = probs(f"{cls}/exif_{o}.jpg")
            assert scored[f"{cls}/exif_{o}.jpg"]["prediction"] == scored[f"{cls}/upright.jpg"]["prediction"]
            assert max(abs(got[k] - base[k]) for k in base) < 0.02, (cls, o)
    # The test can tell: the same pixels scored without their orientation differ.
    assert (
        max(
            max(abs(probs(f"{c}/sideways.jpg")[k] - probs(f"{c}/upright.jpg")[k]) for k in CLASSES)
            for c in ("triangle", "star", "cross")
        )
        > 0.02
    )


# ---- the encoded bytes per Arrow batch are capped ----------------------------------------------------


def test_a_batch_of_many_large_images_stays_under_the_byte_budget(spark, tmp_path):
    rng = np.random.default_rng(7)
    rows = []
    for i in range(48):  # noise PNGs of 150-300 KB: 10 MB in all, a few hundred KB each
        side = int(rng.integers(220, 320))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=0)
        rows.append((f"noise_{i:02d}.png", buf.getvalue()))
    sizes = [len(b) for _, b in rows]
    df = spark.createDataFrame(rows, "path string, content binary").repartition(2)
    model = Path(__file__).resolve().parents[1] / "fixtures" / "model" / "shapes.keras"
    budget_mb, max_image = 1.0, 320 * 320 * 3 + 4096
    assert max(sizes) <= max_image and sum(sizes) > 8 * budget_mb * 1024 * 1024
    scored = score_images(df, str(model), batch_size=64, max_image_bytes=max_image, max_batch_mb=budget_mb)
    with scoring_run(scored).settings():  # the budget holds for the actions inside
        out = scored.collect()
    assert len(out) == 48 and all(r["error"] is None for r in out)
    workers = scoring_run(scored).workers()
    budget = int(budget_mb * 1024 * 1024)
    assert max(w["peak_batch_bytes"] for w in workers.values()) <= budget
    assert sum(w["rows"] for w in workers.values()) == 48
    assert sum(w["batches"] for w in workers.values()) >= sum(sizes) / budget
    with pytest.raises(UserError, match="one image would not fit"):
        score_images(df, str(model), max_image_bytes=2 * 1024 * 1024, max_batch_mb=1)


# ---- models unpacked on workers: one directory per digest, reused --------------------------------------


def test_unpacked_models_are_shared_by_digest_not_per_process(shapes_model, failing_savedmodel, tmp_path, monkeypatch):
    import tempfile

    from image_transfer.models.artifact import content_digest, pack, unpack

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = pack(str(shapes_model), "keras")
    digest = content_digest(shapes_model)
    first = unpack(data, "keras", digest)
    second = unpack(data, "keras", digest)
    assert first == second and Path(first).read_bytes() == data
    root = Path(first).parent.parent  # this user's cache folder
    assert [p.name for p in root.iterdir()] == [digest[:32]]  # no per-pid or staging directories left
    saved = unpack(pack(str(failing_savedmodel), "savedmodel"), "savedmodel")
    assert (Path(saved) / "saved_model.pb").exists()
    assert len(list(root.iterdir())) == 2 and not [p for p in root.iterdir() if p.name.startswith(".")]


# ---- shipping by path refuses paths executors cannot see -----------------------------------------------


@pytest.mark.parametrize(
    ("path", "master", "ok"),
    [
        ("/Volumes/main/ml/models/m.keras", "spark://10.0.0.1:7077", True),
        ("/dbfs/models/m.keras", "spark://10.0.0.1:7077", True),
        ("/Workspace/Users/a@b.c/m.keras", "yarn", True),
        ("file:/Volumes/main/ml/models/m.keras", "spark://10.0.0.1:7077", True),
        ("models/m.keras", "spark://10.0.0.1:7077", False),
        ("/tmp/m.keras", "spark://10.0.0.1:7077", False),
        ("/local_disk0/tmp/m.keras", "spark://10.0.0.1:7077", False),
        ("file:/local_disk0/m.keras", "k8s://https://host:443", False),
        ("/Volumes/../tmp/m.keras", "spark://10.0.0.1:7077", False),
        ("/tmp/m.keras", None, False),  # a master we cannot tell counts as a cluster
        ("/tmp/m.keras", "local[*]", True),
        ("models/m.keras", "local[2]", True),
        ("/local_disk0/m.keras", "local[*, 4]", True),  # a Databricks single-node cluster
        ("/tmp/m.keras", "local-cluster[2,1,1024]", True),
    ],
)
def test_shared_path_rule(path, master, ok):
    from image_transfer.scoring.frame import check_shared_path

    if ok:
        check_shared_path(path, master)
    else:
        with pytest.raises(UserError, match="executors cannot see it"):
            check_shared_path(path, master)


def test_driver_local_model_path_refused_up_front_on_a_cluster_and_fine_locally(
    spark, images_parquet, shapes_model, monkeypatch
):
    from image_transfer.scoring import frame as score

    source = spark.read.parquet(images_parquet).limit(20)
    monkeypatch.setattr(score, "_master", lambda _spark, _connect: "spark://10.0.0.1:7077")
    with pytest.raises(UserError, match="/Volumes"):
        score_images(source, str(shapes_model), broadcast_max_mb=0)
    score_images(source, str(shapes_model))  # broadcast: any driver path is fine
    monkeypatch.undo()
    scored = featurize_images(source, str(shapes_model), broadcast_max_mb=0)  # local master: by path
    assert scoring_run(scored).shipped == "shared path"
    assert scored.where("error IS NULL").count() == 20


# ---- recovery: a commit marker decides which output is complete ----------------------------------------


def _fs(spark, dest: Path, kind: str):
    """The output's file system as write_output uses it: Hadoop (classic) or this process (Spark Connect)."""
    from image_transfer.storage.fs import _HadoopFs, _LocalFs

    if kind == "local":
        return _LocalFs(), str(dest)
    fs = _HadoopFs(spark, str(dest))
    return fs, fs.qualify(str(dest))


def _values(spark, path: Path) -> list[int]:
    return sorted(r["id"] for r in spark.read.parquet(str(path)).collect())


def _complete_dir(spark, where: Path, ids: range) -> Path:
    """A complete output (written as write_output writes it, marker included) moved to ``where``."""
    tmp = where.parent / f"tmp-{where.name.strip('.')}"
    write_output(spark.range(ids.start, ids.stop, 1, 3), str(tmp))
    tmp.rename(where)
    return where


@pytest.mark.parametrize(
    "crash",
    [
        "writing",
        "before_swap",
        "moving_previous_aside",
        "between_renames",
        "between_renames_unmarked",
        "during_rename",
        "after_swap",
    ],
)
@pytest.mark.parametrize("fs_kind", ["hadoop", "local"])
def test_recovery_never_keeps_a_partial_output(spark, tmp_path, crash, fs_kind):
    dest = tmp_path / "out.parquet"
    old, new = range(0, 30), range(100, 160)
    staging, previous = tmp_path / ".out.parquet.staging-abc", tmp_path / ".out.parquet.previous-abc"
    if crash == "writing":  # killed during the write: staging without a marker
        _complete_dir(spark, dest, old)
        _complete_dir(spark, staging, new)
        (staging / COMMIT_MARKER).unlink()
        expected = list(old)
    elif crash == "before_swap":  # written and marked, the swap not started: a killed run does not count
        _complete_dir(spark, dest, old)
        _complete_dir(spark, staging, new)
        expected = list(old)
    elif crash == "moving_previous_aside":  # a file-by-file rename of the previous output stopped half way
        _complete_dir(spark, dest, old)
        _complete_dir(spark, staging, new)
        previous.mkdir()
        for f in sorted(p for p in dest.iterdir() if p.suffix == ".parquet")[:2]:
            f.rename(previous / f.name)
        expected = list(old)
    elif crash.startswith("between_renames"):  # previous moved aside, the new one not yet in place
        _complete_dir(spark, previous, old)
        _complete_dir(spark, staging, new)
        if crash.endswith("unmarked"):
            (staging / COMMIT_MARKER).unlink()
        expected = list(old)
    elif crash == "during_rename":  # a file-by-file rename (object stores) stopped half way
        _complete_dir(spark, previous, old)
        _complete_dir(spark, staging, new)
        dest.mkdir()
        parts = sorted(p for p in staging.iterdir() if p.suffix == ".parquet")
        for f in [staging / COMMIT_MARKER, *parts[:1]]:
            f.rename(dest / f.name)
        expected = list(old)
    else:  # the new output in place, the previous not yet deleted
        _complete_dir(spark, previous, old)
        _complete_dir(spark, dest, new)
        expected = list(new)
    _recover(*_fs(spark, dest, fs_kind))
    assert _values(spark, dest) == expected
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("tmp-")) == ["out.parquet"]


def test_recovery_keeps_a_complete_previous_over_a_partial_new_output_and_leaves_it_marked(spark, tmp_path):
    dest = tmp_path / "out.parquet"
    write_output(spark.range(0, 10, 1, 2), str(dest))
    assert (dest / COMMIT_MARKER).read_text().startswith("files=")
    assert _values(spark, dest) == list(range(10))  # the marker is not data
    # A crash during the swap of a second write: the partial new output is in place, unmarked.
    dest.rename(tmp_path / ".out.parquet.previous-x")
    write_output(spark.range(50, 90, 1, 4), str(tmp_path / "tmp"))
    dest.mkdir()
    for f in sorted((tmp_path / "tmp").glob("part-*"))[:2]:
        f.rename(dest / f.name)
    # The next run recovers (puts the complete previous back), then writes its own output.
    assert write_output(spark.range(5), str(dest)).count() == 5
    assert not list(tmp_path.glob(".out.parquet.*"))


# ---- output files sized for readers ------------------------------------------------------------------


def test_rows_per_file_sizes_output_without_narrowing_scoring(spark, images_parquet, shapes_model, tmp_path, capsys):
    out, summary = tmp_path / "pred.parquet", tmp_path / "summary.json"
    argv = ["score", "--input", images_parquet, "--model", str(shapes_model), "--output", str(out)]
    code = cli.run([*argv, "--rows-per-file", "100", "--batch-size", "16", "--summary", str(summary)])
    capsys.readouterr()
    assert code == 0
    files = _parquet_files(out)
    assert len(files) == 3
    import pyarrow.parquet as pq

    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sum(rows) == 240 and max(rows) <= 100
    workers = json.loads(summary.read_text())["workers"]
    assert len([w for w in workers.values() if w["rows"] > 0]) >= 2  # both task slots scored

    # The plan: scoring runs below the shuffle that sizes the files (not a coalesce into fewer tasks).
    scored = score_images(spark.read.parquet(images_parquet), str(shapes_model))
    plan = scored.repartition(3)._jdf.queryExecution().executedPlan().toString()
    assert plan.index("Exchange RoundRobinPartitioning(3)") < plan.index("ArrowEvalPython")
    assert "Coalesce" not in plan


def test_litert_is_refused_for_a_model_whose_checks_it_would_drop(spark, images_parquet, failing_savedmodel):
    from image_transfer.errors import UserError

    with pytest.raises(UserError, match=r"--engine litert cannot run this model here: .*runtime checks \(Assert\)"):
        score_images(spark.read.parquet(images_parquet), str(failing_savedmodel), engine="litert")
