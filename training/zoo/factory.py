"""``create_model``: one factory over the registry and timm, plus each model's input spec."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import load_state_dict
from torch import nn

from training.zoo.registry import REGISTRY

log = logging.getLogger(__name__)


def create_model(
    name: str,
    *,
    num_classes: int,
    img_size: int = 224,
    pretrained: bool = False,
    checkpoint: str | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a zoo model or any timm model with ``num_classes`` outputs at ``img_size``.

    ``model_kwargs`` go to the builder unchanged (timm: ``global_pool="avg"``, ``fc_norm=True``
    for MAE-style fine-tuning).

    ``pretrained`` asks timm for its hub weights (needs the network or a warm cache);
    ``checkpoint`` loads local weights instead (.safetensors/.pth/.pt, a timm or a cxr-triage
    checkpoint); a classifier of the wrong size is dropped and re-initialised, and ViT position
    embeddings are resampled to ``img_size`` by timm. Every returned model carries a
    ``pretrained_cfg`` so ``timm.data.resolve_data_config`` gives its mean/std/interpolation.
    """
    kwargs: dict[str, Any] = dict(model_kwargs)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    entry = REGISTRY.get(name)
    if entry is not None and not pretrained:
        model = entry.build(num_classes=num_classes, img_size=img_size, **kwargs)
        model.pretrained_cfg = {
            "input_size": (3, img_size, img_size),
            "mean": entry.mean,
            "std": entry.std,
            "interpolation": entry.interpolation,
        }
        if checkpoint:
            load_weights(model, checkpoint)
        return model
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: not in the zoo ({sorted(REGISTRY)}) nor in timm")
    if checkpoint:
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    want_weights = pretrained or bool(checkpoint)
    try:
        return timm.create_model(
            name, pretrained=want_weights, num_classes=num_classes, img_size=img_size, **kwargs
        )
    except TypeError as exc:  # CNNs take no img_size; they are size-agnostic
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, pretrained=want_weights, num_classes=num_classes, **kwargs)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict non-strictly, dropping tensors whose shape does not match (the head)."""
    state = load_state_dict(path, use_ema=False, weights_only=True)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(k for k in state if k not in kept)
    result = model.load_state_dict(kept, strict=False)
    log.info(
        "loaded %d tensors from %s; dropped %d, missing %d",
        len(kept),
        path,
        len(dropped),
        len(result.missing_keys),
    )
    if not kept:
        raise ValueError(f"{path}: no tensor matches the model's parameters")


def data_config(model: nn.Module, *, img_size: int) -> dict[str, Any]:
    """mean, std, interpolation from timm's resolve_data_config; height/width from ``img_size``."""
    cfg = resolve_data_config({}, model=model)
    return {
        "height": img_size,
        "width": img_size,
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "interpolation": str(cfg["interpolation"]),
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zoo_defaults(name: str) -> dict[str, Any]:
    entry = REGISTRY.get(name)
    return dict(entry.defaults) if entry else {}


def is_vit(model: nn.Module) -> bool:
    """timm-style ViT: patch embedding, prefix tokens and blocks with an ``attn`` module."""
    blocks = getattr(model, "blocks", None)
    return (
        hasattr(model, "patch_embed")
        and hasattr(model, "num_prefix_tokens")
        and isinstance(blocks, nn.Sequential | nn.ModuleList)
        and len(blocks) > 0
        and all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") for b in blocks)
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
