"""Feeds: a Spark DataFrame streamed into ``tf.data`` through one of two data paths, one interface.

``open_feed(df, path=..., cache_dir=...)`` materialises the DataFrame once as Parquet under a private
directory of ``cache_dir`` and yields a ``Feed``; leaving the ``with`` block deletes that directory,
also when the block raised.

- ``petastorm``: Petastorm's ``make_spark_converter`` / ``make_tf_dataset``. Petastorm 0.13 imports
  only with pyarrow <= 14, so it runs on Databricks Runtime 15.4 LTS ML but not on 16.4 / 17.3.
- ``arrow``: ``pyarrow.dataset`` over the same kind of Parquet files, read by a generator into
  ``tf.data`` (any pyarrow version).
- ``auto``: Petastorm when it imports, else Arrow.

Both read the files' row groups in the same order (shuffled per epoch when training), so for the
same input they yield the same rows. ``Feed.make_tf_dataset`` then runs the same ``tf.data``
pipeline on either: shuffle (training), decode and resize, augmentation (training), batching, all
in parallel inside TensorFlow, never in Spark. Images come out as float RGB 0..255; the model's
own layers do any further preprocessing.

``open_features(df, model, ...)`` is the frozen phase's cache: the executors embed every image once
through ``featurize_images`` and the embeddings are cached as Parquet in the same kind of private
directory (same cleanup), then read into memory for the head.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError

DATA_PATHS = ("auto", "petastorm", "arrow")
ROW_GROUP_BYTES = 32 * 1024 * 1024  # Petastorm's default for make_spark_converter
_READ_ROWS = 64  # rows per read from a row group
_PARALLEL = max(2, os.cpu_count() or 2)  # fixed: an AUTOTUNE iterator can stall for seconds on exit


def petastorm_available() -> bool:
    """Whether Petastorm imports here (it needs pyarrow <= 14)."""
    if importlib.util.find_spec("petastorm") is None:
        return False
    try:
        import petastorm.spark  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError or pyarrow API errors on newer pyarrow
        return False
    return True


def choose_path(path: str, *, connect: bool = False) -> str:
    """``auto`` -> ``petastorm`` when it imports (and the session is classic), else ``arrow``; a choice is checked.

    Petastorm's converter needs a SparkContext, which a Spark Connect session does not have.
    """
    if path not in DATA_PATHS:
        raise UserError(f"unknown data path {path!r}; one of {', '.join(DATA_PATHS)}")
    if path == "petastorm" and connect:
        raise UserError(
            "the petastorm data path needs a SparkContext, which Spark Connect (standard access, serverless) "
            "does not have; use --data-path arrow"
        )
    if path == "auto":
        return "petastorm" if petastorm_available() and not connect else "arrow"
    if path == "petastorm" and not petastorm_available():
        raise UserError("the petastorm data path needs Petastorm (with pyarrow <= 14); use --data-path arrow")
    return path


@dataclass(frozen=True)
class CacheLocation:
    """One directory both as Spark writes it (a URL) and as this process reads it (a local path)."""

    url: str
    local: str


def cache_location(parent: str | None, spark: Any) -> CacheLocation:
    """A fresh private directory under ``parent`` (default: a local temp dir, on a local-mode Spark).

    ``parent`` may be a local path, ``file:///...``, ``file:///dbfs/...`` or ``dbfs:/...`` (DBFS through
    its FUSE mount), or ``/Volumes/...``. A cluster with remote executors needs a shared parent.
    """
    from image_transfer.runtime import is_connect

    name = f"image-transfer-feed-{uuid.uuid4().hex[:12]}"
    if parent is None:
        if is_connect(spark):
            raise UserError(
                "give --cache-dir under Spark Connect (a Volume path): the cluster writes the cache and this "
                "process reads it, and a Connect client cannot tell whether they share a disk"
            )
        master = str(spark.sparkContext.master)
        if not master.startswith("local"):
            raise UserError(
                "give --cache-dir on a multi-node cluster (a Volume, or file:///dbfs/...): the executors "
                "write the cache and the driver reads it"
            )
        parent = tempfile.gettempdir()
    if parent.startswith("dbfs:/") and not parent.startswith("dbfs://"):
        local = "/dbfs/" + parent[len("dbfs:/") :].lstrip("/")
    elif parent.startswith("file://"):
        local = parent[len("file://") :]
    elif parent.startswith("file:"):
        local = parent[len("file:") :]
    elif "://" in parent:
        raise UserError(f"the cache dir must be on a filesystem this machine mounts, not {parent}")
    else:
        local = os.path.abspath(parent)
    local = os.path.join(local, name)
    return CacheLocation(url="file://" + local, local=local)


class Feed:
    """A materialised DataFrame, ready to stream into ``tf.data`` (create with ``open_feed``)."""

    path: str = ""

    def __init__(self, location: CacheLocation, rows: int, columns: Sequence[str]) -> None:
        self.location = location
        self.rows = rows
        self.columns = tuple(columns)

    def _raw(self, *, num_epochs: int | None, shuffle: bool, seed: int) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    @contextlib.contextmanager
    def make_tf_dataset(
        self,
        *,
        batch_size: int,
        image_size: tuple[int, int],
        training: bool = False,
        num_epochs: int | None = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        keys: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Batches of ``(images, labels)`` (or ``(images, labels, {key: values})`` with ``keys``).

        ``training`` shuffles (row groups, then a buffer of encoded rows) and augments; evaluation
        keeps the stored order. ``num_epochs=None`` repeats forever (give Keras ``steps_per_epoch``).
        The dataset is valid inside the ``with`` block.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        with self._raw(num_epochs=num_epochs, shuffle=training, seed=seed) as raw:
            yield image_pipeline(
                raw,
                batch_size=batch_size,
                image_size=image_size,
                training=training,
                seed=seed,
                shuffle_buffer=shuffle_buffer,
                keys=keys,
            )


def augment(image: Any, seed: Any) -> Any:
    """Graph op: a random crop-zoom, left-right flip, brightness and contrast; values stay in 0..255."""
    import tensorflow as tf

    height, width = image.shape[0], image.shape[1]
    seeds = tf.random.experimental.stateless_split(seed, 5)
    scale = tf.random.stateless_uniform([], seeds[0], 1.0, 1.2)
    big = tf.cast(tf.round(tf.constant([height, width], tf.float32) * scale), tf.int32)
    image = tf.image.resize(image, big, method="bilinear")
    image = tf.image.stateless_random_crop(image, [height, width, 3], seeds[1])
    image = tf.image.stateless_random_flip_left_right(image, seeds[2])
    image = tf.image.stateless_random_brightness(image, 0.1 * 255.0, seeds[3])
    image = tf.image.stateless_random_contrast(image, 0.85, 1.15, seeds[4])
    return tf.clip_by_value(image, 0.0, 255.0)


def image_pipeline(
    raw: Any,
    *,
    batch_size: int,
    image_size: tuple[int, int],
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    keys: Sequence[str] = (),
) -> Any:
    """Raw column batches (``content``, ``label_index``, ...) -> batches of float images and int labels."""
    import tensorflow as tf

    from image_transfer.imaging.graph import decode_resize

    height, width = image_size
    rows = raw.unbatch()
    if training and shuffle_buffer > 1:
        rows = rows.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    rows = rows.enumerate()  # a per-row index makes augmentation deterministic for a given seed

    def load(i: Any, row: dict[str, Any]) -> Any:
        image = decode_resize(row["content"], height, width)
        if training:
            image = augment(image, tf.stack([tf.constant(seed, tf.int64), i]))
        label = tf.cast(row["label_index"], tf.int32)
        if keys:
            return image, label, {k: row[k] for k in keys}
        return image, label

    return rows.map(load, num_parallel_calls=_PARALLEL, deterministic=True).batch(batch_size).prefetch(2)


# ---- Petastorm ---------------------------------------------------------------------------------


class PetastormFeed(Feed):
    """Petastorm's Spark converter: the DBR <= 15.4 ML path."""

    path = "petastorm"

    def __init__(self, location: CacheLocation, converter: Any, columns: Sequence[str]) -> None:
        super().__init__(location, len(converter), columns)
        self.converter = converter

    @contextlib.contextmanager
    def _raw(self, *, num_epochs: int | None, shuffle: bool, seed: int) -> Iterator[Any]:
        _quiet_petastorm()
        with self.converter.make_tf_dataset(
            batch_size=_READ_ROWS,
            prefetch=2,
            num_epochs=num_epochs,
            workers_count=1,  # one reader: row groups arrive in ventilated order, as on the Arrow path
            shuffling_queue_capacity=0,
            shuffle_row_groups=shuffle,
            seed=seed,
            schema_fields=list(self.columns),
        ) as ds:
            yield ds.map(lambda t: {k: getattr(t, k) for k in self.columns})


def _quiet_petastorm() -> None:
    """Petastorm 0.13 on pyarrow 14 warns about its own use of deprecated pyarrow APIs: nothing to act on."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    warnings.filterwarnings("ignore", category=UnicodeWarning, module=r"petastorm(\.|$)")
    logging.getLogger("petastorm").setLevel(logging.ERROR)


def _open_petastorm(df: Any, location: CacheLocation, columns: Sequence[str]) -> Feed:
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    _quiet_petastorm()
    df.sparkSession.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, location.url)
    converter = make_spark_converter(df, parquet_row_group_size_bytes=ROW_GROUP_BYTES)
    # Spark lists the files in no particular order; read them in name order, as the Arrow path does.
    converter.file_urls = sorted(converter.file_urls)
    return PetastormFeed(location, converter, columns)


# ---- Arrow -------------------------------------------------------------------------------------


def _tf_dtype(arrow_type: Any) -> Any:
    import pyarrow as pa
    import tensorflow as tf

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or pa.types.is_string(arrow_type):
        return tf.string
    if pa.types.is_integer(arrow_type):
        return tf.int64 if arrow_type.bit_width == 64 else tf.int32
    if pa.types.is_floating(arrow_type):
        return tf.float32
    if pa.types.is_boolean(arrow_type):
        return tf.bool
    raise UserError(f"the Arrow data path cannot feed a column of type {arrow_type}")


class ArrowFeed(Feed):
    """``pyarrow.dataset`` row groups -> ``tf.data`` via a generator: any pyarrow, no Petastorm."""

    path = "arrow"

    def __init__(self, location: CacheLocation, columns: Sequence[str]) -> None:
        import pyarrow.dataset as pads

        self.dataset = pads.dataset(location.local, format="parquet")
        # Row groups in file-name order (what Petastorm's reader ventilates); Spark's _SUCCESS etc. skipped.
        self.pieces = [
            rg
            for fragment in sorted(self.dataset.get_fragments(), key=lambda f: f.path)
            for rg in fragment.split_by_row_group()
        ]
        rows = sum(p.row_groups[0].num_rows for p in self.pieces)
        super().__init__(location, rows, columns)

    def shard(self, index: int, count: int) -> ArrowFeed:
        """The row groups ``index, index + count, ...``: one worker's share of the same Parquet."""
        import copy

        part = copy.copy(self)
        part.pieces = self.pieces[index::count]
        part.rows = sum(p.row_groups[0].num_rows for p in part.pieces)
        return part

    @contextlib.contextmanager
    def _raw(self, *, num_epochs: int | None, shuffle: bool, seed: int) -> Iterator[Any]:
        import numpy as np
        import tensorflow as tf

        schema = self.dataset.schema
        columns = list(self.columns)
        signature = {c: tf.TensorSpec([None], _tf_dtype(schema.field(c).type)) for c in columns}
        pieces = self.pieces

        def generate() -> Iterator[dict[str, Any]]:
            rng = np.random.default_rng(seed)
            epoch = 0
            while num_epochs is None or epoch < num_epochs:
                order = rng.permutation(len(pieces)) if shuffle else range(len(pieces))
                for i in order:
                    for batch in pieces[i].to_batches(columns=columns, batch_size=_READ_ROWS):
                        yield {c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns}
                epoch += 1

        yield tf.data.Dataset.from_generator(generate, output_signature=signature)


# ---- the interface -----------------------------------------------------------------------------


@contextlib.contextmanager
def open_feed(
    df: Any,
    *,
    path: str = "auto",
    cache_dir: str | None = None,
    columns: Sequence[str] = ("content", "label_index"),
    files: int | None = None,
) -> Iterator[Feed]:
    """Materialise ``df[columns]`` under ``cache_dir`` and yield a ``Feed`` over it.

    ``files``: spread the rows over that many Parquet files (workers each read a share of them).

    The private cache directory is deleted on leaving the block, whether it ended normally or not.
    """
    from image_transfer.runtime import is_connect

    chosen = choose_path(path, connect=is_connect(df.sparkSession))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"no column {', '.join(missing)} to feed (columns: {', '.join(df.columns)})")
    location = cache_location(cache_dir, df.sparkSession)
    selected = df.select(*columns)
    if files:
        selected = selected.repartition(files)
    feed: Feed | None = None
    try:
        if chosen == "petastorm":
            feed = _open_petastorm(selected, location, columns)
        else:
            (
                selected.write.option("parquet.block.size", ROW_GROUP_BYTES)
                .option("compression", "uncompressed")
                .parquet(location.url)
            )
            feed = ArrowFeed(location, columns)
        if feed.rows == 0:
            raise UserError("nothing to feed: the data has no rows")
        yield feed
    finally:
        _delete(location, feed=feed)


def _delete(location: CacheLocation, *, feed: Feed | None) -> None:
    if isinstance(feed, PetastormFeed):
        with contextlib.suppress(Exception):  # its own bookkeeping; the directory goes below anyway
            feed.converter.delete()
    shutil.rmtree(location.local, ignore_errors=True)
    if Path(location.local).exists():  # pragma: no cover - e.g. a FUSE mount refusing the delete
        raise OSError(f"could not delete the feed cache {location.local}")


# ---- features: the frozen backbone's embeddings, computed once per image ----------------------


@dataclass
class FeatureCache:
    """Embeddings of a prepared dataset's rows, per split, read from the Parquet cache into memory.

    ``splits[name]`` is ``(features float32 [n, d], labels int32 [n])``, rows in ``path`` order when
    the input has paths. ``rows`` and ``rows_failed`` are what featurize saw (unreadable rows are kept
    out of the splits and counted); ``embedded`` is the model calls' row count from the workers'
    statistics (each image once); ``seconds`` is the featurization's wall time.
    """

    location: CacheLocation
    splits: dict[str, tuple[Any, Any]]
    rows: int
    rows_failed: int
    embedded: int
    seconds: float
    failures: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counts (no arrays)."""
        return {
            "rows": self.rows,
            "rows_failed": self.rows_failed,
            "embedded": self.embedded,
            "seconds": self.seconds,
            "splits": {k: int(len(v[1])) for k, v in self.splits.items()},
        }


@contextlib.contextmanager
def open_features(
    df: Any,
    model: Any,
    *,
    class_names: Sequence[str],
    cache_dir: str | None = None,
    options: Any = None,
) -> Iterator[FeatureCache]:
    """Embed ``df``'s images once through the public featurize path and cache them as Parquet.

    ``df`` is a prepared dataset's usable rows (``content``, ``label_index``, ``split``); ``model`` is
    the Keras classifier whose last layer's input is the embedding (saved into the cache directory, so
    executors on a cluster read it from shared storage when it is too large to broadcast). The
    executors run it as ``featurize_images`` does (traced once per worker, GPU pinning, the scoring
    engine of ``options``, a ``ScoringOptions``); rows that fail are left out and counted, and more
    than ``options.max_failed_fraction`` failing raises ``TooManyFailures``. The cache directory is
    deleted on leaving the block, whether it ended normally or not.
    """
    import time

    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from image_transfer.models.artifact import save_model
    from image_transfer.scoring.options import ScoringOptions
    from image_transfer.scoring.score import score_frame, scoring_run

    keys = ["split", "label_index"] + (["path"] if "path" in df.columns else [])
    options = ScoringOptions.build(options, image_column="content", key_columns=tuple(keys))
    location = cache_location(cache_dir, df.sparkSession)
    try:
        os.makedirs(location.local, exist_ok=True)
        model_file = os.path.join(location.local, "embedder.keras")
        save_model(model, model_file, class_names=list(class_names))
        started = time.perf_counter()
        embedded_df = score_frame(
            df.select("content", *keys),
            model_file,
            mode="embed",
            top_k=5,
            layer=None,
            model_version=None,
            options=options,
        )
        run = scoring_run(embedded_df)
        out = location.url + "/features"
        embedded_df.write.option("compression", "uncompressed").parquet(out)
        seconds = time.perf_counter() - started
        table = pads.dataset(os.path.join(location.local, "features"), format="parquet").to_table()
        if "path" in keys:
            table = table.sort_by("path")
        errors = table.column("error").to_pylist()
        failed = [i for i, e in enumerate(errors) if e is not None]
        sample = tuple(f"{table.column('path')[i].as_py() if 'path' in keys else i}: {errors[i]}" for i in failed[:5])
        run.check(rows=table.num_rows, failed=len(failed), sample=sample)
        splits = _feature_splits(table.filter(pc.is_null(table.column("error"))))
        embedded = int(run.totals()["rows"])
        cache = FeatureCache(
            location=location,
            splits=splits,
            rows=table.num_rows,
            rows_failed=len(failed),
            embedded=embedded,
            seconds=seconds,
            failures=sample,
        )
        if not len(splits["train"][1]):
            raise UserError("nothing to train on: no train image could be embedded")
        yield cache
    finally:
        _delete(location, feed=None)


def _feature_splits(good: Any) -> dict[str, tuple[Any, Any]]:
    """``{split: (features float32 [n, d], labels int32 [n])}`` of the train and validation rows of ``good``
    (an Arrow table of embedded rows: ``split``, ``label_index``, ``embedding``)."""
    import numpy as np

    splits: dict[str, tuple[Any, Any]] = {}
    split_values = np.asarray(good.column("split").to_pylist(), dtype=object)
    labels = np.asarray(good.column("label_index").to_numpy(zero_copy_only=False), dtype="int32")
    embeddings = good.column("embedding").to_pylist()
    width = len(embeddings[0]) if embeddings else 0
    matrix = np.asarray(embeddings, dtype="float32").reshape(len(embeddings), width)
    for name in ("train", "validation"):
        mask = split_values == name
        splits[name] = (matrix[mask], labels[mask])
    return splits
