"""Engines: what runs the model on the workers, one module each, behind one interface (``base.Engine``).

``tensorflow`` (``TensorFlowEngine``: the Keras model or SavedModel in traced graphs) and ``litert``
(``LiteRTEngine``: the model converted to a flatbuffer by ``litert_convert``, run by the XNNPACK
interpreter). ``ENGINES`` registers them by name, in the order ``--engine auto`` tries them; the
driver's choice (``scoring.engine.choose_engine``), the worker (``scoring.worker``) and the MLflow
pyfunc (``lifecycle.pyfunc``) know engines only through it. A new engine is one more module here,
with its class added to ``ENGINES`` (``register``).

No engine module imports its framework at import time: a driver that ships a converted model imports
no TensorFlow.

May import: ``errors``, ``runtime``, ``devices``, ``imaging``, ``models``, and ``scoring.options`` /
``scoring.stats`` (the prepared model, the worker's counters) where needed; nothing else of scoring.
"""

from __future__ import annotations

from image_transfer.errors import UserError
from image_transfer.scoring.engines.base import Engine
from image_transfer.scoring.engines.litert import LiteRTEngine
from image_transfer.scoring.engines.tensorflow import TensorFlowEngine

ENGINES: dict[str, type[Engine]] = {  # name -> engine; ``auto`` tries them in this order
    LiteRTEngine.name: LiteRTEngine,
    TensorFlowEngine.name: TensorFlowEngine,
}


def register(engine: type[Engine]) -> type[Engine]:
    """Add ``engine`` to ``ENGINES`` under its ``name`` (tried last by ``auto``); returns it (usable as a
    class decorator)."""
    ENGINES[engine.name] = engine
    return engine


def engine_class(name: str) -> type[Engine]:
    """The registered engine called ``name``; UserError for a name none has."""
    try:
        return ENGINES[name]
    except KeyError:
        raise UserError(f"engine must be one of {', '.join(['auto', *ENGINES])}, not {name!r}") from None


__all__ = ["ENGINES", "Engine", "LiteRTEngine", "TensorFlowEngine", "engine_class", "register"]
