"""The training loop: AdamW + warm-up/cosine, AMP, clipping, early stopping, exact resume, DDP.

A run folder holds everything a run needs to be resumed, evaluated and exported:

    RUN/config.yaml        the resolved TrainConfig
    RUN/splits.csv         file, patient_id, split (train/val/test) of every cached image
    RUN/last.pt            full state (every rank's RNG too) every ``checkpoint_every`` epochs
                           and at the end, written in a background thread (for --resume)
    RUN/best.pt            weights of the best epoch by validation mean AUROC (restored at the end)
    RUN/metrics.csv        one row per epoch; RUN/train_steps.csv one row per optimiser step
    RUN/run.json           summary: input spec, labels, counts, best epoch, commit, the
                           effective lr (base_lr x global batch / 256) and the checkpoint report
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from app.labels import NIH_LABELS
from training import distributed as D
from training.augment import AugmentConfig, Normalizer, RandAugmentConfig
from training.cache import Cache, build_cache, open_cache
from training.checkpoint import load_checkpoint
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
    # one decision for all ranks: a rank that looked a moment later could see rank 0's half-built
    # cache, skip the barrier the others wait in, and read a partial index
    build = D.broadcast_object(not (path / "cache.json").is_file(), info)
    if build:
        if not cfg.labels:
            raise ValueError(f"no cache at {path} and no --labels CSV to build one from")
        if info.enabled:
            # building 112k images takes far longer than the process group's timeout, during
            # which every other rank would hang in the barrier
            raise ValueError(
                f"no cache at {path}: build it before torchrun with `cxr-triage cache --labels "
                f"{cfg.labels} --out {path} --image-size {cfg.image_size}` (a multi-process run "
                "does not build one)"
            )
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


def predict_logits(
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
    """float32 logits [N, L] in dataset order (and the summed loss when ``loss_fn``).

    Logits rather than probabilities: temperature scaling is fitted on them, and sigmoid of a
    float32 logit beyond about 17 rounds to exactly 1.0.
    """
    model.eval()
    out: list[torch.Tensor] = []
    loss_sum = 0.0
    loader = make_loader(dataset, batch_size)
    with torch.inference_mode(), autocast(normalizer.device, amp):
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            logits = model(normalizer(images)).float()
            if loss_fn is not None:
                loss = loss_fn(logits, targets.to(logits.device))
                loss_sum += float(loss) * len(images)
            out.append(logits.cpu())
    if not out:
        return np.zeros((0, dataset.targets.shape[1]), np.float32), 0.0
    return torch.cat(out).numpy(), loss_sum


def predict(
    model: nn.Module,
    dataset: CachedImages,
    normalizer: Normalizer,
    **kwargs: Any,
) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities [N, L] in dataset order (and the summed loss when ``loss_fn``)."""
    logits, loss_sum = predict_logits(model, dataset, normalizer, **kwargs)
    return torch.sigmoid(torch.from_numpy(logits)).numpy(), loss_sum


def _cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of every tensor in ``obj``: a snapshot the background writer owns."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints atomically (tmp + rename), in a background thread when ``background``.

    The state is copied to CPU memory synchronously (a consistent snapshot: training goes on
    changing the live tensors), then serialised off the training thread; a ViT-B/16 last.pt with
    AdamW state is ~1 GB, seconds of disk time that would otherwise stall every GPU. Writes run
    in order, at most ``max_pending`` queued (an epoch's best.pt and last.pt), so snapshots cannot
    pile up when the disk is slower than an epoch; ``wait`` re-raises a failed write.
    """

    def __init__(self, run_dir: Path, *, background: bool, max_pending: int = 2) -> None:
        self.run_dir = run_dir
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending: list[Future] = []
        self.max_pending = max_pending

    def _write(self, obj: dict[str, Any], name: str) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, self.run_dir / name)

    def save(self, obj: dict[str, Any], name: str) -> None:
        while len(self.pending) >= self.max_pending:
            self.pending.pop(0).result()
        snapshot = _cpu_copy(obj)
        if self.pool is None:
            self._write(snapshot, name)
        else:
            self.pending.append(self.pool.submit(self._write, snapshot, name))

    def wait(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def close(self) -> None:
        self.wait()
        if self.pool is not None:
            self.pool.shutdown()


def effective_lr(cfg: TrainConfig, world: int) -> tuple[float, int, str]:
    """(peak lr, global batch, rule): base_lr x global batch / 256 when base_lr is set."""
    global_batch = cfg.batch_size * world
    if cfg.base_lr is not None:
        return cfg.base_lr * global_batch / 256, global_batch, "base_lr x global_batch / 256"
    return cfg.lr, global_batch, "lr as given (not scaled with the global batch)"


def _rng_state() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


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
            pretrained=cfg.pretrained and not cfg.checkpoint,
            drop_rate=cfg.drop_rate,
            drop_path_rate=cfg.drop_path_rate,
            **(cfg.model_kwargs or {}),
        )
        self.checkpoint_report: dict[str, Any] | None = None
        if cfg.checkpoint and not resume:
            report = load_checkpoint(model, cfg.checkpoint, min_fraction=cfg.checkpoint_min_loaded)
            self.checkpoint_report = {
                k: v
                for k, v in report.to_dict().items()
                if k not in ("loaded",)  # the names of what loaded add nothing but length
            }
            self.checkpoint_report["loaded"] = len(report.loaded)
            if self.info.is_main:
                log.info("checkpoint: %s", report.summary())
        # the same init on every rank (DDP also broadcasts rank 0's weights), then a different
        # stream per rank: the same seed everywhere gives every rank the same drop-path and
        # dropout masks, which wastes the extra ranks' regularisation
        torch.manual_seed(cfg.seed + self.info.rank)
        spec = data_config(model, img_size=cfg.image_size)
        if cfg.interpolation:
            spec["interpolation"] = cfg.interpolation
        if cfg.mean is not None:
            spec["mean"] = tuple(cfg.mean)
        if cfg.std is not None:
            spec["std"] = tuple(cfg.std)
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
        self.lr, self.global_batch, self.lr_rule = effective_lr(cfg, self.info.world)
        self.optimizer = create_optimizer_v2(
            model,
            opt="adamw",
            lr=self.lr,
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
            warmup_lr_init=min(cfg.min_lr, self.lr),
            warmup_prefix=True,
            t_in_epochs=False,
        )
        self.loss_fn = build_loss(cfg, self.train_ds.targets).to(self.device)
        self.normalizer = Normalizer(
            spec["mean"], spec["std"], self.device, channels_last=self.channels_last
        )
        self.aug: AugmentConfig | RandAugmentConfig | None = None
        if cfg.augment and cfg.randaug_n > 0:
            self.aug = RandAugmentConfig(
                cfg.randaug_n, cfg.randaug_m, cfg.randaug_mstd, cfg.aug_hflip
            )
        elif cfg.augment:
            self.aug = AugmentConfig(
                cfg.aug_rotate,
                cfg.aug_translate,
                cfg.aug_scale,
                cfg.aug_hflip,
                cfg.aug_brightness,
                cfg.aug_contrast,
            )
        # EMA weights are what validation scores and best.pt keeps when it is on
        self.ema = (
            ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
            if cfg.ema_decay is not None
            else None
        )
        self.writer = CheckpointWriter(self.run_dir, background=cfg.checkpoint_async)
        self.timing = {"data_s": 0.0, "compute_s": 0.0}
        self.state = State()
        if resume:
            self._load_last()
        # the schedule is a function of the step, so a resumed run (or one given more --epochs)
        # needs no scheduler state: the cosine is rebuilt from the config and set to this step
        self.scheduler.step_update(self.state.global_step)
        self.net: nn.Module = model
        if self.info.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            # after the DDP wrap, so dynamo sees DDP's bucket boundaries and splits the graph
            # there (DDPOptimizer), overlapping gradient all-reduce with the backward pass
            self.net = torch.compile(self.net)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else unwrap(self.model)

    # checkpoints ------------------------------------------------------------------------------
    def _checkpoint(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """last.pt; ``rng`` is every rank's RNG state in rank order (see ``_load_last``)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "state": self.state.__dict__,
            "rng": rng,
            "config": self.cfg.to_dict(),
            "spec": self.spec,
            "labels": self.labels,
        }

    def _load_last(self) -> None:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ck.get("ema") or ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = State(**ck["state"])
        rng = ck.get("rng") or [{"cpu": ck["rng_cpu"], "cuda": ck["rng_cuda"]}]  # older runs
        if len(rng) == self.info.world:
            torch.set_rng_state(rng[self.info.rank]["cpu"])
            if rng[self.info.rank]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng[self.info.rank]["cuda"])
        else:
            log.warning(
                "last.pt holds the RNG state of %d ranks, this run has %d: random streams are "
                "re-seeded (the resumed run is not bit-identical to an uninterrupted one)",
                len(rng),
                self.info.world,
            )
            torch.manual_seed(self.cfg.seed + 7919 * (self.state.epoch + 1) + self.info.rank)
        if self.info.is_main:
            self._truncate_logs(self.state.epoch + 1)
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
        """One epoch; returns mean loss, per-step losses and images/s.

        ``self.timing`` gets the seconds spent waiting for the loader (``data_s``) apart from the
        rest of the step (``compute_s``): a data-bound run shows it there, not as a slow GPU.
        """
        self.net.train()
        gen = torch.Generator().manual_seed(
            (self.cfg.seed * 1_000_003 + epoch) * 97 + self.info.rank
        )
        losses: list[torch.Tensor] = []
        seen = 0
        data_s = 0.0
        smoothing = self.cfg.label_smoothing
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            leave=False,
            disable=not (self.cfg.progress and self.info.is_main),
        )
        batches = self._batches(epoch)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            data_s += time.perf_counter() - t_wait
            if batch is None:
                break
            images, targets = batch
            x = self.normalizer(images, aug=self.aug, generator=gen)
            y = targets.to(self.device, non_blocking=True)
            if smoothing:
                y = y * (1.0 - smoothing) + 0.5 * smoothing
            with autocast(self.device, self.cfg.amp):
                logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.state.global_step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.state.global_step)
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
        self.timing = {"data_s": data_s, "compute_s": elapsed - data_s}
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
            for buffer in self.eval_model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        probs, loss_sum = predict(
            self.eval_model,
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
                "%s: %d parameters; %s; %d steps/epoch on %s x%d; peak lr %.3g (%s, global "
                "batch %d)",
                cfg.arch,
                count_parameters(self.model),
                self.counts,
                self.steps_per_epoch,
                self.device,
                info.world,
                self.lr,
                self.lr_rule,
                self.global_batch,
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
            early_stop = bool(cfg.patience and state.bad_epochs >= cfg.patience)
            pause = bool(
                cfg.stop_after_epoch
                and epoch + 1 >= cfg.stop_after_epoch
                and epoch + 1 < cfg.epochs
            )
            group_lrs = [g["lr"] for g in self.optimizer.param_groups]
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_images": val["val_images"],
                "val_loss": val["val_loss"],
                "val_mean_auroc": val["val_mean_auroc"],
                # the head's (largest) lr: with layer decay group 0 is the patch embedding's
                "lr": max(group_lrs),
                "lr_min_group": min(group_lrs),
                "train_img_s": img_s,
                "data_s": self.timing["data_s"],
                "compute_s": self.timing["compute_s"],
                "epoch_s": time.perf_counter() - t0,
                "best": improved,
            }
            state.history.append(row)
            last_here = epoch + 1 == cfg.epochs or early_stop or pause
            write_last = last_here or (epoch + 1) % cfg.checkpoint_every == 0
            rng = D.gather_objects(_rng_state(), info) if write_last else []
            if info.is_main:
                if improved:
                    self.writer.save(
                        {
                            "model": self.eval_model.state_dict(),
                            "epoch": epoch,
                            "score": score,
                            "ema": self.ema is not None,
                            "config": cfg.to_dict(),
                            "spec": self.spec,
                            "labels": self.labels,
                        },
                        "best.pt",
                    )
                if write_last:
                    self.writer.save(self._checkpoint(rng), "last.pt")
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
                    for k in ("train_loss", "val_loss", "val_mean_auroc", "train_img_s", "data_s"):
                        if row[k] is not None:
                            writer.add_scalar(k, row[k], epoch + 1)
                    for i, lr in enumerate(group_lrs):
                        writer.add_scalar(f"lr/group_{i:02d}", lr, epoch + 1)
                auc = "n/a" if val["val_mean_auroc"] is None else f"{val['val_mean_auroc']:.4f}"
                log.info(
                    "epoch %d/%d train_loss %.4f val_loss %.4f val_mean_auroc %s lr %.3g "
                    "(%.0f img/s, %.1fs: %.1fs waiting for data)%s",
                    epoch + 1,
                    cfg.epochs,
                    train_loss,
                    val["val_loss"],
                    auc,
                    row["lr"],
                    img_s,
                    row["epoch_s"],
                    row["data_s"],
                    " *" if improved else "",
                )
            if early_stop:
                log.info("early stop: no better val mean AUROC for %d epochs", cfg.patience)
                break
            if pause:
                finished = False
                log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
                break
        self.writer.close()
        D.barrier(info)
        if finished and (self.run_dir / "best.pt").is_file():
            best = torch.load(self.run_dir / "best.pt", map_location="cpu", weights_only=True)
            self.eval_model.load_state_dict(best["model"])
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
            "seeds_per_rank": [self.cfg.seed + r for r in range(self.info.world)],
            "world_size": self.info.world,
            "batch_size_per_process": self.cfg.batch_size,
            "global_batch": self.global_batch,
            "base_lr": self.cfg.base_lr,
            "lr": self.lr,
            "lr_rule": self.lr_rule,
            "layer_decay": self.cfg.layer_decay,
            "ema_decay": self.cfg.ema_decay,
            "label_smoothing": self.cfg.label_smoothing,
            "augmentation": None
            if self.aug is None
            else {"kind": type(self.aug).__name__, **self.aug.__dict__},
            "checkpoint": self.cfg.checkpoint,
            "checkpoint_load": self._checkpoint_report(),
            "device": str(self.device),
            "steps_per_epoch": self.steps_per_epoch,
            "global_step": self.state.global_step,
            "commit": git_commit(),
            "cache": str(self.cache.path),
            "labels_source": self.cfg.labels,
        }

    def _checkpoint_report(self) -> dict[str, Any] | None:
        """This invocation's load report, or the one a resumed run recorded when it started."""
        if self.checkpoint_report is not None or not self.resume:
            return self.checkpoint_report
        path = self.run_dir / "run.json"
        return json.loads(path.read_text()).get("checkpoint_load") if path.is_file() else None

    def _truncate_logs(self, epochs: int) -> None:
        """Drop log rows of epochs after the checkpoint resumed from (last.pt every N epochs)."""
        for name in ("metrics.csv", "train_steps.csv"):
            path = self.run_dir / name
            if path.is_file():
                frame = pd.read_csv(path)
                kept = frame[frame["epoch"] <= epochs]
                if len(kept) < len(frame):
                    log.info(
                        "%s: dropping %d rows after epoch %d", name, len(frame) - len(kept), epochs
                    )
                    kept.to_csv(path, index=False)

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
