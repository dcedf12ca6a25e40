"""The video ResNet of Wang et al. (Non-local Neural Networks, CVPR 2018, sec. 4, table 1):
C2D and its inflated 3-D counterpart I3D.

C2D is ResNet-50 run frame by frame (1 x k x k kernels) with the temporal axis touched
only by the stem's strides and two max pools; I3D "inflates" some kernels to t x k x k.
Table 1 (input 32 x 224 x 224):

    conv1   1x7x7 (C2D) / 5x7x7 (I3D), 64, stride 2,2,2    16 x 112 x 112
    pool1   3x3x3 max, stride 2,2,2                         8 x 56 x 56
    res2    bottlenecks x 3                                 8 x 56 x 56
    pool2   3x1x1 max, stride 2,1,1                         4 x 56 x 56
    res3..5 bottlenecks x 4, 6, 3 (spatial stride 2 each)   4 x 28 x 28 ... 4 x 7 x 7
    global average pool, fc

so the clip is 8x shorter from res3 on. I3D_{3x1x1} inflates the first 1x1 of a block to
3x1x1, I3D_{3x3x3} its 3x3 to 3x3x3, in one block of every two (sec. 4).

Parameter names are those of the 2-D trunk (`models/layers/resnet.py`: conv1/bn1,
layer1..4 with conv1..3/bn1..3/downsample, fc), so 2-D ImageNet weights inflate by name
(`inflate_2d_state_dict`). The stride sits on the 3x3 convolution, as in the 2-D trunk and
the authors' released code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

INFLATE_3X1X1 = "3x1x1"  # I3D_{3x1x1}: the block's first 1x1 becomes t x 1 x 1
INFLATE_3X3X3 = "3x3x3"  # I3D_{3x3x3}: the block's 3x3 becomes t x 3 x 3
INFLATIONS = (INFLATE_3X1X1, INFLATE_3X3X3)


class Bottleneck3d(nn.Module):
    """1x1x1 -> 1x3x3 -> 1x1x1 bottleneck with one kernel optionally inflated in time."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, temporal_kernel: int = 1,
                 inflate: str = INFLATE_3X1X1):
        super().__init__()
        if inflate not in INFLATIONS:
            raise ValueError(f"unknown inflation {inflate!r}; choose one of: {', '.join(INFLATIONS)}")
        if temporal_kernel < 1 or temporal_kernel % 2 == 0:
            raise ValueError(f"the temporal kernel must be odd and positive, got {temporal_kernel}")
        t1 = temporal_kernel if inflate == INFLATE_3X1X1 else 1
        t2 = temporal_kernel if inflate == INFLATE_3X3X3 else 1
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv3d(in_chs, planes, (t1, 1, 1), padding=(t1 // 2, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(planes, planes, (t2, 3, 3), stride=(1, stride, stride),
                               padding=(t2 // 2, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv3d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_chs, out_chs, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNet3d(nn.Module):
    """Table 1's video ResNet on (B, C, T, H, W) clips.

    Args:
        layers: bottlenecks per stage (3, 4, 6, 3 for ResNet-50).
        num_classes: classifier outputs.
        temporal_kernels: per stage, the temporal kernel of each block (1: not inflated);
            all ones is C2D.
        inflate: which kernel of a block the temporal kernel applies to (INFLATIONS).
        stem_temporal_kernel: conv1's temporal kernel (1 for C2D, 5 for I3D).
    """

    # Temporal strides of conv1, pool1 and pool2 (table 1): clips are this many times
    # shorter from res3 on.
    temporal_stride = 8

    def __init__(self, layers: Sequence[int], num_classes: int, temporal_kernels: Sequence[Sequence[int]],
                 in_chans: int = 3, stem_width: int = 64, inflate: str = INFLATE_3X1X1,
                 stem_temporal_kernel: int = 5):
        super().__init__()
        if len(temporal_kernels) != len(layers) or any(
                len(k) != n for k, n in zip(temporal_kernels, layers, strict=True)):
            raise ValueError(
                f"temporal_kernels must give one kernel per block of each stage {tuple(layers)}, "
                f"got {tuple(tuple(k) for k in temporal_kernels)}")
        t = stem_temporal_kernel
        self.conv1 = nn.Conv3d(in_chans, stem_width, (t, 7, 7), stride=2, padding=(t // 2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)  # pool1
        # pool2, after res2: the only other temporal reduction (table 1).
        self.pool2 = nn.MaxPool3d((3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        in_chs = stem_width
        for i, (depth, kernels) in enumerate(zip(layers, temporal_kernels, strict=True)):
            planes = stem_width * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck3d(in_chs, planes, stride, kernels[j], inflate))
                in_chs = planes * Bottleneck3d.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 and pool1: (B, C, T, H, W) -> (B, stem_width, T / 4, H / 4, W / 4)."""
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> the last stage's map (B, C', T / 8, H / 32, W / 32)."""
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            if i == 0:
                x = self.pool2(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=(2, 3, 4))  # (B, C) global average pool
        return self.fc(x)


def inflate_2d_state_dict(state_dict: Mapping[str, torch.Tensor],
                          model: nn.Module) -> dict[str, torch.Tensor]:
    """2-D weights of the same names (an ImageNet ResNet) -> `model`'s 3-D shapes, as the
    paper initialises I3D (sec. 4): each of the t planes of a t x k x k kernel is the k x k
    kernel divided by t, so a clip of one repeated frame gives the 2-D model's features.

    Keys `model` has and `state_dict` lacks (its non-local blocks, say) keep `model`'s
    values; keys of `state_dict` that `model` lacks, or whose shapes do not inflate
    (a classifier of another width), are dropped. Returns a complete state dict for
    `model.load_state_dict`.
    """
    out = dict(model.state_dict())
    for key, value in state_dict.items():
        if key not in out:
            continue
        want = out[key].shape
        if value.shape == want:
            out[key] = value.clone()
        elif value.dim() == 4 and len(want) == 5 and tuple(value.shape) == (*want[:2], *want[3:]):
            t = want[2]
            out[key] = value.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
    return out
