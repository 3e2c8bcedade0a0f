"""Training's model: a backbone (``keras.applications`` by name, or a Keras file) and its preprocessing, a new
softmax head over it, the top layers unfrozen for fine-tuning, and the optimizer each phase compiles with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError
from image_transfer.training.config import BACKBONES, DEFAULT_IMAGE_SIZE, TrainConfig


def _preprocess_layers(kind: str) -> list[Any]:
    """Keras layers for a preprocessing, so it lives (serialisably, without Lambda) inside the model."""
    import numpy as np
    from keras import layers

    if kind == "none":
        return []
    if kind == "scale_-1_1":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    if kind == "caffe":  # RGB -> BGR and ImageNet means off: a fixed 1x1 linear map on the channels
        swap = np.eye(3, dtype="float32")[::-1]
        mean = np.array([103.939, 116.779, 123.68], "float32")
        dense = layers.Dense(3, trainable=False, name="preprocess")
        dense.build((None, 3))
        dense.set_weights([swap, -mean])
        return [dense]
    raise ValueError(kind)


def build_backbone(
    name: str, *, weights: str, image_size: int | None, trust: bool = False
) -> tuple[Any, list[Any], int]:
    """(backbone, preprocessing layers, input size); a file backbone keeps its own preprocessing.

    A backbone file naming code outside Keras is refused unless ``trust`` (``--trust-model-code``).
    """
    if name in BACKBONES:
        return _application_backbone(name, weights=weights, image_size=image_size)
    return _file_backbone(name, weights=weights, image_size=image_size, trust=trust)


def _application_backbone(name: str, *, weights: str, image_size: int | None) -> tuple[Any, list[Any], int]:
    """A ``keras.applications`` backbone by name, with the preprocessing its weights expect."""
    import keras

    spec = BACKBONES[name]
    size = image_size or DEFAULT_IMAGE_SIZE
    if weights == "none":
        w: str | None = None
    elif weights == "imagenet":
        w = "imagenet"
    else:
        if not Path(weights).is_file():
            raise UserError(f"weights file not found: {weights}")
        w = weights
    try:
        net = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=w, input_shape=(size, size, 3), pooling="avg"
        )
    except ValueError as exc:
        raise UserError(f"cannot build {name} with weights {weights}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a failed imagenet download surfaces as many types
        if w == "imagenet":
            raise UserError(
                f"cannot load the ImageNet weights for {name} ({type(exc).__name__}: {exc}); they are "
                "downloaded on first use: without internet, pass --weights PATH or --weights none"
            ) from exc
        raise
    return net, _preprocess_layers(spec.preprocess), size


def _file_backbone(name: str, *, weights: str, image_size: int | None, trust: bool) -> tuple[Any, list[Any], int]:
    """A Keras file: a feature extractor, or a classifier cut before its last layer."""
    import keras

    from image_transfer.models.artifact import read_metadata
    from image_transfer.models.load import embedding_model, load_keras

    net = load_keras(name, trust=trust)
    if read_metadata(name).get("class_names"):
        net = embedding_model(net, None)
    if weights not in ("imagenet", "none"):
        net.load_weights(weights)
    shape = tuple(net.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise UserError(f"backbone {name} must take square RGB images [None, n, n, 3], takes {shape}")
    if image_size is not None and image_size != shape[1]:
        raise UserError(f"backbone {name} takes {shape[1]}x{shape[2]} images; --image-size {image_size} differs")
    if len(net.outputs[0].shape) == 4:
        net = keras.Model(net.inputs, keras.layers.GlobalAveragePooling2D()(net.outputs[0]))
    if len(net.outputs[0].shape) != 2:
        raise UserError(f"backbone {name} must output features [None, d], outputs {tuple(net.outputs[0].shape)}")
    return net, [], int(shape[1])


def head_dropout(rate: float) -> Any:
    """The head's Dropout layer (``head_dropout``).

    Under ``MultiWorkerMirroredStrategy`` make it outside the strategy's scope and pass it to
    ``build_classifier``: its random-seed variable is then the worker's own, not mirrored (Keras < 3.5 makes
    it uint32, which the strategy cannot broadcast, and each worker may draw its own dropout masks).
    """
    import keras

    return keras.layers.Dropout(rate, name="head_dropout")


def build_classifier(
    backbone: Any,
    preprocess: Sequence[Any],
    *,
    classes: int,
    size: int,
    dropout: float,
    dropout_layer: Any = None,
) -> Any:
    """Frozen ``backbone`` under a new softmax head: float RGB 0..255 [None, size, size, 3] -> [None, classes].

    ``dropout_layer`` (``head_dropout(dropout)``, made elsewhere) replaces the one made here.
    """
    import keras

    backbone.trainable = False
    inputs = keras.Input((size, size, 3), name="pixels")
    x = inputs
    for layer in preprocess:
        x = layer(x)
    x = backbone(x, training=False)  # BatchNorm stays in inference mode, also when fine-tuned
    if isinstance(x, (list, tuple)) and len(x) == 1:  # Keras 3.12+: a file saved as [output] calls as a list
        x = x[0]
    x = (dropout_layer if dropout_layer is not None else head_dropout(dropout))(x)
    # float32 softmax also under a mixed policy (float16 probabilities lose the small ones)
    outputs = keras.layers.Dense(classes, activation="softmax", name="classifier", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="image_transfer_classifier")


def unfreeze_top(backbone: Any, layers: int) -> int:
    """Make the top ``layers`` layers with weights trainable (BatchNorm stays frozen); returns how many."""
    import keras

    backbone.trainable = True
    weighted = [lyr for lyr in backbone.layers if lyr.weights]
    top = {id(lyr) for lyr in weighted[-layers:]} if layers else set()
    count = 0
    for lyr in backbone.layers:
        lyr.trainable = id(lyr) in top and not isinstance(lyr, keras.layers.BatchNormalization)
        count += lyr.trainable
    return count


def head_model(model: Any) -> Any:
    """The classifier's head alone (its own dropout and softmax layers, shared): embeddings -> probabilities."""
    import keras

    dense = model.get_layer("classifier")
    dropout = model.get_layer("head_dropout")
    inputs = keras.Input((int(dense.kernel.shape[0]),), name="features")
    return keras.Model(inputs, dense(dropout(inputs)), name="image_transfer_head")


def precision_policy(config: TrainConfig) -> str:
    """The Keras policy to train under: ``mixed_float16`` with ``mixed_precision`` and a GPU, else float32."""
    from image_transfer import devices

    if not config.mixed_precision:
        return "float32"
    if devices.visible_gpus():
        return "mixed_float16"
    print("train: --mixed-precision needs a GPU; training in float32")
    return "float32"


def build_model(config: TrainConfig, strategy: Any, policy: str, *, classes: int) -> tuple[Any, Any, int]:
    """(backbone, classifier, input size) built in ``strategy``'s scope under ``policy``, seeded by ``config``."""
    import keras

    from image_transfer import devices

    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        with strategy.scope():
            backbone, preprocess, size = build_backbone(
                config.backbone, weights=config.weights, image_size=config.image_size, trust=config.trust_model_code
            )
            if policy != "float32":  # a backbone file keeps its saved float32 layers unless retyped
                backbone = devices.with_policy(backbone, policy)
            model = build_classifier(backbone, preprocess, classes=classes, size=size, dropout=config.dropout)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return backbone, model, size


def compile_phase(model: Any, strategy: Any, *, learning_rate: float, policy: str = "float32") -> None:
    """Compile ``model`` in ``strategy``'s scope for one phase: Adam at ``learning_rate`` (loss-scaled under
    ``mixed_float16``), sparse categorical cross-entropy, accuracy."""
    import keras

    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
