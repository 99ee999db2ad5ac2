"""The notebooks' CNN baselines: a small plain CNN and ResNet-34, both from random init.

The notebook CNN flattened its last feature map into a 95M-parameter dense layer; here a global
average pool feeds the classifier instead, which is what makes class activation maps exact.
"""

from __future__ import annotations

import itertools

import timm
import torch
from torch import nn

from training.zoo.registry import ZooEntry, register


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Stride-2 stem, four conv-BN-ReLU stages with max-pooling, GAP, dropout, linear.

    Same interface as timm models (``forward_features``, ``forward_head``, ``get_classifier``) so
    the trainer, layer-decay grouping and CAM export treat it like any timm CNN. About 1M
    parameters and 0.2 GMAC at 224 px: an epoch over 1k images takes seconds on two CPU cores.
    """

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 128, 256, 256),
        drop_rate: float = 0.2,
        pooled_stages: int | None = None,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(3, widths[0], stride=2), nn.MaxPool2d(2))
        stages: list[nn.Module] = []
        # the first ``pooled_stages`` stages halve the map (default: all but the last)
        pooled = len(widths) - 2 if pooled_stages is None else pooled_stages
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            stages.append(
                nn.Sequential(_conv(cin, cout), nn.MaxPool2d(2)) if i < pooled else _conv(cin, cout)
            )
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def small_cnn(
    *, num_classes: int, img_size: int, drop_rate: float = 0.2, drop_path_rate: float = 0.0
) -> SmallCNN:
    del img_size, drop_path_rate  # fully convolutional; no stochastic depth
    return SmallCNN(num_classes, drop_rate=drop_rate)


def cnn_s8(
    *, num_classes: int, img_size: int, drop_rate: float = 0.2, drop_path_rate: float = 0.0
) -> SmallCNN:
    """The CNN at output stride 8: an 8x8 last feature map (and CAM) at 64 px instead of 2x2.

    Stem (stride 2 + pool) and one pooled stage reach stride 8; the three deeper stages keep that
    resolution, at narrower widths so the cost per image stays near the stride-32 model's x2.
    """
    del img_size, drop_path_rate
    return SmallCNN(
        num_classes, widths=(32, 64, 96, 128, 128), drop_rate=drop_rate, pooled_stages=1
    )


def resnet34(
    *, num_classes: int, img_size: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0
) -> nn.Module:
    """timm's ResNet-34, random init; ``--pretrained`` switches to timm's ImageNet weights."""
    del img_size
    return timm.create_model(
        "resnet34",
        pretrained=False,
        num_classes=num_classes,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )


register(ZooEntry("cnn", small_cnn, "5-stage CNN with global average pooling (from scratch)"))
register(ZooEntry("cnn-s8", cnn_s8, "cnn at output stride 8: 8x8 CAM at 64 px (from scratch)"))
register(ZooEntry("resnet34", resnet34, "ResNet-34 (timm, from scratch)"))
