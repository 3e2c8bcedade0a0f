"""What the parts share: run settings, child processes, the session, TensorFlow threads, the in-process
floor, and the probes (load average, peak memory, CPU seconds per process kind).

Every measurement runs in a child process of ``bench.py`` (``bench.py --child NAME``: a fresh Spark
session, fresh memory high-water marks); ``run_child`` starts one and returns the JSON it wrote.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from data import CACHE, SIZE

HERE = Path(__file__).resolve().parent
ENTRY = HERE / "bench.py"
BATCH = 64  # score's batch size, and the Arrow batch size of every pandas variant
FLOOR_THREADS = 2  # the floor is one process with both cores
WORKER_THREADS = 1  # per Python worker in local[2]: what score sets (the task's cores)


# ---- child processes -----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")


def child_command(name: str, cfg: dict[str, Any], out: str) -> list[str]:
    """``bench.py --child NAME``: runs ``parts.CHILDREN[NAME](cfg)`` and writes its result as JSON to ``out``."""
    return [sys.executable, str(ENTRY), "--child", name, "--config", json.dumps(cfg), "--child-out", out]


def run_child(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one child process to its end and return its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=CACHE, delete=False) as f:
        out = Path(f.name)
    try:
        subprocess.run(child_command(name, cfg, str(out)), check=True, env=child_env())
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# ---- in the children -----------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}"


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def spark_session(app: str) -> Any:
    """A local[2] session from the project's ``image_transfer.runtime.get_spark``."""
    from image_transfer.runtime import get_spark

    spark = get_spark(app, master="local[2]")
    # One Parquet file = one partition (files are packed while below maxPartitionBytes, each costing
    # openCostInBytes): every variant sees the same partitions, and Part 3 keeps partitions equal-sized.
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(256 * 1024 * 1024))
    spark.conf.set("spark.sql.files.openCostInBytes", str(256 * 1024 * 1024))
    return spark


def configure_tf(threads: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def read_local(files: list[str], columns: list[str]) -> dict[str, list[Any]]:
    """The files' columns into this process with pyarrow (no Spark)."""
    import pyarrow.parquet as pq

    out: dict[str, list[Any]] = {c: [] for c in columns}
    for f in files:
        table = pq.read_table(f, columns=columns)
        for c in columns:
            out[c] += table.column(c).to_pylist()
    return out


class Floor:
    """The compute floor: no Spark, one process, tf.data over the same bytes, model in a tf.function."""

    def __init__(self, model_path: str, contents: list[bytes], *, parallel: int = FLOOR_THREADS) -> None:
        import tensorflow as tf

        from image_transfer.imaging.graph import decode_resize
        from image_transfer.models.artifact import read_metadata
        from image_transfer.models.load import load_keras, preprocess_fn

        model = load_keras(model_path)
        preprocess = preprocess_fn(read_metadata(model_path).get("preprocess", "none"))
        self.traces = 0

        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
        def serve(images: Any) -> Any:
            self.traces += 1
            top = tf.math.top_k(tf.cast(model(images, training=False), tf.float32), k=5)
            return top.values, top.indices

        self.serve = serve
        self.encoded = tf.constant(contents)
        self.parallel = parallel
        # Fixed parallelism, not AUTOTUNE: destroying an autotuned iterator can stall for seconds.
        self.dataset = (
            tf.data.Dataset.from_tensor_slices(self.encoded)
            .map(lambda e: preprocess(decode_resize(e, SIZE, SIZE)), num_parallel_calls=parallel, deterministic=True)
            .batch(BATCH)
            .prefetch(2)
        )
        for images in self.dataset.take(1):  # load + trace, not timed
            self.serve(images)

    def run(self) -> tuple[float, list[int]]:
        import numpy as np

        iterator = iter(self.dataset)
        started = time.perf_counter()
        top1 = []
        for images in iterator:
            _, indices = self.serve(images)
            top1.append(indices.numpy()[:, 0])
        seconds = time.perf_counter() - started  # up to the last batch's result
        del iterator
        return seconds, np.concatenate(top1).tolist()


# ---- probes --------------------------------------------------------------------------------------


def jvm_peak_mb(spark: Any) -> int | None:
    """VmHWM of the driver JVM (a child of this Python process)."""
    pids = []
    try:
        pids.append(int(spark.sparkContext._gateway.proc.pid))
    except Exception:  # noqa: BLE001
        pass
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "java":
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
        except OSError:
            continue
    return None


def python_peak_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root``'s descendants: the JVM(s) and the Python workers, by kind."""
    children: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(")", 1)
            pid = int(stat.parent.name)
            children.setdefault(int(rest.split()[1]), []).append(pid)
            comm[pid] = head.split("(", 1)[1]
        except (OSError, IndexError, ValueError):
            continue
    out = {"jvm": 0.0, "python_workers": 0.0}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            kind = (
                "jvm"
                if comm.get(pid) == "java"
                else "python_workers"
                if comm.get(pid, "").startswith("python")
                else None
            )
            if kind:
                out[kind] += proc_cpu_seconds(pid)
        except OSError:
            continue
    return out
