"""GPU clusters without a GPU: pinning to Spark's task resources, precision, XLA, overlap, multi-device training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from image_transfer import api
from image_transfer import devices as gpu
from image_transfer.errors import UserError
from image_transfer.imaging.screen import ImageLimits, screen_batch
from image_transfer.jobs import cli
from image_transfer.scoring.engines import TensorFlowEngine as Scorer
from image_transfer.scoring.options import Compute, ScoringOptions, prepare_model
from image_transfer.scoring.stats import _PROCESS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batch(fixtures_dir):
    """37 fixture images (JPEG and PNG) screened as a worker would, and at 5 one that fails in the graph."""
    files = sorted((fixtures_dir / "images").rglob("*.*"))[::6][:37]
    screened = screen_batch(np.array([f.read_bytes() for f in files], dtype=object), ImageLimits.default())
    assert len(screened.payloads) == 37
    screened.payloads.insert(5, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + b"IEND\xaeB`\x82")  # past screening
    screened.orientations.insert(5, 1)
    return screened


def _scorer(model, **compute) -> Scorer:
    prepared = prepare_model(str(model), mode="classify", top_k=6)
    return Scorer(replace(prepared, compute=Compute(**compute)), str(model))


def _traces(scorer: Scorer, *calls) -> int:
    before = _PROCESS["traces"]
    for payloads, orientations in calls:
        scorer.score(payloads, orientations)
    return _PROCESS["traces"] - before


def test_overlap_jit_and_precision_give_the_single_graph_outputs(batch, shapes_model):
    reference, ref_errors = _scorer(shapes_model, overlap="off").score(batch.payloads, batch.orientations)
    assert list(ref_errors) == [5] and len(reference["indices"]) == len(batch.payloads) - 1
    ref_probs = np.take_along_axis(reference["probabilities"], np.argsort(reference["indices"]), axis=1)

    variants = {
        "overlap": (dict(overlap="on"), 1e-6),
        "jit": (dict(overlap="off", jit=True, batch_size=16), 1e-5),
        "jit+overlap": (dict(overlap="on", jit=True, batch_size=40), 1e-5),
        "float16": (dict(overlap="off", precision="float16"), 5e-3),
        "bfloat16": (dict(overlap="on", precision="bfloat16"), 3e-2),
    }
    for name, (compute, tolerance) in variants.items():
        scorer = _scorer(shapes_model, **compute)
        assert scorer.split == (name != "float16"), name
        out, errors = scorer.score(batch.payloads, batch.orientations)
        assert list(errors) == [5], name  # the bad image is still found by bisection
        assert out["probabilities"].dtype == np.float32, name
        probs = np.take_along_axis(out["probabilities"], np.argsort(out["indices"]), axis=1)
        np.testing.assert_allclose(probs, ref_probs, atol=tolerance, err_msg=name)
        if tolerance < 1e-4:
            np.testing.assert_array_equal(out["indices"][:, 0], reference["indices"][:, 0], err_msg=name)


def test_featurize_overlapped_and_compiled_gives_the_same_embeddings(batch, shapes_model):
    prepared = prepare_model(str(shapes_model), mode="embed")
    plain = Scorer(replace(prepared, compute=Compute(overlap="off")), str(shapes_model))
    fast = Scorer(replace(prepared, compute=Compute(overlap="on", jit=True, batch_size=64)), str(shapes_model))
    want, want_errors = plain.score(batch.payloads, batch.orientations)
    got, got_errors = fast.score(batch.payloads, batch.orientations)
    assert list(want_errors) == list(got_errors) == [5]
    assert got["embedding"].shape == want["embedding"].shape == (37, 64)
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-4)


def test_jit_compiles_once_on_a_fixed_shape(batch, shapes_model):
    scorer = _scorer(shapes_model, overlap="on", jit=True, batch_size=24)
    assert scorer.fixed == 6  # 24 in 4 overlapped chunks
    good = [i for i in range(len(batch.payloads)) if i != 5]
    calls = [([batch.payloads[i] for i in good[:n]], [batch.orientations[i] for i in good[:n]]) for n in (24, 7, 1, 13)]
    assert _traces(scorer, *calls) == 1  # partial batches are padded: one trace, one XLA compilation
    assert scorer._infer.experimental_get_tracing_count() == 1


def test_compute_options_are_checked_and_keyed(shapes_model, tmp_path):
    with pytest.raises(UserError, match="precision must be one of"):
        ScoringOptions(precision="int8")
    with pytest.raises(UserError, match="overlap must be one of"):
        ScoringOptions(overlap="always")
    prepared = prepare_model(str(shapes_model), mode="classify")
    keys = {replace(prepared, compute=Compute(precision=p)).cache_key for p in gpu.PRECISIONS}
    assert len(keys) == 3  # a different precision is a different cached scorer
    args = cli.build_parser().parse_args(
        ["score", "--input", "i", "--model", "m", "--output", "o", "--precision", "bfloat16", "--jit"]
    )
    options = ScoringOptions.from_args(args)
    assert (options.precision, options.jit, options.overlap) == ("bfloat16", True, "auto")

    import keras

    exported = tmp_path / "exported"
    keras.models.load_model(shapes_model, compile=False).export(str(exported))
    from image_transfer.scoring.options import with_compute

    saved = prepare_model(str(exported), mode="classify")
    with pytest.raises(UserError, match="needs a Keras"):
        with_compute(saved, ScoringOptions(precision="float16"))


@pytest.mark.slow
def test_each_worker_is_pinned_to_the_gpu_its_task_was_assigned(fixtures_dir, tmp_path):
    """local-cluster with two fake GPUs: amount 1 (one task per GPU) and 0.5 (two tasks share one)."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    job = REPO / "tests" / "jobs" / "gpu_scoring.py"
    proc = subprocess.run(
        [sys.executable, str(job), str(fixtures_dir), str(tmp_path), "1", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    for amount, result in results.items():
        workers = result["workers"]
        assert result["rows"] == 240 and sum(w["rows"] for w in workers.values()) == 240, amount
        assert all(len(t) == 1 and t[0] in ("0", "1") for t in result["tasks"]), result["tasks"]
        for worker, facts in workers.items():
            where = (amount, worker, facts)
            assert facts["model_loads"] == 1 and facts["traces"] == 1, where
            assert facts["gpu"] in (["0"], ["1"]), where  # exactly one of the announced addresses
            assert facts["cuda_visible_devices"] == facts["gpu"][0], where  # what TensorFlow will see
            assert set(facts["gpu_assigned"]) <= {"0", "1"}, where
            assert facts["gpu"][0] in facts["gpu_assigned"], where  # pinned by one of its own tasks
    # One task per GPU: the two workers run concurrently from the first wave, one on each GPU.
    pins = sorted(w["gpu"][0] for w in results["1"]["workers"].values())
    assert pins == ["0", "1"], results["1"]["workers"]
    # Half a GPU per task: Spark fills GPU 0 first (2 cores: both concurrent tasks), and both workers share it.
    half = results["0.5"]
    assigned = {a for t in half["tasks"] for a in t}
    assert all(w["gpu"][0] in assigned for w in half["workers"].values()), half
    if assigned == {"0"}:
        assert all(w["gpu"] == ["0"] for w in half["workers"].values()), half


def test_without_gpu_resources_nothing_is_pinned(spark, fixtures_dir, tmp_path):
    """local[2] (no GPU scheduling): the summary's workers carry gpu null, CUDA_VISIBLE_DEVICES untouched."""
    from image_transfer.storage.outputs import write_output

    images = tmp_path / "images.parquet"
    write_output(api.read_images(spark, str(fixtures_dir / "images")).limit(24), str(images))
    summary = tmp_path / "summary.json"
    model = str(fixtures_dir / "model" / "shapes.keras")
    args = ["score", "--input", str(images), "--model", model, "--output", str(tmp_path / "out"), "--summary"]
    assert cli.run([*args, str(summary), "--batch-size", "8"]) == 0
    workers = json.loads(summary.read_text())["workers"]
    assert workers and sum(w["rows"] for w in workers.values()) == 24
    for facts in workers.values():
        assert facts["gpu"] is None, facts
        assert facts["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES"), facts  # left as it was
        assert "gpu_assigned" not in facts, facts


@pytest.mark.slow
def test_mirrored_training_over_two_devices_matches_single_device(tmp_path):
    """Two logical CPU devices: a mirrored run (8 per replica) against one device (16), then mixed_float16."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    job = REPO / "tests" / "jobs" / "mirrored_training.py"
    command = [sys.executable, str(job), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    single, mirrored, mixed = result["single"], result["mirrored"], result["mixed"]
    assert (single["replicas"], mirrored["replicas"]) == (1, 2)
    assert single["global_batch_size"] == mirrored["global_batch_size"] == 16
    assert "mirrored over 2 devices, global batch 16" in proc.stdout
    if gpu.keras_averages_replicas():  # same data, seed and global batch: the same curve
        np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=2e-3)
        assert abs(mirrored["accuracy"] - single["accuracy"]) <= 0.05
    else:  # Keras 3.3 sums the replicas' gradients: it learns, on a somewhat different curve
        assert mirrored["loss"][-1] < mirrored["loss"][0] * 0.7
        assert abs(mirrored["accuracy"] - single["accuracy"]) <= 0.15
    assert mixed["precision"] == "mixed_float16"
    np.testing.assert_allclose(mixed["loss"], single["loss"][:2], rtol=2e-2)
    assert mixed["saved_policies"] == ["float32"]  # saved float32: scoring chooses its own precision
