"""Swin Transformer.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021. https://arxiv.org/abs/2103.14030

A 4x4 patch embedding, then four stages of blocks that attend within non-overlapping
M x M windows (sec. 3.2), alternating with blocks whose windows are shifted by M/2 via
a cyclic shift and an attention mask (fig. 4); a learned relative position bias per
head (eq. 4); patch merging between stages (2x2 neighbours concatenated, LayerNorm,
linear 4C -> 2C). Window attention is the `attnserve::window_attention` op, so the
export carries one WindowAttention node per block. Maps that the window does not divide
are padded bottom/right with zeros, then shifted, and cropped after attention, as the
authors' detection code does (timm shifts before padding; the two agree whenever the
window divides the map, as at every paper configuration). Names follow timm's `swin_*`
checkpoints; the original Microsoft layout is mapped by `checkpoint_filter`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attnserve.models.layers import Mlp
from attnserve.models.registry import register_model
from attnserve.ops import window_attention
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2M-1)^2 bias table for every query/key pair of a window
    (eq. 4: relative offsets in [-M+1, M-1] per axis)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask for shifted windows: after the cyclic shift a window
    may hold pixels from up to four image regions that must not attend to each other
    (sec. 3.2, "efficient batch computation"). -100 rather than -inf, as the reference."""
    regions = torch.zeros(height, width)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[hs, ws] = label
            label += 1
    windows = regions.reshape(height // window, window, width // window, window)
    windows = windows.permute(0, 2, 1, 3).reshape(-1, window * window)  # (nW, N)
    differs = windows[:, None, :] != windows[:, :, None]
    return differs.float() * -100.0


class WindowAttentionBlock(nn.Module):
    """Multi-head self-attention within (shifted) windows with relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def bias(self) -> torch.Tensor:
        n = self.window * self.window
        table = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return table.reshape(n, n, self.num_heads).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(self, x: torch.Tensor, shift: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, H, W, head_dim)
        out = window_attention(q, k, v, window=(self.window, self.window), shift=(shift, shift),
                               rel_pos_bias=self.bias(), mask=mask)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C))  # (B, H, W, heads * head_dim)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int], window: int, shift: int,
                 cfg: SwinConfig):
        super().__init__()
        # A map no larger than the window is one window, and shifting it is pointless.
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionBlock(dim, num_heads, window, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        H, W = resolution
        self.pad = ((window - H % window) % window, (window - W % window) % window)
        mask = shifted_window_mask(H + self.pad[0], W + self.pad[1], window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        B, H, W, C = x.shape
        y = self.norm1(x)
        if any(self.pad):
            y = F.pad(y, (0, 0, 0, self.pad[1], 0, self.pad[0]))
        y = self.attn(y, self.shift, self.attn_mask)[:, :H, :W]
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (4C), normalised, projected to 2C (sec. 3.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 2[w], 2[h], C): the reference's x0..x3 order
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: tuple[int, int],
                 downsample: bool, cfg: SwinConfig):
        super().__init__()
        self.downsample = PatchMerging(in_dim) if downsample else nn.Identity()
        if downsample:
            resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
        self.resolution = resolution
        window = cfg.window_size
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, resolution, window, 0 if i % 2 == 0 else window // 2, cfg)
            for i in range(depth)
        ])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class PatchEmbedNHWC(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(1, 2)))  # global average over (H, W)


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError("depths and num_heads need one entry per stage")
        self.cfg = cfg
        self.patch_embed = PatchEmbedNHWC(cfg)
        resolution = (cfg.img_size // cfg.patch_size,) * 2
        stages, dim = [], cfg.embed_dim
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads, strict=True)):
            out_dim = cfg.embed_dim * 2**i
            stage = SwinStage(dim, out_dim, depth, heads, resolution, i > 0, cfg)
            resolution, dim = stage.resolution, out_dim
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.head = ClassifierHead(dim, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layers(self.patch_embed(images))))


def checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's layout is ours; the original Microsoft layout keeps patch merging at the
    end of the previous stage and the head unwrapped."""
    sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    if "head.weight" in sd:  # original layout
        out = {}
        for k, v in sd.items():
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.", "head.fc.", k)
            out[k] = v
        sd = out
    return sd


CONFIGS = {
    # 32x32 images, 2x2 patches: a 16x16 map, windows of 4 shifted by 2, then 8x8.
    "tiny": SwinConfig(img_size=32, patch_size=2, num_classes=10, embed_dim=32, depths=(2, 2),
                       num_heads=(2, 4), window_size=4),
    # Table 1 of the paper (window 7, 224 x 224).
    "t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


register_model(
    "swin",
    configs=CONFIGS,
    spec=image_classifier(),  # static size: bias and shift masks are built for it
    paper="Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, ICCV 2021",
    checkpoint_filter=checkpoint_filter,
    checkpoint_formats=("timm swin_*",),
    custom_ops=("WindowAttention",),
)(SwinTransformer)
