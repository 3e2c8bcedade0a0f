"""The driver's choice of what runs the model, among the registered engines (``scoring.engines``).

``auto`` takes the first engine of ``ENGINES`` (LiteRT with XNNPACK) that can run the model here and
is meant for this cluster (LiteRT: not where the cluster schedules GPUs); else the next (TensorFlow),
with one line on stderr saying why: a setting only TensorFlow honours (``--precision`` other than
float32, ``--jit``, ``--overlap on``), no LiteRT interpreter installed, or a converter that cannot take
the model. A named engine where it cannot run is a UserError. A model kind only one engine takes
(``.tflite``: LiteRT) runs on it, or is refused by it (``Engine.only_engine``).

The chosen engine's payload (LiteRT: the converted flatbuffer, ``engines.litert_convert``) is shipped
instead of the model. A driver that finds the conversion (or is given a ``.tflite``) imports no
TensorFlow where ``ai_edge_litert`` is installed.
"""

from __future__ import annotations

from typing import Any

from image_transfer.errors import UserError
from image_transfer.scoring.engines import ENGINES, engine_class
from image_transfer.scoring.engines.base import say_once


def choose_engine(prepared: Any, requested: str, spark: Any = None) -> tuple[str, bytes | None, bool]:
    """(the chosen engine's name, what it ships instead of the model or None, whether that was made now).

    ``auto`` falls back along ``ENGINES`` with one line on stderr saying why; a named engine that
    cannot run the model raises UserError (before any Spark work).
    """
    takers = [engine for engine in ENGINES.values() if engine.takes(prepared.info.kind)]
    if len(takers) == 1:  # a model kind only one engine runs (.tflite: LiteRT)
        (only,) = takers
        only.only_engine(prepared, requested, spark)
        data, _ = only.payload(prepared)
        return only.name, data, False
    if requested != "auto":
        engine = engine_class(requested)
        reason, data, now = _attempt(engine, prepared)
        if reason is None:
            return engine.name, data, now
        raise UserError(f"--engine {requested} cannot run this model here: {reason}")
    reasons = []
    for engine in takers:
        if engine.refusal(prepared) is None and not engine.auto_here(spark):
            continue  # not meant for this cluster (LiteRT where it schedules GPUs): nothing to say
        reason, data, now = _attempt(engine, prepared)
        if reason is None:
            if reasons:  # once per model and reason (a stream scores many micro-batches)
                say_once(prepared.digest, f"image-transfer: engine auto runs {engine.title}: {reasons[0]}")
            return engine.name, data, now
        reasons.append(reason)
    raise UserError(f"no engine can run this model here: {'; '.join(reasons)}")


def _attempt(engine: Any, prepared: Any) -> tuple[str | None, bytes | None, bool]:
    """(why ``engine`` cannot run ``prepared`` here, its settings or making its payload, else None; the
    payload; whether it was made now)."""
    reason = engine.refusal(prepared)
    if reason is not None:
        return reason, None, False
    try:
        data, now = engine.payload(prepared)
    except UserError as exc:
        return str(exc), None, False
    return None, data, now
