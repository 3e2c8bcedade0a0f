"""image-transfer: transfer learning and batch image scoring on Spark.

>>> from image_transfer import read_images, score_images, write_scored
>>> scored = score_images(read_images(spark, "/Volumes/main/ml/images"), "/Volumes/main/ml/models/m.keras")
>>> write_scored(scored, "/Volumes/main/ml/scores")

The package re-exports the public API (``image_transfer.api``) only.
"""

from __future__ import annotations

# The version is importable without pyspark or TensorFlow: the imports come after it.
from image_transfer.api import *  # noqa: E402, F403
from image_transfer.api import __all__ as _api
from image_transfer.version import __version__

__all__ = ["__version__", *_api]
