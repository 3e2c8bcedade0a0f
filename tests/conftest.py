"""Shared test fixtures: one local[2] SparkSession for the whole run, and the repo's fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def spark():
    from image_transfer.cli import _spark

    session = _spark("image-transfer tests", "local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shapes_model() -> Path:
    return FIXTURES / "model" / "shapes.keras"


@pytest.fixture(scope="session")
def backbone_model() -> Path:
    return FIXTURES / "model" / "backbone.keras"
