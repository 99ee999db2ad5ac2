"""Model zoo: the notebook baselines and any timm model behind one ``create_model`` factory."""

from training.zoo import cnn as _cnn  # noqa: F401  (registers cnn, resnet34)
from training.zoo import vit as _vit  # noqa: F401  (registers vit-v1, vit-v2)
from training.zoo.factory import (
    count_parameters,
    create_model,
    data_config,
    is_vit,
    unwrap,
    zoo_defaults,
)
from training.zoo.heatmap import (
    AttentionRollout,
    FoldEnsemble,
    PerLabelCAM,
    TokenCAM,
    normalise_maps,
    per_label_module,
    with_heatmap,
)
from training.zoo.registry import REGISTRY, ZooEntry, list_models

__all__ = [
    "REGISTRY",
    "AttentionRollout",
    "FoldEnsemble",
    "PerLabelCAM",
    "TokenCAM",
    "ZooEntry",
    "count_parameters",
    "create_model",
    "data_config",
    "is_vit",
    "list_models",
    "normalise_maps",
    "per_label_module",
    "unwrap",
    "with_heatmap",
    "zoo_defaults",
]
