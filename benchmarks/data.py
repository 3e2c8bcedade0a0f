"""Data and model of the benchmarks, generated once into ``benchmarks/.cache`` (not committed).

- Images: deterministic 320x240 JPEGs (a smooth random colour field with mild grain, ~15 KB each,
  seeded by their index), stored as Parquet files of ``path``, ``content``, ``label_index`` with a
  fixed number of images per file (one file = one Spark partition); for Part 4 also 8 such files in a
  folder of their own (the CLI's ``--input``) and all of them in a single Parquet file with one row
  group (an input Spark cannot split when reading it).
- Model: MobileNetV2 224x224, 1000 classes, random weights (seed 0) with BatchNorm statistics from
  separate calibration images, saved with the project's ``save_model`` and ``preprocess: scale_-1_1``.

``gpu.py`` uses the same generator and model.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODEL_PATH = CACHE / "mobilenetv2-224.keras"
IMAGE_W, IMAGE_H = 320, 240
SIZE = 224  # the model's input size
CLASSES = 10  # labels of the synthetic data (training part)


def make_jpeg(i: int) -> bytes:
    """Image ``i``: a smooth random colour field with mild grain, 320x240, JPEG quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(small.resize((IMAGE_W, IMAGE_H), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0.0, 4.0, base.shape).astype(np.int16)
    image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def data_files(per_file: int, count: int) -> list[str]:
    """The first ``count`` Parquet files of ``per_file`` images each (generated on first use)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = CACHE / f"images-{per_file}-per-file"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(count):
        path = folder / f"part-{k:05d}.parquet"
        if not path.exists():
            ids = range(k * per_file, (k + 1) * per_file)
            table = pa.table(
                {
                    "path": pa.array([f"synthetic/{i % CLASSES}/{i:06d}.jpg" for i in ids], pa.string()),
                    "content": pa.array([make_jpeg(i) for i in ids], pa.binary()),
                    "label_index": pa.array([i % CLASSES for i in ids], pa.int32()),
                }
            )
            tmp = path.with_suffix(".tmp")
            pq.write_table(table, tmp)
            tmp.rename(path)
        files.append(str(path))
    return files


def own_folder(files: list[str], name: str) -> list[str]:
    """``files`` linked into a folder of their own (``CACHE/name``), so the folder is the input and holds
    nothing else (``data_files``' folders also hold the files of larger inputs of the same file size)."""
    folder = CACHE / name
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        path = folder / Path(f).name
        if not path.exists():
            tmp = folder / f".{path.name}.tmp"  # hidden: Spark does not read it
            tmp.unlink(missing_ok=True)
            try:
                os.link(f, tmp)
            except OSError:
                shutil.copyfile(f, tmp)
            tmp.rename(path)
        out.append(str(path))
    return out


def one_file(files: list[str], name: str) -> str:
    """The images of ``files`` in a single Parquet file with one row group (cannot be split at read time)."""
    import pyarrow.parquet as pq

    path = CACHE / f"{name}.parquet"
    if not path.exists():
        table = pq.ParquetDataset(files).read()
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, row_group_size=table.num_rows)
        tmp.rename(path)
    return str(path)


def make_model(path: Path = MODEL_PATH) -> None:
    """MobileNetV2 224x224, 1000 classes, random weights (seed 0), saved with ``scale_-1_1`` metadata."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize
    from image_transfer.models.artifact import save_model

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3), classes=1000)
    # Fresh BatchNorm statistics (mean 0, variance 1) make a random MobileNetV2 give the same uniform
    # output for every image; set each BatchNorm's statistics from calibration images (not the
    # benchmark's), in order, so outputs differ per image and "top-1 = floor" is a real check.
    calibration = (
        np.stack([decode_resize(tf.constant(make_jpeg(10_000_000 + i)), SIZE, SIZE).numpy() for i in range(32)]) / 127.5
        - 1.0
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            inputs = np.asarray(keras.Model(model.inputs, layer.input)(calibration, training=False))
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, inputs.mean(axis=(0, 1, 2)), inputs.var(axis=(0, 1, 2)) + 1e-3])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, class_names=None, preprocess="scale_-1_1")
