"""Export mode: wrap a model so it returns ``(logits, heatmap)``, the heatmap computed in-graph.

ViTs: attention rollout (Abnar & Zuidema, 2020) over all blocks: each block's head-averaged
attention plus the identity for the residual path, rows renormalised, multiplied through the
network; the CLS row over the patch tokens, reshaped to the patch grid. timm's fused attention
(``scaled_dot_product_attention``) never materialises the attention matrix, so it is switched off
and the matrix is read at the ``attn_drop`` module, which sees the post-softmax weights (hooks live
only for the duration of one forward, so the plain model is unaffected).

CNNs: a class-agnostic class activation map (Zhou et al., 2016): the classifier weights of every
pathology applied to the last feature map, averaged with the predicted probabilities as weights,
ReLU. Exact for a global-average-pool + linear head.

Both maps are divided by their per-image maximum, so they lie in [0, 1]; dividing (rather than
min-max stretching) keeps a nearly flat map flat and keeps ONNX-vs-torch parity tight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from app.labels import NO_FINDING
from training.zoo.factory import is_vit

HeatmapMethod = Literal["attention_rollout", "cam"]
_EPS = 1e-6


class AttentionRollout(nn.Module):
    """(logits, rollout map [N, h, w]) for a timm VisionTransformer-like model."""

    method: HeatmapMethod = "attention_rollout"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for block in model.blocks:
            block.attn.fused_attn = False

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attns: list[torch.Tensor] = []
        hooks = [
            block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: attns.append(out))
            for block in self.model.blocks
        ]
        try:
            logits = self.model(pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
        if len(attns) != len(self.model.blocks):
            raise RuntimeError(
                f"captured {len(attns)} attention maps for {len(self.model.blocks)} blocks; "
                "this attention module does not pass its weights through attn_drop"
            )
        tokens = attns[0].shape[-1]
        eye = torch.eye(tokens, dtype=attns[0].dtype, device=attns[0].device)
        rollout = eye
        for attn in attns:
            a = 0.5 * attn.mean(dim=1) + 0.5 * eye
            a = a / a.sum(dim=-1, keepdim=True)
            rollout = a @ rollout
        prefix = int(self.model.num_prefix_tokens)
        cls_row = rollout[:, 0, prefix:]
        h, w = self.model.patch_embed.grid_size
        heat = cls_row.reshape(-1, h, w)
        return logits, heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(_EPS)


class ClassAgnosticCAM(nn.Module):
    """(logits, CAM [N, h, w]) for a CNN with ``forward_features`` and an avg-pool linear head."""

    method: HeatmapMethod = "cam"

    def __init__(self, model: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"CAM needs a linear classifier, not {type(head).__name__}")
        pool = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
        if pool != "avg":
            raise TypeError(f"CAM needs global average pooling, not {pool!r}")
        findings = [i for i, name in enumerate(labels) if name != NO_FINDING]
        self.register_buffer("findings", torch.tensor(findings, dtype=torch.long), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(pixel_values)
        if features.ndim != 4:
            raise TypeError("CAM needs [N, C, h, w] features from forward_features")
        logits = self.model.forward_head(features)
        weight = self.model.get_classifier().weight[self.findings]
        probs = torch.sigmoid(logits[:, self.findings])
        mix = (probs / probs.sum(dim=1, keepdim=True).clamp_min(_EPS)) @ weight
        heat = torch.relu(torch.einsum("nc,nchw->nhw", mix, features))
        return logits, heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(_EPS)


def with_heatmap(model: nn.Module, labels: Sequence[str]) -> AttentionRollout | ClassAgnosticCAM:
    """The export-mode wrapper that fits ``model`` (rollout for ViTs, CAM otherwise)."""
    if is_vit(model):
        return AttentionRollout(model)
    return ClassAgnosticCAM(model, labels)
