"""The comparison variants of Part 1 (``parts/scoring.py``): the ways people commonly score images with Spark.

This module runs on the Spark workers (Part 1 ships it with ``SparkContext.addPyFile``), so the
UDFs below are importable there rather than pickled from the script's ``__main__``. Every variant
counts, per Python worker pid, the model loads it does and the traces Keras makes of its predict
function, with a public accumulator of per-worker counts (``counters``).

All variants decode with Pillow in Python, one image at a time (what the usual code does), resize to
224x224 bilinearly, scale to -1..1 and report the top-1 class index and its probability.

- ``row_udf_closure``: a row-at-a-time ``udf`` whose closure holds the model; the closure is pickled
  into every task, so the model is rebuilt once per task; ``model.predict`` per image.
- ``row_udf_broadcast``: the same with the model broadcast, so it is rebuilt once per worker.
- ``series_udf``: a Series -> DataFrame ``pandas_udf``; the broadcast model is called eagerly on each
  Arrow batch (``model(x)``, no ``tf.function``).
- ``iterator_udf``: an Iterator[Series] -> Iterator[DataFrame] ``pandas_udf`` that rebuilds the model
  from broadcast bytes once per iterator (i.e. once per partition) and calls ``model.predict`` per
  Arrow batch: the pattern of Databricks' model-inference guides.
"""

import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd  # module level: pandas_udf resolves the type hints against these globals

SIZE = 224
RESULT_DDL = "prediction int, probability float"


def counters(sc: Any) -> Any:
    """A public accumulator of ``{host:pid: {counter: n}}`` for the variants' own counts."""
    from pyspark.accumulators import AccumulatorParam

    from image_transfer.scoring.stats import merge

    class Counts(AccumulatorParam):
        def zero(self, value: Any) -> dict:
            return {}

        def addInPlace(self, a: dict, b: dict) -> dict:  # noqa: N802 - Spark's name
            for worker, counts in b.items():
                merge(a, worker, counts)
            return a

    return sc.accumulator({}, Counts())


def record(accumulator: Any, **counts: int) -> None:
    """Add counters for this worker (``host:pid``); each task deserializes the variants' closures afresh."""
    from image_transfer.scoring.stats import worker_id

    accumulator.add({worker_id(): counts})


def warm_worker(threads: int) -> tuple[int, bool]:
    """Import TensorFlow in this worker and fix its thread pools (before any op runs); (pid, applied)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        applied = True
    except RuntimeError:  # TensorFlow already ran something in this process
        applied = False
    import keras  # noqa: F401 - part of the import cost every variant would otherwise pay first

    return os.getpid(), applied


class ShippedModel:
    """A ``.keras`` file's bytes that become a Keras model on first use in the process that holds them.

    Pickled, only the bytes travel: wherever the object is unpickled (with every task when it sits in
    a UDF's closure, once per worker when it is a broadcast value), the first ``get`` rebuilds the
    model, as unpickling a Keras model would, and counts it as a model load.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.data = state["data"]
        self._model = None

    def get(self, stats: Any) -> Any:
        if self._model is None:
            self._model = load_counted(self.data, stats)
        return self._model


def load_counted(data: bytes, stats: Any) -> Any:
    """Load a ``.keras`` model from bytes; count the load, and each trace of its predict function."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    path = os.path.join(tempfile.gettempdir(), f"bench-model-{os.getpid()}-{uuid.uuid4().hex[:8]}.keras")
    with open(path, "wb") as f:
        f.write(data)
    try:
        model = keras.models.load_model(path, compile=False)
    finally:
        os.unlink(path)
    record(stats, model_loads=1)
    step = model.predict_step

    def predict_step(batch: Any) -> Any:  # Keras calls this from Python only while tracing predict
        record(stats, traces=1)
        return step(batch)

    model.predict_step = predict_step
    return model


def decode(data: bytes) -> np.ndarray:
    """One encoded image -> float32 [224, 224, 3] in -1..1, with Pillow (the usual per-image code)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def _top1(probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"prediction": probs.argmax(axis=1).astype(np.int32), "probability": probs.max(axis=1).astype(np.float32)}
    )


def row_udf_closure(shipped: ShippedModel, stats: Any) -> Any:
    """Row-at-a-time UDF; the model travels in the closure (rebuilt once per task)."""
    from pyspark.sql.functions import udf

    def predict(content: bytes) -> tuple[int, float]:
        model = shipped.get(stats)
        probs = model.predict(decode(content)[None], verbose=0)[0]
        record(stats, rows=1)
        return int(probs.argmax()), float(probs.max())

    return udf(predict, RESULT_DDL)


def row_udf_broadcast(broadcast: Any, stats: Any) -> Any:
    """Row-at-a-time UDF; the model is a broadcast value (rebuilt once per worker)."""
    from pyspark.sql.functions import udf

    def predict(content: bytes) -> tuple[int, float]:
        model = broadcast.value.get(stats)
        probs = model.predict(decode(content)[None], verbose=0)[0]
        record(stats, rows=1)
        return int(probs.argmax()), float(probs.max())

    return udf(predict, RESULT_DDL)


def series_udf(broadcast: Any, stats: Any) -> Any:
    """Series -> DataFrame pandas UDF; per-image Pillow decode, eager model call per Arrow batch."""
    from pyspark.sql.functions import pandas_udf

    def predict(content: pd.Series) -> pd.DataFrame:
        model = broadcast.value.get(stats)
        images = np.stack([decode(c) for c in content])
        probs = np.asarray(model(images, training=False))
        record(stats, batches=1, rows=len(content))
        return _top1(probs)

    return pandas_udf(predict, RESULT_DDL)


def iterator_udf(model_bytes: Any, stats: Any) -> Any:
    """Iterator pandas UDF: model rebuilt per iterator (partition), ``model.predict`` per Arrow batch."""
    from pyspark.sql.functions import pandas_udf

    def predict(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model = load_counted(model_bytes.value, stats)
        for content in batches:
            images = np.stack([decode(c) for c in content])
            probs = model.predict(images, verbose=0)
            record(stats, batches=1, rows=len(content))
            yield _top1(probs)

    return pandas_udf(predict, RESULT_DDL)
