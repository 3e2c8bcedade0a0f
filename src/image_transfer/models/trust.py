"""Model trust: a ``.keras`` config that names code outside Keras is refused before anything imports it.

Loading a Keras model imports every module its ``config.json`` names (a custom layer's), and Keras
releases before 3.11 could be made to call functions of their own through the config (CVE-2025-1550,
CVE-2025-8747, CVE-2025-9906). ``untrusted_code`` reads the config as JSON, imports nothing, and says
what in it would run code; ``check_keras_trust`` turns that into a UserError (exit 2) unless the user
trusts the model (``--trust-model-code``, ``trust_model_code=True``). A trusted model's modules are
imported here, so Keras finds its registered layers (Keras >= 3.9 no longer imports them itself).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
import zipfile
from typing import Any

from image_transfer.errors import UserError

TRUST_FLAG = "--trust-model-code"
# Keras releases with the published safe-mode fixes (CVE-2025-1550: 3.9; CVE-2025-8747, CVE-2025-9906: 3.11).
FIXED_KERAS = (3, 11)
# Functions a config may name (as ``{"class_name": "function", ...}``): activations only.
_FUNCTION_MODULES = ("keras.activations", "keras.src.activations")
# Keras callables a config must never name: they turn safe mode off, fetch files, or load other code.
_FORBIDDEN = (
    "enable_unsafe_deserialization",
    "get_file",
    "load_model",
    "load_weights",
    "deserialize_keras_object",
    "TFSMLayer",
)
_WARNED: list[bool] = []


def _module_ok(module: Any) -> bool:
    return module is None or module == "keras" or (isinstance(module, str) and module.startswith("keras."))


def _layer_of(path: list[str]) -> str:
    return path[-1] if path else "the model"


def _object_problem(class_name: Any, module: Any, registered: Any, config: Any) -> str | None:
    """What a serialized object (``class_name``, ``module``, ...) would run that is not Keras's own, else None."""
    if not _module_ok(module):
        return f"module {module!r}"
    if class_name in _FORBIDDEN or (isinstance(config, str) and config in _FORBIDDEN):
        return f"{module or 'keras'}.{config if isinstance(config, str) else class_name}"
    if class_name == "__lambda__":
        return "Python code (a Lambda layer), which Keras safe mode does not run"
    if class_name == "function":
        if not (isinstance(module, str) and module.startswith(_FUNCTION_MODULES)):
            return f"function {module}.{config}"
    elif registered not in (None, class_name):
        return f"registered class {registered!r}"
    return None


def _find(value: Any, layer: str) -> tuple[str, str] | None:
    """(layer, what) of the first thing in a config that would run code not Keras's own, else None."""
    if isinstance(value, list):
        for item in value:
            found = _find(item, layer)
            if found:
                return found
        return None
    if not isinstance(value, dict):
        if isinstance(value, str) and "." in value and value.rsplit(".", 1)[1] in _FORBIDDEN:
            return layer, f"names {value!r}"  # a dotted name, e.g. keras.config.enable_unsafe_deserialization
        return None
    class_name, module, registered = value.get("class_name"), value.get("module"), value.get("registered_name")
    config = value.get("config")
    name = config.get("name") if isinstance(config, dict) and isinstance(config.get("name"), str) else None
    here = f"{name} ({class_name})" if name and isinstance(class_name, str) else layer
    if "module" in value or "class_name" in value:
        what = _object_problem(class_name, module, registered, config)
        if what:
            return here, what
    for key, item in value.items():
        if key in ("module", "class_name", "registered_name"):
            continue
        found = _find(item, here)
        if found:
            return found
    return None


def _config(path: str | os.PathLike[str]) -> Any:
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read("config.json"))
    except KeyError:
        raise UserError(f"{path} is not a valid .keras file: it has no config.json") from None
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid .keras file: {exc}") from exc


def untrusted_code(path: str | os.PathLike[str]) -> str | None:
    """What in a ``.keras`` config would run code outside Keras (``layer s (Scale): module 'x'``), or None.

    Every ``module`` must be Keras's own (``keras``, ``keras.*``), every ``registered_name`` a Keras
    builtin's (the class name), functions only Keras activations, and nothing may name the Keras
    callables the known safe-mode bypasses use. Reads JSON only: imports nothing.
    """
    found = _find(_config(path), "the model")
    return f"layer {found[0]}: {found[1]}" if found else None


def named_modules(path: str | os.PathLike[str]) -> list[str]:
    """The modules outside Keras a ``.keras`` config names, sorted."""
    modules: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            module = value.get("module")
            if isinstance(module, str) and not _module_ok(module):
                modules.add(module)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(_config(path))
    return sorted(modules)


def check_keras_trust(path: str | os.PathLike[str], trust: bool) -> None:
    """UserError (one line, naming the layer and what it names) for a model that would run outside code, unless trusted.

    With ``trust`` the modules the config names are imported (the user said so), so their registered
    layers are there when Keras looks them up.
    """
    if trust:
        for module in named_modules(path):
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - the model's own code failed to import
                raise UserError(f"cannot import {module!r}, which the model {path} names: {exc}") from exc
        return
    found = untrusted_code(path)
    if found is not None and "Lambda layer" in found:
        raise UserError(f"refused to load {path}: {found}; rebuild the model without it")
    if found is not None:
        raise UserError(
            f"refused to load {path}: {found}; a model is code: pass {TRUST_FLAG} "
            "(trust_model_code=True) only for a model you trust"
        )


def keras_fixed(version: str) -> bool:
    """Whether a Keras version has the published safe-mode fixes (``FIXED_KERAS``)."""
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return parts >= FIXED_KERAS


def warn_unfixed_keras() -> None:
    """Warn once per process when the installed Keras predates the safe-mode fixes: the config scan is the guard."""
    if _WARNED:
        return
    _WARNED.append(True)
    try:
        from importlib.metadata import version

        installed = version("keras")
    except Exception:  # noqa: BLE001 - no distribution metadata: nothing to say
        return
    if not keras_fixed(installed):
        warnings.warn(
            f"Keras {installed} predates the safe-mode fixes of Keras 3.11 (CVE-2025-1550, CVE-2025-8747, "
            "CVE-2025-9906); image-transfer loads untrusted .keras models only when its own config check passes",
            stacklevel=2,
        )
