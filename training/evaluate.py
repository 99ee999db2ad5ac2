"""Evaluate a run's best weights: AUROC with CIs, thresholds from validation, ROC curves.

``cxr-triage evaluate --run RUN [--split val|test]`` writes RUN/eval/<split>.json (per-label AUROC
with bootstrap CIs, mean over the 14 pathologies, sensitivity/specificity/PPV at the screening and
diagnosis thresholds) and RUN/eval/<split>_roc.png. Thresholds are always fitted on the validation
split (RUN/eval/thresholds.json), then applied unchanged to the split evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from app.labels import PATHOLOGIES
from training.augment import Normalizer
from training.cache import Cache, open_cache
from training.config import TrainConfig
from training.dataset import CachedImages
from training.distributed import DistInfo, resolve_device
from training.metrics import auroc_table, fit_thresholds, threshold_report
from training.trainer import predict
from training.zoo import create_model

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A finished run's config, best weights, input spec, labels, cache and split."""

    run_dir: Path
    cfg: TrainConfig
    summary: dict[str, Any]
    model: nn.Module
    spec: dict[str, Any]
    labels: list[str]
    cache: Cache
    split: np.ndarray
    device: torch.device
    weights_id: str

    def positions(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_run(run_dir: str | Path, *, device: str = "cpu", cache: str | None = None) -> LoadedRun:
    """Rebuild the model from RUN/config.yaml and load RUN/best.pt (random init never leaks out)."""
    run_dir = Path(run_dir)
    best_path = run_dir / "best.pt"
    if not best_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no best.pt; train it first (`cxr-triage train`)")
    cfg = TrainConfig.load(run_dir / "config.yaml")
    summary = (
        json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    )
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    labels = list(best["labels"])
    model = create_model(
        cfg.arch,
        num_classes=len(labels),
        img_size=cfg.image_size,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    model.load_state_dict(best["model"])
    dev = resolve_device(device, DistInfo())
    model.to(dev).eval()
    cache_path = Path(cache or summary.get("cache") or cfg.cache or run_dir / "cache")
    opened = open_cache(cache_path)
    splits = pd.read_csv(run_dir / "splits.csv", dtype=str, keep_default_na=False)
    if splits["file"].tolist() != opened.index["file"].tolist():
        raise ValueError(f"{cache_path} does not hold the images of {run_dir}/splits.csv")
    stat = best_path.stat()
    weights_id = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return LoadedRun(
        run_dir,
        cfg,
        summary,
        model,
        dict(best["spec"]),
        labels,
        opened,
        splits["split"].to_numpy(),
        dev,
        weights_id,
    )


def split_predictions(
    run: LoadedRun, split: str, *, batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(probs, targets) for one split, cached in RUN/eval/preds_<split>.npz per best.pt version.

    Always float32, like the exported graph: thresholds are set on the probabilities serving
    will produce, not on bf16 approximations of them.
    """
    out = run.run_dir / "eval" / f"preds_{split}.npz"
    if out.is_file():
        saved = np.load(out)
        if str(saved["weights_id"]) == run.weights_id:
            return saved["probs"], saved["targets"]
    ds = CachedImages(run.cache, run.positions(split))
    norm = Normalizer(run.spec["mean"], run.spec["std"], run.device)
    probs, _ = predict(
        run.model,
        ds,
        norm,
        batch_size=batch_size,
        amp="off",
        progress=progress,
        desc=f"predict {split}",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, probs=probs, targets=ds.targets, weights_id=run.weights_id)
    return probs, ds.targets


def plot_roc(
    targets: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    table: dict[str, Any],
    path: Path,
    title: str,
) -> None:
    """One ROC curve per label with both classes present, AUROC in the legend (headless Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    colors = plt.get_cmap("tab20").colors  # 15 labels: the default 10-colour cycle repeats
    for i, name in enumerate(labels):
        auc = table["per_label"][name]["auroc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(targets[:, i], probs[:, i])
        style = "--" if name not in PATHOLOGIES else "-"
        ax.plot(fpr, tpr, style, color=colors[i % len(colors)], lw=1.2, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    mean = table["mean_auroc"]
    ax.set_title(f"{title} - mean AUROC {mean:.3f}" if mean is not None else title)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 64,
    n_boot: int = 1000,
    target_sensitivity: float = 0.95,
    diagnosis_method: str = "youden",
    seed: int = 0,
    progress: bool = True,
    run: LoadedRun | None = None,
) -> dict[str, Any]:
    """Metrics of ``split`` (with thresholds fitted on val); writes RUN/eval/<split>.json + PNG."""
    run = run or load_run(run_dir, device=device)
    if not len(run.positions("val")):
        raise ValueError("the run has no validation images to fit thresholds on")
    if not len(run.positions(split)):
        raise ValueError(f"the run's {split!r} split is empty")
    val_probs, val_targets = split_predictions(run, "val", batch_size=batch_size, progress=progress)
    thresholds = fit_thresholds(
        val_targets,
        val_probs,
        run.labels,
        target_sensitivity=target_sensitivity,
        diagnosis_method=diagnosis_method,
    )
    probs, targets = (
        (val_probs, val_targets)
        if split == "val"
        else split_predictions(run, split, batch_size=batch_size, progress=progress)
    )
    table = auroc_table(targets, probs, run.labels, n_boot=n_boot, seed=seed)
    result = {
        "split": split,
        "metrics": table,
        "operating_points": threshold_report(targets, probs, run.labels, thresholds),
        "thresholds_fitted_on": "val",
    }
    out = run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    (out / f"{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_roc(
        targets,
        probs,
        run.labels,
        table,
        out / f"{split}_roc.png",
        f"{run.cfg.arch} on {split} ({len(targets)} images)",
    )
    result["thresholds"] = thresholds
    return result


def format_report(result: dict[str, Any]) -> str:
    """A fixed-width table of AUROC [CI] and screening/diagnosis sens/spec/PPV per label."""
    m = result["metrics"]
    ops = result["operating_points"]

    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:.3f}"

    lines = [
        f"split {result['split']}: {m['n_images']} images; thresholds fitted on validation",
        f"{'label':<19}{'pos':>5} {'AUROC':>6} {'95% CI':>13}   "
        f"{'scr sens':>8} {'spec':>5} {'PPV':>5}   {'dx sens':>7} {'spec':>5} {'PPV':>5}",
    ]
    for name, e in m["per_label"].items():
        s, d = ops["screening"][name], ops["diagnosis"][name]
        ci = "-" if e["auroc"] is None else f"{f(e['auroc_ci_low'])}-{f(e['auroc_ci_high'])}"
        lines.append(
            f"{name:<19}{e['positives']:>5} {f(e['auroc']):>6} {ci:>13}   "
            f"{f(s['sensitivity']):>8} {f(s['specificity']):>5} {f(s['ppv']):>5}   "
            f"{f(d['sensitivity']):>7} {f(d['specificity']):>5} {f(d['ppv']):>5}"
        )
    ci = f"{f(m['mean_auroc_ci_low'])}-{f(m['mean_auroc_ci_high'])}"
    lines.append(
        f"mean AUROC over {len(m['mean_over'])} pathologies: {f(m['mean_auroc'])} (95% CI {ci})"
    )
    if m["skipped"]:
        lines.append(f"no AUROC (one class only in this split): {', '.join(m['skipped'])}")
    return "\n".join(lines)
