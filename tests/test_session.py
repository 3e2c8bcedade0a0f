"""The one session helper: the active session first, Spark Connect sessions the CLI did not make, settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from image_transfer.errors import UserError
from image_transfer.runtime import SETTINGS, get_spark, is_connect, parse_conf


def test_the_active_session_comes_first(spark):
    if is_connect(spark):
        pytest.skip("a classic session's identity")
    assert get_spark("another app") is spark
    assert get_spark("again", conf={"spark.sql.shuffle.partitions": "7"}) is spark
    assert spark.conf.get("spark.sql.shuffle.partitions") == "7"
    spark.conf.unset("spark.sql.shuffle.partitions")


def test_the_local_session_runs_with_the_settings(spark):
    if is_connect(spark):
        pytest.skip("the test session is a Connect one")
    for key, value in SETTINGS.items():
        assert spark.sparkContext.getConf().get(key) == value, key


def test_a_setting_a_live_session_cannot_take_is_a_user_error(spark):
    if is_connect(spark):
        pytest.skip("classic session")
    with pytest.raises(UserError, match="spark.executor.memory"):
        get_spark("x", conf={"spark.executor.memory": "1g"})


def test_conf_pairs():
    assert parse_conf(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(UserError, match="key=value"):
        parse_conf(["novalue"])


def test_a_master_beside_spark_remote_is_refused(monkeypatch):
    monkeypatch.setenv("SPARK_REMOTE", "sc://localhost:1")
    with pytest.raises(UserError, match="SPARK_REMOTE"):
        get_spark("x", master="local[1]")


CLI_ON_CONNECT = r"""
import json, sys
from image_transfer.jobs import cli
code = cli.run(sys.argv[1:])
from pyspark.sql import SparkSession
spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
from image_transfer.runtime import is_connect
print(json.dumps({"code": code, "connect": is_connect(spark), "rows": spark.read.parquet(sys.argv[-1]).count()}))
"""


@pytest.mark.slow
def test_the_cli_runs_on_a_connect_session_it_did_not_make(fixtures_dir, shapes_model, tmp_path):
    """As the platform hands it (serverless, standard access): SPARK_REMOTE set, no --remote, on Databricks."""
    import pyspark

    if int(pyspark.__version__.split(".")[0]) < 4:
        pytest.skip("pyspark >= 4 ships the local Spark Connect server (the Runtime 17.3-like environment)")
    out = tmp_path / "scored.parquet"
    env = {
        **os.environ,
        "SPARK_REMOTE": "local[2]",
        "DATABRICKS_RUNTIME_VERSION": "17.3",
        "PYSPARK_PYTHON": sys.executable,
    }
    env.pop("IMAGE_TRANSFER_TEST_SESSION", None)
    # ingest, then score: both commands on the session the environment gives
    ingest = [
        sys.executable,
        "-m",
        "image_transfer",
        "ingest",
        "--images",
        str(fixtures_dir / "images"),
        "--output",
        str(tmp_path / "images.parquet"),
    ]
    done = subprocess.run(ingest, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    command = [
        sys.executable,
        "-c",
        CLI_ON_CONNECT,
        "score",
        "--input",
        str(tmp_path / "images.parquet"),
        "--model",
        str(shapes_model),
        "--top-k",
        "2",
        "--output",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "connect": True, "rows": 240}, result
    assert "JVM_ATTRIBUTE_NOT_SUPPORTED" not in done.stderr and "CANNOT_CONFIGURE" not in done.stderr


def test_the_session_kind_is_asked_once_per_scoring_call(spark, fixtures_dir, shapes_model, monkeypatch):
    """``score_images`` asks ``is_connect`` once and passes the answer down (shipping, spreading, statistics)."""
    import traceback

    from image_transfer import read_images, runtime, score_images

    asked: list[str] = []

    def counting(session):
        asked.append(traceback.extract_stack(limit=2)[0].name)
        return is_connect(session)

    original = runtime.is_connect
    for name, module in list(sys.modules.items()):
        if name.startswith("image_transfer") and getattr(module, "is_connect", None) is original:
            monkeypatch.setattr(module, "is_connect", counting)
    df = read_images(spark, str(fixtures_dir / "images"))
    asked.clear()
    score_images(df, str(shapes_model))
    assert asked == ["score_frame"]


def test_the_runtime_is_read_in_one_place(monkeypatch):
    from pathlib import Path

    from image_transfer import runtime

    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "18.0")
    assert runtime.runtime_version() == "18.0" and runtime.on_databricks()
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION")
    assert runtime.runtime_version() is None and not runtime.on_databricks()
    package = Path(runtime.__file__).parent
    readers = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if "DATABRICKS_RUNTIME_VERSION" in p.read_text()
    ]
    assert readers == ["runtime.py"]
