"""Export mode: wrap a model so it returns ``(logits, heatmap)``, the heatmap computed in-graph.

ViTs: attention rollout (Abnar & Zuidema, 2020) over all blocks: each block's head-averaged
attention plus the identity for the residual path, rows renormalised, multiplied through the
network; the CLS row over the patch tokens, reshaped to the patch grid. timm's fused attention
(``scaled_dot_product_attention``) never materialises the attention matrix, so it is switched off
and the matrix is read at the ``attn_drop`` module, which sees the post-softmax weights (hooks live
only for the duration of one forward, so the plain model is unaffected).

CNNs: per-label class activation maps (Zhou et al., 2016): each label's classifier weights over
the last feature map, ``[N, L, h, w]``; exact for a global-average-pool + linear head. Mean-pooled
ViTs get the same per-label map over their patch tokens (TokenCAM). A fold ensemble averages its
members' logits and raw maps in one graph.

Rollout maps are divided by their per-image maximum; CAMs are min-max scaled per label (see
:func:`normalise_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from app.card import HeatmapMethod, HeatmapShape
from training.zoo.factory import is_vit

_EPS = 1e-6
_TINY = 1e-6


class AttentionRollout(nn.Module):
    """(logits, rollout map [N, h, w]) for a timm VisionTransformer-like model."""

    method: HeatmapMethod = "attention_rollout"
    shape: HeatmapShape = "per_image"

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


class PerLabelCAM(nn.Module):
    """(logits, CAM [N, L, h, w]) for a CNN with ``forward_features`` and an avg-pool linear head.

    Label ``c``'s map is ``w_c . F[:, :, y, x]``, the classifier weights of that label over the last
    feature map: its spatial mean plus the bias is exactly the label's logit, so the map shows
    where that finding's evidence lies (Zhou et al., 2016).
    """

    method: HeatmapMethod = "cam"
    shape: HeatmapShape = "per_label"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise TypeError(f"CAM needs a linear classifier, not {type(head).__name__}")
        pool = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
        if pool != "avg":
            raise TypeError(f"CAM needs global average pooling, not {pool!r}")

    def raw(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the unnormalised maps (what an ensemble averages)."""
        features = self.model.forward_features(pixel_values)
        if features.ndim != 4:
            raise TypeError("CAM needs [N, C, h, w] features from forward_features")
        logits = self.model.forward_head(features)
        weight = self.model.get_classifier().weight
        return logits, torch.einsum("lc,nchw->nlhw", weight, features)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.raw(pixel_values)
        return logits, normalise_maps(cam)


class TokenCAM(nn.Module):
    """(logits, map [N, L, h, w]) for a ViT whose head is linear over mean-pooled, normed tokens.

    With no class token and the LayerNorm applied per token before the mean (timm
    ``global_pool="avg", fc_norm=False``), a label's logit is the mean over patch tokens of
    ``w_c . token``: the per-token values form an exact per-label map on the patch grid, the
    transformer counterpart of CAM. (Attention rollout explains the CLS token, not a label.)
    """

    method: HeatmapMethod = "cam"
    shape: HeatmapShape = "per_label"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if getattr(model, "global_pool", None) != "avg" or int(model.num_prefix_tokens) != 0:
            raise TypeError("TokenCAM needs a ViT with global_pool='avg' and no prefix tokens")
        if not isinstance(getattr(model, "fc_norm", None), nn.Identity):
            raise TypeError("TokenCAM needs fc_norm off (LayerNorm before the mean)")

    def raw(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(pixel_values)
        logits = self.model.forward_head(tokens)
        head = self.model.get_classifier()
        h, w = self.model.patch_embed.grid_size
        cam = torch.einsum("ld,ntd->nlt", head.weight, tokens)
        return logits, cam.reshape(cam.shape[0], cam.shape[1], h, w)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.raw(pixel_values)
        return logits, normalise_maps(cam)


class FoldEnsemble(nn.Module):
    """The average of k fold models' logits, and of their per-label maps, in one graph.

    Averaging logits keeps the CAM decomposition exact: the ensemble's logit is the spatial mean
    of the mean of the members' maps (plus the mean bias), so the averaged map explains it.
    """

    method: HeatmapMethod = "cam"
    shape: HeatmapShape = "per_label"

    def __init__(self, members: Sequence[PerLabelCAM | TokenCAM]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def raw(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m.raw(pixel_values) for m in self.members]
        logits = torch.stack([o[0] for o in outs]).mean(dim=0)
        cams = torch.stack([o[1] for o in outs]).mean(dim=0)
        return logits, cams

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.raw(pixel_values)
        return logits, normalise_maps(cam)


def normalise_maps(cam: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1] over its own cells.

    A class activation map is signed evidence for its label; its absolute level is in the logit,
    so the map shows where, relative to the rest of this image, the evidence is strongest. Unlike
    the old ReLU + max scaling, this is never all zero: its maximum is 1, and a flat map comes
    out all ones (no place stands out) instead of blank.
    """
    lo = cam.amin(dim=(-2, -1), keepdim=True)
    hi = cam.amax(dim=(-2, -1), keepdim=True)
    return (cam - lo + _TINY) / (hi - lo + _TINY)


HeatmapModule = AttentionRollout | PerLabelCAM | TokenCAM | FoldEnsemble


def per_label_module(model: nn.Module) -> PerLabelCAM | TokenCAM:
    """The per-label map wrapper for ``model`` (TokenCAM for mean-pooled ViTs, else CAM)."""
    if is_vit(model):
        return TokenCAM(model)
    return PerLabelCAM(model)


def with_heatmap(model: nn.Module, labels: Sequence[str]) -> HeatmapModule:
    """The export-mode wrapper that fits ``model``.

    CNNs and mean-pooled ViTs: one map per label (CAM, TokenCAM). CLS-token ViTs: attention
    rollout, one map per image (the CLS token has no per-label decomposition without gradients).
    """
    del labels  # maps cover every card label, in the model's output order
    if is_vit(model):
        if getattr(model, "global_pool", None) == "avg" and int(model.num_prefix_tokens) == 0:
            return TokenCAM(model)
        return AttentionRollout(model)
    return PerLabelCAM(model)
