"""GPU placement: pin a worker to the GPU Spark assigned its task, memory growth, precision, training strategy.

Scoring workers call ``pin_worker`` before TensorFlow is imported in the process: it sets
``CUDA_VISIBLE_DEVICES`` to the addresses in the task's resources (``TaskContext.resources()["gpu"]``),
so the process sees exactly that GPU (as its ``GPU:0``) and opens no context on the others. Spark
hands the same address to several tasks when ``spark.task.resource.gpu.amount`` is a fraction, which
is how tasks share a GPU. Without a GPU resource (single-node clusters, CPU clusters, ``local[n]``)
nothing is changed.

CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when TensorFlow initialises the GPUs: the first pin of a
process is the one it keeps. A reused Python worker (``spark.python.worker.reuse``) may later run a
task Spark assigned to another GPU; it keeps computing on the GPU it was pinned to. The worker
statistics report both: ``gpu`` (the pinned addresses, or None) and ``gpu_assigned`` (every address
the worker's tasks were assigned).

No import of TensorFlow at module level: importing this module must not initialise anything.

May import: ``errors``, ``runtime``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from image_transfer.errors import UserError

PRECISIONS = ("float32", "float16", "bfloat16")
_POLICY = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
_LOCK = threading.Lock()
_PINNED: dict[str, Any] = {}  # "addresses": what this process was pinned to (None: not pinned); set once
_ASSIGNED: set[str] = set()


def task_gpu_addresses() -> list[str] | None:
    """The GPU addresses Spark assigned to the running task, or None (no task, or no GPU resource)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None:
            return None
        info = ctx.resources().get("gpu")
    except Exception:  # noqa: BLE001 - no pyspark, or a TaskContext without resources()
        return None
    if info is None or not info.addresses:
        return None
    return [str(a) for a in info.addresses]


def _tensorflow_initialised() -> bool:
    """Whether TensorFlow is imported in this process (then it is too late to choose its devices)."""
    return "tensorflow" in sys.modules


def pin_worker(set_worker_fact: Callable[[str, Any], None]) -> list[str] | None:
    """Pin this process to the running task's GPU(s), once; returns the addresses it is pinned to, or None.

    Must run before TensorFlow is imported in the process. Later calls (a reused worker running a task
    assigned to another GPU) return the first pin and only record the new assignment. ``set_worker_fact``
    records ``gpu``, ``cuda_visible_devices`` and ``gpu_assigned`` (the scoring statistics' recorder).
    """
    assigned = task_gpu_addresses()
    with _LOCK:
        if "addresses" not in _PINNED:
            pinned = None
            if assigned and not _tensorflow_initialised():
                # Spark's addresses come from the discovery script (nvidia-smi order = PCI bus order);
                # CUDA's own default order (fastest first) may differ.
                os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(assigned)
                pinned = list(assigned)
            _PINNED["addresses"] = pinned
            set_worker_fact("gpu", pinned)
            set_worker_fact("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
        if assigned:
            _ASSIGNED.update(assigned)
            set_worker_fact("gpu_assigned", sorted(_ASSIGNED))
        return _PINNED["addresses"]


def note_task(set_worker_fact: Callable[[str, Any], None]) -> None:
    """Record the running task's GPU assignment (after the first pin); cheap enough for every batch."""
    assigned = task_gpu_addresses()
    if assigned and not _ASSIGNED.issuperset(assigned):
        with _LOCK:
            _ASSIGNED.update(assigned)
            set_worker_fact("gpu_assigned", sorted(_ASSIGNED))


def enable_memory_growth() -> int:
    """Let TensorFlow grow its memory on every visible GPU instead of taking it all; returns how many GPUs.

    Needed where several processes share a GPU (fractional task amounts, a notebook next to a job) and
    harmless otherwise; it must run before TensorFlow's first op (too late: left as it is).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for device in gpus:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (RuntimeError, ValueError):  # already initialised: growth cannot change any more
            pass
    return len(gpus)


def visible_gpus() -> int:
    """How many GPUs TensorFlow sees in this process (imports TensorFlow)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


# ---- precision ---------------------------------------------------------------------------------


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``; UserError otherwise."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def keras_policy(precision: str) -> str:
    """The Keras dtype policy of an inference precision: float16 -> ``mixed_float16``, ..."""
    return _POLICY[check_precision(precision)]


def _retype(node: Any, policy: str) -> None:
    if isinstance(node, list):
        for item in node:
            _retype(item, policy)
        return
    if not isinstance(node, dict):
        return
    config = node.get("config")
    kind = node.get("class_name")
    if isinstance(config, dict) and kind not in ("InputLayer", "__keras_tensor__") and "dtype" in config:
        if kind not in ("Functional", "Sequential", "Model"):
            config["dtype"] = policy
    for value in node.values():
        _retype(value, policy)


def with_policy(model: Any, policy: str) -> Any:
    """A copy of a Keras model whose layers compute under ``policy`` (e.g. ``mixed_float16``), same weights.

    Saved models name each layer's dtype policy, which a global policy does not override, so the
    configuration is rewritten and the weights copied (variables stay float32 under mixed policies).
    """
    import keras

    current = getattr(getattr(model, "dtype_policy", None), "name", None)
    if current == policy:
        return model
    config = model.get_config()
    _retype(config.get("layers", []), policy)
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    if isinstance(copy, keras.Model) and hasattr(copy, "dtype_policy"):
        try:
            copy.dtype_policy = policy
        except Exception:  # noqa: BLE001 - older Keras: the model's own policy is informational
            pass
    return copy


# ---- training ----------------------------------------------------------------------------------


def training_strategy() -> Any:
    """``MirroredStrategy`` over all visible GPUs when there is more than one; the default strategy otherwise."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    return tf.distribute.get_strategy()


def keras_averages_replicas() -> bool:
    """Whether Keras averages gradients across ``tf.distribute`` replicas itself.

    Keras 3.8+ (3.10 on Databricks Runtime 17.3 ML) scales each replica's loss by 1/replicas and sums
    the gradients across replicas. Keras 3.3 (15.4 ML) does neither on CPU, nor on GPU without XLA: each
    replica applies its own gradient and the replicas drift apart: ``train --workers`` all-reduces the
    gradients itself there (single-node mirrored training does not yet: a known defect). Detected by
    the loss-scaling function Keras 3.8 added.
    """
    try:
        from keras.src.losses import loss as keras_loss
    except ImportError:  # pragma: no cover - a Keras without this layout: a recent one
        return True
    return hasattr(keras_loss, "scale_loss_for_distribution")
