"""Prepared training datasets for the prepare/feed/train tests, built once per test session."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="image-transfer-training-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.cache
def fixture_dataset(spark) -> str:
    """The fixture images (6 classes x 40) prepared with a 0.2 validation fraction; returns its path."""
    from image_transfer.training.prepare import prepare

    out = _root() / "fixtures.parquet"
    prepare(spark, str(FIXTURES / "images"), str(out))
    return str(out)
