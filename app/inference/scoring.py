"""Logits to findings and a triage summary, from the card's thresholds (docs/serving.md)."""

from __future__ import annotations

import logging

import numpy as np

from app.api.schemas import (
    Finding,
    Triage,
)
from app.card import ModelCard
from app.labels import NO_FINDING

logger = logging.getLogger(__name__)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def score(card: ModelCard, logits: np.ndarray) -> tuple[list[Finding], Triage]:
    """Findings in model order and the triage summary (see docs/serving.md for "abnormal").

    Logits are divided by the card's calibration temperature before the sigmoid (1.0 unless the
    model was temperature-scaled): the card's thresholds were chosen on those probabilities.
    """
    probabilities = _sigmoid(np.asarray(logits, np.float64) / card.calibration.temperature)
    findings: list[Finding] = []
    for label, p in zip(card.labels, probabilities.tolist(), strict=True):
        s_thr = card.thresholds.screening[label].threshold
        d_thr = card.thresholds.diagnosis[label].threshold
        findings.append(
            Finding(
                label=label,
                probability=p,
                screening_threshold=s_thr,
                diagnosis_threshold=d_thr,
                screening_positive=p >= s_thr,
                diagnosis_positive=p >= d_thr,
            )
        )
    pathologies = [f for f in findings if f.label != NO_FINDING]
    diagnosis = [f.label for f in pathologies if f.diagnosis_positive]
    triage = Triage(
        screening_positive=[f.label for f in pathologies if f.screening_positive],
        diagnosis_positive=diagnosis,
        abnormal=bool(diagnosis),
    )
    return findings, triage
