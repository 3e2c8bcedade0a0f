"""What training reports: the metrics JSON, a PNG of the training curves beside it, the MLflow run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_transfer.training.config import TrainResult


def write_metrics(result: TrainResult, path: Path) -> None:
    """The metrics JSON at ``path`` and the training curves as a PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = path.with_suffix(".png")
    plot_training_curves(result.epochs, plot)
    result.metrics_path, result.plot_path = str(path), str(plot)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def plot_training_curves(epochs: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, with the fine-tuning start marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            ax.plot(x, [e.get(metric) for e in epochs], marker="o", label=f"train {metric}")
            if any(f"val_{metric}" in e for e in epochs):
                ax.plot(x, [e.get(f"val_{metric}") for e in epochs], marker="o", label=f"validation {metric}")
            tuned = [e["epoch"] for e in epochs if e["phase"] == "fine_tune"]
            if tuned:
                ax.axvline(tuned[0] - 0.5, color="grey", linestyle="--", label="fine-tuning")
            ax.set_xlabel("epoch")
            ax.set_title(metric)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def mlflow_enabled() -> bool:
    """MLflow is importable and a tracking server is configured (always the case on Databricks)."""
    from image_transfer.models.uris import tracking_configured

    return tracking_configured()


def log_to_mlflow(result: TrainResult, *, register_as: str | None = None) -> str | None:
    """Log the run to MLflow (see ``registry.log_training``) and register the model; returns the run id."""
    from image_transfer.lifecycle.tracking import log_training

    run_id, version = log_training(result, register_as=register_as)
    result.mlflow_run_id, result.registered_version = run_id, version
    return run_id


def publish(result: TrainResult, metrics_path: str | None, *, register_as: str | None = None) -> None:
    """The metrics JSON (at ``metrics_path``, default beside the model) and its curves, then the MLflow run;
    the JSON is written again to name the registered version."""
    metrics = Path(metrics_path) if metrics_path else Path(result.model_path).with_suffix(".metrics.json")
    write_metrics(result, metrics)
    log_to_mlflow(result, register_as=register_as)
    if result.registered_version:  # the metrics JSON names the version too
        metrics.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
