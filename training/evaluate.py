"""Evaluate a run's best weights: AUROC with CIs, thresholds from validation, ROC curves.

``cxr-triage evaluate --run RUN [--split val|test]`` writes RUN/eval/<split>.json (per-label AUROC
with patient-level bootstrap CIs, mean over the 14 pathologies, sensitivity/specificity/PPV at the
screening and diagnosis thresholds, ECE before and after temperature scaling, AUROC by view, sex
and age band), RUN/eval/<split>_roc.png and RUN/eval/<split>_reliability.png. The temperature
and the thresholds are always fitted on the validation split (RUN/eval/thresholds.json), in that
order (thresholds on calibrated probabilities, as the service applies them), then applied
unchanged to the split evaluated. ``compare_runs`` is ``cxr-triage compare``: a paired
patient-level bootstrap of two runs on the same images.
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
from training.calibration import calibration_report, plot_reliability, sigmoid
from training.config import TrainConfig
from training.dataset import CachedImages
from training.distributed import DistInfo, resolve_device
from training.metrics import auroc_table, fit_thresholds, paired_comparison, threshold_report
from training.subgroups import metadata_for, subgroup_table
from training.trainer import predict_logits
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

    def patients(self, split: str) -> np.ndarray:
        """Patient id of each image of ``split``: the bootstrap's resampling unit."""
        return self.cache.index["patient_id"].astype(str).to_numpy()[self.positions(split)]

    def files(self, split: str) -> list[str]:
        return self.cache.index["file"].astype(str).to_numpy()[self.positions(split)].tolist()


def load_run(run_dir: str | Path, *, device: str = "auto", cache: str | None = None) -> LoadedRun:
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
        **(cfg.model_kwargs or {}),
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


def _cache_source(cache: Cache) -> str | None:
    """The labels CSV a cache was built from (where the view/sex/age metadata lives)."""
    info = cache.path / "cache.json"
    return json.loads(info.read_text()).get("source") or None if info.is_file() else None


def split_logits(
    run: LoadedRun, split: str, *, batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) for one split, cached in RUN/eval/preds_<split>.npz per best.pt version.

    Always float32, like the exported graph: the temperature and thresholds are set on the
    outputs serving will produce, not on bf16 approximations of them.
    """
    out = run.run_dir / "eval" / f"preds_{split}.npz"
    if out.is_file():
        saved = np.load(out)
        if str(saved["weights_id"]) == run.weights_id and "logits" in saved.files:
            return saved["logits"], saved["targets"]
    ds = CachedImages(run.cache, run.positions(split))
    norm = Normalizer(run.spec["mean"], run.spec["std"], run.device)
    logits, _ = predict_logits(
        run.model,
        ds,
        norm,
        batch_size=batch_size,
        amp="off",
        progress=progress,
        desc=f"predict {split}",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        logits=logits,
        probs=sigmoid(logits).astype(np.float32),
        targets=ds.targets,
        weights_id=run.weights_id,
    )
    return logits, ds.targets


def split_predictions(
    run: LoadedRun, split: str, *, batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(uncalibrated sigmoid probabilities, targets) for one split."""
    logits, targets = split_logits(run, split, batch_size=batch_size, progress=progress)
    return sigmoid(logits), targets


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
    device: str = "auto",
    batch_size: int = 64,
    n_boot: int = 1000,
    target_sensitivity: float = 0.95,
    diagnosis_method: str = "youden",
    seed: int = 0,
    progress: bool = True,
    run: LoadedRun | None = None,
    calibrate: bool = True,
    subgroup_boot: int | None = None,
    bootstrap_unit: str = "patient",
) -> dict[str, Any]:
    """Metrics of ``split`` (temperature and thresholds fitted on val); writes JSON + two PNGs."""
    run = run or load_run(run_dir, device=device)
    if not len(run.positions("val")):
        raise ValueError("the run has no validation images to fit thresholds on")
    if not len(run.positions(split)):
        raise ValueError(f"the run's {split!r} split is empty")
    val_logits, val_targets = split_logits(run, "val", batch_size=batch_size, progress=progress)
    logits, targets = (
        (val_logits, val_targets)
        if split == "val"
        else split_logits(run, split, batch_size=batch_size, progress=progress)
    )
    calibration = calibration_report(
        val_logits, val_targets, logits, targets, split=split, fit=calibrate
    )
    temperature = calibration["temperature"]
    thresholds = fit_thresholds(
        val_targets,
        sigmoid(val_logits, temperature),
        run.labels,
        target_sensitivity=target_sensitivity,
        diagnosis_method=diagnosis_method,
    )
    probs = sigmoid(logits, temperature)
    groups = run.patients(split)
    if bootstrap_unit not in ("patient", "image"):
        raise ValueError(f"bootstrap_unit must be patient or image, not {bootstrap_unit!r}")
    table = auroc_table(
        targets,
        probs,
        run.labels,
        n_boot=n_boot,
        seed=seed,
        groups=groups if bootstrap_unit == "patient" else None,
    )
    meta = metadata_for(run.files(split), run.cfg.labels or _cache_source(run.cache))
    table["subgroups"] = (
        subgroup_table(
            targets,
            probs,
            run.labels,
            meta,
            groups,
            n_boot=n_boot if subgroup_boot is None else subgroup_boot,
            seed=seed,
        )
        if meta is not None
        else {}
    )
    result = {
        "split": split,
        "metrics": table,
        "calibration": calibration,
        "operating_points": threshold_report(targets, probs, run.labels, thresholds),
        "thresholds_fitted_on": "val",
    }
    out = run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    thresholds["temperature"] = temperature
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    (out / f"{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{run.cfg.arch} on {split} ({len(targets)} images)"
    plot_roc(targets, probs, run.labels, table, out / f"{split}_roc.png", title)
    plot_reliability(targets, logits, temperature, out / f"{split}_reliability.png", title)
    result["thresholds"] = thresholds
    return result


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    *,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 64,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Paired patient-level bootstrap of AUROC(A) - AUROC(B) on the images both runs hold.

    The two runs may use different caches (image sizes); images are matched by file path, and
    the comparison refuses when the runs' ``split`` share no images or disagree on a label.
    Temperature scaling leaves AUROC unchanged, so raw probabilities are compared.
    """
    a = load_run(run_a, device=device)
    b = load_run(run_b, device=device)
    if a.labels != b.labels:
        raise ValueError(f"{run_a} and {run_b} have different label lists")
    files_a, files_b = a.files(split), b.files(split)
    common = sorted(set(files_a) & set(files_b))
    if not common:
        raise ValueError(f"the runs' {split!r} splits share no images")
    pos_a = {f: i for i, f in enumerate(files_a)}
    pos_b = {f: i for i, f in enumerate(files_b)}
    ia = np.array([pos_a[f] for f in common])
    ib = np.array([pos_b[f] for f in common])
    pa, ya = split_predictions(a, split, batch_size=batch_size, progress=progress)
    pb, yb = split_predictions(b, split, batch_size=batch_size, progress=progress)
    if not np.array_equal(ya[ia], yb[ib]):
        raise ValueError("the runs disagree on the labels of shared images")
    result = paired_comparison(
        ya[ia], pa[ia], pb[ib], a.labels, groups=a.patients(split)[ia], n_boot=n_boot, seed=seed
    )
    result.update(
        split=split,
        run_a=str(a.run_dir),
        run_b=str(b.run_dir),
        images_only_in_a=len(files_a) - len(common),
        images_only_in_b=len(files_b) - len(common),
    )
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """Per-label and mean AUROC of A and B, the difference, its paired 95% CI and p-value."""

    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:+.3f}" if v < 0 else f"{v:.3f}"

    lines = [
        f"A = {result['run_a']}\nB = {result['run_b']}",
        f"split {result['split']}: {result['n_images']} shared images; paired "
        f"{result['bootstrap_unit']}-level bootstrap, {result['bootstrap_replicates']} replicates",
        f"{'label':<19}{'A':>6} {'B':>6} {'A-B':>7} {'95% CI':>16} {'p':>7}",
    ]
    rows = list(result["per_label"].items())
    if "mean" in result:
        rows.append((f"mean ({len(result['mean_over'])})", result["mean"]))
    for name, e in rows:
        ci = f"{e.get('ci_low', 0):+.3f}..{e.get('ci_high', 0):+.3f}" if "ci_low" in e else "-"
        p = f"{e['p_value']:.4f}" if "p_value" in e else "-"
        lines.append(
            f"{name:<19}{e['a']:>6.3f} {e['b']:>6.3f} {e['difference']:>+7.3f} {ci:>16} {p:>7}"
        )
    return "\n".join(lines)


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
    unit = m.get("bootstrap_unit", "image")
    patients = f", {m['n_patients']} patients" if m.get("n_patients") else ""
    lines.append(
        f"mean AUROC over {len(m['mean_over'])} pathologies: {f(m['mean_auroc'])} (95% CI {ci}; "
        f"{unit}-level bootstrap{patients})"
    )
    if m["skipped"]:
        lines.append(f"no AUROC (one class only in this split): {', '.join(m['skipped'])}")
    cal = result.get("calibration")
    if cal:
        before, after = cal["ece_before"], cal["ece_after"]
        lines.append(
            f"calibration: temperature {cal['temperature']:.4f} ({cal['method']}, fitted on "
            f"{cal['fitted_on'] or '-'}); ECE ({cal['ece_bins']} bins, all labels pooled) "
            + "; ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before)
        )
    for attr, levels in m.get("subgroups", {}).items():
        parts = [
            f"{level} {f(g['mean_auroc'])} ({f(g['mean_auroc_ci_low'])}-"
            f"{f(g['mean_auroc_ci_high'])}, n={g['n_images']})"
            for level, g in levels.items()
        ]
        lines.append(f"mean AUROC by {attr}: " + "; ".join(parts))
    return "\n".join(lines)
