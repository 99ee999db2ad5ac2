"""The zoo's registry: named model configs, each with its own builder and data config.

Any name not registered here is handed to ``timm.create_model``, so ``vit_base_patch16_224``,
``deit_small_patch16_224`` or ``resnet50`` work as well as the notebook baselines below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# NIH radiographs in [0, 1] have a mean near 0.5 and a standard deviation near 0.25; models trained
# from scratch normalise with these rather than ImageNet's colour statistics.
XRAY_MEAN = (0.5, 0.5, 0.5)
XRAY_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ZooEntry:
    """One named architecture: how to build it and what its inputs and defaults are."""

    name: str
    build: Callable[..., nn.Module]
    description: str
    mean: tuple[float, float, float] = XRAY_MEAN
    std: tuple[float, float, float] = XRAY_STD
    interpolation: str = "bilinear"
    defaults: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in REGISTRY:
        raise ValueError(f"zoo name {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(REGISTRY)
