"""Evaluate: score one split of a prepared dataset with the scoring machinery and report accuracy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        return asdict(self)

    def describe(self) -> str:
        """Accuracy overall and per class."""
        lines = [
            f"{self.split}: accuracy {self.accuracy:.3f} on {self.rows - self.rows_failed} images "
            f"({self.rows_failed} failed to score) with {self.model}"
        ]
        lines += [f"  {k}: {v['accuracy']:.3f} of {int(v['rows'])}" for k, v in sorted(self.per_class.items())]
        return "\n".join(lines)


def evaluate(
    spark: Any,
    df: Any,
    *,
    model_path: str,
    split: str = "validation",
    batch_size: int = 64,
    metrics_path: str | None = None,
) -> EvaluationResult:
    """Classify the ``split`` rows of a prepared dataset and compare the predictions with ``label``."""
    from pyspark.sql import functions as F

    from image_transfer import score
    from image_transfer.prepare import usable
    from image_transfer.score import ScoringRequest

    rows = usable(df, split).select("path", "label", "label_index", "content")
    if rows.isEmpty():
        raise UserError(f"the dataset has no usable rows in the {split} split")
    request = ScoringRequest(model_path=model_path, key_columns=("path", "label", "label_index"), batch_size=batch_size)
    prepared = score.prepare_model(request, mode="classify", top_k=1)
    names = prepared.info.class_names
    if names is not None:
        unknown = {r["label"] for r in rows.select("label").distinct().collect()} - set(names)
        if unknown:
            raise UserError(f"the model does not know the classes {', '.join(sorted(unknown))} (it has {names})")

    held: list[Any] = []

    def keep(scored: Any) -> Any:  # nothing to write: hold the predictions in memory for the counts
        held.append(scored.persist())
        held[0].count()
        return held[0]

    try:
        run = score.run(spark, rows, request, prepared, writer=keep)
        predictions = held[0]
        ok = predictions.where(F.col("error").isNull())
        # A model without class names predicts output indices: compare those with label_index.
        truth = F.col("label") if names is not None else F.col("label_index").cast("string")
        hit = (F.col("prediction") == truth).cast("double")
        per_class = {
            r["label"]: {"rows": float(r["rows"]), "accuracy": float(r["accuracy"])}
            for r in ok.groupBy("label").agg(F.count("*").alias("rows"), F.avg(hit).alias("accuracy")).collect()
        }
        overall = ok.agg(F.avg(hit).alias("a")).first()["a"]
    finally:
        for h in held:
            h.unpersist()
    result = EvaluationResult(
        model=model_path,
        split=split,
        rows=run.rows_out,
        rows_failed=run.rows_failed,
        accuracy=float(overall or 0.0),
        per_class=per_class,
        images_per_second=round(run.images_per_second, 2),
    )
    if metrics_path:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
