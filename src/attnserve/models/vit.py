"""Vision Transformer.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021. https://arxiv.org/abs/2010.11929

Patch embedding, a learned class token, learned 1-D position embeddings, a pre-norm
encoder (eq. 1-4), and a linear head on the final class token. Parameter names are
timm's, so timm `vit_*` checkpoints load by name; torchvision's `vit_b_16` layout is
mapped by `checkpoint_filter`. A checkpoint trained at another resolution is carried to
the config's `img_size` by bicubic interpolation of the position embedding (sec. 3.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.layers import Block, PatchEmbed, resample_pos_embed
from attnserve.models.registry import register_model
from attnserve.spec import image_classifier


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # timm's and the original JAX code's LayerNorm epsilon


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1  # the class token

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.num_prefix_tokens + self.patch_embed.num_patches, cfg.embed_dim) * 0.02
        )
        self.blocks = nn.Sequential(*[
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
            for _ in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        return self.cls_token.expand(batch, -1, -1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, D)
        x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)  # (B, prefix + N, D)
        x = x + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def _torchvision_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision `vit_b_16` keys -> ours (the layouts differ in names only)."""
    renames = [
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"^encoder\.pos_embedding$", "pos_embed"),
        (r"^class_token$", "cls_token"),
        (r"^encoder\.ln\.", "norm."),
        (r"^heads\.head\.", "head."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
        (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map timm or torchvision ViT state dicts onto ours and resize the position
    embedding to the model's patch grid."""
    if "conv_proj.weight" in sd:
        sd = _torchvision_to_timm(sd)
    # timm keeps no-parameter modules (fc_norm, norm_pre) as Identity; some exports
    # carry an empty-shaped entry for them we do not need.
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc_norm.", "norm_pre.")) or v.numel()}
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_pos_embed(
            sd["pos_embed"], model.patch_embed.grid_size, model.num_prefix_tokens
        )
    return sd


def _vit(patch: int, dim: int, depth: int, heads: int, **kw) -> ViTConfig:
    return ViTConfig(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **kw)


CONFIGS = {
    # tiny: ~0.2M parameters, for tests on two CPU cores.
    "tiny": ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2),
    # Table 1 of the paper (Ti and S from DeiT / timm, the sizes timm ships).
    "ti16": _vit(16, 192, 12, 3),
    "s16": _vit(16, 384, 12, 6),
    "s32": _vit(32, 384, 12, 6),
    "b16": _vit(16, 768, 12, 12),
    "b32": _vit(32, 768, 12, 12),
    "l16": _vit(16, 1024, 24, 16),
    "l32": _vit(32, 1024, 24, 16),
}


register_model(
    "vit",
    configs=CONFIGS,
    # The position embedding fixes the patch grid, so the image size is static in the
    # graph; other sizes are a config (img_size=...) plus interpolation at load time.
    spec=image_classifier(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    paper="Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021",
    checkpoint_filter=checkpoint_filter,
    checkpoint_formats=("timm vit_*", "torchvision vit_b_16"),
)(VisionTransformer)
