"""The public API: thin, typed, keyword-only functions over the layers below, one for every step.

Reading (``read_images``, ``read_input``); scoring and featurizing (``score_images``, ``featurize_images``,
``scoring_run``); writing a scored output with the job guarantees (``write_scored``; any DataFrame:
``write_output``); the incremental runs (``score_new_images``, ``featurize_new_images``); training:
``prepare_dataset``, ``train_model``, ``evaluate_model``, ``promote_model`` (and ``dataset_rows``). The
CLI, the jobs, the demo and the notebook run every step through these.

May import: ``errors``, ``runtime``, ``storage``, ``imaging``, ``models``, ``devices``, ``scoring``,
``lifecycle``, ``training``.
"""

from __future__ import annotations

from image_transfer.api.incremental import IncrementalResult, featurize_new_images, score_new_images
from image_transfer.api.reading import read_images, read_input
from image_transfer.api.scoring import featurize_images, score_images, scoring_run
from image_transfer.api.training import (
    EvaluationResult,
    PrepareResult,
    Promotion,
    PromotionRefused,
    TrainConfig,
    TrainResult,
    dataset_rows,
    evaluate_model,
    prepare_dataset,
    promote_model,
    train_model,
)
from image_transfer.api.writing import RunSummary, write_output, write_scored
from image_transfer.errors import RunFailed, TooManyFailures, UserError
from image_transfer.scoring.options import ScoringOptions

__all__ = [
    "EvaluationResult",
    "IncrementalResult",
    "PrepareResult",
    "Promotion",
    "PromotionRefused",
    "TrainConfig",
    "TrainResult",
    "dataset_rows",
    "evaluate_model",
    "prepare_dataset",
    "promote_model",
    "train_model",
    "write_output",
    "RunFailed",
    "RunSummary",
    "ScoringOptions",
    "TooManyFailures",
    "UserError",
    "featurize_images",
    "featurize_new_images",
    "read_images",
    "read_input",
    "score_images",
    "score_new_images",
    "scoring_run",
    "write_scored",
]
