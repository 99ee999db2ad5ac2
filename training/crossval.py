"""Patient-wise k-fold cross-validation: every image scored out of fold, one model per fold.

Why: with ~1.2k images, one validation split of ~230 images gives a mean-AUROC interval ±0.05 wide
and chooses the epoch on the very images it then scores. Here every image is scored exactly once,
by the model that did not see its patient, and nothing is chosen on those scores: each fold trains
a fixed schedule (the config's epochs, cosine to ``min_lr``) and the last epoch is kept. The card's
estimate is the out-of-fold mean AUROC with a patient-level bootstrap CI, and its thresholds are
fitted on the out-of-fold probabilities.

Folds: scikit-learn's ``StratifiedGroupKFold`` over patients (no patient in two folds), stratified
on each image's rarest positive label so every fold gets some of the rare findings. The fold
assignment depends on ``fold_seed`` only, so runs with different training seeds share their folds
and their out-of-fold predictions can be averaged (how :func:`ensemble_gain` measures what
averaging models buys).

A CV folder holds ``folds.csv``, ``fold{k}/model.pt`` (weights + input spec), ``oof.npz``
(probabilities, logits, targets, patient ids, folds) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from app.labels import NIH_LABELS, PATHOLOGIES
from training import distributed as D
from training.augment import AugmentConfig, Normalizer
from training.cache import Cache
from training.config import TrainConfig
from training.dataset import CachedImages, EpochSampler, make_loader, sample_weights
from training.losses import build_loss
from training.metrics import auroc_table
from training.trainer import channels_last, git_commit, prepare_cache
from training.zoo import count_parameters, create_model, data_config, zoo_defaults

log = logging.getLogger(__name__)


def assign_folds(index: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) per image; patients never span two folds."""
    targets = index[list(NIH_LABELS)].to_numpy()
    prevalence = targets.sum(axis=0)
    order = np.argsort(prevalence)  # rarest label first
    key = np.full(len(index), -1)
    for col in order[::-1]:  # rarest written last wins
        key[targets[:, col] > 0] = col
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = np.full(len(index), -1)
    groups = index["patient_id"].astype(str).to_numpy()
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(index)), key, groups)):
        folds[held] = fold
    return folds


def source_subset(index: pd.DataFrame) -> np.ndarray:
    """'64px' for images that exist only at 64 px, 'larger' for the 1024/256/misc sources.

    The source-size shortcut check: a model that tells the sources apart (their label mixes
    differ) scores well pooled but not within each source.
    """
    files = index["file"].astype(str)
    return np.where(files.str.contains("nih-64"), "64px", "larger")


@dataclass
class FoldResult:
    fold: int
    logits: np.ndarray
    curve: list[dict[str, Any]]
    seconds: float


def _model_for(cfg: TrainConfig, n_labels: int) -> tuple[nn.Module, dict[str, Any]]:
    model = create_model(
        cfg.arch,
        num_classes=n_labels,
        img_size=cfg.image_size,
        pretrained=cfg.pretrained,
        checkpoint=cfg.checkpoint,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    spec = data_config(model, img_size=cfg.image_size)
    return model, spec


def predict_logits(
    model: nn.Module, ds: CachedImages, normalizer: Normalizer, batch_size: int = 128
) -> np.ndarray:
    model.eval()
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for images, _ in make_loader(ds, batch_size):
            out.append(model(normalizer(images)).float().cpu())
    return torch.cat(out).numpy()


def train_fold(
    cfg: TrainConfig,
    cache: Cache,
    train_pos: np.ndarray,
    held_pos: np.ndarray,
    *,
    fold: int,
    out_dir: Path,
    curve_every: int = 10,
) -> FoldResult:
    """Train one fold on ``train_pos`` for the full schedule; return held-out logits (last epoch).

    Every ``curve_every`` epochs the held-out mean AUROC is logged as a learning curve only: it
    chooses nothing (the last epoch is kept whatever the curve says).
    """
    device = torch.device("cpu" if cfg.device == "auto" else cfg.device)
    torch.manual_seed(cfg.seed * 1009 + fold)
    labels = list(NIH_LABELS)
    model, spec = _model_for(cfg, len(labels))
    spec["interpolation"] = cache.interpolation
    cl = channels_last(cfg, model)
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    train_ds = CachedImages(cache, train_pos)
    held_ds = CachedImages(cache, held_pos)
    sampler = EpochSampler(
        len(train_ds),
        weights=sample_weights(train_ds.targets, cfg.sampler, cfg.sampler_beta),
        seed=cfg.seed * 1009 + fold,
    )
    loader = make_loader(train_ds, cfg.batch_size, sampler=sampler, drop_last=True)
    steps = len(loader)
    weight_decay = (
        cfg.weight_decay
        if cfg.weight_decay is not None
        else zoo_defaults(cfg.arch).get("weight_decay", 0.05)
    )
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=cfg.lr, weight_decay=weight_decay, layer_decay=cfg.layer_decay
    )
    total = max(1, cfg.epochs * steps)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps))
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=min(cfg.min_lr, cfg.lr),
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scheduler.step_update(0)
    loss_fn = build_loss(cfg, train_ds.targets).to(device)
    normalizer = Normalizer(spec["mean"], spec["std"], device, channels_last=cl)
    aug = (
        AugmentConfig(
            cfg.aug_rotate,
            cfg.aug_translate,
            cfg.aug_scale,
            cfg.aug_hflip,
            cfg.aug_brightness,
            cfg.aug_contrast,
        )
        if cfg.augment
        else None
    )
    held_targets = held_ds.targets
    curve: list[dict[str, Any]] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 97 + fold)
        losses = []
        for images, targets in loader:
            x = normalizer(images, aug=aug, generator=gen)
            loss = loss_fn(model(x).float(), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            losses.append(loss.item())
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError(f"fold {fold}: loss became non-finite in epoch {epoch + 1}")
        if (epoch + 1) % curve_every == 0 or epoch + 1 == cfg.epochs:
            logits = predict_logits(model, held_ds, normalizer)
            table = auroc_table(held_targets, sigmoid(logits), labels, n_boot=0)
            curve.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(losses)),
                    "held_mean_auroc": table["mean_auroc"],
                }
            )
            log.info(
                "fold %d epoch %d/%d train_loss %.4f held-out mean AUROC %.4f (%.0fs)",
                fold,
                epoch + 1,
                cfg.epochs,
                np.mean(losses),
                table["mean_auroc"] or float("nan"),
                time.perf_counter() - start,
            )
    logits = predict_logits(model, held_ds, normalizer)
    fold_dir = out_dir / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": model.cpu().state_dict(),
            "arch": cfg.arch,
            "spec": spec,
            "labels": labels,
            "config": cfg.to_dict(),
            "fold": fold,
            "parameters": count_parameters(model),
        },
        fold_dir / "model.pt",
    )
    return FoldResult(fold, logits, curve, time.perf_counter() - start)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def oof_report(
    targets: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray,
    subsets: np.ndarray,
    *,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Out-of-fold AUROC table (patient bootstrap) and the per-source means (shortcut check)."""
    labels = list(NIH_LABELS)
    table = auroc_table(targets, probs, labels, n_boot=n_boot, groups=groups)
    by_source = {}
    for name in ("64px", "larger"):
        rows = subsets == name
        sub = auroc_table(targets[rows], probs[rows], labels, n_boot=0) if rows.any() else {}
        by_source[name] = {"images": int(rows.sum()), "mean_auroc": sub.get("mean_auroc")}
    return {"table": table, "by_source": by_source}


def run_crossval(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    k: int = 5,
    fold_seed: int = 0,
    folds_to_run: list[int] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Train the k fold models (skipping folds already saved), then score out of fold."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or 1)
    _, spec = _model_for(cfg, len(NIH_LABELS))
    cache = prepare_cache(cfg, out_dir, cfg.interpolation or spec["interpolation"], D.from_env())
    index = cache.index
    folds = assign_folds(index, k, fold_seed)
    pd.DataFrame({"file": index["file"], "patient_id": index["patient_id"], "fold": folds}).to_csv(
        out_dir / "folds.csv", index=False
    )
    cfg.save(out_dir / "config.yaml")
    n_labels = len(NIH_LABELS)
    logits_path = out_dir / "oof_logits.npy"
    logits = (
        np.load(logits_path) if logits_path.is_file() else np.full((len(index), n_labels), np.nan)
    )
    curves: dict[str, Any] = {}
    curves_path = out_dir / "curves.json"
    if curves_path.is_file():
        curves = json.loads(curves_path.read_text())
    for fold in folds_to_run if folds_to_run is not None else range(k):
        held = np.flatnonzero(folds == fold)
        if not np.isnan(logits[held]).any() and (out_dir / f"fold{fold}" / "model.pt").is_file():
            log.info("fold %d already done; skipping", fold)
            continue
        res = train_fold(
            cfg, cache, np.flatnonzero(folds != fold), held, fold=fold, out_dir=out_dir
        )
        logits[held] = res.logits
        curves[str(fold)] = {"curve": res.curve, "seconds": res.seconds}
        np.save(logits_path, logits)
        curves_path.write_text(json.dumps(curves, indent=2) + "\n")
    if np.isnan(logits).any():
        log.info("some folds are not trained yet; no out-of-fold report")
        return {}
    return summarise(out_dir, n_boot=n_boot)


def load_oof(out_dir: Path) -> dict[str, Any]:
    """Out-of-fold logits with their targets, patient ids, folds and source subsets."""
    from training.cache import open_cache

    cfg = TrainConfig.load(out_dir / "config.yaml")
    folds = pd.read_csv(out_dir / "folds.csv", dtype={"patient_id": str})
    cache = open_cache(cfg.cache) if cfg.cache else open_cache(out_dir / "cache")
    if list(cache.index["file"]) != list(folds["file"]):
        raise ValueError(f"{out_dir}: folds.csv does not match the cache's images")
    return {
        "logits": np.load(out_dir / "oof_logits.npy"),
        "targets": cache.targets,
        "groups": folds["patient_id"].to_numpy(),
        "folds": folds["fold"].to_numpy(),
        "subsets": source_subset(cache.index),
        "config": cfg,
        "cache": cache,
    }


def summarise(out_dir: str | Path, *, n_boot: int = 1000) -> dict[str, Any]:
    """Write ``summary.json``: out-of-fold AUROC (patient-bootstrap CI), per fold and source."""
    out_dir = Path(out_dir)
    oof = load_oof(out_dir)
    probs = sigmoid(oof["logits"])
    report = oof_report(oof["targets"], probs, oof["groups"], oof["subsets"], n_boot=n_boot)
    per_fold = {}
    for fold in np.unique(oof["folds"]):
        rows = oof["folds"] == fold
        t = auroc_table(oof["targets"][rows], probs[rows], list(NIH_LABELS), n_boot=0)
        per_fold[str(int(fold))] = {
            "images": int(rows.sum()),
            "patients": len(np.unique(oof["groups"][rows])),
            "mean_auroc": t["mean_auroc"],
        }
    curves_path = out_dir / "curves.json"
    curves = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    ck = torch.load(out_dir / "fold0" / "model.pt", map_location="cpu", weights_only=False)
    summary = {
        "arch": oof["config"].arch,
        "parameters": ck.get("parameters"),
        "folds": len(per_fold),
        "images": len(probs),
        "patients": len(np.unique(oof["groups"])),
        "epochs": oof["config"].epochs,
        "seed": oof["config"].seed,
        "oof_mean_auroc": report["table"]["mean_auroc"],
        "oof_mean_auroc_ci": [
            report["table"]["mean_auroc_ci_low"],
            report["table"]["mean_auroc_ci_high"],
        ],
        "bootstrap_unit": report["table"]["bootstrap_unit"],
        "by_source": report["by_source"],
        "per_fold": per_fold,
        "per_label": {
            k: v for k, v in report["table"]["per_label"].items() if k in list(NIH_LABELS)
        },
        "train_seconds": {f: c.get("seconds") for f, c in curves.items()},
        "curves": {f: c.get("curve") for f, c in curves.items()},
        "commit": git_commit(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ensemble_gain(cv_dirs: list[Path], *, n_boot: int = 1000) -> dict[str, Any]:
    """Out-of-fold mean AUROC of each run and of their averaged logits (same folds required).

    Runs that differ only in training seed score each image with models that never saw its
    patient, so the average of their out-of-fold logits is an honest out-of-fold ensemble.
    The paired patient bootstrap gives the CI of the gain over the first run.
    """
    from training.metrics import paired_comparison

    oofs = [load_oof(Path(d)) for d in cv_dirs]
    folds0 = oofs[0]["folds"]
    for d, o in zip(cv_dirs, oofs, strict=True):
        if not np.array_equal(o["folds"], folds0):
            raise ValueError(f"{d} has other folds than {cv_dirs[0]}")
    targets, groups = oofs[0]["targets"], oofs[0]["groups"]
    singles = [sigmoid(o["logits"]) for o in oofs]
    averaged = sigmoid(np.mean([o["logits"] for o in oofs], axis=0))
    labels = list(NIH_LABELS)
    out: dict[str, Any] = {"runs": [str(d) for d in cv_dirs], "single": []}
    for d, p in zip(cv_dirs, singles, strict=True):
        out["single"].append(
            {"run": str(d), "mean_auroc": auroc_table(targets, p, labels, n_boot=0)["mean_auroc"]}
        )
    t = auroc_table(targets, averaged, labels, n_boot=n_boot, groups=groups)
    out["ensemble"] = {
        "mean_auroc": t["mean_auroc"],
        "ci": [t["mean_auroc_ci_low"], t["mean_auroc_ci_high"]],
    }
    out["paired_vs_first"] = paired_comparison(
        targets, averaged, singles[0], labels, n_boot=n_boot, groups=groups
    )
    return out


PATHOLOGY_SET = frozenset(PATHOLOGIES)


def flip_tta_gain(cv_dir: str | Path, *, n_boot: int = 1000) -> dict[str, Any]:
    """Out of fold: does averaging each image with its left-right mirror help?

    Each fold model scores its own held-out images as they are and mirrored; the averaged logits
    are compared with the plain ones by a paired patient bootstrap. (Training never flips: the
    heart is on the patient's left, so a mirrored radiograph is not a normal one.)
    """
    import torch

    from training.export import load_cv_members
    from training.metrics import paired_comparison

    cv_dir = Path(cv_dir)
    oof = load_oof(cv_dir)
    members, spec, labels = load_cv_members([cv_dir])
    cache = oof["cache"]
    normalizer = Normalizer(spec["mean"], spec["std"], torch.device("cpu"))
    plain = np.zeros_like(oof["logits"])
    flipped = np.zeros_like(oof["logits"])
    for fold, member in enumerate(members):
        rows = np.flatnonzero(oof["folds"] == fold)
        ds = CachedImages(cache, rows)
        with torch.inference_mode():
            for start in range(0, len(rows), 128):
                idx = list(range(start, min(start + 128, len(rows))))
                images, _ = ds.__getitems__(idx)
                x = normalizer(images)
                plain[rows[idx]] = member.model(x).numpy()
                flipped[rows[idx]] = member.model(torch.flip(x, dims=[3])).numpy()
    tta = (plain + flipped) / 2
    comparison = paired_comparison(
        oof["targets"], sigmoid(tta), sigmoid(plain), labels, n_boot=n_boot, groups=oof["groups"]
    )
    return {
        "max_abs_diff_vs_stored_oof": float(np.abs(plain - oof["logits"]).max()),
        "mean": comparison["mean"],
    }
