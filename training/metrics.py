"""Per-label AUROC with bootstrap CIs, operating thresholds, and sensitivity/specificity/PPV.

All curve and score computations are scikit-learn's (``roc_auc_score``, ``roc_curve``,
``precision_recall_curve``, ``confusion_matrix``). A label is positive when its probability is
``>=`` its threshold, which is how the service applies the card's thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from app.labels import PATHOLOGIES


def has_both_classes(y: np.ndarray) -> bool:
    return bool(y.min() != y.max())


def auroc_table(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per-label AUROC (+ percentile bootstrap CI) and their macro mean over the 14 pathologies.

    The bootstrap resamples images (with replacement) ``n_boot`` times; each replicate's AUROC is
    ``roc_auc_score`` with the resample counts as sample weights, which equals scoring the
    resampled arrays without copying them. A replicate where a label lost one of its classes is
    skipped for that label. Labels with a single class in the data have AUROC None and are listed
    in ``skipped``. The mean's CI comes from the same replicates (mean over the labels that have
    both classes in the full data).
    """
    n = len(targets)
    names = list(labels)
    valid = [i for i, name in enumerate(names) if has_both_classes(targets[:, i])]
    pathology = [i for i in valid if names[i] in PATHOLOGIES]
    per_label: dict[str, dict[str, Any]] = {}
    point = np.full(len(names), np.nan)
    for i in valid:
        point[i] = roc_auc_score(targets[:, i], probs[:, i])

    rng = np.random.default_rng(seed)
    boots = np.full((n_boot, len(names)), np.nan)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        keep = counts > 0
        for i in valid:
            y = targets[keep, i]
            if has_both_classes(y):
                boots[b, i] = roc_auc_score(y, probs[keep, i], sample_weight=counts[keep])
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2

    for i, name in enumerate(names):
        pos = int(targets[:, i].sum())
        entry: dict[str, Any] = {
            "auroc": None,
            "auroc_ci_low": None,
            "auroc_ci_high": None,
            "positives": pos,
            "negatives": n - pos,
        }
        if i in valid:
            col = boots[:, i][~np.isnan(boots[:, i])]
            entry["auroc"] = float(point[i])
            if len(col):
                entry["auroc_ci_low"] = float(np.percentile(col, lo_q))
                entry["auroc_ci_high"] = float(np.percentile(col, hi_q))
        per_label[name] = entry

    out: dict[str, Any] = {
        "n_images": n,
        "mean_auroc": None,
        "mean_auroc_ci_low": None,
        "mean_auroc_ci_high": None,
        "per_label": per_label,
        "skipped": [names[i] for i in range(len(names)) if i not in valid],
        "mean_over": [names[i] for i in pathology],
    }
    if pathology:
        out["mean_auroc"] = float(np.mean(point[pathology]))
        if n_boot:
            means = np.nanmean(boots[:, pathology], axis=1)
            means = means[~np.isnan(means)]
            out["mean_auroc_ci_low"] = float(np.percentile(means, lo_q))
            out["mean_auroc_ci_high"] = float(np.percentile(means, hi_q))
    return out


def mean_auroc(targets: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> float | None:
    """Macro mean AUROC over the pathologies that have both classes (no bootstrap)."""
    scores = [
        roc_auc_score(targets[:, i], probs[:, i])
        for i, name in enumerate(labels)
        if name in PATHOLOGIES and has_both_classes(targets[:, i])
    ]
    return float(np.mean(scores)) if scores else None


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    sensitivity: float | None
    specificity: float | None
    ppv: float | None


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> OperatingPoint:
    """Sensitivity, specificity and PPV of ``p >= threshold`` (None where undefined)."""
    tn, fp, fn, tp = confusion_matrix(
        y.astype(int), (p >= threshold).astype(int), labels=[0, 1]
    ).ravel()

    def ratio(a: int, b: int) -> float | None:
        return float(a / b) if b else None

    return OperatingPoint(
        float(threshold), ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    )


def screening_threshold(y: np.ndarray, p: np.ndarray, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity on (y, p) is >= ``target``.

    ``roc_curve`` lists thresholds in decreasing order with non-decreasing TPR, so the first one
    reaching the target is the highest; each threshold is an observed score, so ``p >= t`` keeps
    exactly the positives counted in that TPR.
    """
    _fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    idx = int(np.argmax(tpr >= target - 1e-12))
    return float(np.clip(thr[idx], 0.0, 1.0))


def diagnosis_threshold(y: np.ndarray, p: np.ndarray, method: str = "youden") -> float:
    """Youden's J (max sensitivity + specificity - 1) or the F1-maximising threshold."""
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
        finite = np.isfinite(thr)
        idx = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
        return float(np.clip(thr[idx], 0.0, 1.0))
    if method == "f1":
        precision, recall, thr = precision_recall_curve(y, p)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return float(np.clip(thr[int(np.argmax(f1))], 0.0, 1.0))
    raise ValueError(f"unknown diagnosis threshold method {method!r}")


FALLBACK_THRESHOLD = 0.5


def fit_thresholds(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    target_sensitivity: float = 0.95,
    diagnosis_method: str = "youden",
) -> dict[str, Any]:
    """Screening and diagnosis thresholds per label with what they achieve on the fitting data.

    A label with a single class in the fitting data cannot have a threshold chosen; it gets
    ``FALLBACK_THRESHOLD`` with sensitivity/specificity None and is listed in ``unfitted``.
    """
    screening: dict[str, dict[str, Any]] = {}
    diagnosis: dict[str, dict[str, Any]] = {}
    unfitted: list[str] = []
    for i, name in enumerate(labels):
        y, p = targets[:, i], probs[:, i]
        if has_both_classes(y):
            s_thr = screening_threshold(y, p, target_sensitivity)
            d_thr = diagnosis_threshold(y, p, diagnosis_method)
        else:
            s_thr = d_thr = FALLBACK_THRESHOLD
            unfitted.append(name)
        for table, thr in ((screening, s_thr), (diagnosis, d_thr)):
            op = operating_point(y, p, thr)
            fitted = name not in unfitted
            table[name] = {
                "threshold": thr,
                "sensitivity": op.sensitivity if fitted else None,
                "specificity": op.specificity if fitted else None,
            }
    return {
        "screening": screening,
        "diagnosis": diagnosis,
        "screening_target_sensitivity": target_sensitivity,
        "diagnosis_method": diagnosis_method,
        "chosen_on": "validation",
        "unfitted": unfitted,
    }


def threshold_report(
    targets: np.ndarray, probs: np.ndarray, labels: Sequence[str], thresholds: dict[str, Any]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Sensitivity/specificity/PPV of both thresholds on another split (e.g. test)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for kind in ("screening", "diagnosis"):
        out[kind] = {}
        for i, name in enumerate(labels):
            op = operating_point(targets[:, i], probs[:, i], thresholds[kind][name]["threshold"])
            out[kind][name] = {
                "threshold": op.threshold,
                "sensitivity": op.sensitivity,
                "specificity": op.specificity,
                "ppv": op.ppv,
            }
    return out
