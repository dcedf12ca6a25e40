"""Class-Attention in Image Transformers (CaiT).

Touvron et al., "Going deeper with Image Transformers", ICCV 2021.
https://arxiv.org/abs/2103.17239

Two stages: self-attention over patch tokens only (talking-heads attention, sec. 3.1
of the paper's appendix), each residual branch scaled by a learned per-channel
LayerScale (sec. 2); then class-attention layers where only the class token is
updated, attending over itself and the frozen patch tokens (sec. 3). The class token is
inserted late, and the position embedding covers the patch tokens only. Names follow
timm's `cait_*` checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models import vit
from attnserve.models.layers import ClassAttention, Mlp, PatchEmbed, TalkingHeadAttention
from attnserve.models.registry import register_model
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class CaiTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 24
    depth_token_only: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # LayerScale init: 1e-5 for depth 24, 1e-6 beyond (paper, sec. 2).
    init_values: float = 1e-5
    norm_eps: float = 1e-6


class _LayerScaleBlock(nn.Module):
    """Pre-norm attention and MLP branches, each scaled per channel by a learned
    LayerScale vector (gamma_1, gamma_2)."""

    def __init__(self, cfg: CaiTConfig, attn_cls: type[nn.Module]):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = attn_cls(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(cfg.init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(cfg.init_values * torch.ones(dim))


class LayerScaleBlock(_LayerScaleBlock):
    """x + diag(gamma_1) TalkingHeadAttn(LN(x)), then x + diag(gamma_2) MLP(LN(x))."""

    def __init__(self, cfg: CaiTConfig):
        super().__init__(cfg, TalkingHeadAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class ClassAttentionBlock(_LayerScaleBlock):
    """Updates the class token only: attention over [cls, patches], then an MLP on cls."""

    def __init__(self, cfg: CaiTConfig):
        super().__init__(cfg, ClassAttention)

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        cls = cls + self.gamma_1 * self.attn(self.norm1(u))
        return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class CaiT(nn.Module):
    num_prefix_tokens = 0  # the position embedding covers patch tokens only

    def __init__(self, cfg: CaiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, cfg.embed_dim))
        self.blocks = nn.Sequential(*[LayerScaleBlock(cfg) for _ in range(cfg.depth)])
        self.blocks_token_only = nn.ModuleList(
            [ClassAttentionBlock(cfg) for _ in range(cfg.depth_token_only)]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch_embed(images) + self.pos_embed)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        for block in self.blocks_token_only:
            cls = block(x, cls)
        x = self.norm(torch.cat([cls, x], dim=1))
        return self.head(x[:, 0])


CONFIGS = {
    # LayerScale 0.1 rather than 1e-5: with random weights a near-zero residual branch
    # would let parity tests pass without exercising attention.
    "tiny": CaiTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2,
                       num_heads=4, init_values=0.1),
    # Table 1 of the paper.
    "xxs24": CaiTConfig(embed_dim=192, depth=24, num_heads=4),
    "s24": CaiTConfig(embed_dim=384, depth=24, num_heads=8),
}


register_model(
    "cait",
    configs=CONFIGS,
    spec=image_classifier(),
    paper="Touvron et al., Going deeper with Image Transformers, ICCV 2021",
    checkpoint_filter=vit.checkpoint_filter,
    checkpoint_formats=("timm cait_*",),
)(CaiT)
