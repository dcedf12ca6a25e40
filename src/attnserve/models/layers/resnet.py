"""The ResNet trunk (He et al. 2016) with a pluggable attention module per block.

Parameter names follow timm's ResNet (conv1/bn1/layer1..4/fc, `downsample.0/1`, and
`se` for the block's attention module whatever its kind), so timm's SE-ResNet
checkpoints load by name. The stride sits on the 3x3 convolution (ResNet v1.5), as in
timm and torchvision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

AttnFactory = Callable[[int], nn.Module]  # channels -> attention module


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1,
                 attn_factory: AttnFactory | None = None):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        # The attention module recalibrates the residual branch before the sum
        # (SE paper fig. 3, CBAM paper fig. 3).
        self.se = attn_factory(out_chs) if attn_factory else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        return self.act3(x + shortcut)


class ResNet(nn.Module):
    """7x7 stem, max pool, bottleneck stages (four in the classifiers; captioners stop
    earlier for a finer grid), global average pool, classifier."""

    def __init__(self, layers: Sequence[int], num_classes: int, in_chans: int = 3,
                 stem_width: int = 64, attn_factory: AttnFactory | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = stem_width
        for i, depth in enumerate(layers):
            planes = stem_width * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_chs, planes, stride, attn_factory))
                in_chs = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images -> the last stage's feature map (B, C, H / stride, W / stride)."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(images).mean(dim=(2, 3))  # (B, C) global average pool
        return self.fc(x)
