"""Shared test fixtures: one local[2] SparkSession for the whole run, and the repo's fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


# IMAGE_TRANSFER_TEST_SESSION=connect runs the tests marked ``connect`` against a local Spark Connect
# session (pyspark >= 4 ships the server), the others are skipped: CI runs them both ways.
CONNECT = os.environ.get("IMAGE_TRANSFER_TEST_SESSION") == "connect"


def pytest_collection_modifyitems(config, items):
    if not CONNECT:
        return
    skip = pytest.mark.skip(reason="classic-session test (IMAGE_TRANSFER_TEST_SESSION=connect runs the API tests)")
    for item in items:
        if "connect" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    if CONNECT:
        from pyspark.sql import SparkSession

        session = SparkSession.builder.remote("local[2]").appName("image-transfer connect tests").getOrCreate()
    else:
        from image_transfer.runtime import get_spark

        # A warehouse of its own per run (and per pytest-xdist worker): tables never meet another run's.
        warehouse = tmp_path_factory.mktemp("spark-warehouse")
        session = get_spark("image-transfer tests", master="local[2]", conf={"spark.sql.warehouse.dir": str(warehouse)})
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


@pytest.fixture
def no_spark(monkeypatch):
    """Fail the test if the CLI asks for a SparkSession."""
    from image_transfer.jobs import cli

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a SparkSession was asked for")

    monkeypatch.setattr(cli, "session", refuse)
