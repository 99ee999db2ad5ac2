"""The HTTP service end to end: real shared PNGs and DICOMs, a real ONNX session, TestClient.

Expected probabilities and heatmaps are computed independently with the same decoder and a
separate ONNX Runtime session, so the tests check that each response belongs to its image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.card import ModelCard
from app.imaging.decode import decode_image
from app.imaging.heatmap import select_map
from app.imaging.preprocess import to_model_input
from app.inference.runtime import choose_batch_size
from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from tests.contract import (
    BROKEN_DICOM,
    DESIGN_METRICS,
    PROBLEM_KEYS,
    assert_contract,
    assert_dicom_uids,
    chest_dicoms,
)


def _settings(model_dir: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "model_dir": model_dir,
        "intra_op_threads": 1,
        "decode_workers": 2,
        "audit_db": None,
        "api_keys": None,
        "log_json": False,
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["tiny", "default"])
def model_dir(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Path:
    """Every contract test runs on the hand-built contract graph and on the bundled model that
    came through the training pipeline's export (a ViT's rollout or a CNN's CAM)."""
    if request.param == "tiny":
        return tiny_model_dir
    if not (DEFAULT_MODEL_DIR / "model_card.json").is_file():
        pytest.skip(f"no bundled model at {DEFAULT_MODEL_DIR}")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(model_dir))) as c:
        yield c


@pytest.fixture(scope="module")
def card(model_dir: Path) -> ModelCard:
    return ModelCard.load(model_dir / "model_card.json")


@pytest.fixture(scope="module")
def reference(model_dir: Path, card: ModelCard):
    """Independent expected outputs: same decoder, a separate session."""
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = to_model_input(decode_image(data).pixels, card.input)
        logits, heatmap = session.run(None, {"pixel_values": x[None]})
        return 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64))), heatmap[0], x

    return run


@pytest.fixture(scope="module")
def png_1024(nih_dir: Path) -> list[Path]:
    return sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[:3]


def test_png_multipart_contract(client, card, reference, png_1024) -> None:
    for path in png_1024:
        data = path.read_bytes()
        r = client.post("/predict", files={"file": (path.name, data, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert_contract(body, card, reference(data)[0])
        assert body["dicom"] is None
        assert body["heatmap"] is None
        assert r.headers["x-request-id"] == body["request_id"]


def test_different_images_get_different_answers(client, png_1024) -> None:
    probs = [
        [
            f["probability"]
            for f in client.post(
                "/predict", content=p.read_bytes(), headers={"content-type": "image/png"}
            ).json()["findings"]
        ]
        for p in png_1024[:2]
    ]
    assert probs[0] != probs[1]


def test_dicoms_carry_uids_and_no_patient_fields(client, card, reference, dicom_dir) -> None:
    paths = chest_dicoms(dicom_dir)
    assert len(paths) >= 6
    for path in paths:
        data = path.read_bytes()
        r = client.post("/predict", files={"file": (path.name, data, "application/dicom")})
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert_contract(body, card, reference(data)[0])
        assert_dicom_uids(body, path, r.text)


def test_heatmap_grid_and_overlay(client, card, reference, png_1024) -> None:
    data = png_1024[0].read_bytes()
    r = client.post("/predict?heatmap=true", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    heatmap = r.json()["heatmap"]
    assert heatmap["method"] == card.heatmap_method
    _, expected_grid, _ = reference(data)
    expected_grid = select_map(expected_grid, card.labels.index(heatmap["label"]))
    grid = np.asarray(heatmap["grid"])
    assert grid.shape == expected_grid.shape
    assert grid.ndim == 2 and min(grid.shape) >= 2
    np.testing.assert_allclose(grid, expected_grid, atol=1e-4)
    image = Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"])))
    assert image.format == "PNG"
    # Drawn on the upload itself (1024 px, the overlay's cap), not on the model's input.
    assert image.size == Image.open(io.BytesIO(data)).size
    assert image.mode == "RGB"
    rgb = np.asarray(image).astype(int)
    # Coloured where the map is hot: the overlay is not plain gray.
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 40


def test_heatmap_false_is_null(client, png_1024) -> None:
    r = client.post(
        "/predict?heatmap=false",
        content=png_1024[0].read_bytes(),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200
    assert r.json()["heatmap"] is None


def test_raw_body_uploads(client, card, reference, png_1024, dicom_dir) -> None:
    png = png_1024[1].read_bytes()
    r = client.post("/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert_contract(r.json(), card, reference(png)[0])
    dcm = (dicom_dir / "chest" / "pydicomdata__RG1_UNCR.dcm").read_bytes()
    r = client.post("/predict", content=dcm, headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    assert r.json()["dicom"]["sop_instance_uid"]
    jpeg = io.BytesIO()
    Image.open(png_1024[1]).convert("L").save(jpeg, format="JPEG", quality=95)
    r = client.post("/predict", content=jpeg.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["dicom"] is None


def assert_problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status
    assert body["detail"]
    assert "Traceback" not in r.text
    return body


def test_unsupported_types_are_415(client) -> None:
    body = assert_problem(
        client.post("/predict", content=b"hello", headers={"content-type": "text/plain"}), 415
    )
    assert "text/plain" in body["detail"]
    assert_problem(
        client.post(
            "/predict", content=b"%PDF-1.4 ...", headers={"content-type": "application/pdf"}
        ),
        415,
    )
    pdf = {"file": ("a.pdf", b"%PDF-1.4", "application/pdf")}
    assert_problem(client.post("/predict", files=pdf), 415)


def test_bad_uploads_are_4xx_and_harmless(client, card, reference, dicom_dir, png_1024) -> None:
    broken = (dicom_dir / "chest" / BROKEN_DICOM).read_bytes()
    for r in (
        client.post("/predict", files={"file": (BROKEN_DICOM, broken, "application/dicom")}),
        client.post("/predict", content=broken, headers={"content-type": "application/dicom"}),
        client.post(
            "/predict",
            content=b"\x89PNG\r\n\x1a\n" + b"\0" * 50,
            headers={"content-type": "image/png"},
        ),
    ):
        assert 400 <= r.status_code < 500, r.text
        assert_problem(r, r.status_code)
    assert_problem(client.post("/predict", content=b"", headers={"content-type": "image/png"}), 400)
    assert_problem(client.post("/predict", files={"other": ("x.png", b"x", "image/png")}), 422)
    assert_problem(
        client.post("/predict?heatmap=maybe", content=b"x", headers={"content-type": "image/png"}),
        422,
    )
    # ... and the next request is served normally.
    data = png_1024[0].read_bytes()
    r = client.post("/predict", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200
    assert_contract(r.json(), card, reference(data)[0])


def test_unknown_route_and_method_are_problems(client) -> None:
    assert_problem(client.get("/nope"), 404)
    assert_problem(client.get("/predict"), 405)


def test_request_id_header(client, png_1024) -> None:
    data = png_1024[0].read_bytes()
    r = client.post(
        "/predict", content=data, headers={"content-type": "image/png", "x-request-id": "pacs-42.a"}
    )
    assert r.headers["x-request-id"] == "pacs-42.a" == r.json()["request_id"]
    r = client.post(
        "/predict",
        content=data,
        headers={"content-type": "image/png", "x-request-id": "bad id\t<script>"},
    )
    assert r.headers["x-request-id"] == r.json()["request_id"]
    assert r.json()["request_id"] != "bad id\t<script>"
    r = client.post(
        "/predict", content=b"x", headers={"content-type": "text/plain", "x-request-id": "err-1"}
    )
    assert r.headers["x-request-id"] == "err-1" == r.json()["request_id"]


def test_health_and_readiness(client, tiny_model_dir) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["provider"] == "CPUExecutionProvider"
    # Without the lifespan (no model loaded) the app is alive but not ready.
    cold = TestClient(create_app(_settings(tiny_model_dir)))
    assert cold.get("/healthz").status_code == 200
    r = cold.get("/readyz")
    assert_problem(r, 503)
    assert int(r.headers["retry-after"]) > 0
    assert_problem(cold.post("/predict", content=b"x", headers={"content-type": "image/png"}), 503)


def _metric(text: str, sample: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent, as Prometheus reads it)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    return 0.0


def test_metrics_names_and_counters(client, card, png_1024) -> None:
    before = client.get("/metrics").text
    for name in DESIGN_METRICS:
        assert f"# TYPE {name} " in before, name
    assert f'cxr_model_info{{name="{card.name}",version="{card.version}"}} 1.0' in before
    client.post("/predict", content=png_1024[0].read_bytes(), headers={"content-type": "image/png"})
    client.post("/predict", content=b"x", headers={"content-type": "text/plain"})
    after = client.get("/metrics").text
    for status in ("200", "415"):
        assert (
            _metric(after, "cxr_requests_total", status=status)
            == _metric(before, "cxr_requests_total", status=status) + 1
        )
    assert (
        _metric(after, "cxr_request_duration_seconds_count")
        == _metric(before, "cxr_request_duration_seconds_count") + 2
    )
    assert _metric(after, "cxr_batch_size_count") == _metric(before, "cxr_batch_size_count") + 1
    assert _metric(after, "cxr_decode_duration_seconds_count") > _metric(
        before, "cxr_decode_duration_seconds_count"
    )


def test_model_endpoint(client, card, reference, png_1024) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    body = r.json()
    assert ModelCard.model_validate({k: v for k, v in body.items() if k != "runtime"}) == card
    runtime = body["runtime"]
    assert runtime["providers"] == ["CPUExecutionProvider"]
    assert runtime["device"] == "cpu"
    assert runtime["heatmap_grid"] == list(reference(png_1024[0].read_bytes())[1].shape[-2:])
    assert runtime["warmed_up"] is True
    assert runtime["intra_op_threads"] == 1
    # The start-up probe timed batches up to CXR_MAX_BATCH_SIZE; batches are capped at its pick.
    probe = {int(n): ms for n, ms in runtime["batch_probe_ms_per_image"].items()}
    assert 1 in probe and max(probe) <= 8
    assert runtime["max_batch_size"] == choose_batch_size(probe)
    assert runtime["inference_streams"] == 1  # one intra-op thread: nothing to split


def test_openapi_documents_examples_and_problems(client) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/dicom"} <= set(
        predict["requestBody"]["content"]
    )
    for status in ("400", "413", "415", "422", "503"):
        assert "application/problem+json" in predict["responses"][status]["content"]
    schemas = spec["components"]["schemas"]
    assert schemas["PredictResponse"]["examples"][0]["findings"][0]["label"] == "Atelectasis"
    assert "examples" in schemas["Finding"]["properties"]["probability"]
    assert client.get("/docs").status_code == 200


async def _concurrent_posts(app, payloads: list[bytes]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await asyncio.gather(
                *(
                    ac.post("/predict", content=p, headers={"content-type": "image/png"})
                    for p in payloads
                )
            )


def test_concurrent_requests_share_session_runs(tiny_model_dir, nih_dir) -> None:
    """N concurrent requests are answered by fewer than N session runs, each correctly."""
    # A delay no slow decode outlasts: the batcher waits for admitted images still decoding, so
    # the 12 share runs however busy the machine is (a 250 ms delay made that depend on speed).
    settings = _settings(
        tiny_model_dir, max_batch_size=8, max_batch_delay_ms=600_000.0, batch_probe=False
    )
    app = create_app(settings)
    paths = sorted((nih_dir / "images" / "nih-256").glob("*.png"))[:12]
    payloads = [p.read_bytes() for p in paths]
    responses = asyncio.run(_concurrent_posts(app, payloads))
    assert [r.status_code for r in responses] == [200] * len(payloads)
    registry = app.state.metrics.registry
    images = registry.get_sample_value("cxr_batch_size_sum")
    batches = registry.get_sample_value("cxr_batch_size_count")
    assert images == len(payloads)  # warm-up runs bypass the batcher
    assert batches < len(payloads)
    assert max(r.json()["timing_ms"]["queue"] for r in responses) > 0
    # Batching must not mix answers up: same image alone gives the same probabilities.
    with TestClient(create_app(_settings(tiny_model_dir))) as single:
        for payload, r in zip(payloads[:3], responses[:3], strict=True):
            alone = single.post(
                "/predict", content=payload, headers={"content-type": "image/png"}
            ).json()
            assert [f["probability"] for f in alone["findings"]] == pytest.approx(
                [f["probability"] for f in r.json()["findings"]], abs=1e-6
            )


def test_cli_help_lists_commands_without_torch() -> None:
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("serve", "train", "evaluate", "export", "cache", "download", "audit"):
        assert command in out.stdout


def test_cli_serve_fails_fast_without_model(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--model-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "No model folder" in out.stderr
    assert "CXR_MODEL_DIR" in out.stderr
    assert "Uvicorn running" not in out.stderr


def test_json_has_no_nan(client, png_1024) -> None:
    r = client.post(
        "/predict?heatmap=true",
        content=png_1024[2].read_bytes(),
        headers={"content-type": "image/png"},
    )
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
