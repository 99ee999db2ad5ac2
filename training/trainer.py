"""The training loop: AdamW + warm-up/cosine, AMP, clipping, early stopping, exact resume, DDP.

A run folder holds everything a run needs to be resumed, evaluated and exported:

    RUN/config.yaml        the resolved TrainConfig
    RUN/splits.csv         file, patient_id, split (train/val/test) of every cached image
    RUN/last.pt            full state after the last finished epoch (for --resume)
    RUN/best.pt            weights of the best epoch by validation mean AUROC (restored at the end)
    RUN/metrics.csv        one row per epoch; RUN/train_steps.csv one row per optimiser step
    RUN/run.json           summary: input spec, labels, counts, best epoch, commit
    RUN/tensorboard/       when TensorBoard is installed
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm import tqdm

from app.labels import NIH_LABELS
from training import distributed as D
from training.augment import AugmentConfig, Normalizer
from training.cache import Cache, build_cache, open_cache
from training.config import TrainConfig
from training.data import assign_splits, read_labels, split_summary
from training.dataset import CachedImages, EpochSampler, make_loader, sample_weights, shard
from training.losses import build_loss
from training.metrics import auroc_table, mean_auroc
from training.zoo import (
    count_parameters,
    create_model,
    data_config,
    is_vit,
    unwrap,
    zoo_defaults,
)

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; off on CPU unless asked (few CPUs gain from bf16)."""
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def channels_last(cfg: TrainConfig, model: nn.Module) -> bool:
    """Channels-last speeds up convolutions (oneDNN, cuDNN); ViTs have one conv: CNNs only."""
    return cfg.channels_last if cfg.channels_last is not None else not is_vit(model)


def prepare_cache(cfg: TrainConfig, run_dir: Path, interpolation: str, info: D.DistInfo) -> Cache:
    """Open ``cfg.cache``, or build it (rank 0) from ``cfg.labels`` at ``cfg.image_size``."""
    path = Path(cfg.cache) if cfg.cache else run_dir / "cache"
    if not (path / "cache.json").is_file():
        if not cfg.labels:
            raise ValueError(f"no cache at {path} and no --labels CSV to build one from")
        if info.is_main:
            table = read_labels(
                cfg.labels, image_root=cfg.image_root, official_lists=cfg.official_lists
            )
            log.info("building the %dpx cache of %d images in %s", cfg.image_size, len(table), path)
            build_cache(
                table,
                path,
                size=cfg.image_size,
                interpolation=interpolation,
                workers=cfg.cache_workers,
                progress=cfg.progress,
                source=str(cfg.labels),
            )
        D.barrier(info)
    cache = open_cache(path)
    if cache.size != cfg.image_size:
        raise ValueError(
            f"cache {path} is {cache.size}px but image_size is {cfg.image_size}; "
            "build a cache at the training size (`cxr-triage cache --image-size`)"
        )
    if cache.labels != tuple(NIH_LABELS):
        raise ValueError(f"cache {path} has labels {cache.labels}, expected {NIH_LABELS}")
    return cache


def predict(
    model: nn.Module,
    dataset: CachedImages,
    normalizer: Normalizer,
    *,
    batch_size: int,
    amp: str = "auto",
    loss_fn: nn.Module | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities [N, L] in dataset order (and the summed loss when ``loss_fn``)."""
    model.eval()
    probs: list[torch.Tensor] = []
    loss_sum = 0.0
    loader = make_loader(dataset, batch_size)
    with torch.inference_mode(), autocast(normalizer.device, amp):
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            logits = model(normalizer(images)).float()
            if loss_fn is not None:
                loss = loss_fn(logits, targets.to(logits.device))
                loss_sum += float(loss) * len(images)
            probs.append(torch.sigmoid(logits).cpu())
    if not probs:
        return np.zeros((0, dataset.targets.shape[1]), np.float32), 0.0
    return torch.cat(probs).numpy(), loss_sum


@dataclass
class State:
    """What --resume restores besides the weights and optimiser."""

    epoch: int = -1
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Builds model, data and optimiser from a TrainConfig and runs ``fit``."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        if not cfg.out:
            raise ValueError("a run folder (--out) is required")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume = resume
        self.info = D.from_env()
        self.device = D.resolve_device(cfg.device, self.info)
        D.init(self.info, self.device)
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // self.info.local_world)
        torch.set_num_threads(threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            if (self.run_dir / "last.pt").exists():
                raise FileExistsError(
                    f"{self.run_dir} already holds a run; pass --resume or choose another --out"
                )
            for stale in ("metrics.csv", "train_steps.csv", "run.json", "best.pt"):
                if self.info.is_main:
                    (self.run_dir / stale).unlink(missing_ok=True)

        torch.manual_seed(cfg.seed)
        defaults = zoo_defaults(cfg.arch)
        self.weight_decay = (
            cfg.weight_decay if cfg.weight_decay is not None else defaults.get("weight_decay", 0.05)
        )
        self.labels = list(NIH_LABELS)
        model = create_model(
            cfg.arch,
            num_classes=len(self.labels),
            img_size=cfg.image_size,
            pretrained=cfg.pretrained,
            checkpoint=cfg.checkpoint,
            drop_rate=cfg.drop_rate,
            drop_path_rate=cfg.drop_path_rate,
        )
        spec = data_config(model, img_size=cfg.image_size)
        if cfg.interpolation:
            spec["interpolation"] = cfg.interpolation
        self.cache = prepare_cache(cfg, self.run_dir, spec["interpolation"], self.info)
        if self.cache.interpolation != spec["interpolation"]:
            log.warning(
                "cache resized with %s, model default is %s; the card records the cache's",
                self.cache.interpolation,
                spec["interpolation"],
            )
            spec["interpolation"] = self.cache.interpolation
        self.spec = spec

        index = self.cache.index
        self.split = assign_splits(
            index,
            mode=cfg.split,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
        )
        self.counts = split_summary(index, self.split)
        train_pos = np.flatnonzero(self.split == "train")
        val_pos = np.flatnonzero(self.split == "val")
        if len(train_pos) == 0:
            raise ValueError("no training images after the split")
        self.train_ds = CachedImages(self.cache, train_pos)
        self.val_ds = CachedImages(
            self.cache, val_pos[shard(len(val_pos), self.info.rank, self.info.world)]
        )
        self.n_val = len(val_pos)

        self.sampler = EpochSampler(
            len(self.train_ds),
            weights=sample_weights(self.train_ds.targets, cfg.sampler, cfg.sampler_beta),
            seed=cfg.seed,
            rank=self.info.rank,
            world=self.info.world,
        )
        workers = (
            cfg.num_workers
            if cfg.num_workers is not None
            else (4 if self.device.type == "cuda" else 0)
        )
        self.loader = make_loader(
            self.train_ds,
            cfg.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=len(self.sampler) > cfg.batch_size,
        )
        self.steps_per_epoch = len(self.loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)

        model.to(self.device)
        self.channels_last = channels_last(cfg, model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = create_optimizer_v2(
            model,
            opt="adamw",
            lr=cfg.lr,
            weight_decay=self.weight_decay,
            layer_decay=cfg.layer_decay,
            fused=True if self.device.type == "cuda" else None,
        )
        total = max(1, cfg.epochs * self.steps_per_epoch)
        warmup = min(total - 1, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=max(1, total - warmup),
            lr_min=cfg.min_lr,
            warmup_t=warmup,
            warmup_lr_init=min(cfg.min_lr, cfg.lr),
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.loss_fn = build_loss(cfg, self.train_ds.targets).to(self.device)
        self.normalizer = Normalizer(
            spec["mean"], spec["std"], self.device, channels_last=self.channels_last
        )
        self.aug = (
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
        self.state = State()
        if resume:
            self._load_last()
        # the schedule is a function of the step, so a resumed run (or one given more --epochs)
        # needs no scheduler state: the cosine is rebuilt from the config and set to this step
        self.scheduler.step_update(self.state.global_step)
        self.net: nn.Module = model
        if cfg.compile:
            self.net = torch.compile(self.net)
        if self.info.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": self.cfg.to_dict(),
            "spec": self.spec,
            "labels": self.labels,
        }

    def _save(self, obj: dict[str, Any], name: str) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.run_dir / name)

    def _load_last(self) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = State(**ck["state"])
        torch.set_rng_state(ck["rng_cpu"])
        if ck["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng_cuda"])
        log.info(
            "resumed %s after epoch %d (step %d)",
            self.run_dir,
            self.state.epoch + 1,
            self.state.global_step,
        )

    # loop -------------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        for step, batch in enumerate(self.loader):
            if step >= self.steps_per_epoch:
                break
            yield batch

    def train_epoch(self, epoch: int) -> tuple[float, list[float], float]:
        """One epoch; returns mean loss, per-step losses and images/s."""
        self.net.train()
        gen = torch.Generator().manual_seed(
            (self.cfg.seed * 1_000_003 + epoch) * 97 + self.info.rank
        )
        losses: list[torch.Tensor] = []
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=not (self.cfg.progress and self.info.is_main),
        )
        for images, targets in self._batches(epoch):
            x = self.normalizer(images, aug=self.aug, generator=gen)
            y = targets.to(self.device, non_blocking=True)
            with autocast(self.device, self.cfg.amp):
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.state.global_step += 1
            self.scheduler.step_update(self.state.global_step)
            losses.append(loss.detach())
            seen += len(images)
            bar.update()
            if len(losses) % 10 == 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        step_losses = torch.stack(losses).float().cpu().tolist() if losses else []
        if not all(math.isfinite(v) for v in step_losses):
            raise FloatingPointError(f"loss became non-finite in epoch {epoch + 1}; lower --lr")
        mean = float(np.mean(step_losses)) if step_losses else float("nan")
        return mean, step_losses, seen * self.info.world / max(elapsed, 1e-9)

    def validate(self) -> dict[str, Any]:
        """Predictions on this rank's validation shard, gathered so every rank sees them all.

        BatchNorm running statistics drift apart between DDP ranks (each updates them from its own
        batches), so rank 0's, which are the ones saved, are broadcast first: every shard is then
        scored by exactly the weights in best.pt.
        """
        bs = self.cfg.eval_batch_size or 2 * self.cfg.batch_size
        if self.info.enabled:
            for buffer in unwrap(self.model).buffers():
                torch.distributed.broadcast(buffer, src=0)
        probs, loss_sum = predict(
            unwrap(self.model),
            self.val_ds,
            self.normalizer,
            batch_size=bs,
            amp=self.cfg.amp,
            loss_fn=self.loss_fn,
        )
        parts = D.gather_objects((probs, self.val_ds.targets, loss_sum), self.info)
        probs = np.concatenate([p[0] for p in parts]) if parts else probs
        targets = np.concatenate([p[1] for p in parts])
        n = len(targets)
        out: dict[str, Any] = {
            "val_images": n,
            "val_loss": sum(p[2] for p in parts) / n if n else float("nan"),
            "val_mean_auroc": mean_auroc(targets, probs, self.labels) if n else None,
        }
        if n:
            table = auroc_table(targets, probs, self.labels, n_boot=0)
            out["val_auroc"] = {k: v["auroc"] for k, v in table["per_label"].items()}
        return out

    def fit(self) -> dict[str, Any]:
        cfg, info, state = self.cfg, self.info, self.state
        if info.is_main:
            cfg.save(self.run_dir / "config.yaml")
            pd.DataFrame(
                {
                    "file": self.cache.index["file"],
                    "patient_id": self.cache.index["patient_id"],
                    "split": self.split,
                }
            ).to_csv(self.run_dir / "splits.csv", index=False)
            log.info(
                "%s: %d parameters; %s; %d steps/epoch on %s x%d",
                cfg.arch,
                count_parameters(self.model),
                self.counts,
                self.steps_per_epoch,
                self.device,
                info.world,
            )
        writer = self._tensorboard() if info.is_main else None
        finished = True
        for epoch in range(state.epoch + 1, cfg.epochs):
            t0 = time.perf_counter()
            train_loss, step_losses, img_s = self.train_epoch(epoch)
            val = self.validate()
            score = val["val_mean_auroc"]
            score = -val["val_loss"] if score is None else score
            improved = score > state.best_score + 1e-7
            state.epoch = epoch
            if improved:
                state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
            else:
                state.bad_epochs += 1
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_images": val["val_images"],
                "val_loss": val["val_loss"],
                "val_mean_auroc": val["val_mean_auroc"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_img_s": img_s,
                "epoch_s": time.perf_counter() - t0,
                "best": improved,
            }
            state.history.append(row)
            if info.is_main:
                if improved:
                    self._save(
                        {
                            "model": unwrap(self.model).state_dict(),
                            "epoch": epoch,
                            "score": score,
                            "config": cfg.to_dict(),
                            "spec": self.spec,
                            "labels": self.labels,
                        },
                        "best.pt",
                    )
                self._save(self._checkpoint(), "last.pt")
                self._append_csv("metrics.csv", [row])
                first = state.global_step - len(step_losses) + 1
                self._append_csv(
                    "train_steps.csv",
                    [
                        {"epoch": epoch + 1, "step": first + i, "loss": v}
                        for i, v in enumerate(step_losses)
                    ],
                )
                if writer is not None:
                    for k in ("train_loss", "val_loss", "val_mean_auroc", "lr", "train_img_s"):
                        if row[k] is not None:
                            writer.add_scalar(k, row[k], epoch + 1)
                auc = "n/a" if val["val_mean_auroc"] is None else f"{val['val_mean_auroc']:.4f}"
                log.info(
                    "epoch %d/%d train_loss %.4f val_loss %.4f val_mean_auroc %s "
                    "(%.0f img/s, %.1fs)%s",
                    epoch + 1,
                    cfg.epochs,
                    train_loss,
                    val["val_loss"],
                    auc,
                    img_s,
                    row["epoch_s"],
                    " *" if improved else "",
                )
            if cfg.patience and state.bad_epochs >= cfg.patience:
                log.info("early stop: no better val mean AUROC for %d epochs", cfg.patience)
                break
            if (
                cfg.stop_after_epoch
                and epoch + 1 >= cfg.stop_after_epoch
                and epoch + 1 < cfg.epochs
            ):
                finished = False
                log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
                break
        D.barrier(info)
        if finished and (self.run_dir / "best.pt").is_file():
            best = torch.load(self.run_dir / "best.pt", map_location="cpu", weights_only=True)
            unwrap(self.model).load_state_dict(best["model"])
        summary = self._summary(finished)
        if info.is_main:
            (self.run_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        if writer is not None:
            writer.close()
        D.barrier(info)
        return summary

    def _summary(self, finished: bool) -> dict[str, Any]:
        best = next((h for h in self.state.history if h["epoch"] == self.state.best_epoch + 1), {})
        return {
            "status": "finished" if finished else "paused",
            "arch": self.cfg.arch,
            "parameters": count_parameters(self.model),
            "labels": self.labels,
            "input": self.spec,
            "epochs_completed": self.state.epoch + 1,
            "best_epoch": self.state.best_epoch + 1,
            "best_val_mean_auroc": best.get("val_mean_auroc"),
            "splits": self.counts,
            "split_mode": self.cfg.split,
            "val_fraction": self.cfg.val_fraction,
            "seed": self.cfg.seed,
            "world_size": self.info.world,
            "device": str(self.device),
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.state.global_step,
            "commit": git_commit(),
            "cache": str(self.cache.path),
            "labels_source": self.cfg.labels,
        }

    def _append_csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        path = self.run_dir / name
        new = not path.is_file()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)

    def _tensorboard(self) -> Any:
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(self.run_dir / "tensorboard")


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; the entry point of ``cxr-triage train`` and of torchrun."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        D.shutdown(trainer.info)
