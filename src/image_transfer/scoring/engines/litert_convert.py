"""LiteRT conversion: a model (its embedding sub-model for ``featurize``) as a flatbuffer, converted once
per network and kept in caches.

Conversions (``converted``) are kept in this process and in ``<tmp>/image-transfer-litert`` next to the
unpacked models, found by the file's digest, and for a Keras model also by the network's content
(architecture with layer names by position, and weights), so a warm run converts nothing and neither
does a re-saved copy of a network converted before (``train``'s features path embeds through the same
backbone on every run).

A shared conversion cache (``litert_cache``, ``--litert-cache``, else ``$IMAGE_TRANSFER_LITERT_CACHE``;
on a cluster a Volume folder) is looked in after the private folder and filled by each conversion,
so a cluster converts each model once. Trust: that folder is trusted as much as the model's path
(whoever may write there changes what runs, as whoever may write the model does); what is read from
it is checked first (it loads in the interpreter, with the model's input and output shapes), which
catches a damaged or wrong file, not other weights. A ``.tflite`` model is not converted: its bytes
are its flatbuffer. Finding a conversion imports no TensorFlow where ``ai_edge_litert`` is installed.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from image_transfer.errors import UserError, first_line
from image_transfer.models.artifact import private_dir
from image_transfer.scoring.engines.tensorflow import tensorflow_version

LITE_DIR = "image-transfer-litert"
LITE_KEEP = 8  # converted models kept on disk per machine (least recently used go)
SHARED_KEEP = 64  # converted models kept in a shared conversion cache (``litert_cache``)
CACHE_ENV = "IMAGE_TRANSFER_LITERT_CACHE"  # the shared conversion cache where no option names one
_CONVERTED: dict[str, tuple[bytes, str | None]] = {}  # file key: (flatbuffer, network key)
_WARNED: set[str] = set()  # warning lines already printed
_LOCK = threading.Lock()

CONVERSION = 2  # bump when what a conversion produces changes: cached flatbuffers of older rules are not reused


def _key(prepared: Any) -> str:
    return f"{prepared.digest[:32]}-{prepared.mode}-{prepared.layer or '_'}-c{CONVERSION}-tf{tensorflow_version()}"


def shared_cache(option: str | None = None) -> str | None:
    """The shared conversion cache folder: the ``litert_cache`` option, else ``$IMAGE_TRANSFER_LITERT_CACHE``."""
    return option or os.environ.get(CACHE_ENV) or None


def converted(prepared: Any, path: str | None = None) -> tuple[bytes, bool]:
    """The model's LiteRT flatbuffer and whether it was converted now (else from a cache).

    ``path`` is where the model is on this machine (default: the path the driver checked). A ``.tflite``
    model is its own flatbuffer. Conversions are looked up in this user's private folder, then in the
    shared cache (``shared_cache``), and kept in both. Raises UserError when the converter cannot
    take the model.
    """
    from image_transfer.scoring.stats import count

    if prepared.info.kind == "tflite":
        return Path(path or prepared.info.path).read_bytes(), False
    key = _key(prepared)
    with _LOCK:
        shared = _shared_root(shared_cache(prepared.compute.litert_cache))
        if key in _CONVERTED:
            data, content = _CONVERTED[key]
            if shared is not None:  # a cache named after this process converted it: kept there too
                _keep(shared, key, content, data, shared=True)
            return data, False
        roots = [private_dir(LITE_DIR)]  # per user, 0700: no other user can plant a flatbuffer
        if shared is not None:
            roots.append(shared)
        data, content = _found(roots, key, prepared)
        now = False
        if data is None:
            network = _network(prepared, path or prepared.info.path)
            content = _content_key(network)
            data, _ = _found(roots, content, prepared) if content else (None, None)
            if data is None:
                data, now = _convert(prepared, path or prepared.info.path, network), True
                count(conversions=1)
        for root in roots:  # where it is missing: the network's flatbuffer, and the file's alias to it
            _keep(root, key, content, data, shared=root is shared)
        _CONVERTED.clear()  # one converted model kept in memory
        _CONVERTED[key] = (data, content)
        return data, now


def _shared_root(folder: str | None) -> Path | None:
    """The shared cache folder, created if missing; None (with one warning) when it cannot be used."""
    if not folder:
        return None
    root = Path(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not root.is_dir():
            _warn(f"image-transfer: the LiteRT cache {root} cannot be used ({exc}); converting into this machine's")
            return None
    return root


def _warn(line: str) -> None:
    """Print a warning line on stderr, once per process."""
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr)


def _found(roots: list[Path], key: str, prepared: Any) -> tuple[bytes | None, str | None]:
    """(the flatbuffer kept under ``key`` in the first of ``roots`` that has it, the network's key it is
    kept under, if one), else (None, None).

    One read from a shared folder is checked first (it loads, and takes and gives the model's shapes):
    another user may have written it, so that folder is trusted as much as the model's own path.
    """
    for i, root in enumerate(roots):
        found = _cached(root, key)
        if found is None:
            continue
        data, name = found
        if i > 0:
            info = prepared.info
            try:
                check_flatbuffer(data, info.height, info.width, outputs=info.output_width)
            except UserError as exc:
                _warn(f"image-transfer: ignoring {name}.tflite in the LiteRT cache {root}: {exc}")
                continue
        return data, name if name.startswith("net-") else None
    return None, None


def _keep(root: Path, key: str, content: str | None, data: bytes, *, shared: bool) -> None:
    """Keep ``data`` in ``root`` where it is missing: under the network's key (else the file's), and the
    file's alias to the network's key; a shared folder that refuses is said once and left out."""
    keep = SHARED_KEEP if shared else LITE_KEEP
    try:
        if not (root / f"{content or key}.tflite").exists():
            _store(root, f"{content or key}.tflite", data, keep=keep, shared=shared)
        if content and not (root / f"{key}.alias").exists():
            _store(root, f"{key}.alias", content.encode(), keep=keep * 8, shared=shared)
    except OSError as exc:
        if not shared:
            raise
        _warn(f"image-transfer: cannot write to the LiteRT cache {root} ({exc}): kept on this machine only")


def _cached(root: Path, key: str) -> tuple[bytes, str] | None:
    """(the flatbuffer kept under ``key``, a file's or a network's, following a file's alias; the key it
    is kept under), else None."""
    alias = root / f"{key}.alias"
    try:
        if alias.exists():
            key = alias.read_text().strip()
            if not key.startswith("net-") or "/" in key:
                return None
        cached = root / f"{key}.tflite"
        data = cached.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # never kept, or gone with the least recently used
        return None
    except OSError as exc:
        _warn(f"image-transfer: cannot read the LiteRT cache {root} ({exc})")
        return None
    with contextlib.suppress(OSError):  # a read-only shared folder
        os.utime(cached)
    return data, key


def _store(root: Path, name: str, data: bytes, *, keep: int, shared: bool = False) -> None:
    """Write ``root/name`` whole (readers never see half a file); of the files with its suffix, only the
    ``keep`` most recently used stay. A shared folder's files are readable by all (others' runs read them)."""
    root.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{name}-", dir=root)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if shared:
            with contextlib.suppress(OSError):
                os.chmod(staging, 0o644)
        os.replace(staging, root / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    suffix = os.path.splitext(name)[1]
    with contextlib.suppress(OSError):  # another process trims too, or a file of another user's
        for old in sorted(root.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime)[:-keep]:
            old.unlink(missing_ok=True)


def _network(prepared: Any, path: str) -> Any | None:
    """The Keras network the conversion takes (the embedding sub-model for ``featurize``); None for a
    SavedModel (converted from its folder)."""
    from image_transfer.models.load import embedding_model, load_model

    if prepared.info.kind != "keras":
        return None
    try:
        model = load_model(path, "keras", trust=prepared.trusted)
        return embedding_model(model, prepared.layer) if prepared.mode == "embed" else model
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a file it cannot take
        raise UserError(f"the LiteRT converter cannot take the model: {first_line(exc)[:300]}") from exc


class _LayerNames:
    """A Keras 3 config with its layer names replaced by their order (``#0``, ``#1``...), where Keras puts
    them: a layer's name, ``keras_history``, ``input_layers`` and ``output_layers``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.order: dict[str, str] = {}
        self._collect(config)

    def _collect(self, cfg: dict[str, Any]) -> None:  # a model's (or a layer's) config
        layers = cfg.get("layers") or []
        for name in [cfg.get("name")] + [e.get("name") for e in layers if isinstance(e, dict)]:
            if isinstance(name, str):
                self.order.setdefault(name, f"#{len(self.order)}")
        for entry in layers:
            if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
                self._collect(entry["config"])

    def model(self, cfg: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in cfg.items():
            if k == "name" and isinstance(v, str):
                out[k] = self.order.get(v, v)
            elif k == "layers" and isinstance(v, (list, tuple)):
                out[k] = [self.entry(e) if isinstance(e, dict) else self.generic(e) for e in v]
            elif k in ("input_layers", "output_layers"):
                out[k] = _renamed(v, self.order)
            else:
                out[k] = self.generic(v)
        return out

    def entry(self, cfg: dict[str, Any]) -> dict[str, Any]:  # one of a model's layers
        out = {}
        for k, v in cfg.items():
            if k == "name" and isinstance(v, str):
                out[k] = self.order.get(v, v)
            elif k == "config" and isinstance(v, dict):
                out[k] = self.model(v)
            else:
                out[k] = self.generic(v)
        return out

    def generic(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: self.generic(v, k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):  # Keras gives tuples in places (json writes them as lists)
            return _renamed(value, self.order) if key == "keras_history" else [self.generic(v) for v in value]
        return value


def _content_key(network: Any | None) -> str | None:
    """A key of what the conversion depends on: the network's architecture, with layer names replaced
    by their order (a network built twice in one process gets ``dense`` and ``dense_1``), and its
    weights; the TensorFlow and Keras versions. None when the network has no config to read.

    Names are replaced only where Keras 3 puts them (a layer's name, ``keras_history``,
    ``input_layers`` and ``output_layers``), so a config in another form keeps its names and misses.
    """
    import hashlib
    import json

    import keras
    import numpy as np
    import tensorflow as tf

    if network is None:
        return None
    try:
        config = network.get_config()
    except Exception:  # noqa: BLE001 - a subclassed model without get_config: keyed by its file only
        return None
    renamer = _LayerNames(config)
    digest = hashlib.sha256(json.dumps(renamer.model(config), sort_keys=True, default=str).encode())
    for weight in network.weights:
        array = np.asarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return f"net-{digest.hexdigest()[:32]}-c{CONVERSION}-tf{tf.__version__}-k{keras.__version__}"


def _renamed(value: Any, order: dict[str, str]) -> Any:
    """A layer reference (``[name, node, tensor]``, possibly nested) with its name by position."""
    if isinstance(value, (list, tuple)):
        return [_renamed(v, order) for v in value]
    return order.get(value, value) if isinstance(value, str) else value


def _convert(prepared: Any, path: str, network: Any | None) -> bytes:
    """The flatbuffer of a SavedModel folder at ``path``, or of the Keras ``network`` (``_network``)."""
    import tensorflow as tf

    info = prepared.info
    quiet = contextlib.redirect_stdout(io.StringIO())  # export prints the signature
    try:
        if info.kind != "keras":
            _refuse_runtime_checks(path)
            data = tf.lite.TFLiteConverter.from_saved_model(path).convert()
        else:
            with tempfile.TemporaryDirectory(prefix="image-transfer-export-") as folder, quiet:
                network.export(folder)
                _refuse_runtime_checks(folder)
                data = tf.lite.TFLiteConverter.from_saved_model(folder).convert()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise UserError(f"the LiteRT converter cannot take the model: {first_line(exc)[:300]}") from exc
    check_flatbuffer(bytes(data), info.height, info.width)
    return bytes(data)


RUNTIME_CHECKS = frozenset({"Assert", "CheckNumerics", "CheckNumericsV2"})  # ops the converter drops


def _refuse_runtime_checks(saved_model: str) -> None:
    """UserError when the SavedModel's serving function has runtime checks (``tf.debugging.assert_*``,
    ``check_numerics``): the converter drops them, so LiteRT would score inputs the model refuses."""
    import tensorflow as tf

    fn = tf.saved_model.load(saved_model).signatures["serving_default"]
    graph = fn.graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    found = sorted(ops & RUNTIME_CHECKS)
    if found:
        raise UserError(f"the model has runtime checks ({', '.join(found)}) that LiteRT would drop")


def check_flatbuffer(data: bytes, height: int, width: int, outputs: int | None = None) -> None:
    """UserError unless the flatbuffer loads and has one float image input of ``height`` x ``width`` and
    one output (of ``outputs`` values per image, when given)."""
    from image_transfer.models import lite

    what = "the converted model"
    in_shape, out_shape = lite.io_shapes(lite.load_interpreter(data, what), what)
    if list(in_shape[1:]) != [height, width, 3]:
        raise UserError(f"{what} takes {list(in_shape)}, not images of {height}x{width}x3")
    if outputs is not None and (len(out_shape) != 2 or out_shape[1] != outputs):
        raise UserError(f"{what} gives {list(out_shape)}, not {outputs} values per image")
