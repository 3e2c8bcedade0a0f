"""The interface every engine implements: one small object per worker process and model.

Driver side (class methods, no model loaded): whether the engine takes a model kind, why it cannot run
a model here, what it ships instead of the model. Worker side: ``load`` once per process and model
(from the shipped payload, else the model's path), ``warm_up``, ``run`` decoded images, ``score`` an
encoded batch (decode, run, per-row decode errors), ``describe`` what the worker reports.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from image_transfer.errors import UserError, first_line
from image_transfer.imaging.screen import convert
from image_transfer.scoring.options import MODEL_ERROR, ModelFailure, PreparedModel

Outputs = dict[str, np.ndarray]  # classify: ``probabilities`` and ``indices`` (top-k); embed: ``embedding``


class Engine(ABC):
    """What runs a model: a per-worker model lifecycle, in the spirit of Ray Data's ``map_batches``
    classes and Daft's ``@daft.cls``.

    A subclass sets ``name`` (``--engine`` and ``Compute.engine``), ``label`` (the workers' ``engine``
    statistic), ``title`` (how a line on stderr names it) and implements ``load`` and ``run``; it is
    registered in ``scoring.engines.ENGINES``.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    title: ClassVar[str]

    # ---- the driver side: the choice (``scoring.engine.choose_engine``) ---------------------------------

    @classmethod
    def takes(cls, kind: str) -> bool:
        """Whether this engine runs models of this kind (``keras``, ``savedmodel``, ``tflite``)."""
        return True

    @classmethod
    def refusal(cls, prepared: PreparedModel) -> str | None:
        """Why this engine cannot run ``prepared`` with its compute settings here, or None."""
        return None

    @classmethod
    def auto_here(cls, spark: Any) -> bool:
        """Whether ``--engine auto`` picks this engine on ``spark``'s cluster when it can run the model
        (False: the next registered one is picked, with nothing said)."""
        return True

    @classmethod
    def payload(cls, prepared: PreparedModel) -> tuple[bytes | None, bool]:
        """(what ships to the workers instead of the model, None for the model itself; whether it was made
        now). A UserError is a reason this engine cannot run the model."""
        return None, False

    @classmethod
    def only_engine(cls, prepared: PreparedModel, requested: str, spark: Any) -> None:
        """Called when this is the one engine that takes the model's kind: UserError where ``requested``
        (an engine name or ``auto``) or the compute settings cannot be honoured."""
        if requested not in ("auto", cls.name):
            raise UserError(f"{prepared.info.path} runs only on --engine {cls.name}, not on --engine {requested}")

    # ---- the worker side ------------------------------------------------------------------------------

    @classmethod
    def prepare_process(cls, cores: int) -> None:
        """Ready this Python worker process for the engine (threads, devices); runs before each load, after
        the process is pinned to its task's GPU, so what is done already stays as it is."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, prepared: PreparedModel, shipped: bytes | None, cores: int) -> Engine:
        """The engine with the model loaded, once per worker process and model: from ``shipped`` (what
        ``payload`` gave, or the packed model when it gave None), else (None) from ``prepared.info.path``.
        ``cores``: the task's CPU cores."""

    def warm_up(self) -> None:
        """Trace or compile ahead of the first batch, where the engine does (the worker calls it once
        after ``load``); TensorFlow and LiteRT trace on their first batch instead."""
        return None

    @abstractmethod
    def run(self, images: np.ndarray) -> Outputs:
        """The outputs of a batch of decoded, preprocessed float images (``[n, height, width, 3]``)."""

    def describe(self) -> dict[str, Any]:
        """The facts the worker reports about this engine (``scoring.stats.FACTS``)."""
        return {"engine": self.label, "interpreter": None}

    # ---- an encoded batch: decode, run, and the images that do not decode -----------------------------

    decode_failures: tuple[type[BaseException], ...] = (ValueError,)  # what ``decode`` raises for bad bytes

    def decode(self, payloads: list[bytes], orientations: list[int]) -> np.ndarray:
        """Screened encoded images (upright after ``orientations``) as the model's preprocessed input."""
        raise NotImplementedError(f"the {self.name} engine decodes no images")

    def check_decode(self, payloads: list[bytes], orientations: list[int]) -> None:
        """Raise one of ``decode_failures`` when an image of the batch does not decode."""
        self.decode(payloads, orientations)

    def infer(self, payloads: list[bytes], orientations: list[int]) -> Outputs:
        """The outputs of an encoded batch (one of ``decode_failures`` when an image does not decode)."""
        return self.run(self.decode(payloads, orientations))

    def score(self, payloads: list[bytes], orientations: list[int]) -> tuple[Outputs, dict[int, str]]:
        """Outputs for the payloads that decode (in order) and, by payload position, decode errors.

        A failing batch is bisected with ``check_decode`` to find the images that do not decode; those
        Pillow decodes are converted (``convert``) and scored, the others are per-row errors. An error
        the model raises on decodable images is a ``ModelFailure`` (not a per-row one).
        """
        if not payloads:
            return {}, {}
        try:
            outputs = self.infer(payloads, orientations)
        except self.decode_failures as exc:
            first = exc
        else:
            return outputs, {}
        errors: dict[int, str] = {}
        self._bisect(payloads, orientations, 0, len(payloads), errors)
        if not errors:
            raise ModelFailure(f"{MODEL_ERROR}: {first_line(first)}") from first
        payloads, orientations = list(payloads), list(orientations)
        for j in sorted(errors):  # what the decoder refuses and Pillow decodes (a bad PNG checksum): converted
            converted, _ = convert(payloads[j], orientations[j])
            if converted is not None:
                payloads[j], orientations[j] = converted, 1
                del errors[j]
        good = [i for i in range(len(payloads)) if i not in errors]
        if not good:
            return {}, errors
        try:
            return self.infer([payloads[i] for i in good], [orientations[i] for i in good]), errors
        except self.decode_failures as exc:
            raise ModelFailure(f"{MODEL_ERROR}: {first_line(exc)}") from exc

    def _bisect(self, payloads: list[bytes], orientations: list[int], lo: int, hi: int, errors: dict[int, str]) -> None:
        try:
            self.check_decode(payloads[lo:hi], orientations[lo:hi])
            return
        except self.decode_failures as exc:
            if hi - lo == 1:
                errors[lo] = f"could not decode image: {first_line(exc)[:200]}"
                return
        mid = (lo + hi) // 2
        self._bisect(payloads, orientations, lo, mid, errors)
        self._bisect(payloads, orientations, mid, hi, errors)


def head(outputs: np.ndarray, mode: str, k: int) -> Outputs:
    """An engine's raw model outputs (``[n, width]``) as the worker's: the embedding, or the top ``k``
    (ties: the lower index, as ``tf.math.top_k``)."""
    outputs = np.asarray(outputs, np.float32)
    if mode == "embed":
        return {"embedding": outputs.reshape(len(outputs), -1)}
    indices = np.argsort(-outputs, axis=1, kind="stable")[:, :k].astype(np.int32)
    return {"probabilities": np.take_along_axis(outputs, indices, axis=1), "indices": indices}


_SAID: set[tuple[str, str]] = set()  # (model digest, line) already printed


def say_once(digest: str, line: str) -> None:
    """Print ``line`` on stderr once per model and line (a stream scores many micro-batches)."""
    if (digest, line) not in _SAID:
        _SAID.add((digest, line))
        print(line, file=sys.stderr)


def cluster_gpus(spark: Any) -> bool:
    """Whether the session's executors (or tasks) are given GPUs (Spark's resource settings)."""
    for name in ("spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount"):
        try:
            value = spark.conf.get(name, None) if spark is not None else None
        except Exception:  # noqa: BLE001 - a conf the session does not expose
            value = None
        try:
            if value is not None and float(value) > 0:
                return True
        except ValueError:
            continue
    return False
