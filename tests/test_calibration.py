"""Calibration and honest intervals: ECE, temperature scaling, patient-level and paired bootstrap.

Toy data with a known answer (an over-confident model; patients whose images share one label and
one score), then the served path: the real app applies the card's temperature before its
thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import roc_auc_score

from app.card import Calibration, ModelCard
from app.imaging.decode import decode_image
from app.imaging.preprocess import to_model_input
from app.labels import NIH_LABELS
from app.main import create_app
from app.settings import Settings
from training.calibration import expected_calibration_error, fit_temperature, sigmoid
from training.metrics import auroc_table, paired_comparison, weighted_auroc


def _overconfident(n: int, seed: int, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); the 'model' reports scale * z (too sure of itself)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 4))
    y = (rng.random((n, 4)) < sigmoid(z)).astype(np.float64)
    return scale * z, y


def test_temperature_scaling_lowers_ece_on_held_out_data() -> None:
    val_logits, val_y = _overconfident(4000, seed=0)
    test_logits, test_y = _overconfident(4000, seed=1)
    t = fit_temperature(val_logits, val_y)
    assert t == pytest.approx(3.0, rel=0.1)  # the over-confidence factor is recovered
    before = expected_calibration_error(test_y, sigmoid(test_logits))
    after = expected_calibration_error(test_y, sigmoid(test_logits, t))
    assert after < before / 3
    # one temperature for all labels keeps every label's ranking: AUROC does not move
    for i in range(4):
        assert roc_auc_score(test_y[:, i], sigmoid(test_logits, t)[:, i]) == pytest.approx(
            roc_auc_score(test_y[:, i], test_logits[:, i])
        )


def test_ece_of_hand_made_bins() -> None:
    # bin [0.2, 0.267): p = 0.25 twice, one positive -> |0.5 - 0.25| * 2/4
    # bin [0.933, 1]: p = 0.95 twice, both positive -> |1 - 0.95| * 2/4
    y = np.array([1, 0, 1, 1])
    p = np.array([0.25, 0.25, 0.95, 0.95])
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.25 + 0.5 * 0.05)


def test_weighted_auroc_equals_sklearn_with_sample_weights() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 1)  # many ties
    w = rng.integers(0, 4, (6, 300)).astype(float)
    fast = weighted_auroc(y, p, w)
    slow = [roc_auc_score(y, p, sample_weight=row) for row in w]
    assert fast == pytest.approx(slow, abs=1e-12)


def _clustered(n_patients: int = 40, per_patient: int = 15, seed: int = 0):
    """Every image of a patient has the patient's label and (almost) the patient's score."""
    rng = np.random.default_rng(seed)
    y_pat = rng.integers(0, 2, n_patients)
    s_pat = rng.normal(y_pat * 0.8, 1.0)
    groups = np.repeat(np.arange(n_patients), per_patient)
    y = np.repeat(y_pat, per_patient)[:, None].astype(float)
    p = (np.repeat(s_pat, per_patient) + rng.normal(0, 0.05, len(groups)))[:, None]
    return y, p, groups


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_clustered_data() -> None:
    y, p, groups = _clustered()
    labels = ["Atelectasis"]
    by_image = auroc_table(y, p, labels, n_boot=400, seed=0)
    by_patient = auroc_table(y, p, labels, n_boot=400, seed=0, groups=groups)
    assert by_image["bootstrap_unit"] == "image" and by_patient["bootstrap_unit"] == "patient"
    assert by_patient["n_patients"] == 40
    assert by_patient["mean_auroc"] == by_image["mean_auroc"]  # same point estimate

    def width(t: dict) -> float:
        return t["mean_auroc_ci_high"] - t["mean_auroc_ci_low"]

    # 15 near-copies per patient: the image bootstrap sees 600 "independent" images where
    # there are 40, so its interval is far too narrow (about sqrt(15) times)
    assert width(by_patient) > 2.0 * width(by_image)


def test_paired_comparison_detects_the_better_model_and_not_itself() -> None:
    rng = np.random.default_rng(5)
    n = 600
    groups = np.repeat(np.arange(n // 3), 3)
    y = rng.integers(0, 2, (n, 2)).astype(float)
    good = y + rng.normal(0, 0.6, y.shape)
    bad = y + rng.normal(0, 1.6, y.shape)
    labels = ["Atelectasis", "Effusion"]
    res = paired_comparison(y, good, bad, labels, groups=groups, n_boot=500)
    assert res["bootstrap_unit"] == "patient"
    assert res["mean"]["difference"] > 0 and res["mean"]["ci_low"] > 0
    assert res["mean"]["p_value"] < 0.01
    same = paired_comparison(y, good, good, labels, groups=groups, n_boot=200)
    assert same["mean"]["difference"] == 0 and same["mean"]["p_value"] == 1.0
    assert same["mean"]["ci_low"] == same["mean"]["ci_high"] == 0


def _settings(model_dir: Path) -> Settings:
    return Settings(  # type: ignore[call-arg]
        model_dir=model_dir,
        intra_op_threads=1,
        decode_workers=1,
        audit_db=None,
        api_keys=None,
        log_json=False,
    )


def test_service_divides_logits_by_the_card_temperature(tmp_path: Path, nih_dir: Path) -> None:
    """Through the real app: probabilities are sigmoid(logit / T), flags use them."""
    from tests.model_fixtures import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    card = ModelCard.load(folder / "model_card.json")
    card.calibration = Calibration(method="temperature", temperature=2.5, fitted_on="validation")
    card.save(folder / "model_card.json")
    png = sorted((nih_dir / "images" / "nih-1024").glob("*.png"))[0].read_bytes()

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = to_model_input(decode_image(png).pixels, card.input)
    logits = session.run(["logits"], {"pixel_values": x[None]})[0][0].astype(np.float64)
    expected = sigmoid(logits, 2.5)
    assert np.abs(expected - sigmoid(logits)).max() > 0.01  # T = 2.5 visibly changes them

    with TestClient(create_app(_settings(folder))) as client:
        r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200, r.text
        findings = r.json()["findings"]
        assert client.get("/v1/model").json()["calibration"]["temperature"] == 2.5
    assert [f["label"] for f in findings] == list(NIH_LABELS)
    got = np.array([f["probability"] for f in findings])
    assert got == pytest.approx(expected, abs=1e-5)
    for f in findings:
        assert f["screening_positive"] == (f["probability"] >= f["screening_threshold"])
        assert f["diagnosis_positive"] == (f["probability"] >= f["diagnosis_threshold"])
