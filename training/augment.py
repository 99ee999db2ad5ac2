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


@dataclass(frozen=True)
class RandAugmentConfig:
    """timm-style RandAugment (``rand-m9-n2-mstd0.5``) restricted to ops that keep a chest film a
    chest film.

    Each image gets ``n`` ops drawn with replacement from ``RANDAUG_OPS``, each applied with
    probability 0.5 at magnitude ``m`` (0-10, per-image Gaussian noise ``mstd``) and a random
    sign. Left out on purpose: vertical flip (lungs are not upside down), invert and solarize
    (they turn air white: a different image), posterize and colour ops (grayscale, few levels),
    cut-out (it can erase the one nodule that carries the label). Horizontal flip is a separate
    probability, off by default (the heart's side is anatomy, dextrocardia is a finding).
    """

    n: int = 2
    m: float = 9.0
    mstd: float = 0.5
    hflip: float = 0.0


# op -> its magnitude at m = 10 (geometry kept smaller than timm's: positioning varies less
# between radiographs than between photographs)
RANDAUG_OPS: dict[str, float] = {
    "rotate": 10.0,  # degrees
    "shear_x": 0.15,
    "shear_y": 0.15,
    "translate_x": 0.1,  # fraction of the side
    "translate_y": 0.1,
    "zoom": 0.15,  # log scale
    "brightness": 0.3,  # added, in [0, 1] units
    "contrast": 0.5,  # factor 1 +- this
    "gamma": 0.4,  # exp(+- this)
    "sharpness": 0.9,  # unsharp-mask weight (negative: blur)
    "noise": 0.04,  # Gaussian sigma
    "autocontrast": 1.0,  # min-max stretch (no magnitude)
}


def rand_augment(
    x: torch.Tensor, cfg: RandAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Chest-safe RandAugment of a [B, 1, H, W] batch in [0, 1], one batched pass on x's device.

    The choice of ops and magnitudes comes from ``generator`` (CPU), so runs are reproducible
    and resumable; the geometric ops of an image compose into one affine warp (one
    ``grid_sample`` for the batch), the intensity ops are per-image tensor arithmetic.
    """
    b = x.shape[0]
    names = list(RANDAUG_OPS)
    scale = torch.tensor([RANDAUG_OPS[k] for k in names])
    choice = torch.randint(0, len(names), (b, cfg.n), generator=generator)
    applied = torch.rand(b, cfg.n, generator=generator) < 0.5
    mag = (cfg.m + cfg.mstd * torch.randn(b, cfg.n, generator=generator)).clamp(0, 10) / 10
    sign = torch.where(torch.rand(b, cfg.n, generator=generator) < 0.5, -1.0, 1.0)
    strength = torch.zeros(b, len(names)).scatter_add_(1, choice, mag * sign * applied)
    chosen = torch.zeros(b, len(names)).scatter_add_(1, choice, applied.float()) > 0
    s = {k: strength[:, i] * scale[i] for i, k in enumerate(names)}
    flip = torch.where(torch.rand(b, generator=generator) < cfg.hflip, -1.0, 1.0)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    angle = s["rotate"] * (math.pi / 180.0)
    zoom = torch.exp(s["zoom"])
    cos, sin = torch.cos(angle), torch.sin(angle)
    shx, shy = s["shear_x"], s["shear_y"]
    # output -> input coordinates: rotation @ shear, shrunk by the zoom; flip mirrors x
    a11, a12 = (cos - sin * shy) / zoom, (cos * shx - sin) / zoom
    a21, a22 = (sin + cos * shy) / zoom, (sin * shx + cos) / zoom
    theta = torch.stack(
        [
            torch.stack([a11 * flip, a12, s["translate_x"] * 2.0], dim=1),
            torch.stack([a21 * flip, a22, s["translate_y"] * 2.0], dim=1),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.to(device=x.device, dtype=x.dtype).view(b, 1, 1, 1)

    stretch = per_image(chosen[:, names.index("autocontrast")].float())
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = stretch * (x - lo) / (hi - lo).clamp_min(1e-3) + (1 - stretch) * x
    x = x.clamp(0.0, 1.0).pow(per_image(torch.exp(s["gamma"])))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * per_image((1.0 + s["contrast"]).clamp_min(0.1)) + mean
    x = x + per_image(s["brightness"])
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + per_image(s["sharpness"]) * (x - blurred)
    noise_gen = torch.Generator(device=x.device).manual_seed(noise_seed)
    noise = torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
    x = x + per_image(s["noise"].abs()) * noise
    return x.clamp_(0.0, 1.0)


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
        aug: AugmentConfig | RandAugmentConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if isinstance(aug, RandAugmentConfig) and generator is not None:
            x = rand_augment(x, aug, generator)
        elif aug is not None and generator is not None:
            x = augment(x, aug, generator)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
