"""The MLflow pyfunc flavor of a trained model: our ``.keras`` file (with its class names) as an artifact.

``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"content": [jpeg_bytes, ...]}))`` returns
``prediction, probability, error`` per image, decoded and resized exactly as ``score_images`` does
(the same traced scoring function, and the same engine choice: ``ImageClassifier(engine=...)`` or
``params={"engine": ...}``, auto by default). The package's source is logged with the model
(``code_paths``): loading needs only its pip requirements, not image-transfer installed. ``score`` and
``evaluate`` do not use the pyfunc, they download the ``.keras`` artifact and ship it as usual.
Imported only where MLflow is installed.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Top-1 class of encoded images (column ``content``, or the first column) with the ``.keras`` model."""

    def load_context(self, context: Any) -> None:
        """Find the ``.keras`` file; it is loaded and traced on the first ``predict`` (MLflow 3 calls this on save)."""
        from image_transfer.models.uris import KERAS_ARTIFACT, find_model_file

        self._path = find_model_file(context.artifacts[KERAS_ARTIFACT])
        self._scorer = None

    def __init__(self, engine: str = "auto") -> None:
        """``engine``: what runs the model, as ``--engine`` (auto: LiteRT with XNNPACK without a GPU)."""
        self.engine = engine

    def _load(self, engine: str | None = None) -> Any:
        import os
        from dataclasses import replace

        from image_transfer import devices
        from image_transfer.scoring.engine import choose_engine
        from image_transfer.scoring.engines import engine_class
        from image_transfer.scoring.options import ScoringOptions, prepare_model, with_compute

        wanted = engine or getattr(self, "engine", "auto")
        if getattr(self, "_scorer", None) is None or getattr(self, "_engine", None) != wanted:
            options = ScoringOptions(engine=wanted)  # checks the name
            prepared = with_compute(prepare_model(self._path, mode="classify", top_k=1), options)
            requested = "tensorflow" if wanted == "auto" and devices.visible_gpus() > 0 else wanted
            chosen, payload, _ = choose_engine(prepared, requested)
            self._prepared = replace(prepared, compute=replace(prepared.compute, engine=chosen))
            self._scorer = engine_class(chosen).load(self._prepared, payload, os.cpu_count() or 1)
            self._engine = wanted
        return self._scorer

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow reads these hints
        """``prediction, probability, error`` for each row of ``model_input``."""
        import numpy as np
        import pandas as pd

        from image_transfer.imaging.screen import ImageLimits, screen_batch

        if not hasattr(self, "_path"):
            self.load_context(context)
        scorer = self._load((params or {}).get("engine"))  # params={"engine": "tensorflow"} picks one
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"content": list(model_input)})
        column = frame["content"] if "content" in frame.columns else frame.iloc[:, 0]
        values = [bytes(v) if isinstance(v, (bytearray, memoryview)) else v for v in column]
        n = len(values)
        screened = screen_batch(values, ImageLimits.default())
        errors = list(screened.errors)
        outputs, graph_errors = scorer.score(screened.payloads, screened.orientations)
        for j, message in graph_errors.items():
            errors[screened.kept[j]] = message
        ok = [row for j, row in enumerate(screened.kept) if j not in graph_errors]
        prediction = np.full(n, None, dtype=object)
        probability = np.full(n, np.nan, np.float64)
        if ok:
            info = self._prepared.info
            prediction[ok] = [info.label(int(i)) for i in outputs["indices"][:, 0]]
            probability[ok] = outputs["probabilities"][:, 0]
        return pd.DataFrame({"prediction": prediction, "probability": probability, "error": errors})
