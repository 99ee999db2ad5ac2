"""Multi-label losses over logits: BCE, positive-weighted BCE, focal, asymmetric; by name."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from training.config import TrainConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): down-weights easy examples; torchvision's implementation."""

    def __init__(self, gamma: float = 2.0, alpha: float = -1.0) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(
            logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="mean"
        )


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for multi-label data dominated by negatives.

    Negatives get focusing ``gamma_neg`` and a probability margin ``clip`` (easy negatives with
    p < clip contribute nothing); positives get ``gamma_pos``. Averaged over elements, so its scale
    does not depend on the batch size (timm's version sums).
    """

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * F.logsigmoid(logits) * (1 - p).pow(self.gamma_pos)
        loss_neg = (
            (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg.pow(self.gamma_neg)
        )
        return -(loss_pos + loss_neg).mean()


def pos_weight(targets: np.ndarray, cap: float) -> torch.Tensor:
    """negatives / positives per label from the training set, capped (rare labels explode)."""
    pos = targets.sum(axis=0)
    neg = len(targets) - pos
    return torch.tensor(np.clip(neg / np.maximum(pos, 1.0), 1.0, cap), dtype=torch.float32)


def build_loss(cfg: TrainConfig, train_targets: np.ndarray) -> nn.Module:
    if cfg.loss == "bce":
        return nn.BCEWithLogitsLoss()
    if cfg.loss == "wbce":
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight(train_targets, cfg.pos_weight_max))
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha)
    if cfg.loss == "asl":
        return AsymmetricLoss(cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)
    raise ValueError(f"unknown loss {cfg.loss!r}")
