"""image-transfer: transfer learning and batch image scoring on Spark.

>>> from image_transfer import read_images, score_images
>>> scored = score_images(read_images(spark, "/Volumes/main/ml/images"), "/Volumes/main/ml/models/m.keras")
"""

from __future__ import annotations

__version__ = "0.2.0"

# The version is importable without pyspark or TensorFlow: the imports come after it.
from image_transfer.api import featurize_images, read_images, score_images, scoring_run  # noqa: E402
from image_transfer.errors import RunFailed, TooManyFailures, UserError  # noqa: E402
from image_transfer.scoring.incremental import IncrementalResult, featurize_new_images, score_new_images  # noqa: E402

__all__ = [
    "IncrementalResult",
    "RunFailed",
    "TooManyFailures",
    "UserError",
    "__version__",
    "featurize_images",
    "featurize_new_images",
    "read_images",
    "score_images",
    "score_new_images",
    "scoring_run",
]
