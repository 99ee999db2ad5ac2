"""Load local backbone weights and say what loaded: ``--checkpoint`` with a report and a floor.

timm loads non-strictly once the classifier is dropped, so a checkpoint with the wrong key names
(an MAE checkpoint's ``encoder.`` prefix, another architecture) used to "load" with nothing
loaded and train from random weights without a word. Here every tensor is accounted for:
loaded, missing (in the model, not in the file), unexpected (in the file, not in the model) and
shape mismatches; the head is reported apart, and loading fails unless ``min_fraction`` of the
backbone's parameters (elements, not tensor count) came from the file.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from timm.models import load_state_dict
from torch import nn

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """Too little of the backbone loaded from the checkpoint."""


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    head_reinitialised: list[str] = field(default_factory=list)
    backbone_params: int = 0
    loaded_backbone_params: int = 0

    @property
    def fraction(self) -> float:
        return self.loaded_backbone_params / self.backbone_params if self.backbone_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loaded_backbone_fraction": self.fraction}

    def summary(self, limit: int = 6) -> str:
        def some(names: list[str]) -> str:
            more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
            return ", ".join(names[:limit]) + more if names else "none"

        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, {self.fraction:.1%} of the "
            f"backbone's {self.backbone_params:,} parameters; missing {len(self.missing)} "
            f"[{some(self.missing)}]; unexpected {len(self.unexpected)} "
            f"[{some(self.unexpected)}]; shape mismatch {len(self.shape_mismatch)} "
            f"[{some(self.shape_mismatch)}]; head re-initialised {len(self.head_reinitialised)}"
        )


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier (timm's ``pretrained_cfg['classifier']``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def load_checkpoint(model: nn.Module, path: str, *, min_fraction: float = 0.95) -> LoadReport:
    """Load ``path`` into ``model`` (non-strict, like timm) and raise unless enough loaded.

    The file may be a timm/torchvision state dict, a cxr-triage run checkpoint (``model`` key),
    or a ``state_dict``-keyed training checkpoint; DDP/compile prefixes are stripped by timm.
    The model's own timm ``checkpoint_filter_fn`` runs first where it has one (ViTs: resampling
    position embeddings to this image size, converting other ViT layouts).
    """
    state = load_state_dict(path, use_ema=False, weights_only=True)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except (KeyError, RuntimeError, ValueError) as exc:
            log.warning(
                "%s: timm's checkpoint filter failed (%s); loading keys as they are", path, exc
            )
    own = model.state_dict()
    heads = head_prefixes(model)
    report = LoadReport(path=str(path))
    kept = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            (report.head_reinitialised if key.startswith(heads) else report.shape_mismatch).append(
                key
            )
        else:
            kept[key] = value
    model.load_state_dict(kept, strict=False)
    report.loaded = sorted(kept)
    for key, tensor in own.items():
        if key not in kept and not key.startswith(heads):
            report.missing.append(key)
        if not key.startswith(heads):
            report.backbone_params += tensor.numel()
            if key in kept:
                report.loaded_backbone_params += tensor.numel()
    log.info("checkpoint %s", report.summary())
    if report.fraction < min_fraction:
        raise CheckpointMismatch(
            f"only {report.fraction:.1%} of the backbone loaded (need {min_fraction:.0%}, "
            f"--checkpoint-min-loaded): {report.summary()}"
        )
    return report
