"""Evaluate: score one split of a prepared dataset with the scoring machinery and report accuracy."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.scoring.options import ScoringOptions


@dataclass
class EvaluationResult:
    """Accuracy of a model on one split; ``to_dict`` is the metrics JSON."""

    model: str
    split: str
    rows: int
    rows_failed: int
    accuracy: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> rows, accuracy
    images_per_second: float = 0.0
    model_version: str = ""  # NAME/VERSION for a registered model, the file digest for a path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        return asdict(self)

    def describe(self) -> str:
        """Accuracy overall and per class."""
        lines = [
            f"{self.split}: accuracy {self.accuracy:.3f} on {self.rows - self.rows_failed} images "
            f"({self.rows_failed} failed to score) with {self.model} ({self.model_version})"
        ]
        lines += [f"  {k}: {v['accuracy']:.3f} of {int(v['rows'])}" for k, v in sorted(self.per_class.items())]
        return "\n".join(lines)


def evaluate(
    spark: Any,
    df: Any,
    *,
    model_path: str,
    split: str = "validation",
    metrics_path: str | None = None,
    options: ScoringOptions | None = None,
) -> EvaluationResult:
    """Classify the ``split`` rows of a prepared dataset and compare the predictions with ``label``.

    ``model_path`` is a model file or an MLflow URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``).
    ``options`` are the scoring options (batch size, limits, compute); the dataset's image column is
    ``content`` and its keys are ``path, label, label_index``, so those two options do not apply.
    """
    from pyspark.sql import functions as F

    from image_transfer.scoring.score import score_frame, scoring_run
    from image_transfer.training.prepare import usable

    rows = usable(df, split).select("path", "label", "label_index", "content")
    if rows.select().isEmpty():
        raise UserError(f"the dataset has no usable rows in the {split} split")
    options = options or ScoringOptions()
    for name in ("image_column", "key_columns"):
        if getattr(options, name) != getattr(ScoringOptions(), name):
            raise UserError(f"evaluate scores a prepared dataset: {name} ({ScoringOptions.flag(name)}) does not apply")
    keys = replace(options, key_columns=("path", "label", "label_index"))
    scored = score_frame(rows, model_path, mode="classify", top_k=1, layer=None, model_version=None, options=keys)
    run = scoring_run(scored)
    names = run.model.info.class_names
    if names is not None:
        unknown = {r["label"] for r in rows.select("label").distinct().collect()} - set(names)
        if unknown:
            raise UserError(f"the model does not know the classes {', '.join(sorted(unknown))} (it has {names})")
    # A model without class names predicts output indices: compare those with label_index.
    truth = F.col("label") if names is not None else F.col("label_index").cast("string")
    ok = F.col("error").isNull()
    started = time.perf_counter()
    with run, run.settings():  # one pass: per-class counts, hits and failures
        by_class = (
            scored.groupBy("label")
            .agg(
                F.count("*").alias("rows"),
                F.sum(ok.cast("int")).alias("ok"),
                F.sum((ok & (F.col("prediction") == truth)).cast("int")).alias("hits"),
            )
            .collect()
        )
    seconds = time.perf_counter() - started
    per_class = {
        r["label"]: {"rows": float(r["ok"]), "accuracy": (r["hits"] / r["ok"]) if r["ok"] else 0.0} for r in by_class
    }
    total = sum(r["rows"] for r in by_class)
    scored_ok = sum(r["ok"] for r in by_class)
    hits = sum(r["hits"] for r in by_class)
    result = EvaluationResult(
        model=model_path,
        split=split,
        rows=total,
        rows_failed=total - scored_ok,
        accuracy=hits / scored_ok if scored_ok else 0.0,
        per_class=per_class,
        images_per_second=round(total / seconds, 2) if seconds > 0 else 0.0,
        model_version=run.model_version,
    )
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
