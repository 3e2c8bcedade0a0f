"""Reading folders of image files into DataFrames ``path, content``, and saying what a read leaves out."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff")
EVERY_FILE = "*"  # as an extension: every file, whatever its name (the content decides)
EXAMPLES = 5  # skipped files named in a report
UNLISTED_READ_TASKS = 8  # tasks that read the files Spark's own listing leaves out (hidden names)
# Folders never read: hidden ones (.git, .ipynb_checkpoints, .Trash) and Spark's and Delta's bookkeeping.
_BOOKKEEPING = ("_spark_metadata", "_temporary", "_delta_log")


def extension_glob(extensions: Sequence[str]) -> str:
    """The ``pathGlobFilter`` matching file names with one of ``extensions`` (lower or upper case).

    ``*`` among them matches every file.
    """
    if EVERY_FILE in {e.strip() for e in extensions}:
        return "*"
    return "*.{" + ",".join(sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})) + "}"


def spark_hides(name: str) -> bool:
    """Whether Spark's file listing leaves out a file or folder of this name (``_x``, ``.x``, ``x._COPYING_``;
    not ``_x=y`` partition folders nor Parquet's ``_metadata``), as its ``HadoopFSUtils`` rule says."""
    exclude = (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")
    return exclude and not name.startswith(("_common_metadata", "_metadata"))


def _skipped_folder(name: str) -> bool:
    return name.startswith(".") or name in _BOOKKEEPING


def read_image_files(spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Any:
    """Read a folder tree of image files with Spark's ``binaryFile`` source: ``path``, ``content``.

    Lazy: nothing runs until an action (Spark lists the folder on the driver, as for any file source).
    Files are filtered by extension (case-insensitive; ``*`` takes every file and lets the content
    decide); unreadable and empty images are kept (scoring reports them per row), so every file that
    matched appears in the result, whatever its name. Spark's file sources make no row for a zero-byte
    file, nor for a name starting with ``_`` or ``.`` (cameras write ``_DSC0001.JPG``): for folders the
    executors can open as local paths (local, ``file:``, ``/Volumes``, ``/dbfs``) those are listed inside
    the action on an executor and read in ``UNLISTED_READ_TASKS`` tasks. Elsewhere (``s3://``...) Spark's
    listing cannot be told otherwise: ``skipped_files`` counts them. Files inside hidden folders
    (``.git``, ``.ipynb_checkpoints``) and Spark's bookkeeping folders are not read: ``skipped_files``
    reports them too.
    """
    from pyspark.sql import functions as F

    from image_transfer.errors import UserError

    pattern = extension_glob(extensions)
    try:
        df = (
            spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", pattern)
            .load(folder)
        )
    except Exception as exc:  # AnalysisException: path does not exist
        raise UserError(f"cannot read images from {folder}: {str(exc).splitlines()[0]}") from exc
    df = df.select(F.col("path"), F.col("content"))
    local = _local_folder(folder)
    if local is None:
        return df
    return df.unionByName(_unlisted_files(spark, local, pattern, df.schema))


def _local_folder(folder: str) -> tuple[str, str] | None:
    """(the folder as a local path, the prefix Spark's ``path`` column gives it) or None when not local."""
    if folder.startswith("file:"):
        return "/" + folder[len("file:") :].lstrip("/"), "file:"
    if folder.startswith("dbfs:/") and not folder.startswith("dbfs://"):
        rest = "/" + folder[len("dbfs:/") :].lstrip("/")
        return (rest if rest.startswith("/Volumes/") else "/dbfs" + rest), "dbfs:"
    if "://" in folder:
        return None
    path = os.path.abspath(folder)
    if path.startswith(("/Volumes/", "/dbfs/")):
        return path, "dbfs:"
    return path, "file:"


def _unlisted_files(spark: Any, local: tuple[str, str], pattern: str, schema: Any) -> Any:
    """A lazy DataFrame ``path, content`` of the matching files Spark's listing leaves out under a local
    folder (zero-byte files, hidden names), listed in the action and read in a few tasks."""
    root, prefix = local

    def listing(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for _ in batches:
            found = [_spark_path(p, prefix) for p in unlisted_files(root, pattern)]
            if found:  # no empty frame: pyspark 4.1 cannot convert one (StructArray from a ChunkedArray)
                yield pd.DataFrame({"path": found, "content": [None] * len(found)})

    def reading(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            if len(batch):
                batch["content"] = [_read_local(_local_path(p, prefix)) for p in batch["path"]]
                yield batch

    listed = spark.range(1).mapInPandas(listing, schema)
    return listed.repartition(UNLISTED_READ_TASKS).mapInPandas(reading, schema)


def _read_local(path: str) -> bytes:
    """A file's bytes; b"" when it vanished or cannot be opened (scoring then reports an empty image)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _spark_path(path: str, prefix: str) -> str:
    """A local path as the ``path`` column names it: ``file:/a/b``, ``dbfs:/Volumes/...``, ``dbfs:/x``."""
    if prefix == "dbfs:" and path.startswith("/dbfs/"):
        return "dbfs:" + path[len("/dbfs") :]
    return prefix + path


def _local_path(path: str, prefix: str) -> str:
    """The inverse of ``_spark_path``."""
    rest = path[len(prefix) :]
    if prefix == "dbfs:" and not rest.startswith("/Volumes/"):
        return "/dbfs" + rest
    return rest


def _patterns(pattern: str) -> list[str]:
    if pattern.startswith("*.{"):
        return [f"*.{n}" for n in pattern[3:-1].split(",")]
    return [pattern]


def _walk(root: str) -> Iterator[tuple[str, str, bool]]:
    """(directory, file name, whether Spark's listing shows it) for every file below ``root``, hidden
    folders (``.x``) and Spark's bookkeeping folders left out."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not _skipped_folder(d))
        rel = os.path.relpath(directory, root)
        shown_dir = rel == "." or not any(spark_hides(part) for part in rel.split(os.sep))
        for name in sorted(files):
            yield directory, name, shown_dir and not spark_hides(name)


def unlisted_files(root: str, pattern: str) -> list[str]:
    """The files below ``root`` matching ``pattern`` (as Spark's ``pathGlobFilter`` does, case as given)
    that Spark's listing gives no row: zero-byte files and hidden names (``_x``, ``.x``, or in a ``_x``
    folder), outside hidden folders."""
    patterns = _patterns(pattern)
    found = []
    for directory, name, shown in _walk(root):
        if name.endswith("._COPYING_") or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        path = os.path.join(directory, name)
        try:
            if not os.path.isfile(path) or (shown and os.path.getsize(path) != 0):
                continue
        except OSError:
            continue
        found.append(path)
    return found


@dataclass(frozen=True)
class SkippedFiles:
    """What reading a folder leaves out, and why: counts by reason, and the first few files."""

    reasons: dict[str, int] = field(default_factory=dict)  # reason -> files
    examples: tuple[str, ...] = ()  # up to EXAMPLES paths, relative to the folder
    note: str = ""  # what could not be counted here

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def __bool__(self) -> bool:
        return bool(self.count or self.note)

    def describe(self) -> str:
        """``3 files: 2 with other extensions (1 .txt, 1 without an extension), 1 in hidden folders; e.g.
        notes.txt, README, .git/a.jpg``, or "" when nothing was skipped."""
        if not self:
            return ""
        extensions = {r: n for r, n in self.reasons.items() if r.startswith("extension ")}
        others = {r: n for r, n in self.reasons.items() if r not in extensions}
        parts = []
        if extensions:
            total = sum(extensions.values())
            kinds = sorted(extensions.items(), key=lambda kv: (-kv[1], kv[0] == "extension ", kv[0]))
            shown = [f"{n} .{r[10:]}" if r[10:] else f"{n} without an extension" for r, n in kinds]
            parts.append(f"{_files(total)} with other extensions ({', '.join(shown)})")
        parts += [f"{_files(n)} {reason}" for reason, n in sorted(others.items(), key=lambda kv: -kv[1])]
        text = "; ".join(parts) if len(parts) == 1 else f"{_files(self.count)}: {'; '.join(parts)}"
        if self.examples:
            more = self.count - len(self.examples)
            text += f" (e.g. {', '.join(self.examples)}{f' and {more} more' if more > 0 else ''})"
        if self.note:
            text = f"{text}; {self.note}" if text else self.note
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"count", "reasons", "examples", "note"}``."""
        return {"count": self.count, "reasons": dict(self.reasons), "examples": list(self.examples), "note": self.note}


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


HIDDEN_FOLDER = "in hidden or Spark bookkeeping folders (.git, _temporary, ...)"
BEING_COPIED = "being copied (._COPYING_)"
HIDDEN_NAME = (
    "with names starting with _ or . (Spark's listing leaves them out here: rename them, or copy them to a Volume)"
)


def survey_local(root: str, extensions: Sequence[str], *, hidden_names: str = "") -> tuple[dict[str, int], list[str]]:
    """(reason -> files, the first few paths relative to ``root``) of what a read of ``root`` leaves out;
    ``hidden_names``: the reason for skipping names Spark hides (``_x``, ``.x``), "" when they are read."""
    keep = None if EVERY_FILE in {e.strip() for e in extensions} else {e.lower().lstrip(".") for e in extensions}
    reasons: Counter[str] = Counter()
    examples: list[str] = []

    def skip(reason: str, path: str) -> None:
        reasons[reason] += 1
        if len(examples) < EXAMPLES:
            examples.append(os.path.relpath(path, root))

    for directory, subdirs, files in os.walk(root):
        for d in sorted(subdirs):
            if _skipped_folder(d):
                for inner, _, names in os.walk(os.path.join(directory, d)):
                    for name in sorted(names):
                        if keep is None or _suffix(name) in keep:
                            skip(HIDDEN_FOLDER, os.path.join(inner, name))
        subdirs[:] = sorted(d for d in subdirs if not _skipped_folder(d))
        for name in sorted(files):
            if keep is not None and _suffix(name) not in keep:
                skip(f"extension {_suffix(name)}", os.path.join(directory, name))
            elif name.endswith("._COPYING_"):
                skip(BEING_COPIED, os.path.join(directory, name))
            elif hidden_names and any(spark_hides(p) for p in _below(root, directory, name)):
                skip(hidden_names, os.path.join(directory, name))
    return dict(reasons), examples


def _below(root: str, directory: str, name: str) -> list[str]:
    rel = os.path.relpath(directory, root)
    return ([] if rel == "." else rel.split(os.sep)) + [name]


def _suffix(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return ext.lower() if dot and stem and "/" not in ext else ""


STREAM_HIDDEN_NAME = (
    "with names starting with _ or . (the streaming file source leaves them out: rename them, or read them with "
    "`ingest` and score them with --input)"
)


def skipped_files(
    spark: Any, folder: str, *, extensions: Sequence[str] = IMAGE_EXTENSIONS, streaming: bool = False
) -> SkippedFiles:
    """What ``read_image_files`` (``streaming``: the incremental path's file stream) leaves out under
    ``folder`` (recursive), and why.

    Files with other extensions (none with ``*``), files in hidden folders, and, where Spark's listing
    cannot be told otherwise (streams; folders the executors cannot open as local paths), names starting
    with ``_`` or ``.``. One pass over the listing, no file is read; it runs when called (a Spark job for
    local folders, which lists on an executor). A folder that cannot be listed skips nothing here (the
    read says why).
    """
    local = _local_folder(folder)
    if local is not None:
        return _survey_on_executor(spark, local[0], extensions, STREAM_HIDDEN_NAME if streaming else "")
    return _survey_remote(spark, folder, extensions)


def _survey_on_executor(spark: Any, root: str, extensions: Sequence[str], hidden_names: str) -> SkippedFiles:
    import json

    from pyspark.sql.types import StringType, StructField, StructType

    schema = StructType([StructField("report", StringType())])
    wanted = list(extensions)

    def survey(batches: Iterator[Any]) -> Iterator[Any]:
        import pandas as pd

        for _ in batches:
            found = survey_local(root, wanted, hidden_names=hidden_names) if os.path.isdir(root) else ({}, [])
            reasons, examples = found
            yield pd.DataFrame({"report": [json.dumps({"reasons": reasons, "examples": examples})]})

    report = json.loads(spark.range(1).mapInPandas(survey, schema).collect()[0]["report"])
    return SkippedFiles(report["reasons"], tuple(report["examples"]))


def _survey_remote(spark: Any, folder: str, extensions: Sequence[str]) -> SkippedFiles:
    """Through the Hadoop file system (classic sessions), else Spark's own listing (extensions only)."""
    from image_transfer.storage.fs import file_system

    keep = None if EVERY_FILE in {e.strip() for e in extensions} else {e.lower().lstrip(".") for e in extensions}
    try:
        fs, root = file_system(spark, folder)
        listing = [rel for rel, _ in fs.files(root)]
    except Exception:  # noqa: BLE001 - Connect, or unlisted here: Spark's listing, which hides _ and . names
        return _survey_by_spark(spark, folder, keep)
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    for rel in sorted(listing):
        parts = rel.split("/")
        if any(_skipped_folder(p) for p in parts[:-1]):
            reason = HIDDEN_FOLDER if keep is None or _suffix(parts[-1]) in keep else ""
        elif keep is not None and _suffix(parts[-1]) not in keep:
            reason = f"extension {_suffix(parts[-1])}"
        elif parts[-1].endswith("._COPYING_"):
            reason = BEING_COPIED
        elif any(spark_hides(p) for p in parts):
            reason = HIDDEN_NAME
        else:
            reason = ""
        if reason:
            reasons[reason] += 1
            if len(examples) < EXAMPLES:
                examples.append(rel)
    return SkippedFiles(dict(reasons), tuple(examples))


def _survey_by_spark(spark: Any, folder: str, keep: set[str] | None) -> SkippedFiles:
    from pyspark.sql import functions as F

    note = f"names starting with _ or . are not listed by Spark under {folder} and could not be counted here"
    if keep is None:
        return SkippedFiles(note=note)
    try:
        listing = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(folder)
    except Exception:  # noqa: BLE001 - AnalysisException: missing folder; read_image_files reports it
        return SkippedFiles()
    suffix = F.lower(F.regexp_extract(F.col("path"), r"\.([^./]+)$", 1)).alias("suffix")
    other = listing.select(suffix, "path").where(~F.col("suffix").isin(sorted(keep)))
    reasons = {f"extension {r['suffix']}": int(r["count"]) for r in other.groupBy("suffix").count().collect()}
    examples = tuple(r["path"] for r in other.orderBy("path").limit(EXAMPLES).collect())
    return SkippedFiles(reasons, examples, note)
