"""The shipped default model, served by a real ``cxr-triage serve`` process, over real HTTP.

This is the path a user's first request takes: ``models/default`` (what ``make serve`` loads),
uvicorn on a free port, real shared NIH PNGs and chest DICOMs posted as multipart and raw bodies.
Each answer is checked against DESIGN.md's contract, against the model card's thresholds, and
against an independent ONNX Runtime run of ``models/default/model.onnx`` on the same decoded
image, so a response can only pass if it is this model's answer for this image. No AUROC is
asserted here: the shared images trained the model (see benchmarks/eval_http.py for the
held-out figure).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from app.card import ModelCard
from app.imaging.decode import decode_image
from app.imaging.heatmap import select_map
from app.imaging.preprocess import to_model_input
from app.labels import PATHOLOGIES
from tests.contract import BROKEN_DICOM, assert_contract, assert_dicom_uids, chest_dicoms
from tests.live_server import LiveServer, start_server

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "default"
# The same radiographs exist at 1024 px (nih-1024) and at 64 px (nih-64) in the shared data.
SAME_IMAGE = ("00000075_000.png", "00000100_000.png", "00000129_000.png", "00000211_000.png")

Reference = Callable[[bytes], tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not (DEFAULT_MODEL / "model.onnx").is_file():
        pytest.skip(f"no default model at {DEFAULT_MODEL} (see docs/model-comparison.md)")
    return DEFAULT_MODEL


@pytest.fixture(scope="module")
def card(model_dir: Path) -> ModelCard:
    return ModelCard.load(model_dir / "model_card.json")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(model_dir, tmp_path_factory.mktemp("e2e"))
    yield live
    live.stop()
    assert live.process.returncode == 0, live.log()[-2000:]


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def reference(model_dir: Path, card: ModelCard) -> Reference:
    """Expected (probabilities, heatmap) from the app's decoder and a separate ORT session."""
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(data: bytes) -> tuple[np.ndarray, np.ndarray]:
        x = to_model_input(decode_image(data).pixels, card.input)
        logits, heatmap = session.run(["logits", "heatmap"], {"pixel_values": x[None]})
        return 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64))), heatmap[0]

    return run


@pytest.fixture(scope="module")
def pngs(nih_dir: Path) -> list[Path]:
    """One PNG of each shared size and colour mode: 1024 px (L and RGBA), 256 px RGB, 64 px."""
    images = nih_dir / "images"
    return [
        images / "nih-1024" / "00000075_000.png",
        images / "nih-1024" / "00000100_000.png",
        sorted((images / "nih-256").glob("*.png"))[0],
        sorted((images / "nih-64").glob("*.png"))[0],
    ]


def test_default_model_card_is_the_served_one(http, card) -> None:
    served = http.get("/v1/model").json()
    assert served["name"] == card.name == "default"
    assert served["version"] == card.version
    assert served["labels"] == card.labels
    assert served["onnx_sha256"] == card.onnx_sha256
    assert set(card.labels) >= set(PATHOLOGIES)
    text = (card.intended_use + " " + card.limitations).lower()
    assert "from scratch" in text and "not for clinical" in text
    validation = card.metrics["validation"]
    assert validation.mean_auroc_ci_low <= validation.mean_auroc <= validation.mean_auroc_ci_high
    assert http.get("/readyz").status_code == 200


def test_png_multipart_with_heatmap(http, card, reference, pngs) -> None:
    for path in pngs:
        data = path.read_bytes()
        r = http.post(
            "/predict", params={"heatmap": "true"}, files={"file": (path.name, data, "image/png")}
        )
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        expected, expected_grid = reference(data)
        assert_contract(body, card, expected)
        assert body["dicom"] is None
        heatmap = body["heatmap"]
        assert heatmap["method"] == card.heatmap_method
        expected_grid = select_map(expected_grid, card.labels.index(heatmap["label"]))
        grid = np.asarray(heatmap["grid"])
        assert grid.shape == expected_grid.shape and grid.ndim == 2
        np.testing.assert_allclose(grid, expected_grid, atol=1e-4)
        assert grid.min() >= 0 and grid.max() <= 1
        overlay = Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"])))
        assert overlay.format == "PNG"
        assert overlay.size == Image.open(io.BytesIO(data)).size  # the upload, capped at 1024


def test_png_raw_body_without_heatmap(http, card, reference, pngs) -> None:
    data = pngs[0].read_bytes()
    r = http.post("/predict", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_contract(body, card, reference(data)[0])
    assert body["heatmap"] is None


def test_dicoms_multipart_and_raw(http, card, reference, dicom_dir) -> None:
    paths = chest_dicoms(dicom_dir)
    assert len(paths) >= 6
    for i, path in enumerate(paths):
        data = path.read_bytes()
        if i % 2:
            r = http.post("/predict", content=data, headers={"Content-Type": "application/dicom"})
        else:
            r = http.post("/predict", files={"file": (path.name, data, "application/dicom")})
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert_contract(body, card, reference(data)[0])
        assert_dicom_uids(body, path, r.text)


def test_broken_dicom_is_a_problem_and_harmless(http, card, reference, dicom_dir, pngs) -> None:
    r = http.post(
        "/predict",
        content=(dicom_dir / "chest" / BROKEN_DICOM).read_bytes(),
        headers={"Content-Type": "application/dicom"},
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == r.status_code
    data = pngs[1].read_bytes()
    r = http.post("/predict", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert_contract(r.json(), card, reference(data)[0])


def test_one_radiograph_at_1024_and_64_px_scores_alike(http, nih_dir) -> None:
    """The model sees 64 px, the size the 64 px subset was made at, so source size barely matters.

    This is why the default model's input is 64 px (docs/model-comparison.md): each 64 px copy
    gets nearly its original's answer (mean |difference| over the labels), and is told apart
    from the other radiographs.
    """
    answers = {}
    for subset in ("nih-1024", "nih-64"):
        for name in SAME_IMAGE:
            data = (nih_dir / "images" / subset / name).read_bytes()
            r = http.post("/predict", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            answers[subset, name] = np.array([f["probability"] for f in r.json()["findings"]])
    large = np.stack([answers["nih-1024", name] for name in SAME_IMAGE])
    small = np.stack([answers["nih-64", name] for name in SAME_IMAGE])
    distance = np.abs(large[:, None, :] - small[None, :, :]).mean(axis=-1)
    assert (np.diag(distance) < 0.03).all(), distance
    assert (distance.argmin(axis=0) == np.arange(len(SAME_IMAGE))).all(), distance


def test_metrics_name_the_default_model(http, card) -> None:
    text = http.get("/metrics").text
    assert f'cxr_model_info{{name="{card.name}",version="{card.version}"}} 1.0' in text
