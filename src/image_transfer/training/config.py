"""Training's configuration and result: ``TrainConfig`` (what decides how a model is trained, recorded in
the metrics and MLflow params), the ``keras.applications`` backbones by name, and ``TrainResult``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from image_transfer.errors import UserError
from image_transfer.storage.fs import local_absolute

DEFAULT_IMAGE_SIZE = 224
HEAD_INPUTS = ("features", "images")


@dataclass(frozen=True)
class Backbone:
    """How to build one ``keras.applications`` backbone and the preprocessing its weights expect."""

    constructor: str  # attribute of keras.applications
    preprocess: str  # "scale_-1_1", "caffe" or "none" (built into the network)
    min_size: int = 32


BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", "scale_-1_1"),
    "resnet50": Backbone("ResNet50", "caffe"),
    "efficientnet_b0": Backbone("EfficientNetB0", "none"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a model is trained (recorded in the metrics and MLflow params)."""

    backbone: str = "mobilenet_v2"  # a name in BACKBONES, or a .keras file
    weights: str = "imagenet"  # imagenet | none | a weights file (keras.applications backbones)
    epochs: int = 5
    fine_tune_layers: int = 0
    fine_tune_epochs: int | None = None  # default: ``epochs``
    batch_size: int = 32
    image_size: int | None = None  # default: 224, or a backbone file's input size
    learning_rate: float = 1e-3
    dropout: float = 0.2
    patience: int = 3
    augment: bool = True
    seed: int = 0
    data_path: str = "auto"
    cache_dir: str | None = None
    checkpoint_dir: str | None = None  # default: a temp dir, deleted at the end
    mixed_precision: bool = False  # mixed_float16 on GPUs (ignored without one)
    head_input: str = "features"  # features: the frozen phase trains on embeddings computed once; images
    workers: int = 1  # > 1: the image phases as a barrier stage of MultiWorkerMirroredStrategy workers
    trust_model_code: bool = False  # a backbone file may name code outside Keras (custom layers)
    litert_cache: str | None = None  # features: the shared LiteRT conversion cache (ScoringOptions.litert_cache)

    def __post_init__(self) -> None:
        if self.head_input not in HEAD_INPUTS:
            raise UserError(f"head-input must be one of {', '.join(HEAD_INPUTS)}, not {self.head_input!r}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.fine_tune_layers < 0:
            raise UserError(f"fine-tune-layers must be >= 0, got {self.fine_tune_layers}")
        if self.image_size is not None and self.image_size < 32:
            raise UserError(f"image-size must be at least 32, got {self.image_size}")
        if self.backbone not in BACKBONES and not self.backbone.endswith(".keras"):
            raise UserError(f"unknown backbone {self.backbone!r}: one of {', '.join(BACKBONES)}, or a .keras file")


FROM_BACKBONE_FILE = "from the backbone file"


def weights_used(config: TrainConfig) -> str:
    """The weights training starts from, as recorded: a file backbone's own unless a weights file is given."""
    if config.backbone.endswith(".keras") and config.weights in ("imagenet", "none"):
        return FROM_BACKBONE_FILE
    return config.weights


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with its local relative paths (a backbone or weights file, the cache and checkpoint dirs)
    made absolute: barrier workers and executors run in other directories. URIs stay as they are."""
    changes: dict[str, Any] = {}
    if config.backbone.endswith(".keras"):
        changes["backbone"] = local_absolute(config.backbone)
    if config.weights not in ("imagenet", "none"):
        changes["weights"] = local_absolute(config.weights)
    for name in ("cache_dir", "checkpoint_dir"):
        if getattr(config, name):
            changes[name] = local_absolute(getattr(config, name))
    return replace(config, **changes)


@dataclass
class TrainResult:
    """What ``train`` produced; ``to_dict`` is the metrics JSON."""

    model_path: str
    class_names: list[str]
    image_size: int
    data_path: str
    train_rows: int
    validation_rows: int
    epochs: list[dict[str, Any]]
    final_validation_accuracy: float | None
    images_per_second: float
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    metrics_path: str | None = None
    plot_path: str | None = None
    mlflow_run_id: str | None = None
    registered_version: str | None = None  # NAME/VERSION when registered

    @property
    def model_uri(self) -> str:
        """What ``score`` and ``evaluate`` take: ``models:/NAME/VERSION`` when registered, else the file."""
        return f"models:/{self.registered_version}" if self.registered_version else self.model_path

    replicas: int = 1  # devices the model trained on (MirroredStrategy: GPUs; across workers: all of them)
    workers: int = 1  # training processes (nodes) of the image phases
    worker_steps: list[int] | None = None  # with workers > 1: each worker's training steps
    global_batch_size: int = 0  # batch_size x replicas
    precision: str = "float32"  # the Keras policy training ran under
    head_input: str = "images"  # what the frozen phase trained on
    features: dict[str, Any] | None = None  # with head_input features: rows embedded, failed, seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        return asdict(self)

    def describe(self) -> str:
        """A short human summary."""
        acc = self.final_validation_accuracy
        return (
            f"trained on {self.train_rows} images ({len(self.class_names)} classes) via {self.data_path}, "
            f"{len(self.epochs)} epochs in {self.seconds:.1f}s ({self.images_per_second:.1f} images/s); "
            f"validation accuracy {'n/a' if acc is None else f'{acc:.3f}'} on {self.validation_rows} images\n"
            f"model: {self.model_path}"
            + (f"\nmetrics: {self.metrics_path}" if self.metrics_path else "")
            + (f"\ncurves: {self.plot_path}" if self.plot_path else "")
            + (f"\nMLflow run: {self.mlflow_run_id}" if self.mlflow_run_id else "")
            + (f"\nregistered: {self.model_uri}" if self.registered_version else "")
        )
