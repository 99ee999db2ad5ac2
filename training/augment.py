"""Batched, chest-X-ray-safe augmentation and the serving-identical normalisation.

Augmentation runs on whole batches on the training device (one ``affine_grid``/``grid_sample``
call), so the DataLoader only slices the uint8 cache: on a GPU the augmentation is free, on two CPU
cores it avoids worker processes. Geometry stays small (a few degrees, a few percent) and there is
never a vertical flip: lungs are not upside down, and a horizontal flip is off by default because
it moves the heart to the wrong side (dextrocardia is itself a finding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate: float = 7.0
    translate: float = 0.05
    scale: float = 0.1
    hflip: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine + brightness/contrast of a [B, 1, H, W] batch in [0, 1].

    Random numbers come from ``generator`` (on the CPU) so a run is reproducible and resumable
    independent of the device. Areas shifted in from outside the image are black, like a
    collimated radiograph's border.
    """
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) * (high - low) + low

    angle = uniform(-cfg.rotate, cfg.rotate) * (math.pi / 180.0)
    zoom = uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
    shift = torch.stack([uniform(-cfg.translate, cfg.translate) for _ in range(2)], dim=1) * 2.0
    flip = torch.where(torch.rand(b, generator=generator) < cfg.hflip, -1.0, 1.0)
    brightness = uniform(-cfg.brightness, cfg.brightness)
    contrast = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)

    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = contrast.to(x.device, x.dtype).view(b, 1, 1, 1)
    brightness = brightness.to(x.device, x.dtype).view(b, 1, 1, 1)
    return ((x - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


class Normalizer:
    """uint8 [B, 1, H, W] -> float [B, 3, H, W], normalised as ``to_model_input`` does in serving.

    Serving replicates the grayscale image to three channels and applies ``(x - mean) / std`` with
    the card's values; doing the same here (after augmentation) keeps train and serve identical.
    """

    def __init__(
        self,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: torch.device,
        *,
        channels_last: bool = False,
    ) -> None:
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = device
        self.channels_last = channels_last

    def __call__(
        self,
        images: torch.Tensor,
        *,
        aug: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if aug is not None and generator is not None:
            x = augment(x, aug, generator)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
