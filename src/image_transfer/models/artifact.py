"""The model artifact: save with class names and preprocessing, metadata, kind, digest, pack and unpack."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
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
TFLITE_IDENTIFIER = b"TFL3"  # a LiteRT flatbuffer's file identifier, at bytes 4..8


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned about a model before scheduling any work."""

    path: str
    kind: str  # "keras", "savedmodel" or "tflite" (a LiteRT flatbuffer: runs on LiteRT only)
    height: int
    width: int
    output_width: int
    class_names: tuple[str, ...] | None
    preprocess: str = "none"
    size_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    probabilities: bool | None = None  # the outputs are probabilities (softmax/sigmoid); None: not checked
    pooled_from: tuple[Any, ...] | None = None  # embeddings: the feature map's shape, pooled by its global average

    def embedding_note(self) -> str:
        """How the embedding is made, when it is not a layer's own output ("" otherwise)."""
        if self.pooled_from is None:
            return ""
        return f"global average of the {self.pooled_from} feature map (as keras.applications' pooling='avg')"

    def label(self, index: int) -> str:
        """Class name of an output index (the index itself when the model has no class names)."""
        return self.class_names[index] if self.class_names else str(index)


def model_kind(path: str | os.PathLike[str]) -> str:
    """``keras`` for a ``.keras`` file, ``savedmodel`` for a SavedModel directory, ``tflite`` for a LiteRT
    flatbuffer; UserError otherwise."""
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
    if p.suffix == ".tflite":
        with open(p, "rb") as fh:
            if not is_flatbuffer(fh.read(8)):
                raise UserError(
                    f"{path} is not a LiteRT flatbuffer (no {TFLITE_IDENTIFIER.decode()} identifier at byte 4)"
                )
        return "tflite"
    raise UserError(
        f"unsupported model format {p.suffix or p.name!r}: use a .keras file, a SavedModel directory "
        "or a LiteRT .tflite file"
    )


def is_flatbuffer(head: bytes) -> bool:
    """Whether bytes (a file's first 8 at least) carry LiteRT's flatbuffer identifier."""
    return len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER


def size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata stored inside the model, or beside it as ``<path>.json`` (a ``.tflite`` file's sidecar:
    ``{"class_names": [...], "preprocess": "scale_-1_1"}``); ``{}`` when there is none."""
    p = Path(path)
    try:
        if p.is_dir() and (p / METADATA_NAME).exists():
            return json.loads((p / METADATA_NAME).read_text())
        if p.is_file() and p.suffix != ".tflite" and zipfile.is_zipfile(p):  # a flatbuffer: only beside it
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
    """The model as bytes for a broadcast: the ``.keras`` or ``.tflite`` file, or a tar of the SavedModel directory."""
    if kind in ("keras", "tflite"):
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


# The shipped-model cache: one folder per model under <tmp>/image-transfer-models-<uid> (mode 0700: no
# other user can plant or swap a model there), least recently used out past these limits. An entry
# used (unpacked or reused) in the last CACHE_MIN_AGE_SECONDS is never removed: a worker of another
# job may be between unpacking it and loading it.
CACHE_DIR = "image-transfer-models"
CACHE_MAX_ENTRIES = 8
CACHE_MAX_BYTES = 4 * 1024**3
CACHE_MIN_AGE_SECONDS = 15 * 60


def cache_root() -> Path:
    """This user's model cache folder, ``<tmp>/image-transfer-models-<uid>``, created mode 0700."""
    return private_dir(CACHE_DIR)


def private_dir(name: str) -> Path:
    """``<tmp>/<name>-<uid>``, a folder only this user can enter (created mode 0700).

    UserError when it exists but belongs to another user, or is not a real folder (a link); a folder
    of ours others can read is closed to 0700.
    """
    root = Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as exc:
        raise UserError(f"cannot create the model cache {root}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise UserError(f"the model cache {root} is not a folder of this user's: remove it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(root, 0o700)
    return root


def check_zip_members(path: str | os.PathLike[str]) -> None:
    """UserError when a ``.keras`` archive has a member that is a link or would leave its folder."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a valid .keras file: {exc}") from exc
    for member in members:
        if stat.S_ISLNK(member.external_attr >> 16):
            raise UserError(f"unsafe member in model archive {path}: {member.filename} is a link")
        _check_member_name(member.filename, str(path))


def _check_member_name(name: str, where: str) -> None:
    parts = Path(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise UserError(f"unsafe member in model archive {where}: {name} leaves its folder")


def _check_tar_members(tar: tarfile.TarFile) -> None:
    """UserError for a member that is a link, a device or FIFO, or would leave the folder."""
    for member in tar.getmembers():
        _check_member_name(member.name, "shipped model")
        if member.issym() or member.islnk():
            raise UserError(f"unsafe member in shipped model: {member.name} is a link")
        if not (member.isfile() or member.isdir()):
            raise UserError(f"unsafe member in shipped model: {member.name} is not a file or folder")


def _verified(entry: Path, name: str, digest: str) -> bool:
    """Whether a cache entry holds the model of ``digest`` (its bytes hashed again: nothing swapped it)."""
    model = entry / name
    try:
        return not model.is_symlink() and model.exists() and content_digest(model) == digest
    except OSError:
        return False


def unpack(data: bytes, kind: str, digest: str | None = None) -> str:
    """Materialise shipped model bytes on the worker; returns the local model path.

    The model lands in ``cache_root()/<digest>`` (``digest``: ``content_digest`` of the model, by
    default computed from what was shipped) and is reused by every worker process of the user on the
    machine that ships the same model, after its bytes are hashed again against the digest (a
    changed entry is unpacked anew). It is written to a private dir, then renamed into place, so
    readers never see half a model. A packed SavedModel with a link, or a member leaving its folder,
    is refused. Each use marks the entry as recently used; unpacking a new one trims the cache.
    """
    if digest is None and kind == "keras":
        digest = hashlib.sha256(data).hexdigest()
    root = cache_root()
    name = "model.keras" if kind == "keras" else "model"
    if digest is not None:
        final = root / digest[:32]
        if _verified(final, name, digest) and _touch(final):
            return str(final / name)
    staging = Path(tempfile.mkdtemp(prefix=f".{(digest or 'unpack')[:16]}-", dir=root))
    try:
        if kind == "keras":
            (staging / name).write_bytes(data)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                _check_tar_members(tar)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, filter="data")
                else:  # Python < 3.11.4: the members were checked above
                    tar.extractall(staging)
        actual = content_digest(staging / name)
        if digest is not None and actual != digest:
            raise UserError(f"the shipped model does not match its digest sha256:{digest[:12]}")
        final = root / actual[:32]
        if final.exists() and not _verified(final, name, actual):  # changed since: put aside, unpack anew
            trash = root / f".trash-{final.name}-{os.getpid()}"
            try:
                os.rename(final, trash)
            except OSError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
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
