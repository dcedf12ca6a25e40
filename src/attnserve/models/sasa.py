"""Stand-alone self-attention ResNets (SASA).

Ramachandran, Parmar, Vaswani, Bello, Levskaya, Shlens, "Stand-Alone Self-Attention in
Vision Models", NeurIPS 2019. https://arxiv.org/abs/1906.05909

Every 3x3 convolution of the ResNet bottlenecks becomes local self-attention over the
k x k neighbourhood N_k(i, j) of each pixel (sec. 2.2 and 3.1, fig. 3; k = 7 and 8 heads,
sec. 4.1):

    y_ij = sum_{a,b in N_k(i,j)} softmax_ab(q_ij^T k_ab + q_ij^T r_{a-i,b-j}) v_ab    (eq. 3)

with q = W_Q x_ij, k = W_K x_ab, v = W_V x_ab (full 1x1 projections d_in -> d_out: with
them ResNet-26 and -50 have Table 1's 10.3M and 18.0M parameters). The relative embedding
r_{a-i,b-j} is the concatenation of a row-offset embedding r_{a-i} and a column-offset
embedding r_{b-j}, each of d_out / 2 channels. Multi-head attention splits the channels
depthwise into N groups (sec. 2.2): head n uses channels n d_out/N .. (n+1) d_out/N of
q, k, v and r, so with the concatenated r the first half of the heads see row offsets and
the second half column offsets. The logits are unscaled, as eq. 2-3 write them. Where a
stride-2 convolution stood, 2x2 average pooling with stride 2 follows the attention
(sec. 3.1); ceil mode, so that odd maps keep the size of the strided 1x1 projection
shortcut. The stem is the convolutional one (7x7 stride-2 convolution, batch norm, ReLU,
3x3 max pool): the paper's "conv-stem + attention" models (Table 1), the best ResNet-26
and the ResNet-50 within 0.2%; the attention stem of sec. 3.2 is not implemented.

The attention is the `attnserve::window_attention` op in its "sliding" mode: keys at
offsets -(k-1)/2 .. (k-1)/2 per axis around the query, neighbours outside the map
excluded from the softmax (the paper does not say how borders are handled; this is the
op's definition). The op adds a per-query bias (B, heads, H, W, k^2) to the logits; the
model computes q^T r into it. The model has no position-dependent parameters, so the
exported graph takes any image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.registry import register_model
from attnserve.ops import window_attention
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class SasaConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # bottlenecks per stage: ResNet-50
    stem_width: int = 64
    img_size: int = 224  # the training size; the graph accepts others
    in_chans: int = 3
    num_classes: int = 1000
    kernel_size: int = 7  # k, the spatial extent (sec. 4.1)
    num_heads: int = 8  # N (sec. 4.1)


class LocalSelfAttention(nn.Module):
    """Multi-head k x k local self-attention with relative row/column embeddings (eq. 3),
    (B, d_in, H, W) -> (B, d_out, H, W)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, num_heads: int):
        super().__init__()
        if out_chs % num_heads or out_chs % 2:
            raise ValueError(f"{out_chs} channels do not split into {num_heads} heads and two halves")
        self.out_chs = out_chs
        self.num_heads = num_heads
        self.head_dim = out_chs // num_heads
        self.kernel_size = kernel_size
        self.qkv = nn.Conv2d(in_chs, 3 * out_chs, 1, bias=False)  # W_Q, W_K, W_V stacked
        # r_{a-i} and r_{b-j}: row index o is offset o - (k - 1) // 2, the op's key order.
        self.rel_rows = nn.Parameter(torch.randn(kernel_size, out_chs // 2) * self.head_dim**-0.5)
        self.rel_cols = nn.Parameter(torch.randn(kernel_size, out_chs // 2) * self.head_dim**-0.5)

    def relative_embeddings(self) -> torch.Tensor:
        """r_{a-i,b-j} for the k^2 offsets, row-major, split into heads: (heads, k^2, d_head)."""
        k, half = self.kernel_size, self.out_chs // 2
        rows = self.rel_rows[:, None, :].expand(k, k, half)  # (k rows, k cols, d_out / 2)
        cols = self.rel_cols[None, :, :].expand(k, k, half)
        r = torch.cat([rows, cols], dim=-1).reshape(k * k, self.num_heads, self.head_dim)
        return r.transpose(0, 1)  # (heads, k^2, d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, H, W)
        q, k, v = qkv.permute(1, 0, 2, 4, 5, 3).unbind(0)  # each (B, heads, H, W, d_head)
        # q_ij^T r_{a-i,b-j} for every query and offset: (B, heads, H, W, k^2).
        r = self.relative_embeddings()
        bias = (q.reshape(B, self.num_heads, H * W, self.head_dim) @ r.transpose(1, 2))
        bias = bias.reshape(B, self.num_heads, H, W, -1)
        out = window_attention(q, k, v, window=(self.kernel_size, self.kernel_size), mode="sliding",
                               rel_pos_bias=bias, scale=1.0)  # eq. 3 has no 1/sqrt(d) scale
        return out.permute(0, 1, 4, 2, 3).reshape(B, self.out_chs, H, W)  # heads concatenated


class SasaBottleneck(nn.Module):
    """ResNet bottleneck with the 3x3 convolution replaced by local self-attention, and
    2x2 average pooling after it where the convolution had stride 2 (sec. 3.1)."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int, cfg: SasaConfig):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.attn = LocalSelfAttention(planes, planes, cfg.kernel_size, cfg.num_heads)
        self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:  # ResNet's projection shortcut
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.pool(self.attn(x))))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class SasaResNet(nn.Module):
    """Conv stem, four stages of attention bottlenecks, global average pool, classifier.
    Names follow timm's ResNet (conv1/bn1/layer1..4/fc)."""

    def __init__(self, cfg: SasaConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(cfg.in_chans, cfg.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = cfg.stem_width
        for i, depth in enumerate(cfg.layers):
            planes = cfg.stem_width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(SasaBottleneck(in_chs, planes, 2 if (i > 0 and j == 0) else 1, cfg))
                in_chs = planes * SasaBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(cfg.layers)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the last stage's map (B, C, H / 32, W / 32), rounded up."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(images))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(images).mean(dim=(2, 3)))  # global average pool


CONFIGS = {
    # tiny: one bottleneck per stage, 16-wide stem, 4 heads, the paper's k = 7 (~0.5M
    # parameters), for tests on two CPU cores; 64 x 64 -> maps of 16, 8, 4, 2.
    "tiny": SasaConfig(layers=(1, 1, 1, 1), stem_width=16, img_size=64, num_classes=10, num_heads=4),
    # Sec. 4.1, Table 1: ResNet-26 [1, 2, 4, 1] and ResNet-50 [3, 4, 6, 3] bottlenecks.
    "resnet26": SasaConfig(layers=(1, 2, 4, 1)),
    "resnet50": SasaConfig(),
}


register_model(
    "sasa_resnet",
    configs=CONFIGS,
    spec=image_classifier(dynamic_size=True),  # no position-dependent parameters: any size
    paper="Ramachandran et al., Stand-Alone Self-Attention in Vision Models, NeurIPS 2019",
    custom_ops=("WindowAttention",),
)(SasaResNet)
