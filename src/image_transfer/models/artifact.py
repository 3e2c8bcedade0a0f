"""The model artifact: save with class names and preprocessing, metadata, kind, digest, pack and unpack."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError

METADATA_NAME = "image_transfer.json"
PREPROCESSING = ("none", "scale_0_1", "scale_-1_1", "caffe")


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned about a model before scheduling any work."""

    path: str
    kind: str  # "keras" or "savedmodel"
    height: int
    width: int
    output_width: int
    class_names: tuple[str, ...] | None
    preprocess: str = "none"
    size_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    probabilities: bool | None = None  # the outputs are probabilities (softmax/sigmoid); None: not checked

    def label(self, index: int) -> str:
        """Class name of an output index (the index itself when the model has no class names)."""
        return self.class_names[index] if self.class_names else str(index)


def model_kind(path: str | os.PathLike[str]) -> str:
    """``keras`` for a ``.keras`` file, ``savedmodel`` for a SavedModel directory; UserError otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model not found: {path}")
    if p.is_dir():
        if (p / "saved_model.pb").exists():
            return "savedmodel"
        raise UserError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
    if p.suffix == ".keras":
        if not zipfile.is_zipfile(p):
            raise UserError(f"{path} is not a valid .keras file (not a zip archive)")
        return "keras"
    raise UserError(f"unsupported model format {p.suffix or p.name!r}: use a .keras file or a SavedModel directory")


def size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata stored inside the model, or beside it as ``<path>.json``; ``{}`` when there is none."""
    p = Path(path)
    try:
        if p.is_dir() and (p / METADATA_NAME).exists():
            return json.loads((p / METADATA_NAME).read_text())
        if p.is_file() and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                if METADATA_NAME in zf.namelist():
                    return json.loads(zf.read(METADATA_NAME))
        beside = Path(str(p) + ".json")
        if beside.exists():
            return json.loads(beside.read_text())
    except (json.JSONDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"unreadable model metadata for {path}: {exc}") from exc
    return {}


def save_model(
    model: Any,
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None,
    preprocess: str = "none",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a Keras model as ``.keras`` with its class names and preprocessing inside the file.

    The file is assembled in a local temp dir and copied into place with one sequential write, then
    renamed: Volumes and DBFS FUSE mounts refuse a zip's random writes, and readers never see half a file.
    """
    p = Path(path)
    if p.suffix != ".keras":
        raise ValueError(f"model path must end in .keras: {path}")
    metadata = {"class_names": list(class_names) if class_names else None, "preprocess": preprocess}
    metadata.update(extra or {})
    p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="image-transfer-save-") as tmp:
        local = Path(tmp) / "model.keras"
        model.save(local)
        with zipfile.ZipFile(local, "a") as zf:
            zf.writestr(METADATA_NAME, json.dumps(metadata, indent=2))
        staging = p.with_name(f".{p.name}.partial")
        shutil.copyfile(local, staging)
        os.replace(staging, p)
    return p


def pack(path: str, kind: str) -> bytes:
    """The model as bytes for a broadcast: the ``.keras`` file, or a tar of the SavedModel directory."""
    if kind == "keras":
        return Path(path).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname="model")
    return buf.getvalue()


def content_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model's bytes (a SavedModel: of its files' relative paths and bytes), hex."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# The shipped-model cache: one folder per model under <tmp>/image-transfer-models, least recently used
# out past these limits. An entry used (unpacked or reused) in the last CACHE_MIN_AGE_SECONDS is never
# removed: a worker of another job may be between unpacking it and loading it.
CACHE_DIR = "image-transfer-models"
CACHE_MAX_ENTRIES = 8
CACHE_MAX_BYTES = 4 * 1024**3
CACHE_MIN_AGE_SECONDS = 15 * 60


def unpack(data: bytes, kind: str, digest: str | None = None) -> str:
    """Materialise shipped model bytes on the worker; returns the local model path.

    The model lands in ``<tmp>/image-transfer-models/<digest>`` and is reused by every worker process
    of the machine that ships the same model (written to a private dir, then renamed into place, so
    readers never see half a model). Each use marks the entry as recently used; unpacking a new one
    trims the cache (``trim_cache``).
    """
    digest = digest or hashlib.sha256(data).hexdigest()
    root = Path(tempfile.gettempdir()) / CACHE_DIR
    final = root / digest[:32]
    name = "model.keras" if kind == "keras" else "model"
    if _touch(final) and (final / name).exists():
        return str(final / name)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    try:
        if kind == "keras":
            (staging / name).write_bytes(data)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # Python < 3.11.4: refuse members that would escape the target directory
                    for member in tar.getmembers():
                        if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                            raise UserError(f"unsafe path in packed model: {member.name}")
                    tar.extractall(staging)
        try:
            os.rename(staging, final)
        except OSError:  # another worker put the same model in place first
            pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _touch(final)
    trim_cache(root, keep=final)
    return str(final / name)


def _touch(path: Path) -> bool:
    """Mark a cache entry as just used; False when it is not there."""
    try:
        os.utime(path)
        return True
    except OSError:
        return False


def trim_cache(
    root: Path,
    *,
    keep: Path | None = None,
    max_entries: int | None = None,
    max_bytes: int | None = None,
    min_age: float | None = None,
) -> list[str]:
    """Remove the least recently used models of the cache ``root`` beyond ``max_entries`` or ``max_bytes``.

    Never removes ``keep`` nor an entry used in the last ``min_age`` seconds (so the cache may stay
    over its limits for a while); leftovers of killed unpacks older than ``min_age`` go too. Returns
    the names removed. Each entry is renamed away before it is deleted, and put back if it was used
    meanwhile, so a process never sees half a model.
    """
    max_entries = CACHE_MAX_ENTRIES if max_entries is None else max_entries
    max_bytes = CACHE_MAX_BYTES if max_bytes is None else max_bytes
    min_age = CACHE_MIN_AGE_SECONDS if min_age is None else min_age
    now = time.time()
    entries: list[tuple[float, int, Path]] = []
    removed: list[str] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        try:
            mtime = child.stat().st_mtime
        except OSError:
            continue
        if child.name.startswith("."):  # a staging or trash folder: a killed unpack's leftovers
            if now - mtime > min_age:
                shutil.rmtree(child, ignore_errors=True)
            continue
        entries.append((mtime, size_on_disk(child) if child.is_dir() else 0, child))
    entries.sort(key=lambda e: e[0], reverse=True)  # most recently used first
    count, total = len(entries), sum(size for _, size, _ in entries)
    for mtime, size, entry in reversed(entries):  # least recently used first
        if count <= max_entries and total <= max_bytes:
            break
        if (keep is not None and entry == keep) or now - mtime <= min_age:
            continue
        trash = root / f".trash-{entry.name}-{os.getpid()}"
        try:
            os.rename(entry, trash)
        except OSError:
            continue  # gone already
        if time.time() - trash.stat().st_mtime <= min_age:  # used between the listing and the rename
            try:
                os.rename(trash, entry)
                continue
            except OSError:
                pass  # unpacked again meanwhile: this copy is not needed
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(entry.name)
        count, total = count - 1, total - size
    return removed
