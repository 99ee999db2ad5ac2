"""API keys, upload and time limits, and log privacy, through real HTTP apps.

The first tests drive a small FastAPI app wired with the same dependency and middleware the
service uses, so each behaviour is seen in isolation; the ``service`` tests at the end check the
wiring in ``app.main.create_app`` itself.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from app.api.limits import MIB, DeadlineMiddleware, Drain, DrainMiddleware, UploadLimitMiddleware
from app.api.problems import PROBLEM_MEDIA_TYPE, Problem
from app.api.security import (
    ApiKeyAuth,
    ApiKeyConfigError,
    parse_api_keys,
    require_api_key,
    require_metrics_key,
)
from app.ops.logs import JsonFormatter, RequestIdMiddleware, configure_logging, is_patient_field
from app.settings import Settings

KEY_A = "k-alpha-0123456789abcdef"
KEY_B = "k-bravo-fedcba9876543210"


def _problem_handler(request: Request, exc: Exception) -> object:
    assert isinstance(exc, Problem)
    return exc.to_response()


def make_app(settings: Settings) -> FastAPI:
    """A minimal app with the service's auth dependency and limit middleware."""
    app = FastAPI()
    app.state.auth = ApiKeyAuth.from_settings(settings)
    app.add_exception_handler(Problem, _problem_handler)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict", dependencies=[Depends(require_api_key)])
    async def predict(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)])
    def metrics() -> dict[str, str]:
        return {"metrics": "here"}

    @app.get("/slow")
    async def slow(seconds: float) -> dict[str, str]:
        await asyncio.sleep(seconds)
        return {"status": "done"}

    app.add_middleware(UploadLimitMiddleware, max_bytes=int(settings.max_upload_mb * MIB))
    app.add_middleware(DeadlineMiddleware, timeout_s=settings.request_timeout_s)
    app.add_middleware(RequestIdMiddleware)
    return app


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    with TestClient(make_app(Settings(api_keys=f"{KEY_A}, {KEY_B}"))) as client:
        yield client


def assert_problem(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


# ------------------------------------------------------------------------------ key parsing


def test_comma_list_trims_blanks_and_duplicates() -> None:
    assert parse_api_keys(f" {KEY_A} ,,{KEY_B}, {KEY_A} ") == (KEY_A, KEY_B)


def test_no_keys_configured_means_open() -> None:
    assert parse_api_keys(None) == ()
    assert parse_api_keys("   ") == ()
    assert not ApiKeyAuth.from_settings(Settings(api_keys=None)).enabled


def test_key_file_with_comments(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# PACS gateway\n{KEY_A}\n\n  {KEY_B}   # reporting tool\n#{KEY_A}x\n")
    assert parse_api_keys(str(key_file)) == (KEY_A, KEY_B)


def test_missing_key_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyConfigError, match="does not exist"):
        parse_api_keys(str(tmp_path / "nope" / "keys.txt"))


def test_key_file_without_keys_refuses_to_start(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# nothing yet\n\n")
    with pytest.raises(ApiKeyConfigError, match="no key"):
        parse_api_keys(str(key_file))


def test_matches_every_key_and_nothing_else() -> None:
    auth = ApiKeyAuth.from_settings(Settings(api_keys=f"{KEY_A},{KEY_B}"))
    assert auth.matches(KEY_A) and auth.matches(KEY_B)
    for wrong in ("", KEY_A[:-1], KEY_A + "x", KEY_A.upper(), f"{KEY_A},{KEY_B}"):
        assert not auth.matches(wrong), wrong
    assert all(len(digest) == 32 for digest in auth.digests)
    assert KEY_A.encode() not in b"".join(auth.digests)


# ------------------------------------------------------------------------------ HTTP auth


def test_open_when_no_keys() -> None:
    with TestClient(make_app(Settings(api_keys=None))) as client:
        assert client.post("/predict", content=b"abc").json() == {"bytes": 3}


def test_predict_without_key_is_401_problem(keyed: TestClient) -> None:
    response = keyed.post("/predict", content=b"abc")
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert "X-API-Key" in str(body["detail"])


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"X-API-Key": KEY_A[:-1]},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": f"Bearer {KEY_A}x"},
    ],
)
def test_wrong_key_is_401(keyed: TestClient, headers: dict[str, str]) -> None:
    response = keyed.post("/predict", content=b"abc", headers=headers)
    body = assert_problem(response, 401)
    assert KEY_A not in response.text and KEY_A[:-1] not in str(body)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": f"bearer {KEY_B}"},
        {"X-API-Key": KEY_B},
        {"Authorization": "Bearer not-this-one-0000000", "X-API-Key": KEY_A},
    ],
)
def test_valid_key_passes(keyed: TestClient, headers: dict[str, str]) -> None:
    response = keyed.post("/predict", content=b"abcd", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"bytes": 4}


def test_healthz_stays_open(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200


def test_metrics_open_unless_configured(keyed: TestClient) -> None:
    assert keyed.get("/metrics").status_code == 200
    settings = Settings(api_keys=KEY_A, metrics_require_key=True)
    with TestClient(make_app(settings)) as client:
        assert_problem(client.get("/metrics"), 401)
        assert client.get("/metrics", headers={"X-API-Key": KEY_A}).status_code == 200


def test_openapi_declares_both_schemes(keyed: TestClient) -> None:
    schema = keyed.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"


def test_app_without_auth_state_fails_closed() -> None:
    app = make_app(Settings(api_keys=None))
    del app.state.auth
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/predict", content=b"abc").status_code == 500


# ------------------------------------------------------------------------------ limits


@pytest.fixture
def limited() -> Iterator[TestClient]:
    # A deadline only a hang reaches: these tests are about sizes, not time.
    settings = Settings(api_keys=None, max_upload_mb=1.0, request_timeout_s=120.0)
    with TestClient(make_app(settings)) as client:
        yield client


def test_upload_at_the_limit_passes(limited: TestClient) -> None:
    assert limited.post("/predict", content=b"x" * MIB).json() == {"bytes": MIB}


def test_declared_oversize_is_413_before_reading(limited: TestClient) -> None:
    body = assert_problem(limited.post("/predict", content=b"x" * (MIB + 1)), 413)
    assert body["type"].endswith("/upload-too-large")
    assert "CXR_MAX_UPLOAD_MB" in str(body["detail"])


def test_declared_oversize_never_reads_the_body() -> None:
    messages: list[dict[str, object]] = []

    async def route(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict[str, object]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-length", b"11")],
    }
    asyncio.run(UploadLimitMiddleware(route, max_bytes=10)(scope, receive, send))  # type: ignore[arg-type]
    assert messages[0]["status"] == 413
    assert json.loads(messages[1]["body"])["status"] == 413  # type: ignore[arg-type]


def test_chunked_oversize_is_cut_off(limited: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * (64 * 1024)

    response = limited.post("/predict", content=chunks())
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert limited.post("/predict", content=b"ok").json() == {"bytes": 2}


def test_bad_content_length_is_400(limited: TestClient) -> None:
    response = limited.post("/predict", content=b"abc", headers={"Content-Length": "3x"})
    assert_problem(response, 400)


def test_deadline_is_504_problem() -> None:
    """A route that would take an hour is cut off at the (1 s) deadline with a 504, and the
    next request on the same app is served (it only has to start answering within 1 s)."""
    settings = Settings(api_keys=None, request_timeout_s=1.0)
    with TestClient(make_app(settings)) as client:
        body = assert_problem(client.get("/slow", params={"seconds": 3600}), 504)
        assert "CXR_REQUEST_TIMEOUT_S" in str(body["detail"])
        assert client.get("/slow", params={"seconds": 0}).json() == {"status": "done"}


# ------------------------------------------------------------------------------ logs


def test_request_id_echoed_and_sanitised(keyed: TestClient) -> None:
    given = keyed.get("/healthz", headers={"X-Request-ID": "pacs-42.a:b"})
    assert given.headers["x-request-id"] == "pacs-42.a:b"
    for hostile in ('x" {"level": "ERROR"}', "a" * 129, "caf\u00e9".encode()):
        response = keyed.get("/healthz", headers={"X-Request-ID": hostile})
        assert len(response.headers["x-request-id"]) == 32, hostile


def test_json_lines_carry_request_id_and_never_keys() -> None:
    stream = io.StringIO()
    settings = Settings(api_keys=KEY_A, log_json=True, log_level="DEBUG")
    handler = configure_logging(settings, stream=stream)
    try:
        app = make_app(settings)

        @app.get("/hello")
        def hello() -> dict[str, str]:
            logging.getLogger("app.test").info("said hello", extra={"study": "1.2.3"})
            return {"hi": "there"}

        with TestClient(app) as client:
            response = client.get("/hello", headers={"X-Request-ID": "req-123"})
            client.post("/predict", content=b"a", headers={"X-API-Key": KEY_A})
            client.post("/predict", content=b"a", headers={"Authorization": f"Bearer {KEY_A}z"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert response.status_code == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    hello = next(line for line in lines if line["message"] == "said hello")
    assert hello["request_id"] == "req-123"
    assert hello["study"] == "1.2.3"
    assert hello["level"] == "INFO" and hello["logger"] == "app.test"
    assert hello["time"].endswith("Z")
    assert KEY_A not in stream.getvalue()


def test_patient_fields_are_dropped() -> None:
    stream = io.StringIO()
    handler = configure_logging(Settings(log_json=True), stream=stream)
    try:
        logging.getLogger("app.test").warning(
            "decoded",
            extra={
                "PatientName": "DOE^JANE",
                "patient_id": "MRN-1",
                "PatientBirthDate": "19700101",
                "accession_number": "ACC-9",
                "fields": {"PatientSex": "F", "rows": 2048},
                "sop_instance_uid": "1.2.840.1",
            },
        )
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    for secret in ("DOE^JANE", "MRN-1", "19700101", "ACC-9", "PatientSex"):
        assert secret not in text
    line = json.loads(text.splitlines()[-1])
    assert line["sop_instance_uid"] == "1.2.840.1"
    assert line["fields"] == {"rows": 2048}


def test_patient_keyword_matching() -> None:
    for name in ("PatientName", "patient_name", "PATIENTID", "OtherPatientIDs", "ethnic_group"):
        assert is_patient_field(name), name
    for name in ("sop_instance_uid", "study_instance_uid", "model", "rows"):
        assert not is_patient_field(name), name


def test_uvicorn_access_record_becomes_fields() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/predict?heatmap=true", "1.1", 200), None,
    )  # fmt: skip
    line = json.loads(JsonFormatter().format(record))
    assert line["method"] == "POST" and line["status"] == 200
    assert line["path"] == "/predict?heatmap=true"
    assert line["message"] == "POST /predict?heatmap=true 200"


# ------------------------------------------------------------------------------ draining


async def _until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Let the loop run until ``condition`` holds; only a hang reaches the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def _http_scope(path: str = "/predict") -> dict[str, object]:
    return {"type": "http", "method": "POST", "path": path, "headers": [], "state": {}}


def test_sigterm_drains_before_handing_over_to_the_server() -> None:
    """In-flight work finishes, new work gets 503, then the server's own handler runs."""
    handed_over: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handed_over.append(signum))

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        drain = Drain()
        release = asyncio.Event()

        async def slow_route(scope: object, receive: object, send: Any) -> None:
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

        async def no_body() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        # Seen from outside: the drain phase has passed its delay and waits for in-flight work.
        waiting = asyncio.Event()
        wait_idle = drain.wait_idle

        async def observed_wait_idle(timeout_s: float) -> bool:
            waiting.set()
            return await wait_idle(timeout_s)

        drain.wait_idle = observed_wait_idle  # type: ignore[method-assign]

        gate = DrainMiddleware(slow_route, drain)
        first: list[dict[str, object]] = []
        later: list[dict[str, object]] = []
        in_flight = asyncio.create_task(gate(_http_scope(), no_body, _collect(first)))
        await _until(lambda: drain.in_flight == 1)
        undo = drain.install_sigterm(delay_s=0.1, max_wait_s=120.0)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: drain.draining)
            await gate(_http_scope(), no_body, _collect(later))
            # Once set, wait_idle has run up to its first poll (one in flight) without yielding.
            await _until(waiting.is_set)
            assert handed_over == [], "handed over while a request was still running"
            release.set()
            await in_flight
            await _until(lambda: bool(handed_over))
            assert handed_over == [signal.SIGTERM]
        finally:
            undo()
        return first, later

    try:
        first, later = asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert first[0]["status"] == 200
    assert later[0]["status"] == 503
    assert (b"retry-after", b"5") in later[0]["headers"]  # type: ignore[operator]
    assert json.loads(later[1]["body"])["type"].endswith("/shutting-down")  # type: ignore[arg-type]


def _collect(into: list[dict[str, object]]) -> Any:
    async def send(message: dict[str, object]) -> None:
        into.append(message)

    return send


# ------------------------------------------------------------------------------ the service


@pytest.fixture(scope="module")
def png_bytes(nih_dir: Path) -> bytes:
    return sorted((nih_dir / "images" / "nih-256").glob("*.png"))[0].read_bytes()


def service(model_dir: Path, **overrides: Any) -> TestClient:
    from app.main import create_app

    base: dict[str, Any] = {
        "model_dir": model_dir,
        "intra_op_threads": 1,
        "audit_db": None,
        "log_json": False,
    }
    return TestClient(create_app(Settings(**{**base, **overrides})))


def test_service_requires_keys_on_model_routes_only(tiny_model_dir: Path, png_bytes: bytes) -> None:
    with service(tiny_model_dir, api_keys=f"{KEY_A},{KEY_B}") as client:
        refused = client.post("/predict", content=png_bytes, headers={"Content-Type": "image/png"})
        body = assert_problem(refused, 401)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert body["request_id"] == refused.headers["x-request-id"]
        assert_problem(client.get("/v1/model"), 401)
        assert_problem(client.get("/v1/model", headers={"X-API-Key": "nope-0123456789abcdef"}), 401)

        ok = client.post(
            "/predict",
            content=png_bytes,
            headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY_B}"},
        )
        assert ok.status_code == 200 and len(ok.json()["findings"]) == 15
        assert client.get("/v1/model", headers={"X-API-Key": KEY_A}).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            assert client.get(path).status_code == 200, path
        schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert set(schemes) == {"bearer", "apiKey"}


def test_service_metrics_key_when_configured(tiny_model_dir: Path) -> None:
    with service(tiny_model_dir, api_keys=KEY_A, metrics_require_key=True) as client:
        assert_problem(client.get("/metrics"), 401)
        assert client.get("/metrics", headers={"X-API-Key": KEY_A}).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_open_service_documents_no_auth(tiny_model_dir: Path) -> None:
    with service(tiny_model_dir, api_keys=None) as client:
        assert client.get("/v1/model").status_code == 200
        schema = client.get("/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})


def test_service_refuses_to_start_with_a_missing_key_file(tiny_model_dir: Path) -> None:
    with pytest.raises(ApiKeyConfigError):
        service(tiny_model_dir, api_keys="/run/secrets/cxr-keys")
