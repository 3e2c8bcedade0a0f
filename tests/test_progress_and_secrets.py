"""Progress hands the caller's job group (Connect: tags) back; registry download errors keep no presigned secrets."""

from __future__ import annotations

import http.server
import importlib.util
import io
import threading

import pytest

from image_transfer.errors import UserError
from image_transfer.models.uris import _download, scrub_urls
from image_transfer.runtime import is_connect
from image_transfer.scoring.progress import Progress


@pytest.mark.connect
def test_progress_gives_the_callers_job_group_back(spark):
    if is_connect(spark):  # no job groups: Progress tags its operations and removes only its own tag
        spark.addTag("callers-tag")
        try:
            progress = Progress(spark, "t", total_rows=10, stream=io.StringIO())
            with progress:
                assert spark.range(10).count() == 10
                assert set(spark.getTags()) == {"callers-tag", progress.group}
            assert set(spark.getTags()) == {"callers-tag"}
        finally:
            spark.removeTag("callers-tag")
        return
    sc = spark.sparkContext
    sc.setJobGroup("callers-group", "the caller's description", interruptOnCancel=True)
    try:
        progress = Progress(spark, "t", total_rows=10, description="scoring", stream=io.StringIO())
        with progress:
            assert sc.getLocalProperty("spark.jobGroup.id") == progress.group
            assert spark.range(10).count() == 10
        assert sc.getLocalProperty("spark.jobGroup.id") == "callers-group"
        assert sc.getLocalProperty("spark.job.description") == "the caller's description"
        assert sc.getLocalProperty("spark.job.interruptOnCancel") == "true"
        before = set(sc.statusTracker().getJobIdsForGroup("callers-group"))
        assert spark.range(5).count() == 5  # the caller's next job is in the caller's group again
        assert set(sc.statusTracker().getJobIdsForGroup("callers-group")) > before
    finally:
        for key in ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel"):
            sc.setLocalProperty(key, None)
    with Progress(spark, "t", total_rows=1, stream=io.StringIO()):  # no group before: none after
        pass
    assert sc.getLocalProperty("spark.jobGroup.id") is None


SECRETS = ("SECRETSIG", "SECRETAMZ", "SECRETTOKEN")


@pytest.fixture
def forbidding_server():
    """A loopback server answering 403 to everything, as an object store does to an expired presigned URL."""

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            self.send_response(403)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"AccessDenied: Request has expired")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/bucket/models/m.keras?sig=SECRETSIG&X-Amz-Signature=SECRETAMZ&st=SECRETTOKEN"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="MLflow is not installed here")
def test_download_errors_do_not_echo_presigned_query_strings(forbidding_server, tmp_path, monkeypatch):
    from mlflow.utils.file_utils import download_file_using_http_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    # MLflow's own presigned-URL download (what its cloud artifact stores call) quotes the whole URL.
    with pytest.raises(Exception) as raw:  # noqa: PT011 - requests' HTTPError, through MLflow
        download_file_using_http_uri(forbidding_server, str(tmp_path / "m.keras"))
    assert "403" in str(raw.value) and all(s in str(raw.value) for s in SECRETS[:2])
    cleaned = scrub_urls(str(raw.value))
    assert not any(s in cleaned for s in SECRETS) and "/bucket/models/m.keras?<redacted>" in cleaned
    assert "403 Client Error: Forbidden" in cleaned and "Request has expired" in cleaned

    # The package's download path: the error names the URL without its query string.
    with pytest.raises(UserError) as error:
        _download(forbidding_server, registry_uri=None)
    assert not any(s in str(error.value) for s in SECRETS), str(error.value)
    assert "cannot download model http://127.0.0.1:" in str(error.value) and error.value.__suppress_context__


def test_scrub_urls_keeps_what_is_not_a_secret():
    text = "GET https://acct.blob.core.windows.net/c/m.keras?sv=2024&se=2026&sig=abc%2Fdef failed; retry sig=xyz"
    assert (
        scrub_urls(text) == "GET https://acct.blob.core.windows.net/c/m.keras?<redacted> failed; retry sig=<redacted>"
    )
    assert scrub_urls("models:/shapes/3 not found (RESOURCE_DOES_NOT_EXIST)") == (
        "models:/shapes/3 not found (RESOURCE_DOES_NOT_EXIST)"
    )
