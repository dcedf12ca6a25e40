"""Patch embedding and learned position embeddings for vision transformers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each to `embed_dim`
    (a strided convolution, as in ViT's hybrid-free form)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TubeletEmbed(nn.Module):
    """Split a video into non-overlapping t x h x w tubelets and project each to
    `embed_dim`: ViViT's tubelet embedding (Arnab et al. 2021, sec. 3.2, fig. 3), a 3-D
    convolution whose kernel is its stride. A tubelet of t = 1 embeds every frame on its
    own, as ViT embeds an image.

    Takes (B, T, C, H, W), Hugging Face's video layout, and returns the tokens on their
    (time, space) grid, (B, T / t, (H / h) * (W / w), D); time-major flattening of that
    grid is Hugging Face's token order.
    """

    def __init__(self, img_size: int, num_frames: int, tubelet: tuple[int, int, int], in_chans: int,
                 embed_dim: int):
        super().__init__()
        t, h, w = tubelet
        if num_frames % t or img_size % h or img_size % w:
            raise ValueError(
                f"a clip of {num_frames} frames of {img_size}x{img_size} does not split into "
                f"tubelets of {t}x{h}x{w} (frames x height x width)"
            )
        self.grid_size = (num_frames // t, img_size // h, img_size // w)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(t, h, w), stride=(t, h, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.transpose(1, 2))  # (B, D, T/t, H/h, W/w)
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, T/t, HW/hw, D)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Interpolate a (1, prefix + g*g, D) position embedding to a new_grid x new_grid
    patch grid, leaving the prefix (class, distillation) tokens alone.

    Bicubic, as ViT (sec. 3.2, "fine-tuning at higher resolution") does to carry a model
    to another image size, and antialiased as timm does: torch's antialiased bicubic uses
    the PIL kernel (a = -0.5), so without it timm checkpoints land ~3e-4 off in the logits.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False,
                         antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
