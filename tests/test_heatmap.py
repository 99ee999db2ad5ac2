"""Heatmaps: the per-label maps in the graph, the overlay on the upload, and /predict's choice.

The maps are checked against what makes them meaningful (a label's CAM averages to its logit),
the overlay on real shared radiographs through the real decoder, and the HTTP block on the
bundled model through the real app.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.card import ModelCard
from app.imaging.decode import decode_image
from app.imaging.heatmap import (
    DEFAULT_CAPTION,
    explained_label,
    overlay_png_base64,
    render_overlay,
    select_map,
)
from app.labels import NIH_LABELS, NO_FINDING
from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings


@pytest.fixture(scope="module")
def radiograph(nih_dir: Path) -> np.ndarray:
    """A real 1024 px NIH radiograph, decoded as the service decodes uploads."""
    path = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0]
    return decode_image(path.read_bytes()).pixels


def _colour(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel chroma: 0 on the grey radiograph, large where the colour map is blended in."""
    rgb = rgb.astype(int)
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def _hot_corner() -> np.ndarray:
    grid = np.zeros((8, 8), np.float32)
    grid[:2, :2] = 1.0
    return grid


# --- the overlay ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "max_side", "expected"),
    [
        ((1024, 1024), 1024, (1024, 1024)),
        ((2048, 1500), 2048, (2048, 1500)),  # the PACS Secondary Capture size
        ((3000, 2000), 1024, (1024, 683)),  # portrait, downscaled, aspect kept
        ((1200, 1800), 1024, (683, 1024)),  # landscape
        ((64, 64), 1024, (64, 64)),  # never upscaled above the source
    ],
)
def test_overlay_keeps_aspect_and_caps_the_long_side(
    radiograph: np.ndarray, shape: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    image = np.asarray(
        Image.fromarray(radiograph, mode="F").resize((shape[1], shape[0]), Image.BILINEAR)
    )
    rgb = render_overlay(image, _hot_corner(), finding="Cardiomegaly", max_side=max_side)
    assert rgb.dtype == np.uint8 and rgb.shape == (*expected, 3)


def test_overlay_colours_where_the_map_is_hot_and_leaves_anatomy_grey(
    radiograph: np.ndarray,
) -> None:
    rgb = render_overlay(radiograph, _hot_corner(), finding="Effusion", probability=0.42)
    chroma = _colour(rgb)
    # the hot cells are the top-left quarter of the map (below the title strip)
    assert np.median(chroma[150:230, 60:230]) > 50
    # a cold region (centre, away from the legend and strips) is the plain grey radiograph
    assert chroma[400:700, 300:700].max() <= 2
    plain = np.clip(radiograph[400:700, 300:700] * 255.0, 0, 255)
    assert np.abs(rgb[400:700, 300:700, 0].astype(float) - plain).mean() < 2.0


def test_overlay_burns_in_legend_finding_and_caption(radiograph: np.ndarray) -> None:
    flat = np.zeros((8, 8), np.float32)
    with_text = render_overlay(radiograph, flat, finding="Pleural_Thickening", probability=0.7)
    other = render_overlay(radiograph, flat, finding="Nodule", probability=0.1)
    gray = np.clip(np.rint(radiograph * 255.0), 0, 255)
    # title strip (top) and caption strip (bottom) darken and letter the image
    assert not np.array_equal(with_text[:30], other[:30])  # the finding's name is drawn
    assert with_text[-25:, :, 0].mean() < gray[-25:].mean()
    # the caption is yellow text: red+green high, blue low
    bottom = with_text[-25:].astype(int)
    assert ((bottom[..., 0] > 200) & (bottom[..., 1] > 180) & (bottom[..., 2] < 80)).sum() > 50
    # the colour bar on the right runs from red (1, top) to blue (0, bottom)
    column = with_text[:, -15].astype(int)
    reds = np.flatnonzero((column[:, 0] > 100) & (column[:, 2] < 60))
    blues = np.flatnonzero((column[:, 2] > 100) & (column[:, 0] < 60))
    assert len(reds) > 20 and len(blues) > 20 and reds.mean() < blues.mean()
    assert "not for diagnostic use" in DEFAULT_CAPTION


def test_overlay_pad_mode_puts_the_map_where_the_image_was(radiograph: np.ndarray) -> None:
    """A 2:1 landscape image letterboxed into a square input fills the map's middle rows only:
    a map hot only in the padding rows leaves the image uncoloured."""
    wide = np.asarray(Image.fromarray(radiograph, mode="F").resize((1024, 512), Image.BILINEAR))
    padding_only = np.zeros((8, 8), np.float32)
    padding_only[0, :] = 1.0  # the top border band of the 64 px input
    rgb = render_overlay(wide, padding_only, finding="Mass", resize="pad", input_size=(64, 64))
    assert _colour(rgb)[100:400, 100:900].max() <= 2
    squashed = render_overlay(wide, padding_only, finding="Mass")  # squash: top rows coloured
    assert np.median(_colour(squashed)[40:60, 100:900]) > 50


def test_overlay_png_base64_is_the_rendered_png(radiograph: np.ndarray) -> None:
    png = overlay_png_base64(radiograph, _hot_corner(), finding="Mass", max_side=512)
    image = Image.open(io.BytesIO(base64.b64decode(png)))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (512, 512)
    expected = render_overlay(radiograph, _hot_corner(), finding="Mass", max_side=512)
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_overlay_rejects_what_is_not_an_image_and_a_map() -> None:
    with pytest.raises(ValueError, match="2-D"):
        render_overlay(np.zeros((4, 4, 3), np.float32), np.zeros((2, 2)), finding="Mass")


# --- which map -----------------------------------------------------------------------------------


def test_explained_label_prefers_request_then_top_flagged_then_top_pathology() -> None:
    labels = ["Atelectasis", "Cardiomegaly", "Effusion", NO_FINDING]
    probs = [0.30, 0.20, 0.10, 0.90]
    assert explained_label(labels, probs, ["Cardiomegaly", "Effusion"]) == "Cardiomegaly"
    assert explained_label(labels, probs, ["Effusion"], requested="Atelectasis") == "Atelectasis"
    assert explained_label(labels, probs, []) == "Atelectasis"  # never "No Finding"


def test_select_map_per_label_and_per_image() -> None:
    maps = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    np.testing.assert_array_equal(select_map(maps, 1), maps[1])
    np.testing.assert_array_equal(select_map(maps[0], 2), maps[0])  # one map explains all
    with pytest.raises(ValueError):
        select_map(np.zeros((1, 1, 2, 2)), 0)


# --- the maps in the graph -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cnn-s8", "vit-p8"])
def test_per_label_maps_decompose_each_logit(arch: str) -> None:
    """Each label's raw map averages (plus the bias) to exactly that label's logit: the map is
    that finding's evidence, not a shared picture. Shipped sizes: 8x8 at 64 px."""
    import torch

    from training.zoo import create_model, normalise_maps, per_label_module

    torch.manual_seed(0)
    model = create_model(arch, num_classes=len(NIH_LABELS), img_size=64).eval()
    module = per_label_module(model).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        logits, raw = module.raw(x)
        _, maps = module(x)
        plain = model(x)
    bias = model.get_classifier().bias
    assert raw.shape == (3, len(NIH_LABELS), 8, 8)
    torch.testing.assert_close(raw.mean(dim=(2, 3)) + bias, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(maps, normalise_maps(raw))
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.amax(dim=(2, 3)), torch.ones(3, len(NIH_LABELS)))
    # different labels, different maps
    assert (maps[:, 0] - maps[:, 1]).abs().max() > 0.05


def test_normalised_maps_are_never_blank() -> None:
    import torch

    from training.zoo import normalise_maps

    negative = -torch.rand(2, 4, 8, 8) - 1.0  # all-negative evidence: the old ReLU map was 0
    flat = torch.full((1, 1, 8, 8), -3.0)
    for cam in (negative, flat):
        out = normalise_maps(cam)
        assert bool((out.amax(dim=(-2, -1)) > 0.99).all())


def test_fold_ensemble_averages_members_and_exports(tmp_path: Path) -> None:
    """The ensemble graph's logits are the members' mean and its maps decompose that mean; the
    exported ONNX reproduces torch (the export's parity check) at [N, L, 8, 8]."""
    import onnxruntime as ort
    import torch

    from training.export import check_parity, export_onnx
    from training.zoo import FoldEnsemble, create_model, per_label_module

    torch.manual_seed(1)
    members = [
        per_label_module(create_model("cnn-s8", num_classes=len(NIH_LABELS), img_size=64).eval())
        for _ in range(3)
    ]
    ensemble = FoldEnsemble(members).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, raw = ensemble.raw(x)
        means = torch.stack([m(x)[0] for m in members]).mean(0)
    torch.testing.assert_close(logits, means)
    bias = torch.stack([m.model.get_classifier().bias for m in members]).mean(0)
    torch.testing.assert_close(raw.mean(dim=(2, 3)) + bias, logits, atol=1e-4, rtol=1e-4)
    path = tmp_path / "ensemble.onnx"
    export_onnx(ensemble, path, size=(64, 64), opset=17)
    check_parity(ensemble, path, x)
    heat = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["heatmap"], {"pixel_values": x.numpy()}
    )[0]
    assert heat.shape == (2, len(NIH_LABELS), 8, 8)


# --- POST /predict on the bundled model -----------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> Iterator[tuple[TestClient, ModelCard]]:
    if not (DEFAULT_MODEL_DIR / "model_card.json").is_file():
        pytest.skip(f"no bundled model at {DEFAULT_MODEL_DIR}")
    settings = Settings(
        model_dir=DEFAULT_MODEL_DIR,
        intra_op_threads=1,
        decode_workers=2,
        audit_db=None,
        api_keys=None,
        log_json=False,
    )
    with TestClient(create_app(settings)) as client:
        yield client, ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")


def _post(client: TestClient, data: bytes, heatmap: str) -> dict:
    r = client.post(
        "/predict", params={"heatmap": heatmap}, content=data, headers={"content-type": "image/png"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_shipped_model_declares_per_label_maps_of_at_least_8x8(bundled) -> None:
    client, card = bundled
    assert card.heatmap_shape == "per_label" and card.heatmap_method == "cam"
    grid = client.get("/v1/model").json()["runtime"]["heatmap_grid"]
    assert min(grid) >= 8


def test_every_flagged_response_has_a_readable_map_and_overlay(bundled, nih_dir: Path) -> None:
    """The acceptance rule on real uploads: flagged -> the map of the top flagged finding,
    non-blank and >= 8x8, and an overlay >= 512 px long side for a 1024 px upload."""
    client, _card = bundled
    paths = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[:6]
    flagged_seen = 0
    for path in paths:
        data = path.read_bytes()
        body = _post(client, data, "true")
        block = body["heatmap"]
        flagged = body["triage"]["screening_positive"]
        probs = {f["label"]: f["probability"] for f in body["findings"]}
        grid = np.asarray(block["grid"])
        assert grid.ndim == 2 and min(grid.shape) >= 8
        assert grid.max() > 0.5 and grid.max() - grid.min() > 0.1, path.name
        if flagged:
            flagged_seen += 1
            assert block["label"] == max(flagged, key=probs.__getitem__)
        overlay = Image.open(io.BytesIO(base64.b64decode(block["png_base64"])))
        assert max(overlay.size) >= 512 and overlay.size == Image.open(path).size
    assert flagged_seen, "no shared radiograph was flagged: the check would prove nothing"


def test_heatmap_for_a_named_finding(bundled, nih_dir: Path) -> None:
    client, _card = bundled
    data = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0].read_bytes()
    cardio = _post(client, data, "Cardiomegaly")["heatmap"]
    spaced = _post(client, data, "pleural thickening")["heatmap"]
    assert cardio["label"] == "Cardiomegaly" and spaced["label"] == "Pleural_Thickening"
    assert cardio["per_label"] is True
    assert cardio["grid"] != spaced["grid"]  # each finding has its own map
    assert _post(client, data, "false")["heatmap"] is None


def test_unknown_heatmap_value_is_a_clear_422(bundled, nih_dir: Path) -> None:
    client, _ = bundled
    data = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0].read_bytes()
    r = client.post(
        "/predict",
        params={"heatmap": "Broken_Bone"},
        content=data,
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "Cardiomegaly" in r.json()["detail"]
    assert client.get("/readyz").status_code == 200
