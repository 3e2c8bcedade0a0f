"""Databricks workspace helpers: the ``preflight`` checks and job task values.

Both use databricks-sdk (the ``workspace`` extra, preinstalled on Databricks Runtime), imported
lazily so the rest of the package works without it. Secrets (tokens) are never printed.
"""

from __future__ import annotations

import configparser
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from image_transfer.errors import UserError
from image_transfer.runtime import on_databricks

if TYPE_CHECKING:
    from databricks.sdk import WorkspaceClient

DEFAULT_SPARK_VERSION = "15.4.x-gpu-ml-scala2.12"
DEFAULT_TIMEOUT_SECONDS = 10.0

_VOLUME_NAME = re.compile(r"^[^./\s]+\.[^./\s]+\.[^./\s]+$")


@dataclass(frozen=True)
class Check:
    """One preflight check: what was checked, whether it passed, and why."""

    name: str
    ok: bool
    detail: str


def _sdk() -> Any:
    try:
        import databricks.sdk as sdk
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise UserError(
            "databricks-sdk is not installed; install the wheel with the `workspace` extra: "
            "pip install 'image-transfer[workspace]'"
        ) from exc
    return sdk


def _quiet_sdk_logs() -> None:
    # The SDK warns on stderr (through logging's last-resort handler) when the optional host
    # metadata probe fails; a NullHandler keeps that out of the table unless logging is configured.
    logger = logging.getLogger("databricks.sdk")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def _profile_host(profile: str | None) -> str | None:
    path = os.path.expanduser(os.environ.get("DATABRICKS_CONFIG_FILE") or "~/.databrickscfg")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error:
        return None
    section = profile or "DEFAULT"
    if section != "DEFAULT" and not parser.has_section(section):
        return None
    return parser.get(section, "host", fallback=None)


def _split_host(host: str) -> tuple[str, str, int]:
    """(scheme, hostname, port) of a workspace URL; UserError if it is not one."""
    parts = urlsplit(host if "://" in host else f"https://{host}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.scheme not in ("http", "https"):
        # The value itself is not echoed: it may be a mistyped secret.
        raise UserError("the workspace host is not a URL like https://<workspace>.cloud.databricks.com")
    return parts.scheme, parts.hostname, port or (80 if parts.scheme == "http" else 443)


def _display_host(host: str) -> str:
    """``scheme://hostname:port`` only: never user info, paths or query strings."""
    scheme, hostname, port = _split_host(host)
    return f"{scheme}://{hostname}:{port}"


def probe(host: str, timeout: float) -> None:
    """Open (and close) one TCP connection to ``host``; raise :class:`UserError` if that fails.

    One attempt with ``timeout``: the SDK would retry a refused connection for its whole retry budget.
    """
    _, hostname, port = _split_host(host)
    shown = _display_host(host)
    try:
        with socket.create_connection((hostname, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise UserError(f"cannot reach the workspace {shown}: unknown host ({exc.strerror})") from None
    except TimeoutError:
        raise UserError(f"cannot reach the workspace {shown}: no answer within {timeout:g}s") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot reach the workspace {shown}: {reason.lower()}") from None


def connect(
    *,
    profile: str | None = None,
    host: str | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> WorkspaceClient:
    """A ``WorkspaceClient`` from a profile, host/token or the SDK's usual environment.

    The host is probed first and every request is bounded by ``timeout`` seconds (HTTP timeout
    and SDK retry budget), so an unreachable workspace fails in seconds with a clear message.
    """
    target = host or (None if profile else os.environ.get("DATABRICKS_HOST")) or _profile_host(profile)
    if target:
        probe(target, timeout)  # before importing the SDK, which alone takes seconds
    sdk = _sdk()
    _quiet_sdk_logs()
    options: dict[str, Any] = {
        "retry_timeout_seconds": max(1, math.ceil(timeout)),
        "http_timeout_seconds": timeout,
    }
    if profile:
        options["profile"] = profile
    if host:
        options["host"] = host
    if token:
        options["token"] = token
    try:
        config = sdk.config.Config(**options)
    except ValueError as exc:
        # The SDK's message names the settings it saw with secrets masked (token=***).
        raise UserError(f"cannot configure the Databricks client: {exc}") from None
    if config.host and (not target or _display_host(config.host) != _display_host(target)):
        probe(config.host, timeout)  # the SDK settled on another host (e.g. DATABRICKS_HOST over a profile)
    return sdk.WorkspaceClient(config=config)


def _failure(exc: Exception) -> str:
    from databricks.sdk.errors import DatabricksError, NotFound, PermissionDenied, Unauthenticated

    if isinstance(exc, NotFound):
        return "not found"
    if isinstance(exc, Unauthenticated):
        return f"not authenticated: {exc}"
    if isinstance(exc, PermissionDenied):
        return f"permission denied: {exc}"
    if isinstance(exc, DatabricksError):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return f"no answer in time ({exc})"
    return f"{type(exc).__name__}: {exc}"


def check_identity(client: WorkspaceClient) -> Check:
    """The credentials work: who the checks run as."""
    try:
        me = client.current_user.me()
    except Exception as exc:  # every failure is a failed check
        return Check("workspace", False, f"{_display_host(client.config.host)}: {_failure(exc)}")
    who = me.user_name or me.display_name or me.id or "?"
    return Check("workspace", True, f"{_display_host(client.config.host)} as {who}")


def _is_gpu_ml(key: str) -> bool:
    return "-gpu-ml-" in key


def _version_order(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", key.split("-")[0]))


def check_spark_version(client: WorkspaceClient, spark_version: str) -> Check:
    """``spark_version`` is offered by the workspace and is a GPU ML runtime."""
    name = "spark_version"
    try:
        versions = {v.key: v.name or "" for v in client.clusters.spark_versions().versions or [] if v.key}
    except Exception as exc:
        return Check(name, False, f"cannot list runtimes: {_failure(exc)}")
    gpu_ml = sorted((k for k in versions if _is_gpu_ml(k)), key=_version_order, reverse=True)
    if spark_version not in versions:
        offered = ", ".join(gpu_ml[:4]) or "none"
        return Check(name, False, f"{spark_version} is not offered here; GPU ML runtimes: {offered}")
    if not _is_gpu_ml(spark_version):
        return Check(
            name,
            False,
            f"{spark_version} ({versions[spark_version]}) is not a GPU ML runtime; "
            f"use one of: {', '.join(gpu_ml[:4]) or 'none offered'}",
        )
    return Check(name, True, f"{spark_version} ({versions[spark_version]})")


def _describe_node(node: Any) -> str:
    gib = (node.memory_mb or 0) / 1024
    extra = ", deprecated" if node.is_deprecated else ""
    return f"{node.num_gpus or 0} GPU, {node.num_cores or 0:g} cores, {gib:.0f} GiB{extra}"


def check_node_type(client: WorkspaceClient, node_type_id: str | None) -> Check:
    """``node_type_id`` exists and has GPUs (or, when not given, the workspace offers a GPU type)."""
    name = "node_type_id"
    try:
        nodes = list(client.clusters.list_node_types().node_types or [])
    except Exception as exc:
        return Check(name, False, f"cannot list node types: {_failure(exc)}")
    gpu = [n for n in nodes if (n.num_gpus or 0) > 0 and not n.is_hidden]
    gpu.sort(key=lambda n: (bool(n.is_deprecated), n.num_gpus or 0, n.memory_mb or 0, n.node_type_id))
    offered = ", ".join(n.node_type_id for n in gpu[:6]) or "none"
    if not node_type_id:
        if gpu:
            return Check(name, True, f"none given; GPU node types offered here: {offered}")
        return Check(name, False, "none given, and this workspace offers no GPU node type")
    node = next((n for n in nodes if n.node_type_id == node_type_id), None)
    if node is None:
        return Check(name, False, f"{node_type_id} is not offered here; GPU node types: {offered}")
    if not node.num_gpus:
        return Check(name, False, f"{node_type_id} has no GPU ({_describe_node(node)}); GPU node types: {offered}")
    return Check(name, True, f"{node_type_id}: {_describe_node(node)}")


def _read_volume(client: WorkspaceClient, full_name: str) -> tuple[bool, str]:
    from databricks.sdk.errors import NotFound

    try:
        info = client.volumes.read(full_name)
    except NotFound:
        return False, f"volume {full_name} not found"
    except Exception as exc:
        return False, f"volume {full_name}: {_failure(exc)}"
    kind = getattr(info.volume_type, "value", None) or "volume"
    return True, f"volume {info.full_name or full_name} ({kind.lower()})"


def check_path(client: WorkspaceClient, path: str) -> Check:
    """A volume (``catalog.schema.volume``) or a ``/Volumes/...`` folder or file exists."""
    from databricks.sdk.errors import NotFound

    name = f"path {path}"
    if _VOLUME_NAME.match(path):
        ok, detail = _read_volume(client, path)
        return Check(name, ok, detail)
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/Volumes/") or len(parts) < 4:
        return Check(name, False, "give /Volumes/<catalog>/<schema>/<volume>[/...] or <catalog>.<schema>.<volume>")
    volume = ".".join(parts[1:4])
    if len(parts) == 4:
        ok, detail = _read_volume(client, volume)
        return Check(name, ok, detail)
    clean = "/" + "/".join(parts)
    for lookup, found in (
        (client.files.get_directory_metadata, "folder exists"),
        (client.files.get_metadata, "file exists"),
    ):
        try:
            lookup(clean)
            return Check(name, True, found)
        except NotFound:
            continue
        except Exception as exc:
            return Check(name, False, _failure(exc))
    ok, detail = _read_volume(client, volume)
    if ok:
        return Check(name, False, f"not found in {detail}; create it: databricks fs mkdir dbfs:{clean}")
    return Check(name, False, detail)


def preflight(
    client: WorkspaceClient,
    *,
    spark_version: str = DEFAULT_SPARK_VERSION,
    node_type_id: str | None = None,
    paths: Iterable[str] = (),
) -> list[Check]:
    """Every check, in order; after failed credentials the rest are reported as skipped."""
    identity = check_identity(client)
    names = ["spark_version", "node_type_id"] + [f"path {p}" for p in paths]
    if not identity.ok:
        return [identity] + [Check(n, False, "skipped: the workspace check failed") for n in names]
    checks = [identity, check_spark_version(client, spark_version), check_node_type(client, node_type_id)]
    checks += [check_path(client, p) for p in paths]
    return checks


def render_table(checks: Sequence[Check]) -> str:
    """A fixed-width CHECK / RESULT / DETAIL table and a closing verdict line."""
    width = max([len("CHECK")] + [len(c.name) for c in checks])
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    if failed:
        lines.append(f"preflight: FAILED, {failed} of {len(checks)} checks failed")
    else:
        lines.append(f"preflight: ok, {len(checks)} checks passed")
    return "\n".join(lines)


def _runtime_dbutils() -> Any | None:
    """The cluster's dbutils through the SDK runtime module, or None (with a warning) if unavailable."""
    try:
        from databricks.sdk import runtime
    except Exception as exc:  # ImportError, or the SDK's remote fallback failing to configure itself
        print(f"image-transfer: warning: no Databricks runtime dbutils ({exc}); task values are off", file=sys.stderr)
        return None
    if getattr(runtime, "is_local_implementation", False):
        # Outside a real runtime the SDK substitutes a remote stand-in whose task values do nothing.
        print("image-transfer: warning: not in a Databricks runtime; task values are off", file=sys.stderr)
        return None
    return runtime.dbutils


def set_task_value(key: str, value: Any) -> bool:
    """Publish ``key`` to later tasks of the job run (``{{tasks.<task>.values.<key>}}``).

    Returns True when set; off Databricks it does nothing and returns False. ``value`` must be JSON.
    """
    json.dumps(value)  # task values are JSON: fail here, not in the job service
    if not on_databricks():
        return False
    dbutils = _runtime_dbutils()
    if dbutils is None:
        return False
    dbutils.jobs.taskValues.set(key=key, value=value)
    return True


def get_task_value(task_key: str, key: str, default: Any = None) -> Any:
    """The value ``task_key`` set for ``key`` in this job run; ``default`` off Databricks."""
    if not on_databricks():
        return default
    dbutils = _runtime_dbutils()
    if dbutils is None:
        return default
    return dbutils.jobs.taskValues.get(taskKey=task_key, key=key, default=default, debugValue=default)
