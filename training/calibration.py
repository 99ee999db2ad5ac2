"""Calibration: expected calibration error, temperature scaling, reliability diagrams.

Temperature scaling (Guo et al., ICML 2017) divides every logit by one scalar T > 0 fitted on
validation data by minimising the binary cross-entropy over all (image, label) pairs. One T for
all labels keeps each label's ranking, so AUROC is unchanged; only the probabilities, and with
them the thresholds chosen on them, move. The card stores T and the service divides the graph's
logits by it before the sigmoid (``app.inference.scoring``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit

log = logging.getLogger(__name__)
N_BINS = 15
T_BOUNDS = (0.05, 20.0)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return expit(np.asarray(logits, np.float64) / temperature)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE over equal-width bins: sum over bins of |bin| / N * |positive fraction - mean p|.

    ``y`` and ``p`` may be [N, L]: multi-label pairs are pooled (each (image, label) pair is one
    prediction), the usual definition for sigmoid outputs.
    """
    y = np.asarray(y, np.float64).ravel()
    p = np.asarray(p, np.float64).ravel()
    if not len(p):
        return float("nan")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    return float(np.abs(sum_y - sum_p).sum() / len(p))


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> dict[str, list[float]]:
    """Per non-empty bin: mean predicted probability, observed positive fraction, count."""
    y = np.asarray(y, np.float64).ravel()
    p = np.asarray(p, np.float64).ravel()
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    keep = count > 0
    mean_p = np.bincount(bins, weights=p, minlength=n_bins)[keep] / count[keep]
    frac = np.bincount(bins, weights=y, minlength=n_bins)[keep] / count[keep]
    return {"mean_p": mean_p.tolist(), "observed": frac.tolist(), "count": count[keep].tolist()}


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    return float(-(y * log_expit(z) + (1 - y) * log_expit(-z)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The T in ``T_BOUNDS`` minimising the mean BCE of sigmoid(logits / T) (searched on log T)."""
    logits = np.asarray(logits, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(
        lambda t: _nll(logits, y, float(np.exp(t))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def calibration_report(
    val_logits: np.ndarray,
    val_targets: np.ndarray,
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    split: str,
    fit: bool = True,
    n_bins: int = N_BINS,
) -> dict[str, Any]:
    """Fit T on validation (or keep 1.0) and report ECE with T = 1 and with T on both splits."""
    temperature = fit_temperature(val_logits, val_targets) if fit else 1.0
    if fit and not T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] * 0.99:
        log.warning(
            "temperature %.3g is at the search bound %s: the validation logits are far from "
            "calibrated (too few epochs, or label smoothing?); check the reliability plot",
            temperature,
            T_BOUNDS,
        )
    out: dict[str, Any] = {
        "method": "temperature" if fit else "none",
        "temperature": temperature,
        "fitted_on": "validation" if fit else None,
        "ece_bins": n_bins,
        "ece_before": {},
        "ece_after": {},
        "nll_before": {},
        "nll_after": {},
    }
    split = "validation" if split == "val" else split
    for name, z, y in (("validation", val_logits, val_targets), (split, logits, targets)):
        out["ece_before"][name] = expected_calibration_error(y, sigmoid(z), n_bins)
        out["ece_after"][name] = expected_calibration_error(y, sigmoid(z, temperature), n_bins)
        out["nll_before"][name] = _nll(np.asarray(z, np.float64), np.asarray(y, np.float64), 1.0)
        out["nll_after"][name] = _nll(
            np.asarray(z, np.float64), np.asarray(y, np.float64), temperature
        )
    return out


def plot_reliability(
    y: np.ndarray, logits: np.ndarray, temperature: float, path: Path, title: str
) -> None:
    """Reliability diagram before and after temperature scaling, with ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(6, 7), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for t, style, name in ((1.0, "o-", "raw"), (temperature, "s-", f"T = {temperature:.3f}")):
        p = sigmoid(logits, t)
        r = reliability(y, p)
        ece = expected_calibration_error(y, p)
        ax.plot(r["mean_p"], r["observed"], style, ms=3, lw=1.2, label=f"{name} (ECE {ece:.4f})")
        hist.hist(p.ravel(), bins=N_BINS, range=(0, 1), histtype="step", label=name)
    ax.set_ylabel("observed positive fraction")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_yscale("log")
    hist.set_xlabel("predicted probability (all labels pooled)")
    hist.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
