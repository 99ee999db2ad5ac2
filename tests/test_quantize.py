"""int8 model folders (issue 14): real graphs quantised with ONNX Runtime's tools load through
ModelRuntime, answer /predict, and carry their measured cost in the card."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.card import ModelCard
from app.inference.runtime import ModelRuntime
from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from training.quantize import Images, images_from_files, pick_method, quantize_folder

INT8_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


def _nih_validation(nih_dir: Path, card: ModelCard, n: int = 48) -> tuple[list[Path], Images]:
    """The first ``n`` 1024 px NIH images with their labels from labels.csv."""
    with (nih_dir / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["subset"] == "nih-1024"][:n]
    files = [nih_dir / r["file"] for r in rows]
    columns = [label.replace(" ", "_") for label in card.labels]
    targets = np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float32)
    return files, Images(images_from_files(files, card).pixels, targets)


@pytest.fixture(scope="module")
def int8_default(tmp_path_factory: pytest.TempPathFactory, nih_dir: Path) -> Path:
    """The bundled CNN, statically quantised with calibration on real NIH images."""
    card = ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")
    files, validation = _nih_validation(nih_dir, card)
    out = tmp_path_factory.mktemp("int8") / "default-int8"
    quantize_folder(
        DEFAULT_MODEL_DIR,
        out,
        calibration=images_from_files(files[:16], card),
        validation=validation,
        seconds=0.5,
        threads=1,
    )
    return out


def test_static_int8_folder_is_int8_and_its_card_says_what_it_cost(int8_default: Path) -> None:
    graph = onnx.load(str(int8_default / "model.onnx"))
    assert pick_method(onnx.load(str(DEFAULT_MODEL_DIR / "model.onnx"))) == "static"
    assert INT8_OPS & {node.op_type for node in graph.graph.node}
    card = ModelCard.load(int8_default / "model_card.json")
    source = ModelCard.load(DEFAULT_MODEL_DIR / "model_card.json")
    q = card.export.quantization
    assert card.export.precision == "int8" and q is not None and q.method == "static"
    assert card.name == f"{source.name}-int8" and card.thresholds == source.thresholds
    assert q.calibration_images == 16 and q.validation_images == 48
    assert q.batch1_ms_fp32 > 0 and q.batch1_ms_int8 > 0
    assert q.mean_auroc_fp32 is not None and q.mean_auroc_int8 is not None
    assert q.mean_auroc_delta == pytest.approx(q.mean_auroc_int8 - q.mean_auroc_fp32, abs=2e-4)
    assert 0 <= q.mean_abs_dprob <= card.export.max_abs_dprob and q.fp32_prob_spread > 0
    assert -1.0 <= q.prob_correlation <= 1.0
    assert set(card.export.decisions_changed) == {"screening", "diagnosis"}
    assert card.export.decisions_total == 2 * 48 * len(card.labels)
    assert "int8 (static) quantisation" in card.limitations


def test_int8_folder_loads_and_answers_predict(int8_default: Path, nih_dir: Path) -> None:
    runtime = ModelRuntime.load(int8_default, providers="cpu", intra_op_threads=1)
    runtime.warm_up((1, 4))
    png = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0]
    settings = Settings(model_dir=int8_default, audit_db=None, api_keys=None, decode_processes=0)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/predict", files={"file": (png.name, png.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"]["name"].endswith("-int8")
        assert [f["label"] for f in body["findings"]] == runtime.card.labels
        assert all(0.0 <= f["probability"] <= 1.0 for f in body["findings"])
        assert client.get("/v1/model").json()["export"]["precision"] == "int8"


def test_dynamic_int8_of_a_matmul_graph_keeps_the_contract(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, src)
    card = quantize_folder(src, tmp_path / "tiny-int8", method="dynamic", seconds=0.2, threads=1)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "tiny-int8" / "model.onnx")).graph.node}
    assert ops & INT8_OPS
    assert card.export.quantization.method == "dynamic"
    assert card.export.quantization.mean_auroc_int8 is None  # no validation images given
    assert "not measured" in card.limitations
    runtime = ModelRuntime.load(tmp_path / "tiny-int8", providers="cpu")
    runtime.warm_up((1, 2))
    reference = ModelRuntime.load(src, providers="cpu")
    x = np.random.default_rng(0).random((2, *runtime.input_shape), dtype=np.float32)
    (logits8, heat8), (logits, heat) = runtime.run(x), reference.run(x)
    assert logits8.shape == logits.shape and heat8.shape == heat.shape
    assert np.abs(heat8 - heat).max() < 1e-6  # the heatmap path has no weight MatMul: float32


def test_export_quantize_flag_writes_a_servable_int8_folder(
    tiny_model_dir: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.cli import main

    monkeypatch.setenv("CXR_DATA_DIR", str(data_dir))

    out = tmp_path / "int8"
    argv = ["export", "--model", str(tiny_model_dir), "--quantize", "int8"]
    assert main([*argv, "--quantize-out", str(out), "--quantize-seconds", "0.2"]) == 0
    card = ModelCard.load(out / "model_card.json")
    assert card.export.precision == "int8" and card.export.quantization.method == "dynamic"
    assert card.export.parity_images == 64  # the shared NIH images, no labels: no AUROC
    assert card.export.quantization.mean_auroc_int8 is None
    assert ModelRuntime.load(out, providers="cpu").card.onnx_sha256 == card.onnx_sha256


def test_dynamic_int8_of_an_ensemble_with_shared_classifier_weights_loads(tmp_path: Path) -> None:
    """The bundled ensemble's classifier weights feed both the logits Gemm and the CAM Einsum;
    ONNX Runtime's dynamic quantiser transposes a Gemm weight in place, which without
    ``unshare_weights`` left the Einsum a [128, 15] weight and the graph failed to load."""
    from training.quantize import quantize_graph

    src = DEFAULT_MODEL_DIR / "model.onnx"
    dst = tmp_path / "model.onnx"
    quantize_graph(src, dst, "dynamic", None)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    fp32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    (logits, heat), (logits8, heat8) = (
        fp32.run(None, {"pixel_values": x}),
        int8.run(None, {"pixel_values": x}),
    )
    assert INT8_OPS & {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert heat8.shape == heat.shape and logits8.shape == logits.shape
    assert np.abs(logits8 - logits).max() < 0.5
