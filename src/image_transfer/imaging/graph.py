"""Decoding inside TensorFlow graphs: decode, orient (EXIF), antialiased resize."""

from __future__ import annotations

from typing import Any


def orient(image: Any, orientation: Any) -> Any:
    """Graph op: turn a decoded [h, w, c] image the right way up for its EXIF orientation (1..8).

    The same transposes as Pillow's ``ImageOps.exif_transpose``.
    """
    import tensorflow as tf

    branches = [
        lambda: image,  # 1: as stored
        lambda: tf.image.flip_left_right(image),  # 2: mirrored
        lambda: tf.image.rot90(image, k=2),  # 3: upside down
        lambda: tf.image.flip_up_down(image),  # 4: mirrored vertically
        lambda: tf.image.transpose(image),  # 5: transposed
        lambda: tf.image.rot90(image, k=3),  # 6: turned 90 degrees clockwise to display
        lambda: tf.image.rot90(tf.image.transpose(image), k=2),  # 7: transverse
        lambda: tf.image.rot90(image, k=1),  # 8: turned 90 degrees counter-clockwise to display
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def decode_resize(encoded: Any, height: int, width: int, orientation: Any = None) -> Any:
    """Graph op: one encoded image (scalar string tensor) -> float32 [height, width, 3] in 0..255.

    Any channel layout becomes RGB (grayscale is repeated, alpha dropped, 16-bit scaled to 8-bit),
    an animated GIF gives its first frame, the EXIF ``orientation`` (when given) is applied, and the
    image is resized bilinearly to the model's size, antialiased when shrinking (no aliasing of
    large photos).
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    if orientation is not None:
        image = orient(image, orientation)
    image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
    return tf.ensure_shape(image, [height, width, 3])


def decode_batch(encoded: Any, height: int, width: int, orientations: Any = None) -> Any:
    """Graph op: a batch of encoded images [n] (and their EXIF orientations [n]) -> float32 [n, h, w, 3]."""
    import tensorflow as tf

    if orientations is None:
        orientations = tf.ones_like(encoded, dtype=tf.int32)
    return tf.map_fn(
        lambda args: decode_resize(args[0], height, width, args[1]),
        (encoded, orientations),
        fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
        parallel_iterations=16,
    )
