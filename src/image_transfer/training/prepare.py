"""Prepare: a folder of labelled images -> a Parquet training dataset with a deterministic split.

Columns: ``path``, ``content`` (encoded bytes TensorFlow can decode), ``label``, ``label_index``,
``split`` (``train`` or ``validation``, from a hash of the path relative to the images folder, so the
split does not change when the folder moves or grows) and ``error``. Rows whose ``error`` is set (not
a readable image, or no label) stay in the dataset, are counted (a sample listed) in the summary, all
listed in a side file when asked, and are kept out of training and evaluation: nothing is dropped
silently.

The image bytes are read once: the write screens them (no persisted copy, no extra pass). Class
names come from the labels alone (paths or the labels table, no bytes) and are checked against the
written dataset, which also gives the counts and the rejected files by reading columns without bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd  # module level: pandas_udf resolves the type hints against these globals

from image_transfer.errors import UserError
from image_transfer.imaging.files import IMAGE_EXTENSIONS, read_image_files
from image_transfer.imaging.screen import ImageLimits

SPLITS = ("train", "validation")
_HASH_BUCKETS = 10_000
_TABLE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*){1,2}$")


REJECTED_SAMPLE = 100  # rejected files listed in the summary; all of them go to the side file


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` wrote: per-class counts by split, and the files kept out of training."""

    output: str
    rows: int
    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # label -> split -> usable images
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}: the first, by path
    validation_fraction: float = 0.2
    rejected_count: int = 0  # all of them (the dataset's rows with an ``error``)
    rejected_file: str | None = None  # CSV ``path,reason`` of every rejected file, when written
    skipped: dict[str, Any] = field(default_factory=dict)  # files the read left out (SkippedFiles.to_dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    def describe(self, *, max_rejected: int = 20) -> str:
        """Per-class counts as a table, then the rejected files."""
        width = max([len("class")] + [len(c) for c in self.counts])
        lines = [f"{'class':<{width}}  {'train':>7}  {'validation':>10}"]
        for label in self.class_names:
            c = self.counts[label]
            lines.append(f"{label:<{width}}  {c.get('train', 0):>7}  {c.get('validation', 0):>10}")
        total = {s: sum(c.get(s, 0) for c in self.counts.values()) for s in SPLITS}
        lines.append(f"{'total':<{width}}  {total['train']:>7}  {total['validation']:>10}")
        lines.append(
            f"prepared {self.rows} files into {self.output}: {len(self.class_names)} classes, "
            f"{self.rejected_count} kept out of training"
        )
        lines += [f"  rejected: {r['path']}: {r['reason']}" for r in self.rejected[:max_rejected]]
        shown = min(len(self.rejected), max_rejected)
        if self.rejected_count > shown:
            where = self.rejected_file or "the dataset's error column"
            lines.append(f"  ... and {self.rejected_count - shown} more (all in {where})")
        if self.skipped.get("text"):
            lines.append(f"skipped {self.skipped['text']}")
        return "\n".join(lines)


def _screen_udf(limits: ImageLimits) -> Any:
    """Pandas UDF: content -> struct(error, converted); ``converted`` is set only for re-encoded formats."""
    from pyspark.sql.functions import pandas_udf

    def screen_full(data: Any) -> tuple[str | None, bytes | None]:
        import io
        import warnings

        from PIL import Image

        from image_transfer.imaging.screen import screen_one

        payload, error = screen_one(data, limits, upright=True)
        if error is not None:
            return error, None
        try:  # headers were fine; decode the pixels once so training never meets a corrupt body
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(payload)) as img:
                    img.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file error
            return f"corrupt image data ({type(exc).__name__}: {str(exc)[:120]})", None
        return None, (payload if payload != bytes(data) else None)

    @pandas_udf("error string, converted binary")
    def screen(content: pd.Series) -> pd.DataFrame:
        results = [screen_full(v) for v in content]
        return pd.DataFrame(
            {"error": [r[0] for r in results], "converted": [r[1] for r in results]}, index=content.index
        )

    return screen


def _qualified_root(spark: Any, folder: str) -> str:
    """The folder as Spark names its files (``file:/abs/dir``, ``dbfs:/Volumes/...``), no trailing slash.

    Under Spark Connect (no JVM gateway) a scheme-less path is made absolute here: ``_relative_path``
    matches on the part after any scheme, so ``/abs/dir`` finds ``file:/abs/dir/...`` as well.
    """
    from image_transfer.runtime import is_connect

    if is_connect(spark):
        return (folder if "://" in folder or ":/" in folder else os.path.abspath(folder)).rstrip("/")
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(folder)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return str(fs.makeQualified(path).toString()).rstrip("/")


def _relative_path(path_col: Any, root: str) -> Any:
    """Spark column: ``path`` relative to ``root`` (tolerates ``file:/x`` vs ``file:///x`` spellings)."""
    from pyspark.sql import functions as F

    # Everything after the root's last path components, matched on the unqualified part.
    bare = re.sub(r"^[a-zA-Z][\w+.-]*:(//[^/]*)?", "", root)
    return F.regexp_extract(path_col, "^.*?" + re.escape(bare) + "/(.*)$", 1)


def read_labels(spark: Any, source: str) -> Any:
    """Labels from a CSV file (header ``path,label``) or a table with those columns."""
    from pyspark.sql import functions as F

    is_table = _TABLE_NAME.match(source) is not None and not source.lower().endswith(".csv")
    try:
        df = spark.table(source) if is_table else spark.read.option("header", "true").csv(source)
    except Exception as exc:  # noqa: BLE001 - AnalysisException: missing file or table
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read labels from {source}: {first}") from exc
    missing = {"path", "label"} - set(df.columns)
    if missing:
        raise UserError(f"labels {source} need columns path and label; missing {', '.join(sorted(missing))}")
    return df.select(F.trim(F.col("path").cast("string")).alias("path"), F.col("label").cast("string"))


def attach_labels(images: Any, root: str, labels: Any | None) -> Any:
    """Add ``rel_path`` and ``label``: the parent folder's name, or the label joined on the path.

    Label paths may be relative to the images folder or absolute (with or without a scheme). An image
    directly in the images folder (no class folder) and an image the labels do not mention get no label.
    """
    from pyspark.sql import functions as F

    df = images.withColumn("rel_path", _relative_path(F.col("path"), root))
    if labels is None:
        parts = F.split(F.col("rel_path"), "/")
        folder = F.when(F.size(parts) >= 2, F.element_at(parts, -2))
        return df.withColumn("label", F.when(folder != "", folder))
    bare_root = re.sub(r"^[a-zA-Z][\w+.-]*:(//[^/]*)?", "", root)
    lab = labels.withColumn(
        "rel_path",
        F.when(
            F.col("path").contains(bare_root + "/"),
            F.regexp_extract(F.col("path"), "^.*?" + re.escape(bare_root) + "/(.*)$", 1),
        ).otherwise(F.regexp_replace(F.col("path"), "^\\./", "")),
    )
    dup = lab.groupBy("rel_path").agg(F.countDistinct("label").alias("n")).where("n > 1").limit(3).collect()
    if dup:
        raise UserError(f"labels give more than one label to {', '.join(r['rel_path'] for r in dup)}")
    lab = lab.dropDuplicates(["rel_path"]).select("rel_path", F.col("label"))
    return df.join(F.broadcast(lab) if _small(lab) else lab, on="rel_path", how="left")


def _small(df: Any, limit: int = 1_000_000) -> bool:
    return df.limit(limit + 1).count() <= limit


def split_column(rel_path: Any, validation_fraction: float) -> Any:
    """Spark column: ``validation`` for a stable ``validation_fraction`` of the paths, else ``train``."""
    from pyspark.sql import functions as F

    bucket = F.pmod(F.xxhash64(rel_path), F.lit(_HASH_BUCKETS))
    return F.when(bucket < int(round(validation_fraction * _HASH_BUCKETS)), "validation").otherwise("train")


def _labels(df: Any) -> tuple[str, ...]:
    """The distinct labels of ``df``, sorted (reads the label column only)."""
    return tuple(r["label"] for r in df.select("label").distinct().orderBy("label").collect())


def _class_index(names: Sequence[str]) -> Any:
    from pyspark.sql import functions as F

    return F.create_map(*[x for i, n in enumerate(names) for x in (F.lit(n), F.lit(i))])


def build_dataset(
    images: Any,
    *,
    root: str,
    labels: Any | None = None,
    validation_fraction: float = 0.2,
    limits: ImageLimits | None = None,
) -> tuple[Any, tuple[str, ...]]:
    """The prepared DataFrame (lazy: writing it is the only pass over the bytes) and its class names.

    The class names, in ``label_index`` order, are the labels of at least one file, found from the
    paths (or the labels table) without reading any image. A class whose every file turns out unusable
    is found only when the data is written (``prepare`` then renumbers the classes).
    """
    from pyspark.sql import functions as F

    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    labelled = attach_labels(images, root, labels)
    names = _labels(labelled.where(F.col("label").isNotNull()))
    if not names:
        how = (
            "the labels name none of its files"
            if labels is not None
            else "prepare needs one sub-folder per class (e.g. cats/a.jpg, dogs/b.jpg), or --labels CSV"
        )
        raise UserError(f"no labelled images found under {root}: {how}")
    screened = labelled.withColumn("_s", _screen_udf(limits or ImageLimits.default())(F.col("content")))
    error = F.when(F.col("_s.error").isNotNull(), F.col("_s.error")).when(F.col("label").isNull(), F.lit("no label"))
    out = screened.select(
        "path",
        F.coalesce(F.col("_s.converted"), F.col("content")).alias("content"),
        "label",
        F.when(error.isNull(), _class_index(names)[F.col("label")]).cast("int").alias("label_index"),
        split_column(F.col("rel_path"), validation_fraction).alias("split"),
        error.alias("error"),
    )
    return out, names


def summarize(
    written: Any,
    *,
    output: str,
    validation_fraction: float,
    rejected_file: str | None = None,
    sample: int = REJECTED_SAMPLE,
) -> PrepareResult:
    """Counts per class and split, and the rejected files, from the dataset as written (no image bytes read).

    The summary lists the first ``sample`` rejected files by path; ``rejected_file`` gets all of them
    (streamed a partition at a time, never collected at once).
    """
    from pyspark.sql import functions as F

    ok = written.where(F.col("error").isNull())
    counts: dict[str, dict[str, int]] = {}
    index: dict[int, str] = {}
    for r in ok.groupBy("label", "label_index", "split").count().collect():
        counts.setdefault(r["label"], {s: 0 for s in SPLITS})[r["split"]] = r["count"]
        index[r["label_index"]] = r["label"]
    bad = written.where(F.col("error").isNotNull()).select("path", F.col("error").alias("reason"))
    rejected = [r.asDict() for r in bad.orderBy("path").limit(sample).collect()]
    rejected_count = bad.count() if len(rejected) == sample else len(rejected)
    if rejected_file:
        rejected_count = _write_rejected(bad.orderBy("path"), rejected_file)
    return PrepareResult(
        output=output,
        rows=written.count(),
        class_names=tuple(index[i] for i in sorted(index)),
        counts=counts,
        rejected=rejected,
        validation_fraction=validation_fraction,
        rejected_count=rejected_count,
        rejected_file=rejected_file,
    )


def _write_rejected(bad: Any, path: str) -> int:
    """Stream ``path, reason`` rows into a CSV file on the driver (local or a mounted Volume); returns the count."""
    import csv
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with target.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for r in bad.toLocalIterator():
            w.writerow([r["path"], r["reason"]])
            n += 1
    return n


def _renumber(written: Any, names: Sequence[str]) -> Any:
    """The dataset with ``label_index`` renumbered to ``names`` (classes left without a usable image)."""
    from pyspark.sql import functions as F

    return written.withColumn(
        "label_index", F.when(F.col("error").isNull(), _class_index(names)[F.col("label")]).cast("int")
    ).select(*written.columns)


def prepare(
    spark: Any,
    images_dir: str,
    output: str,
    *,
    output_table: str | None = None,
    labels: str | None = None,
    validation_fraction: float = 0.2,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    limits: ImageLimits | None = None,
    rejected_file: str | None = None,
    overwrite: bool = False,
    wait: float | None = None,
) -> PrepareResult:
    """Read ``images_dir`` with ``binaryFile``, label, screen and split it, write it atomically to ``output``.

    The write is the only pass over the image bytes. ``rejected_file`` (a local or mounted path) gets a
    CSV of every rejected file; the summary lists the first ``REJECTED_SAMPLE``. A folder with fewer
    than two classes is refused before anything is written (training needs two). ``output`` may replace
    only an earlier ``prepare`` output unless ``overwrite`` (``write_output``). The output's lease is held
    from the first look at the images to the last write (``output_lease``; ``wait``: seconds to wait for
    another run's).
    """
    from image_transfer.storage.outputs import output_lease

    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    exts = [e.strip().lstrip(".") for e in extensions if e.strip()]
    if not exts:
        raise UserError("--extensions names no extension")
    with output_lease(spark, output, command="prepare", wait=wait, table=output_table):
        return _prepare_leased(
            spark, images_dir, output, output_table, labels, validation_fraction, exts, limits, rejected_file, overwrite
        )


def _prepare_leased(
    spark: Any,
    images_dir: str,
    output: str,
    output_table: str | None,
    labels: str | None,
    validation_fraction: float,
    exts: list[str],
    limits: ImageLimits | None,
    rejected_file: str | None,
    overwrite: bool,
) -> PrepareResult:
    """``prepare``'s work, holding the output's lease."""
    from pyspark.sql import functions as F

    from image_transfer.imaging.files import skipped_files
    from image_transfer.storage.outputs import check_table, save_table, write_output

    check_table(spark, output_table, command="prepare", overwrite=overwrite)
    images = read_image_files(spark, images_dir, extensions=exts)
    skipped = skipped_files(spark, images_dir, extensions=exts)
    if images.isEmpty():
        raise UserError(
            f"no files with extensions {', '.join(exts)} under {images_dir}"
            + (f" (skipped {skipped.describe()}; --extensions chooses what to read)" if skipped else "")
        )
    label_df = read_labels(spark, labels) if labels else None
    root = _qualified_root(spark, images_dir)
    df, names = build_dataset(
        images, root=root, labels=label_df, validation_fraction=validation_fraction, limits=limits
    )
    if len(names) < 2:
        where = f"the labels {labels} give" if labels else f"{images_dir} has"
        how = "" if labels else " (one subfolder per class, named after it)"
        raise UserError(f"{where} one class ({names[0]}): training needs at least two{how}; nothing written")
    written = write_output(df, output, table=None, command="prepare", overwrite=overwrite)
    usable_names = _labels(written.where(F.col("error").isNull()))
    if not usable_names:
        raise UserError(f"no labelled, readable images found under {images_dir} (every file is listed in {output})")
    if len(usable_names) < 2:
        raise UserError(
            f"only one class ({usable_names[0]}) under {images_dir} has a readable image: training needs at "
            f"least two (the rejected files are listed in {output})"
        )
    if usable_names != names:
        # Rare: a class whose every file was rejected. Renumber so label_index stays 0..n-1 (one more
        # pass over the written bytes, without screening again).
        written = write_output(_renumber(written, usable_names), output, rows=written.count(), command="prepare")
    if output_table:
        save_table(written, output_table, command="prepare")
    result = summarize(written, output=output, validation_fraction=validation_fraction, rejected_file=rejected_file)
    return replace(result, skipped={**skipped.to_dict(), "text": skipped.describe()})


def usable(df: Any, split: str | None = None) -> Any:
    """The rows to train or evaluate on: no error, and (optionally) in ``split``."""
    from pyspark.sql import functions as F

    missing = {"content", "label", "label_index", "split", "error"} - set(df.columns)
    if missing:
        raise UserError(f"not a prepared dataset (run `image-transfer prepare`): no {', '.join(sorted(missing))}")
    if split is not None and split not in SPLITS:
        raise UserError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    out = df.where(F.col("error").isNull() & F.col("label_index").isNotNull())
    return out.where(F.col("split") == split) if split else out


def class_names(df: Any) -> tuple[str, ...]:
    """Class names of a prepared dataset, in ``label_index`` order (checked to be 0..n-1)."""
    rows = usable(df).select("label_index", "label").distinct().orderBy("label_index").collect()
    if [r["label_index"] for r in rows] != list(range(len(rows))):
        raise UserError("the dataset's label_index values are not 0..n-1 with one label each")
    return tuple(r["label"] for r in rows)
