"""Channel and spatial attention modules for convolutional networks."""

from __future__ import annotations

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to the nearest multiple of `divisor`, at least `divisor` (timm's
    rule for SE bottleneck widths, so SE-ResNet checkpoints keep their shapes)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018, sec. 3): global average pool (squeeze),
    FC-ReLU-FC-sigmoid with reduction r (excitation), channel-wise rescale.

    The FCs are 1x1 convolutions on the pooled (B, C, 1, 1) map, named fc1/fc2 as in
    timm.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = make_divisible(channels / reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


class ChannelAttention(nn.Module):
    """CBAM's channel attention (Woo et al. 2018, eq. 2): a shared MLP over the
    average- and max-pooled descriptors, summed, then a sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax(dim=(2, 3), keepdim=True))))
        return x * (avg + mx).sigmoid()


class SpatialAttention(nn.Module):
    """CBAM's spatial attention (eq. 3): channel-wise average and max maps,
    concatenated, a 7x7 convolution, a sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.conv(pooled).sigmoid()  # (B, 2, H, W) -> (B, 1, H, W) gate


class Cbam(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention
    (the sequential channel-first order the paper found best, sec. 4.1)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
