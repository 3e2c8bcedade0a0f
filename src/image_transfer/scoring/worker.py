"""The worker side: the per-process cache of loaded engines, the predict function factory.

The engine is the one the driver chose (``prepared.compute.engine``), found in ``scoring.engines.ENGINES``
and used through its interface (``engines.base.Engine``): this module names no engine.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from image_transfer.errors import UserError
from image_transfer.imaging.screen import ImageLimits, screen_batch
from image_transfer.scoring.engines import engine_class
from image_transfer.scoring.engines.base import Engine
from image_transfer.scoring.options import MODEL_ERROR, ModelFailure, PreparedModel
from image_transfer.scoring.stats import BatchReporter, set_worker_fact, stats_columns

# ---- the worker side -------------------------------------------------------------------------------

_CACHE_SIZE = 2  # loaded engines (traced scoring functions) kept per worker process (least recently used goes)
_CACHE: OrderedDict[tuple[Any, ...], Engine] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOADING: dict[tuple[Any, ...], threading.Lock] = {}  # cache key -> the lock its one load holds


def _task_cores() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else max(1, os.cpu_count() or 1)
    except Exception:  # noqa: BLE001 - older Spark without TaskContext.cpus()
        return 1


_PREPARE_LOCK = threading.Lock()  # held while this worker is being readied


def prepare_worker(engine: type[Engine]) -> None:
    """Ready this Python worker for ``engine``: pinned to its task's GPU, then the engine's own set-up
    (threads, memory growth).

    Runs in the task (it reads the task's resources); what is already done stays as it is.
    """
    from image_transfer import devices

    devices.pin_worker(set_worker_fact)  # before the engine imports its framework in the process
    cores = _task_cores()
    with _PREPARE_LOCK:
        engine.prepare_process(cores)


def _scorer(prepared: PreparedModel, shipped: Any) -> Engine:
    """The worker's cached engine for this model and mode, loading it on a miss.

    Threads asking for one model wait for a single load (a lock per cache key); different models load
    side by side.
    """
    key = prepared.cache_key
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _CACHE_LOCK:
            if key in _CACHE:  # another thread loaded it meanwhile
                _CACHE.move_to_end(key)
                return _CACHE[key]
        try:
            scorer = _load_scorer(prepared, shipped)
            with _CACHE_LOCK:
                _CACHE[key] = scorer
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
        finally:
            with _CACHE_LOCK:
                _LOADING.pop(key, None)
    return scorer


def _load_scorer(prepared: PreparedModel, shipped: Any) -> Engine:
    """Load the model of ``prepared`` into the engine the driver chose (``prepared.compute.engine``),
    from what was shipped (a broadcast, or bytes in the closure), else from the model's path."""
    engine = engine_class(prepared.compute.engine)
    prepare_worker(engine)
    data = shipped.value if hasattr(shipped, "value") else shipped
    loaded = engine.load(prepared, data, _task_cores())
    loaded.warm_up()
    return loaded


def make_predict_fn_factory(
    prepared: PreparedModel, shipped: Any, limits: ImageLimits
) -> Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """The closure factory handed to ``predict_batch_udf`` (it runs once per Python worker and UDF)."""
    classes = prepared.info.output_width if prepared.mode == "classify" else 0
    names = np.array([prepared.info.label(i) for i in range(classes)], dtype=object)

    def make_predict_fn() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        from image_transfer.devices import note_task

        reporter = BatchReporter()  # before loading: the load belongs to this UDF's first report
        try:
            scorer = _scorer(prepared, shipped)
        except UserError as exc:  # the driver checked the config; the weights only load here
            raise ModelFailure(f"{MODEL_ERROR} to load on a worker: {exc}") from exc
        for fact, value in scorer.describe().items():  # engine, interpreter
            set_worker_fact(fact, value)
        k = prepared.width

        def predict(encoded: np.ndarray) -> dict[str, np.ndarray]:
            note_task(set_worker_fact)
            n = len(encoded)
            screened = screen_batch(encoded, limits)
            errors = list(screened.errors)
            outputs, graph_errors = scorer.score(screened.payloads, screened.orientations)
            ok_rows = [row for j, row in enumerate(screened.kept) if j not in graph_errors]
            for j, message in graph_errors.items():
                errors[screened.kept[j]] = message
            arrow_bytes = sum(len(v) for v in encoded if v is not None)  # what crossed from the JVM
            report = reporter.report(batch_bytes=arrow_bytes)
            stats = stats_columns(n, report, screened.warnings)  # rows are counted in Spark
            error_col = np.array(errors, dtype=object)
            if prepared.mode == "embed":
                emb = np.zeros((n, prepared.width), np.float32)
                if ok_rows:
                    emb[ok_rows] = outputs["embedding"]
                return {"embedding": emb, "error": error_col, **stats}
            labels = np.full((n, k), None, dtype=object)
            probs = np.zeros((n, k), np.float32)
            prediction = np.full(n, None, dtype=object)
            probability = np.full(n, np.nan, np.float32)
            if ok_rows:
                labels[ok_rows] = names[outputs["indices"]]
                probs[ok_rows] = outputs["probabilities"]
                prediction[ok_rows] = labels[ok_rows, 0]
                probability[ok_rows] = probs[ok_rows, 0]
            return {
                "prediction": prediction,
                "probability": probability,
                "top_k_labels": labels,
                "top_k_probabilities": probs,
                "error": error_col,
                **stats,
            }

        return predict

    return make_predict_fn
