"""Thresholds, AUROC tables and losses: properties checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from app.labels import NIH_LABELS
from training.metrics import (
    auroc_table,
    diagnosis_threshold,
    fit_thresholds,
    operating_point,
    screening_threshold,
)


@st.composite
def scored_labels(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(4, 60))
    y = draw(arrays(np.int64, n, elements=st.integers(0, 1)))
    y[0], y[1] = 0, 1  # both classes
    # coarse scores produce ties, the hard case for "highest threshold"
    p = draw(arrays(np.float32, n, elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0])))
    return y, p.astype(np.float64)


def _sens(y: np.ndarray, p: np.ndarray, t: float) -> float:
    return float(((p >= t) & (y == 1)).sum() / (y == 1).sum())


@settings(max_examples=150, deadline=None)
@given(scored_labels(), st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_screening_threshold_is_the_highest_reaching_the_target(data, target) -> None:
    y, p = data
    t = screening_threshold(y, p, target)
    assert _sens(y, p, t) >= target
    higher = [s for s in np.unique(p) if s > t]
    assert all(_sens(y, p, s) < target for s in higher)


@settings(max_examples=150, deadline=None)
@given(scored_labels())
def test_diagnosis_thresholds_maximise_youden_and_f1(data) -> None:
    y, p = data

    def j(t: float) -> float:
        op = operating_point(y, p, t)
        return op.sensitivity + op.specificity - 1

    def f1(t: float) -> float:
        op = operating_point(y, p, t)
        if not op.ppv:
            return 0.0
        return 2 * op.ppv * op.sensitivity / (op.ppv + op.sensitivity)

    candidates = np.unique(p)
    assert j(diagnosis_threshold(y, p, "youden")) == pytest.approx(max(j(t) for t in candidates))
    assert f1(diagnosis_threshold(y, p, "f1")) == pytest.approx(max(f1(t) for t in candidates))


def test_fit_thresholds_covers_every_label_and_flags_single_class() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((300, len(NIH_LABELS))) < 0.2).astype(np.float32)
    y[:, NIH_LABELS.index("Hernia")] = 0
    p = np.clip(y * 0.3 + rng.random(y.shape) * 0.7, 0, 1)
    t = fit_thresholds(y, p, NIH_LABELS, target_sensitivity=0.9)
    assert set(t["screening"]) == set(t["diagnosis"]) == set(NIH_LABELS)
    assert t["unfitted"] == ["Hernia"]
    assert t["screening"]["Hernia"]["sensitivity"] is None
    for name in NIH_LABELS:
        if name != "Hernia":
            assert t["screening"][name]["sensitivity"] >= 0.9
            d = t["diagnosis"][name]
            op = operating_point(
                y[:, NIH_LABELS.index(name)], p[:, NIH_LABELS.index(name)], d["threshold"]
            )
            assert (d["sensitivity"], d["specificity"]) == (op.sensitivity, op.specificity)


def test_auroc_table_means_pathologies_only_with_cis() -> None:
    rng = np.random.default_rng(1)
    n = 400
    y = (rng.random((n, len(NIH_LABELS))) < 0.3).astype(np.float32)
    y[:, NIH_LABELS.index("Edema")] = 0  # single class: skipped and reported
    p = np.clip(y * 0.25 + rng.random(y.shape) * 0.75, 0, 1)
    p[:, NIH_LABELS.index("No Finding")] = rng.random(n)  # chance level, excluded from the mean
    table = auroc_table(y, p, NIH_LABELS, n_boot=60, seed=0)
    assert table["skipped"] == ["Edema"]
    assert "No Finding" not in table["mean_over"] and len(table["mean_over"]) == 13
    per = table["per_label"]
    assert per["Edema"]["auroc"] is None and per["Edema"]["negatives"] == n
    pathology_aucs = [per[name]["auroc"] for name in table["mean_over"]]
    assert table["mean_auroc"] == pytest.approx(np.mean(pathology_aucs))
    for e in per.values():
        if e["auroc"] is not None:
            assert e["auroc_ci_low"] <= e["auroc"] <= e["auroc_ci_high"]
    assert table["mean_auroc_ci_low"] < table["mean_auroc"] < table["mean_auroc_ci_high"]
    assert table["mean_auroc_ci_high"] - table["mean_auroc_ci_low"] < 0.05


def test_losses_reduce_to_bce_in_their_limits() -> None:
    from training.config import TrainConfig
    from training.losses import AsymmetricLoss, FocalLoss, build_loss

    torch.manual_seed(0)
    logits = torch.randn(16, 15) * 3
    targets = (torch.rand(16, 15) < 0.3).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert AsymmetricLoss(0.0, 0.0, 0.0)(logits, targets) == pytest.approx(bce.item(), rel=1e-5)
    assert FocalLoss(0.0, -1.0)(logits, targets) == pytest.approx(bce.item(), rel=1e-5)
    # focusing shrinks the loss of easy examples
    assert FocalLoss(2.0)(logits, targets) < bce
    assert AsymmetricLoss()(logits, targets) < bce
    train_targets = targets.numpy()
    wbce = build_loss(TrainConfig(loss="wbce"), train_targets)
    pos = train_targets.sum(0)
    want = np.clip((len(train_targets) - pos) / np.maximum(pos, 1), 1, 50)
    assert np.allclose(wbce.pos_weight.numpy(), want)
