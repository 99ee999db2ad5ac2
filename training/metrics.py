"""Per-label AUROC with (patient-level) bootstrap CIs, paired comparisons, operating thresholds.

Point estimates and curves are scikit-learn's (``roc_auc_score``, ``roc_curve``,
``precision_recall_curve``, ``confusion_matrix``); bootstrap replicates use ``weighted_auroc``,
which scores all replicates of a label from one sort and equals ``roc_auc_score`` with the
replicate's counts as sample weights. A label is positive when its probability is
``>=`` its threshold, which is how the service applies the card's thresholds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from app.labels import PATHOLOGIES


def has_both_classes(y: np.ndarray) -> bool:
    return bool(y.min() != y.max())


def weighted_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under each row of ``weights`` [B, N] (bootstrap counts), vectorised.

    The Mann-Whitney form: the weighted share of (positive, negative) pairs ranked correctly, ties
    counting one half. It equals ``roc_auc_score(y, p, sample_weight=w)`` for every row ``w``
    (tests check this) but scores all replicates from one sort, which is what makes 1,000
    replicates of the 25,596-image test list take seconds, not minutes. NaN where a replicate
    lost one of the classes.
    """
    order = np.argsort(p, kind="mergesort")
    ps, ys = p[order], y[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(np.where(ys, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, w), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_weights(
    groups: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(group index of each image, replicate counts per group [B, G]) for a cluster bootstrap.

    With ``groups`` (patient ids), whole patients are drawn with replacement and each image weighs
    as often as its patient was drawn: images of one patient are correlated, so resampling them
    one by one would make the intervals too narrow. Without, every image is its own group.
    """
    if groups is None:
        index = np.arange(n)
        n_groups = n
    else:
        _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_groups = int(index.max()) + 1 if n else 0
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / max(n_groups, 1)), size=n_boot)
    return index, counts.astype(np.float64)


def _replicate_aurocs(
    targets: np.ndarray,
    probs: np.ndarray,
    columns: Sequence[int],
    index: np.ndarray,
    counts: np.ndarray,
    chunk: int = 100,
) -> np.ndarray:
    """[B, L] replicate AUROCs (NaN for labels not in ``columns``), in chunks to bound memory."""
    boots = np.full((len(counts), targets.shape[1]), np.nan)
    for start in range(0, len(counts), chunk):
        w = counts[start : start + chunk][:, index]
        for i in columns:
            boots[start : start + chunk, i] = weighted_auroc(targets[:, i], probs[:, i], w)
    return boots


def auroc_table(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-label AUROC (+ percentile bootstrap CI) and their macro mean over the 14 pathologies.

    Point estimates are scikit-learn's ``roc_auc_score``. The bootstrap resamples patients when
    ``groups`` (one patient id per image) is given, else images (``bootstrap_unit`` says which),
    ``n_boot`` times; a replicate where a label lost one of its classes is skipped for that label.
    Labels with a single class in the data have AUROC None and are listed in ``skipped``. The
    mean's CI comes from the same replicates (mean over the labels that have both classes in the
    full data).
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
    index, counts = bootstrap_weights(groups, n, n_boot, rng)
    boots = _replicate_aurocs(targets, probs, valid, index, counts)
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
        "n_patients": None if groups is None else len(np.unique(np.asarray(groups))),
        "bootstrap_unit": "patient" if groups is not None else "image",
        "bootstrap_replicates": n_boot,
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
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicate rows
                means = np.nanmean(boots[:, pathology], axis=1)
            means = means[~np.isnan(means)]
            if len(means):
                out["mean_auroc_ci_low"] = float(np.percentile(means, lo_q))
                out["mean_auroc_ci_high"] = float(np.percentile(means, hi_q))
    return out


def paired_comparison(
    targets: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: Sequence[str],
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """AUROC(A) - AUROC(B) on the same images: paired (patient-level) bootstrap CI and p-value.

    Both models are scored on the same resampled patients in every replicate, so the variation
    they share (which images are hard) cancels: a paired interval is much narrower than two
    independent ones, and is the right test of "is A better than B on this split". The p-value
    is two-sided, from the share of replicates on the other side of zero (floored at 1/B).
    """
    names = list(labels)
    valid = [i for i, name in enumerate(names) if has_both_classes(targets[:, i])]
    pathology = [i for i in valid if names[i] in PATHOLOGIES]
    rng = np.random.default_rng(seed)
    index, counts = bootstrap_weights(groups, len(targets), n_boot, rng)
    boot_a = _replicate_aurocs(targets, probs_a, valid, index, counts)
    boot_b = _replicate_aurocs(targets, probs_b, valid, index, counts)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2

    def summary(point_a: float, point_b: float, diffs: np.ndarray) -> dict[str, Any]:
        diffs = diffs[~np.isnan(diffs)]
        entry: dict[str, Any] = {"a": point_a, "b": point_b, "difference": point_a - point_b}
        if len(diffs):
            tail = min((diffs <= 0).mean(), (diffs >= 0).mean())
            entry.update(
                ci_low=float(np.percentile(diffs, lo_q)),
                ci_high=float(np.percentile(diffs, hi_q)),
                p_value=float(min(1.0, max(2 * tail, 1.0 / len(diffs)))),
            )
        return entry

    per_label = {}
    for i in valid:
        a = float(roc_auc_score(targets[:, i], probs_a[:, i]))
        b = float(roc_auc_score(targets[:, i], probs_b[:, i]))
        per_label[names[i]] = summary(a, b, boot_a[:, i] - boot_b[:, i])
    out: dict[str, Any] = {
        "n_images": len(targets),
        "bootstrap_unit": "patient" if groups is not None else "image",
        "bootstrap_replicates": n_boot,
        "per_label": per_label,
        "mean_over": [names[i] for i in pathology],
    }
    if pathology:
        mean_a = float(np.mean([per_label[names[i]]["a"] for i in pathology]))
        mean_b = float(np.mean([per_label[names[i]]["b"] for i in pathology]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            diffs = np.nanmean(boot_a[:, pathology], axis=1) - np.nanmean(
                boot_b[:, pathology], axis=1
            )
        out["mean"] = summary(mean_a, mean_b, diffs)
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
