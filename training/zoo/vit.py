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
