"""The notebooks' small ViTs, rebuilt on timm's VisionTransformer.

Building them from timm's class (rather than a hand-written transformer) gives them the same
attention modules, initialisation, layer-decay grouping and attention-rollout export path as any
pretrained timm ViT.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from training.zoo.registry import ZooEntry, register

VIT_SMALL = {"patch_size": 32, "embed_dim": 64, "depth": 8, "num_heads": 4, "mlp_ratio": 2.0}


def vit_v1(
    *, num_classes: int, img_size: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> VisionTransformer:
    """Patch 32, width 64, 8 blocks of 4 heads, MLP ratio 2, CLS-token pooling."""
    return VisionTransformer(
        img_size=img_size,
        num_classes=num_classes,
        class_token=True,
        global_pool="token",
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **VIT_SMALL,
    )


def vit_v2(
    *, num_classes: int, img_size: int, drop_rate: float = 0.1, drop_path_rate: float = 0.1
) -> VisionTransformer:
    """vit-v1 with dropout on embeddings, projections and the head, and stochastic depth.

    Small data over-fits a transformer quickly; the stronger weight decay is in the entry's
    defaults because it belongs to the optimiser.
    """
    return VisionTransformer(
        img_size=img_size,
        num_classes=num_classes,
        class_token=True,
        global_pool="token",
        drop_rate=drop_rate,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        **VIT_SMALL,
    )


def vit_p8(
    *, num_classes: int, img_size: int, drop_rate: float = 0.1, drop_path_rate: float = 0.1
) -> VisionTransformer:
    """Patch 8 (an 8x8 token grid at 64 px), width 64, 6 blocks, mean-pooled tokens, no CLS.

    The final LayerNorm acts on each token before the mean (``fc_norm=False``), so a label's logit
    is the mean over tokens of that label's linear head applied to each token: the per-label
    token map (CAM over patch tokens) then decomposes the logit exactly, as CAM does for a CNN.
    """
    return VisionTransformer(
        img_size=img_size,
        num_classes=num_classes,
        patch_size=8,
        embed_dim=64,
        depth=6,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        drop_rate=drop_rate,
        pos_drop_rate=drop_rate,
        proj_drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )


register(
    ZooEntry(
        "vit-p8",
        vit_p8,
        "ViT patch 8, dim 64, depth 6, mean-pooled tokens: 8x8 per-label token CAM at 64 px",
        defaults={"weight_decay": 0.1},
    )
)
register(
    ZooEntry("vit-v1", vit_v1, "ViT patch 32, dim 64, depth 8, 4 heads, MLP x2 (from scratch)")
)
register(
    ZooEntry(
        "vit-v2",
        vit_v2,
        "vit-v1 + dropout 0.1, drop-path 0.1, weight decay 0.1",
        defaults={"weight_decay": 0.1},
    )
)
