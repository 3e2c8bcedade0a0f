"""``image-transfer preflight`` and task values against the real databricks-sdk.

The SDK talks HTTP to a loopback ``ThreadingHTTPServer`` that serves the few REST endpoints the
checks call; nothing of the SDK is mocked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("databricks.sdk")

from image_transfer.errors import UserError  # noqa: E402
from image_transfer.jobs import cli, workspace  # noqa: E402

TOKEN = "dapi-test-0123456789abcdef-SECRET"
GPU_ML = "15.4.x-gpu-ml-scala2.12"

SPARK_VERSIONS = [
    {"key": "15.4.x-scala2.12", "name": "15.4 LTS (includes Apache Spark 3.5.0, Scala 2.12)"},
    {"key": "15.4.x-cpu-ml-scala2.12", "name": "15.4 LTS ML (includes Apache Spark 3.5.0, Scala 2.12)"},
    {"key": GPU_ML, "name": "15.4 LTS ML (includes Apache Spark 3.5.0, GPU, Scala 2.12)"},
    {"key": "14.3.x-gpu-ml-scala2.12", "name": "14.3 LTS ML (includes Apache Spark 3.5.0, GPU, Scala 2.12)"},
]


def _node(node_type_id, gpus, cores, memory_mb, **extra):
    node = {
        "node_type_id": node_type_id,
        "instance_type_id": node_type_id,
        "memory_mb": memory_mb,
        "num_cores": cores,
        "num_gpus": gpus,
        "description": node_type_id,
        "category": "GPU Accelerated" if gpus else "General Purpose",
    }
    node.update(extra)
    return node


NODE_TYPES = [
    _node("m5.xlarge", 0, 4.0, 16384),
    _node("g4dn.xlarge", 1, 4.0, 16384),
    _node("g5.xlarge", 1, 4.0, 16384),
    _node("p2.xlarge", 1, 4.0, 62464, is_deprecated=True),
]

VOLUMES = {"main.image_transfer.data"}
FOLDERS = {"/Volumes/main/image_transfer/data/images", "/Volumes/main/image_transfer/data/models"}
FILES = {"/Volumes/main/image_transfer/data/models/image_classifier.keras"}


class FakeWorkspace(BaseHTTPRequestHandler):
    """The REST endpoints the preflight uses, answering as a workspace does (JSON errors, 404s)."""

    seen: list[tuple[str, str, str]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, what):
        self._send(404, {"error_code": "NOT_FOUND", "message": f"{what} does not exist."})

    def _route(self):
        path = unquote(urlsplit(self.path).path)
        type(self).seen.append((self.command, path, self.headers.get("Authorization", "")))
        if path == "/.well-known/databricks-config":
            return self._not_found("Resource")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, {"error_code": "UNAUTHENTICATED", "message": "Invalid access token."})
        if path == "/api/2.0/preview/scim/v2/Me":
            return self._send(200, {"id": "42", "userName": "someone@example.com"})
        if path == "/api/2.1/clusters/spark-versions":
            return self._send(200, {"versions": SPARK_VERSIONS})
        if path == "/api/2.1/clusters/list-node-types":
            return self._send(200, {"node_types": NODE_TYPES})
        prefix = "/api/2.1/unity-catalog/volumes/"
        if path.startswith(prefix):
            name = path[len(prefix) :]
            if name in VOLUMES:
                catalog, schema, volume = name.split(".")
                return self._send(
                    200,
                    {
                        "full_name": name,
                        "catalog_name": catalog,
                        "schema_name": schema,
                        "name": volume,
                        "volume_type": "MANAGED",
                    },
                )
            return self._not_found(f"Volume '{name}'")
        if path.startswith("/api/2.0/fs/directories/"):
            found = path[len("/api/2.0/fs/directories") :] in FOLDERS
            return self._send(200) if found else self._send(404)
        if path.startswith("/api/2.0/fs/files/"):
            found = path[len("/api/2.0/fs/files") :] in FILES
            return self._send(200) if found else self._send(404)
        return self._not_found(path)

    do_GET = _route
    do_HEAD = _route


@pytest.fixture
def server():
    FakeWorkspace.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeWorkspace)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ambient Databricks configuration: no env credentials, no ~/.databrickscfg."""
    for name in list(os.environ):
        if name.startswith(("DATABRICKS_", "ARM_", "GOOGLE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "databrickscfg"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight(argv, capsys):
    code = cli.run(["preflight", *argv])
    out, err = capsys.readouterr()
    return code, out, err


PASSING = [
    "--spark-version", GPU_ML,
    "--node-type-id", "g4dn.xlarge",
    "--path", "main.image_transfer.data",
    "--path", "/Volumes/main/image_transfer/data/images",
    "--path", "/Volumes/main/image_transfer/data/models/image_classifier.keras",
    "--timeout", "5",
]  # fmt: skip


def rows(out):
    """CHECK -> (RESULT, DETAIL), read by the columns of the header line."""
    lines = out.splitlines()
    at = lines[0].index("RESULT")
    return {
        line[:at].strip(): (line[at : at + 6].strip(), line[at + 8 :])
        for line in lines[1:]
        if not line.startswith("preflight:")
    }


def test_all_checks_pass_with_host_and_token(server, capsys):
    code, out, err = preflight(["--host", server, "--token", TOKEN, *PASSING], capsys)
    assert code == 0, out + err
    table = rows(out)
    assert list(table) == [
        "workspace",
        "spark_version",
        "node_type_id",
        "path main.image_transfer.data",
        "path /Volumes/main/image_transfer/data/images",
        "path /Volumes/main/image_transfer/data/models/image_classifier.keras",
    ]
    assert all(result == "PASS" for result, _ in table.values())
    assert table["workspace"][1].endswith("as someone@example.com")
    assert "GPU" in table["spark_version"][1]
    assert table["node_type_id"][1].startswith("g4dn.xlarge: 1 GPU, 4 cores, 16 GiB")
    assert table["path /Volumes/main/image_transfer/data/images"][1] == "folder exists"
    assert table["path /Volumes/main/image_transfer/data/models/image_classifier.keras"][1] == "file exists"
    assert out.splitlines()[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert out.rstrip().endswith("preflight: ok, 6 checks passed")
    assert TOKEN not in out + err
    # The SDK really called the workspace, with the token, on the endpoints the checks use.
    called = {(method, path) for method, path, _ in FakeWorkspace.seen}
    assert ("GET", "/api/2.1/clusters/spark-versions") in called
    assert ("GET", "/api/2.1/clusters/list-node-types") in called
    assert ("GET", "/api/2.1/unity-catalog/volumes/main.image_transfer.data") in called
    assert ("HEAD", "/api/2.0/fs/directories/Volumes/main/image_transfer/data/images") in called
    assert any(auth == f"Bearer {TOKEN}" for _, path, auth in FakeWorkspace.seen if path.startswith("/api/"))


def test_token_and_host_from_environment(server, capsys, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", server)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    code, out, err = preflight(PASSING, capsys)
    assert code == 0, out + err
    assert TOKEN not in out + err


def test_profile_from_config_file(server, capsys, tmp_path):
    (tmp_path / "databrickscfg").write_text(f"[gpu-ws]\nhost = {server}\ntoken = {TOKEN}\n")
    code, out, err = preflight(["--profile", "gpu-ws", *PASSING], capsys)
    assert code == 0, out + err
    assert TOKEN not in out + err


def test_failures_are_reported_and_exit_non_zero(server, capsys):
    argv = [
        "--host", server, "--token", TOKEN,
        "--spark-version", "15.4.x-cpu-ml-scala2.12",
        "--node-type-id", "m5.xlarge",
        "--path", "main.image_transfer.missing",
        "--path", "/Volumes/main/image_transfer/data/predictions",
        "--path", "/dbfs/tmp/images",
        "--timeout", "5",
    ]  # fmt: skip
    code, out, err = preflight(argv, capsys)
    assert code == 1
    table = rows(out)
    assert table["workspace"][0] == "PASS"
    result, detail = table["spark_version"]
    assert result == "FAIL" and "not a GPU ML runtime" in detail and GPU_ML in detail
    result, detail = table["node_type_id"]
    assert result == "FAIL" and "has no GPU" in detail and "g4dn.xlarge" in detail
    assert table["path main.image_transfer.missing"] == ("FAIL", "volume main.image_transfer.missing not found")
    result, detail = table["path /Volumes/main/image_transfer/data/predictions"]
    assert result == "FAIL" and "not found in volume main.image_transfer.data" in detail
    assert "databricks fs mkdir dbfs:/Volumes/main/image_transfer/data/predictions" in detail
    assert table["path /dbfs/tmp/images"][0] == "FAIL"
    assert out.rstrip().endswith("preflight: FAILED, 5 of 6 checks failed")
    assert TOKEN not in out + err


def test_unknown_runtime_and_node_type_suggest_what_exists(server, capsys):
    argv = ["--host", server, "--token", TOKEN, "--spark-version", "99.9.x-gpu-ml-scala2.12",
            "--node-type-id", "Standard_NC4as_T4_v3", "--timeout", "5"]  # fmt: skip
    code, out, _ = preflight(argv, capsys)
    assert code == 1
    table = rows(out)
    assert table["spark_version"][0] == "FAIL"
    # newest GPU ML runtime first
    assert f"GPU ML runtimes: {GPU_ML}, 14.3.x-gpu-ml-scala2.12" in table["spark_version"][1]
    assert table["node_type_id"][0] == "FAIL"
    assert "not offered here" in table["node_type_id"][1] and "g4dn.xlarge" in table["node_type_id"][1]
    assert "m5.xlarge" not in table["node_type_id"][1]


def test_no_node_type_given_lists_gpu_types(server, capsys):
    code, out, _ = preflight(["--host", server, "--token", TOKEN, "--timeout", "5"], capsys)
    assert code == 0
    result, detail = rows(out)["node_type_id"]
    assert result == "PASS"
    assert detail.startswith("none given; GPU node types offered here: g4dn.xlarge, g5.xlarge")
    assert detail.endswith("p2.xlarge")  # deprecated types last


def test_bad_token_fails_every_check_without_printing_it(server, capsys):
    wrong = "dapi-wrong-token-SECRET-0000"
    code, out, err = preflight(["--host", server, "--token", wrong, *PASSING], capsys)
    assert code == 1
    table = rows(out)
    assert table["workspace"][0] == "FAIL" and "not authenticated" in table["workspace"][1]
    assert all(result == "FAIL" for result, _ in table.values())
    assert table["spark_version"][1].startswith("skipped")
    assert wrong not in out + err


def test_unreachable_host_fails_fast_with_clear_message(capsys):
    port = closed_port()
    start = time.monotonic()
    code, out, err = preflight(["--host", f"http://127.0.0.1:{port}", "--token", TOKEN, "--timeout", "3"], capsys)
    elapsed = time.monotonic() - start
    assert code == 2
    assert elapsed < 3, f"took {elapsed:.1f}s"
    assert f"cannot reach the workspace http://127.0.0.1:{port}: connection refused" in err
    assert out == ""
    assert TOKEN not in out + err


def test_unreachable_profile_host_fails_fast(capsys, tmp_path):
    port = closed_port()
    (tmp_path / "databrickscfg").write_text(f"[DEFAULT]\nhost = http://127.0.0.1:{port}\ntoken = {TOKEN}\n")
    start = time.monotonic()
    code, _, err = preflight(["--timeout", "3"], capsys)
    assert code == 2
    assert time.monotonic() - start < 3
    assert "cannot reach the workspace" in err and TOKEN not in err


def test_missing_configuration_is_a_clear_error(capsys):
    code, out, err = preflight(["--timeout", "2"], capsys)
    assert code == 2
    assert "cannot configure the Databricks client" in err


def test_connect_bounds_sdk_retries(server):
    client = workspace.connect(host=server, token=TOKEN, timeout=2.5)
    assert client.config.retry_timeout_seconds == 3
    assert client.config.http_timeout_seconds == 2.5


@pytest.mark.parametrize("host", ["https://", "https://host:secret@", "ftp://host.example"])
def test_probe_rejects_non_url_without_echoing_it(host):
    with pytest.raises(UserError, match="not a URL like https://<workspace>") as info:
        workspace.probe(host, 1)
    rest = host.split("://")[1]
    assert not rest or rest not in str(info.value)


def test_render_table_aligns_columns():
    checks = [workspace.Check("a", True, "fine"), workspace.Check("longer name", False, "broken")]
    lines = workspace.render_table(checks).splitlines()
    assert lines[0] == "CHECK        RESULT  DETAIL"
    assert lines[1] == "a            PASS    fine"
    assert lines[2] == "longer name  FAIL    broken"
    assert lines[3] == "preflight: FAILED, 1 of 2 checks failed"


def test_task_values_are_no_ops_off_databricks(monkeypatch):
    monkeypatch.delenv("DATABRICKS_RUNTIME_VERSION", raising=False)
    assert workspace.set_task_value("model_path", "/Volumes/a/b/c/m.keras") is False
    assert workspace.get_task_value("train", "model_path", "fallback") == "fallback"
    with pytest.raises(TypeError):
        workspace.set_task_value("bad", object())  # not JSON, refused everywhere


FAKE_DBRUNTIME = """
class _TaskValues:
    # The signatures of dbutils.jobs.taskValues on a cluster.
    def __init__(self):
        self.store = {}

    def set(self, key, value):
        self.store[key] = value

    def get(self, taskKey, key, default=None, debugValue=None):
        return self.store.get((taskKey, key), self.store.get(key, default))


class _Jobs:
    taskValues = _TaskValues()


class _DbUtils:
    jobs = _Jobs()


class UserNamespaceInitializer:
    @classmethod
    def getOrCreate(cls):
        return cls()

    def get_namespace_globals(self):
        return {"dbutils": _DbUtils()}
"""

TASK_VALUES_SCRIPT = """
import json
from image_transfer.jobs import workspace
assert workspace.on_databricks()
was_set = workspace.set_task_value("model_path", "/Volumes/a/b/c/m.keras")
print(json.dumps([was_set, workspace.get_task_value("train", "model_path", "/fallback.keras")]))
"""


def run_on_fake_cluster(tmp_path, *, with_runtime, server=None):
    """A fresh interpreter with DATABRICKS_RUNTIME_VERSION set, and optionally the cluster's
    ``dbruntime`` module (the stand-in above), which the SDK's ``databricks.sdk.runtime`` imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
    env.update(DATABRICKS_RUNTIME_VERSION="15.4", HOME=str(tmp_path), DATABRICKS_CONFIG_FILE=str(tmp_path / "none"))
    if with_runtime:
        (tmp_path / "dbruntime").mkdir()
        (tmp_path / "dbruntime" / "__init__.py").write_text(FAKE_DBRUNTIME)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    if server:
        env.update(DATABRICKS_HOST=server, DATABRICKS_TOKEN=TOKEN)
    done = subprocess.run(
        [sys.executable, "-c", TASK_VALUES_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_task_values_go_through_the_runtime_dbutils(tmp_path):
    (was_set, value), _ = run_on_fake_cluster(tmp_path, with_runtime=True)
    assert was_set is True
    assert value == "/Volumes/a/b/c/m.keras"


def test_task_values_warn_when_the_runtime_dbutils_is_missing(server, tmp_path):
    # DATABRICKS_RUNTIME_VERSION without a runtime: the SDK falls back to its remote dbutils,
    # whose task values do nothing; say so instead of pretending the value was handed on.
    (was_set, value), err = run_on_fake_cluster(tmp_path, with_runtime=False, server=server)
    assert was_set is False
    assert value == "/fallback.keras"
    assert "task values are off" in err
    assert TOKEN not in err
