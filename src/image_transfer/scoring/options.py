"""Scoring options (every scoring keyword, defined once), compute settings, the model checked on the driver."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from image_transfer.errors import UserError
from image_transfer.imaging.screen import ImageLimits
from image_transfer.models.artifact import ModelInfo, content_digest
from image_transfer.models.inspection import inspect_model

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
ARROW_BYTES_CONF = "spark.sql.execution.arrow.maxBytesPerBatch"  # Spark >= 4.0
ARROW_BATCH_BYTES = 1536 * 1024 * 1024  # encoded bytes per Arrow batch: under Arrow's 2 GB binary limit
CLOSURE_MAX_BYTES = 64 * 1024 * 1024  # Spark Connect: models up to this size travel in the UDF itself
OUTPUT_COLUMNS = {"classify": ("prediction", "probability", "top_k"), "embed": ("embedding",)}
RESERVED = {"prediction", "probability", "top_k", "error", "embedding", "model_version"}
MODEL_ERROR = "image-transfer: the model failed"
OVERLAP = ("auto", "on", "off")
OVERLAP_CHUNKS = 4  # an overlapped batch is decoded and run in this many chunks, decode i+1 beside model i


class ModelFailure(RuntimeError):
    """The model itself raised while scoring (not an undecodable image): the run fails with this reason."""


@dataclass(frozen=True)
class ScoringOptions:
    """How to score: input columns, batching, limits and shipping (the API's keyword options)."""

    image_column: str = "content"
    key_columns: tuple[str, ...] = ("path",)
    batch_size: int = 64
    limits: ImageLimits = field(default_factory=ImageLimits.default)
    broadcast_max_bytes: int = 256 * 1024 * 1024
    max_batch_bytes: int = ARROW_BATCH_BYTES
    partitions: int | None = None
    precision: str = "float32"  # the model's compute: float32, float16 or bfloat16 (outputs stay float32)
    jit: bool = False  # XLA-compile the model on a fixed batch shape (once per worker)
    overlap: str = "auto"  # decode the next chunk while the model runs: on, off, auto (when a GPU is visible)

    def __post_init__(self) -> None:
        from image_transfer.scoring.gpu import check_precision

        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        check_precision(self.precision)
        if self.overlap not in OVERLAP:
            raise UserError(f"overlap must be one of {', '.join(OVERLAP)}, not {self.overlap!r}")
        if self.partitions is not None and self.partitions < 1:
            raise UserError(f"partitions must be at least 1, got {self.partitions}")
        if self.limits.max_bytes > self.max_batch_bytes:
            raise UserError(
                f"the image size limit ({self.limits.max_bytes} bytes) is over the bytes per batch "
                f"({self.max_batch_bytes}): one image would not fit in a batch"
            )
        clash = RESERVED & set(self.key_columns)
        if clash:
            raise UserError(f"key columns may not be named like output columns: {', '.join(sorted(clash))}")


@dataclass(frozen=True)
class Compute:
    """How a worker runs the model: precision, XLA on a fixed batch shape, decode/model overlap."""

    precision: str = "float32"
    jit: bool = False
    overlap: str = "auto"
    batch_size: int = 0  # the fixed batch of the XLA path (0 without jit)

    @classmethod
    def of(cls, options: ScoringOptions) -> Compute:
        """The compute settings of scoring options."""
        return cls(options.precision, options.jit, options.overlap, options.batch_size if options.jit else 0)


@dataclass(frozen=True)
class PreparedModel:
    """A model checked on the driver, with the scoring mode: ``classify`` (top-k) or ``embed``."""

    info: ModelInfo
    mode: str
    digest: str
    top_k: int = 5
    layer: str | None = None
    width: int = 0  # classify: k actually reported; embed: embedding size
    version: str = ""  # what output rows carry as ``model_version``
    compute: Compute = field(default_factory=Compute)

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """What identifies the traced scoring function in a worker's cache (a new precision: a new one)."""
        return (self.digest, self.mode, self.layer, self.width, self.info.preprocess, self.compute)


def with_compute(prepared: PreparedModel, options: ScoringOptions) -> PreparedModel:
    """``prepared`` with the options' compute settings; UserError when the model cannot run that way."""
    compute = Compute.of(options)
    if compute.precision != "float32" and prepared.info.kind != "keras":
        raise UserError(f"precision {compute.precision} needs a Keras (.keras) model, not a SavedModel")
    return replace(prepared, compute=compute)


def prepare_model(
    model_path: str,
    *,
    mode: str,
    top_k: int = 5,
    layer: str | None = None,
    version: str | None = None,
) -> PreparedModel:
    """Check the model on the driver (``inspect_model``); raises UserError before any Spark work is scheduled."""
    if mode not in OUTPUT_COLUMNS:
        raise ValueError(f"mode must be classify or embed, not {mode!r}")
    if mode == "classify" and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    info = inspect_model(model_path, layer=layer, embed=mode == "embed")
    width = min(top_k, info.output_width) if mode == "classify" else info.output_width
    digest = content_digest(info.path)
    return PreparedModel(
        info=info,
        mode=mode,
        digest=digest,
        top_k=top_k,
        layer=layer,
        width=width,
        version=version or f"sha256:{digest[:12]}",
    )


def validate_columns(df: Any, options: ScoringOptions) -> None:
    """Check the image and key columns exist with the right types (from the schema: no Spark job)."""
    from pyspark.sql.types import BinaryType

    fields = {f.name: f.dataType for f in df.schema.fields}
    if options.image_column not in fields:
        raise UserError(
            f"no image column {options.image_column!r} in the input (columns: {', '.join(fields) or 'none'})"
        )
    if not isinstance(fields[options.image_column], BinaryType):
        raise UserError(
            f"image column {options.image_column!r} must be binary (encoded image bytes), "
            f"not {fields[options.image_column].simpleString()}"
        )
    missing = [k for k in options.key_columns if k not in fields]
    if missing:
        raise UserError(f"no key column {', '.join(missing)} in the input (columns: {', '.join(fields)})")
