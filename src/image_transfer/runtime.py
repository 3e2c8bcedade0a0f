"""The runtime, in one place: Databricks or not (and its version), the session kind, the one session helper
and the Spark settings.

``get_spark`` works like the Databricks ``default-python`` template's: the session the platform (or the
caller) already has comes first, a Spark Connect session included; then ``DatabricksSession`` where
databricks-connect is installed; else a local session built with ``SETTINGS`` and ``LOCAL_SETTINGS``.
Nothing here calls ``sparkContext`` on a Connect session. This module imports nothing of the package
but ``errors``: every layer may ask. Ask ``is_connect`` once per call and pass the answer down.

May import: ``errors``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from image_transfer.errors import UserError

# What every session of this project runs with; the bundle's job clusters set the same in ``spark_conf``
# (tests/test_bundle.py checks that they do).
SETTINGS: dict[str, str] = {
    # Keep each Python worker, and the model it loaded and traced, across tasks.
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}
# Only for the embedded local session (on a cluster the platform owns these).
LOCAL_SETTINGS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.showConsoleProgress": "false",
}
DRIVER_MEMORY_ENV = "IMAGE_TRANSFER_DRIVER_MEMORY"  # the embedded driver's memory, default 4g
MASTER_ENV = "IMAGE_TRANSFER_MASTER"  # the embedded session's master, default local[*]


def is_connect(spark: Any) -> bool:
    """Whether ``spark`` is a Spark Connect session (no SparkContext, accumulators or JVM gateway)."""
    try:
        from pyspark.sql.utils import is_remote

        if is_remote():
            return True
    except ImportError:  # pragma: no cover - very old pyspark
        pass
    return type(spark).__module__.startswith("pyspark.sql.connect")


RUNTIME_VERSION_ENV = "DATABRICKS_RUNTIME_VERSION"  # set by Databricks on clusters and serverless compute


def runtime_version() -> str | None:
    """The Databricks Runtime version this process runs on (``18.0``, ``client.3.1`` on serverless), else None.

    The one place that reads it: every "is this Databricks?" in the package asks here.
    """
    return os.environ.get(RUNTIME_VERSION_ENV) or None


def on_databricks() -> bool:
    """Whether this process runs on a Databricks cluster (or serverless compute)."""
    return runtime_version() is not None


def parse_conf(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--conf key=value`` pairs as a dict; UserError for a pair without ``=``."""
    conf: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--conf takes key=value, got {pair!r}")
        conf[key.strip()] = value
    return conf


def _databricks_connect() -> Any:
    try:
        from databricks.connect import DatabricksSession  # type: ignore[import-not-found]
    except ImportError:
        return None
    return DatabricksSession


def get_spark(
    app_name: str = "image-transfer",
    *,
    master: str | None = None,
    conf: Mapping[str, str] | None = None,
    remote: str | None = None,
) -> Any:
    """The session to run on: the active one, the platform's, a Spark Connect one, or an embedded local one.

    In order: ``remote`` (``sc://host:port``, or ``local[2]`` for a local Connect server) makes a Spark
    Connect session; without ``master``, an active session is used as it is (a notebook's, the one a
    job's platform made, a Connect session included), then ``SPARK_REMOTE`` (Spark Connect), a
    Databricks cluster's session, or ``DatabricksSession`` where databricks-connect is installed; else
    an embedded session on ``master`` (default ``local[*]``) with the settings above. ``conf`` goes to
    the builder, so it reaches a new local session's SparkContext; on an existing session only SQL
    settings can change, and one that cannot is a UserError. Locally the log level is WARN; on
    Databricks the cluster's is left alone.
    """
    # Workers must run the same interpreter (and so the same installed package) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    conf = dict(conf or {})
    if remote:
        builder = SparkSession.builder.appName(app_name).remote(remote)
        return _configured(builder, conf).getOrCreate()
    if master is None:
        active = SparkSession.getActiveSession()
        if active is not None:
            return _set_sql(active, conf)
        if os.environ.get("SPARK_REMOTE") or on_databricks():
            return _set_sql(SparkSession.builder.appName(app_name).getOrCreate(), conf)
        databricks_session = _databricks_connect()
        if databricks_session is not None:
            return _set_sql(databricks_session.builder.getOrCreate(), conf)
    elif os.environ.get("SPARK_REMOTE"):
        raise UserError(f"SPARK_REMOTE is set ({os.environ['SPARK_REMOTE']}): unset it to use --master {master}")
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master or os.environ.get(MASTER_ENV, "local[*]"))
        .config("spark.driver.memory", os.environ.get(DRIVER_MEMORY_ENV, "4g"))
    )
    spark = _configured(builder, {**SETTINGS, **LOCAL_SETTINGS, **conf}).getOrCreate()
    if not is_connect(spark):
        spark.sparkContext.setLogLevel("WARN")
    return spark


def _configured(builder: Any, conf: Mapping[str, str]) -> Any:
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder


def _set_sql(spark: Any, conf: Mapping[str, str]) -> Any:
    """``conf`` applied to a session that exists already (runtime SQL settings only)."""
    for key, value in conf.items():
        try:
            spark.conf.set(key, value)
        except Exception as exc:  # noqa: BLE001 - a static or cluster setting cannot change on a live session
            raise UserError(f"--conf {key} cannot be set on the running session: {str(exc).splitlines()[0]}") from exc
    return spark


def quiet_interrupts(spark: Any) -> None:
    """On Ctrl-C, cancel the session's jobs without the driver's log of every cancelled task.

    Replaces PySpark's SIGINT handler, which cancels all jobs over the main thread's Py4J connection
    (already busy with the call that was interrupted: Py4J then logs its reentrant-call trace) while the
    driver logs every cancelled task's Java trace. Here another thread turns the driver's log off and
    cancels the jobs (under Spark Connect: interrupts the session's operations), Py4J's logging of the
    interrupted call is dropped, and KeyboardInterrupt goes up through the commands' own cleanup (staging
    data, leases) to ``run``, which prints one line and exits 130.
    """
    import logging
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    connect = is_connect(spark)

    def cancel() -> None:
        try:
            if connect:
                spark.interruptAll()
            else:
                spark.sparkContext.setLogLevel("OFF")
                spark.sparkContext.cancelAllJobs()
        except Exception:  # noqa: BLE001 - the session is going away: interrupting is all that matters
            pass

    def on_interrupt(signum: int, frame: Any) -> None:
        logging.getLogger("py4j").setLevel(logging.CRITICAL + 1)
        logging.getLogger().addFilter(_drop_py4j_interrupt_records)
        worker = threading.Thread(target=cancel, name="image-transfer-interrupt", daemon=True)
        worker.start()
        worker.join(timeout=10)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)


def _drop_py4j_interrupt_records(record: Any) -> bool:
    """Py4J logs an interrupted call through the root logger ("... while sending command."): not the user's news."""
    return not str(record.msg).endswith("while sending command.")
