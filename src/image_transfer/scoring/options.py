"""Scoring options (every scoring keyword, defined once), compute settings, the model checked on the driver."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from image_transfer.errors import UserError
from image_transfer.imaging.screen import ImageLimits, parse_size
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
ENGINES = ("auto", "tensorflow", "litert")  # auto and scoring.engines.ENGINES (a test keeps them equal); auto:
# LiteRT with XNNPACK on CPU workers, TensorFlow on GPU ones
OVERLAP_CHUNKS = 4  # an overlapped batch is decoded and run in this many chunks, decode i+1 beside model i


class ModelFailure(RuntimeError):
    """The model itself raised while scoring (not an undecodable image): the run fails with this reason."""


def byte_size(text: str) -> int:
    """argparse type: bytes, or a number with a unit (``24MiB``, ``24 MiB``, ``10MB``)."""
    import argparse

    try:
        return parse_size(text, binary=True)
    except UserError as exc:
        raise argparse.ArgumentTypeError(f"not a size in bytes (24MiB, 10MB, 25165824): {text!r}") from exc


def pixel_count(text: str) -> int:
    """argparse type: a count, or a number with a unit (``64M``, ``1.5G``)."""
    import argparse

    try:
        return parse_size(text, binary=False)
    except UserError as exc:
        raise argparse.ArgumentTypeError(f"not a count (64M, 64000000): {text!r}") from exc


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A scoring option: its default, and how the CLI spells it (``help``; argparse's ``type``, ``choices``...)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class ScoringOptions:
    """Every scoring option, defined once: the API's keywords and the CLI's flags (``--image-column`` ...).

    Built once, from keywords (``ScoringOptions.build``) or from parsed flags (``from_args``), and
    passed through every entry point: ``score_images``, ``featurize_images``, ``score_new_images``,
    ``featurize_new_images``, ``evaluate`` and the CLI's batch and incremental paths.
    """

    image_column: str = _opt("content", "binary column with encoded images")
    key_columns: tuple[str, ...] = _opt(
        ("path",), "column passed through to the output (repeatable)", flag="--key-column"
    )
    batch_size: int = _opt(64, "images per model call", type=int)
    max_image_bytes: int | None = _opt(
        None, "refuse larger encoded images: bytes, or with a unit (24MiB, 10MB) (default 24 MiB)", type=byte_size
    )
    max_pixels: int | None = _opt(
        None, "refuse images declaring more pixels (64M, 64000000) (default 64M)", type=pixel_count
    )
    broadcast_max_mb: float = _opt(
        256.0, "models up to this size are broadcast as bytes; larger ones load from the shared path", type=float
    )
    max_batch_mb: float | None = _opt(
        None, "encoded image bytes per Arrow batch (default 1536, under Arrow's 2 GB limit)", type=float
    )
    partitions: int | None = _opt(
        None, "score in at least this many tasks (default: the cluster's task slots)", type=int
    )
    max_failed_fraction: float = _opt(
        0.5, "fail the run (exit 3, output kept) when more than this share of rows fail", type=float
    )
    precision: str = _opt(
        "float32",
        "the model's compute precision (mixed: variables and outputs stay float32); for GPUs",
        choices=("float32", "float16", "bfloat16"),
    )
    jit: bool = _opt(False, "XLA-compile the model on a fixed batch shape (once per worker)", action="store_true")
    overlap: str = _opt(
        "auto",
        "decode the next chunk of a batch while the model runs the current one (auto: when a GPU is visible)",
        choices=OVERLAP,
    )
    engine: str = _opt(
        "auto",
        "what runs the model: litert (XNNPACK, CPU), tensorflow, or auto (litert without a GPU, else tensorflow)",
        choices=ENGINES,
    )
    litert_cache: str | None = _opt(
        None,
        "a shared folder for LiteRT conversions, so a cluster converts each model once (a Volume: "
        "/Volumes/<catalog>/<schema>/<volume>/litert-cache; trusted as the model's path) "
        "(default: $IMAGE_TRANSFER_LITERT_CACHE, else this machine's private folder)",
        metavar="DIR",
    )
    trust_model_code: bool = _opt(
        False,
        "load a model whose config names code outside Keras (custom layers): a model is code, trust it first",
        action="store_true",
    )

    def __post_init__(self) -> None:
        from image_transfer.devices import check_precision

        object.__setattr__(self, "key_columns", tuple(self.key_columns))
        for name, binary in (("max_image_bytes", True), ("max_pixels", False)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_size(value, binary=binary, option=name))
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        check_precision(self.precision)
        if self.overlap not in OVERLAP:
            raise UserError(f"overlap must be one of {', '.join(OVERLAP)}, not {self.overlap!r}")
        if self.engine not in ENGINES:
            raise UserError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.partitions is not None and self.partitions < 1:
            raise UserError(f"partitions must be at least 1, got {self.partitions}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise UserError(f"max_failed_fraction must be between 0 and 1, got {self.max_failed_fraction}")
        if self.broadcast_max_mb < 0:
            raise UserError(f"broadcast_max_mb must be at least 0, got {self.broadcast_max_mb}")
        if self.max_batch_mb is not None and self.max_batch_mb <= 0:
            raise UserError(f"max_batch_mb must be above 0, got {self.max_batch_mb}")
        if not self.key_columns:
            raise UserError("give at least one key column")
        self.limits  # noqa: B018 - checks the image limits
        if self.limits.max_bytes > self.max_batch_bytes:
            raise UserError(
                f"the image size limit ({self.limits.max_bytes} bytes) is over the bytes per batch "
                f"({self.max_batch_bytes}): one image would not fit in a batch"
            )
        clash = RESERVED & set(self.key_columns)
        if clash:
            raise UserError(f"key columns may not be named like output columns: {', '.join(sorted(clash))}")

    @classmethod
    def build(cls, options: ScoringOptions | None = None, **keywords: Any) -> ScoringOptions:
        """``options`` (or the defaults) with ``keywords`` replaced; a UserError names an unknown keyword."""
        unknown = sorted(set(keywords) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown scoring option {', '.join(unknown)} (options: {', '.join(cls.names())})")
        return replace(options, **keywords) if options is not None else cls(**keywords)

    @classmethod
    def merged(cls, options: ScoringOptions | None, values: Mapping[str, Any]) -> ScoringOptions:
        """``options`` (or the defaults) with the options in ``values`` that differ from their defaults.

        What the API's explicit keywords become: ``values`` is a call's keywords by name (other names are
        ignored), so a keyword left at its default keeps ``options``' value.
        """
        given = {f.name: values[f.name] for f in fields(cls) if f.name in values and values[f.name] != f.default}
        return cls.build(options, **given)

    @classmethod
    def names(cls) -> list[str]:
        """The option names (keywords), in order."""
        return [f.name for f in fields(cls)]

    @staticmethod
    def flag(name: str) -> str:
        """The CLI flag of an option (``--image-column``)."""
        spec = next(f for f in fields(ScoringOptions) if f.name == name)
        return spec.metadata.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: Any, only: tuple[str, ...] | None = None) -> None:
        """Add every option (or those named in ``only``) to an argparse parser as flags (help texts show the defaults).

        ``only=("trust_model_code",)`` gives a command that loads a user's model without scoring
        (``train``, ``inspect``) the same ``--trust-model-code`` flag as the scoring commands.
        """
        for spec in fields(cls):
            if only is not None and spec.name not in only:
                continue
            meta = dict(spec.metadata)
            help_text, flag = meta.pop("help"), meta.pop("flag", None) or "--" + spec.name.replace("_", "-")
            if spec.name == "key_columns":
                parser.add_argument(flag, action="append", dest=spec.name, help=f"{help_text} (default: path)")
                continue
            if meta.get("action") != "store_true" and spec.default is not None:
                help_text = f"{help_text} (default: {spec.default})"
            parser.add_argument(flag, dest=spec.name, default=None, help=help_text, **meta)

    @classmethod
    def from_args(cls, args: Any) -> ScoringOptions:
        """The options of parsed flags: those given, the rest at their defaults."""
        values = {n: getattr(args, n, None) for n in cls.names()}
        given = {n: v for n, v in values.items() if v is not None and v is not False}  # 0 is a value
        return cls.build(**given)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    @property
    def limits(self) -> ImageLimits:
        """The per-image limits (encoded size, declared pixels)."""
        return ImageLimits.of(max_bytes=self.max_image_bytes, max_pixels=self.max_pixels)

    @property
    def broadcast_max_bytes(self) -> int:
        """Models up to this many bytes are broadcast."""
        return int(self.broadcast_max_mb * 1024 * 1024)

    @property
    def max_batch_bytes(self) -> int:
        """Encoded bytes per Arrow batch at most."""
        return int(self.max_batch_mb * 1024 * 1024) if self.max_batch_mb is not None else ARROW_BATCH_BYTES

    def compute_summary(self) -> dict[str, Any]:
        """The compute settings a run summary records."""
        return {
            "batch_size": self.batch_size,
            "precision": self.precision,
            "jit": self.jit,
            "overlap": self.overlap,
            "engine": self.engine,
        }


@dataclass(frozen=True)
class Compute:
    """How a worker runs the model: precision, XLA on a fixed batch shape, decode/model overlap, engine."""

    precision: str = "float32"
    jit: bool = False
    overlap: str = "auto"
    batch_size: int = 0  # the fixed batch of the XLA path (0 without jit)
    engine: str = "tensorflow"  # what the driver chose: a name in scoring.engines.ENGINES (scoring/engine.py)
    litert_cache: str | None = field(default=None, compare=False)  # shared conversions (not what runs)

    @classmethod
    def of(cls, options: ScoringOptions) -> Compute:
        """The compute settings of scoring options."""
        jit_batch = options.batch_size if options.jit else 0
        return cls(options.precision, options.jit, options.overlap, jit_batch, litert_cache=options.litert_cache)


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
    trusted: bool = False  # the user trusts the model's code (``trust_model_code``): workers load it so too

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """What identifies the traced scoring function in a worker's cache (a new precision or engine: a new one)."""
        return (self.digest, self.mode, self.layer, self.width, self.info.preprocess, self.compute)


def with_compute(prepared: PreparedModel, options: ScoringOptions) -> PreparedModel:
    """``prepared`` with the options' compute settings; UserError when the model cannot run that way."""
    compute = Compute.of(options)
    kind = prepared.info.kind
    if compute.precision != "float32" and kind != "keras":
        what = "a .tflite model (it runs only on LiteRT)" if kind == "tflite" else "a SavedModel"
        raise UserError(f"precision {compute.precision} needs a Keras (.keras) model, not {what}")
    return replace(prepared, compute=compute)


def prepare_model(
    model_path: str,
    *,
    mode: str,
    top_k: int = 5,
    layer: str | None = None,
    version: str | None = None,
    trust: bool = False,
) -> PreparedModel:
    """Check the model on the driver (``inspect_model``); raises UserError before any Spark work is scheduled.

    ``classify`` needs a model whose outputs are class probabilities (a softmax or sigmoid at the end):
    a headless backbone is refused with a pointer to ``featurize``. Unless ``trust``
    (``trust_model_code``), a ``.keras`` config naming code outside Keras is refused unimported.
    """
    if mode not in OUTPUT_COLUMNS:
        raise ValueError(f"mode must be classify or embed, not {mode!r}")
    if mode == "classify" and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    info = inspect_model(model_path, layer=layer, embed=mode == "embed", classify=mode == "classify", trust=trust)
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
        trusted=trust,
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
