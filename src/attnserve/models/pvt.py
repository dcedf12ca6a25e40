"""Pyramid Vision Transformer (PVT v1).

Wang, Xie, Li, Fan, Song, Liang, Lu, Luo, Shao, "Pyramid Vision Transformer: A Versatile
Backbone for Dense Prediction without Convolutions", ICCV 2021.
https://arxiv.org/abs/2102.12122

Four stages (sec. 3.1-3.2, fig. 3). Stage i cuts its input into non-overlapping
P_i x P_i patches (P = 4, 2, 2, 2: maps of 1/4, 1/8, 1/16, 1/32 of the image), projects
each to C_i channels and normalises it, adds a learned position embedding and runs L_i
encoder layers. A layer is pre-norm spatial-reduction attention (SRA, sec. 3.3, eq. 1-4)
and a GELU MLP. SRA takes its queries from every token but its keys and values from the
map reduced R_i-fold per axis: SR(x) = Norm(Reshape(x, R_i) W^S) (eq. 3), a linear map of
each R_i x R_i cell, which is a convolution whose kernel is its stride (R = 8, 4, 2, 1),
so attention costs (HW)^2 / R_i^2 instead of (HW)^2. Heads are scaled by 1/sqrt(d_head)
(eq. 4). For classification a class token joins the input of the last stage, as in ViT
and DeiT (sec. 3.1); the head reads it after a final LayerNorm.

Parameter names are the authors' (`patch_embed1`, `pos_embed1`, `block1.0.attn.kv`,
...), so their released checkpoints load by name; `checkpoint_filter` maps Hugging Face
`PvtForImageClassification` (and `PvtModel`) checkpoints onto them. Where the two
differ we follow transformers, which the parity test holds us to: every LayerNorm has
epsilon 1e-6 (the authors' code leaves the patch-embedding and SR norms at torch's
1e-5). Dropout and stochastic depth act in training only and are left out.

The position embeddings fix each stage's grid, so the image size is static: height and
width must be the config's `img_size`, a multiple of the total reduction 32; anything else
raises InputError. (The authors resample the embeddings bilinearly for other sizes;
transformers' `interpolate_pos_encoding` only ever runs at the trained size, where its
bilinear resize is the identity, and fails at any other. This model does not resample:
build it with `img_size=...`.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.errors import CheckpointError, InputError
from attnserve.models.layers import Mlp, scaled_dot_product
from attnserve.models.registry import register_model
from attnserve.spec import image_classification_spec


@dataclass(frozen=True)
class PvtConfig:
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    patch_sizes: tuple[int, ...] = (4, 2, 2, 2)  # P_i
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)  # C_i
    depths: tuple[int, ...] = (2, 2, 2, 2)  # L_i (PVT-Tiny)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)  # N_i
    mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)  # E_i
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # R_i
    qkv_bias: bool = True  # the authors' configs and transformers' default
    norm_eps: float = 1e-6  # transformers' layer_norm_eps, for every LayerNorm


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> C channels, then LayerNorm (sec. 3.1)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, C, H / P, W / P)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)  # (B, HW, C)


class SpatialReductionAttention(nn.Module):
    """SRA (eq. 1-4): multi-head attention whose keys and values come from the map
    reduced R-fold per axis (a conv with kernel = stride = R, then LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool, norm_eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # eq. 4: 1 / sqrt(d_head)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)  # W^O
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)  # W^S
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def reduce(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """SR(x) (eq. 3): (B, HW, C) -> (B, (H / R)(W / R), C); the identity for R = 1."""
        if self.sr_ratio == 1:
            return x
        B, N, C = x.shape
        H, W = size
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = self.sr(x).flatten(2).transpose(1, 2)  # (B, (H / R)(W / R), C)
        return self.norm(x)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        kv = self.kv(self.reduce(x, size))  # (B, N', 2C)
        k, v = kv.reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = scaled_dot_product(q, k, v, self.scale)  # (B, heads, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class PvtBlock(nn.Module):
    """x + SRA(LN(x)), then x + MLP(LN(x)) (eq. 1 of ViT with SRA for MHA)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, cfg: PvtConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, cfg.qkv_bias, cfg.norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # exact GELU (transformers' "gelu")

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), size)
        return x + self.mlp(self.norm2(x))


class PyramidVisionTransformer(nn.Module):
    """images (B, C, S, S) -> logits; `forward_pyramid` gives the four stage maps."""

    def __init__(self, cfg: PvtConfig):
        super().__init__()
        self.num_stages = len(cfg.depths)
        per_stage = (cfg.patch_sizes, cfg.embed_dims, cfg.num_heads, cfg.mlp_ratios, cfg.sr_ratios)
        if any(len(v) != self.num_stages for v in per_stage):
            raise ValueError("patch_sizes, embed_dims, depths, num_heads, mlp_ratios and sr_ratios "
                             "need one entry per stage")
        if cfg.sr_ratios[-1] != 1:
            # The class token has no place on the reduced map.
            raise ValueError("the last stage holds the class token and cannot reduce its keys: "
                             "sr_ratios[-1] must be 1")
        self.cfg = cfg
        self.reduction = math.prod(cfg.patch_sizes)
        if cfg.img_size % self.reduction:
            raise ValueError(
                f"img_size {cfg.img_size} is not a multiple of the total reduction {self.reduction}"
            )
        side, in_chs = cfg.img_size, cfg.in_chans
        for i in range(self.num_stages):
            dim, last = cfg.embed_dims[i], i == self.num_stages - 1
            side //= cfg.patch_sizes[i]
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(cfg.patch_sizes[i], in_chs, dim, cfg.norm_eps))
            # The last stage's embedding has a row for the class token first (sec. 3.1).
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, side * side + last, dim)))
            setattr(self, f"block{i + 1}", nn.ModuleList([
                PvtBlock(dim, cfg.num_heads[i], cfg.mlp_ratios[i], cfg.sr_ratios[i], cfg)
                for _ in range(cfg.depths[i])
            ]))
            in_chs = dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dims[-1]))
        self.norm = nn.LayerNorm(cfg.embed_dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dims[-1], cfg.num_classes)
        self.apply(_init_weights)
        for i in range(self.num_stages):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _check_images(self, images: torch.Tensor) -> None:
        S, C = self.cfg.img_size, self.cfg.in_chans
        if images.dim() != 4 or images.shape[1] != C:
            raise InputError(f"pvt takes images of shape (batch, {C}, {S}, {S}), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.reduction or W % self.reduction:
            raise InputError(
                f"pvt reduces the image {self.reduction}-fold (patches of "
                f"{' x '.join(map(str, self.cfg.patch_sizes))}), so height and width must be multiples "
                f"of {self.reduction}; got {H} x {W}: resize and centre-crop to {S} x {S}"
            )
        if (H, W) != (S, S):
            raise InputError(
                f"pvt's position embeddings fix the image size at {S} x {S}, got {H} x {W}: resize "
                f"and centre-crop to {S} x {S}, or build the model for square images of another "
                f"size (img_size={H}; a checkpoint of another size will not load)"
            )

    def _stages(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> each stage's output map (B, C_i, H_i, W_i) and the last stage's tokens
        (B, 1 + H_4 W_4, C_4), class token first."""
        self._check_images(images)
        B = images.shape[0]
        x, maps = images, []
        for i in range(self.num_stages):
            last = i == self.num_stages - 1
            tokens, (H, W) = getattr(self, f"patch_embed{i + 1}")(x)  # (B, HW, C)
            if last:
                tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1 + HW, C)
            tokens = tokens + getattr(self, f"pos_embed{i + 1}")
            for block in getattr(self, f"block{i + 1}"):
                tokens = block(tokens, (H, W))
            grid = tokens[:, 1:] if last else tokens
            x = grid.transpose(1, 2).reshape(B, -1, H, W)  # (B, C, H, W): the next stage's input
            maps.append(x)
        return maps, tokens

    def forward_pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four feature maps a dense-prediction head takes: strides 4, 8, 16, 32
        (sec. 3.1, fig. 3); the last without its class token, all before the final norm."""
        return self._stages(images)[0]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """-> the normalised tokens of the last stage, (B, 1 + H_4 W_4, C_4)."""
        return self.norm(self._stages(images)[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images)[:, 0])


def _init_weights(m: nn.Module) -> None:
    # The authors' initialisation: truncated normal linears, zero biases; convolutions
    # keep torch's default.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Hugging Face names -> the authors' (ours). Stages and the patch embeddings count from 0
# there and from 1 here. transformers 4 and 5 write the same layout (PVT has no entry in
# transformers' conversion mapping), so the Hub's checkpoints (Xrenya/pvt-*) have it too.
_HF_RENAMES = [
    (r"^encoder\.patch_embeddings\.(\d+)\.position_embeddings$", lambda m: f"pos_embed{_stage(m)}"),
    (r"^encoder\.patch_embeddings\.(\d+)\.projection\.", lambda m: f"patch_embed{_stage(m)}.proj."),
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", lambda m: f"patch_embed{_stage(m)}.norm."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", lambda m: f"block{_stage(m)}.{m.group(2)}."),
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.k."),
    (r"\.attention\.self\.value\.", ".attn.v."),
    (r"\.attention\.self\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense([12])\.", r".mlp.fc\1."),
    (r"^encoder\.layer_norm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _stage(m: re.Match) -> int:
    return int(m.group(1)) + 1


def _is_huggingface(sd: dict[str, torch.Tensor]) -> bool:
    return any(re.match(r"^(?:pvt\.)?encoder\.patch_embeddings\.", k) for k in sd)


def checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `PvtForImageClassification` state dict onto ours: rename, move
    the class token out of the last patch embedding, and stack each layer's key and value
    projections into the authors' `kv`. (A `PvtModel` state dict maps too, but has no
    head: loading reports head.* missing.) The authors' layout (ours) passes through."""
    if not _is_huggingface(sd):
        return sd
    last = model.num_stages - 1
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = re.sub(r"^pvt\.", "", key)
        cls = re.match(r"^encoder\.patch_embeddings\.(\d+)\.cls_token$", key)
        if cls:
            if int(cls.group(1)) != last:
                raise CheckpointError(
                    f"the Hugging Face PVT checkpoint has a class token in stage {int(cls.group(1)) + 1}; "
                    f"PVT v1 has one only in its last stage ({last + 1})"
                )
            out["cls_token"] = value
            continue
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    # block*.N.attn.{k,v}.* -> block*.N.attn.kv.*: rows k, then v, the order SRA splits in.
    separate = {k for k in out if re.match(r"^block\d+\.\d+\.attn\.[kv]\.", k)}
    for key in sorted(k for k in separate if ".attn.k." in k):
        prefix, param = key.split(".attn.k.")
        value_key = f"{prefix}.attn.v.{param}"
        if value_key not in out:
            raise CheckpointError(f"the Hugging Face PVT checkpoint has {key} but not {value_key}")
        out[f"{prefix}.attn.kv.{param}"] = torch.cat([out[key], out[value_key]], dim=0)
    return {k: v for k, v in out.items() if k not in separate}


def _pvt(depths: tuple[int, ...], **kw) -> PvtConfig:
    return PvtConfig(depths=depths, **kw)


CONFIGS = {
    # tiny: 64 x 64 -> maps of 16, 8, 4, 2; SRA keys on 2 x 2 in every stage; the paper's
    # heads, MLP ratios and reductions at a quarter to an eighth of the widths (~0.1M
    # parameters), for tests on two CPU cores.
    "tiny": PvtConfig(img_size=64, num_classes=10, embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1)),
    # Table 1 of the paper: PVT-Tiny / Small / Medium / Large.
    "pvt_tiny": _pvt((2, 2, 2, 2)),
    "pvt_small": _pvt((3, 4, 6, 3)),
    "pvt_medium": _pvt((3, 4, 18, 3)),
    "pvt_large": _pvt((3, 8, 27, 3)),
}


def _spec(name: str, config_name: str, cfg: PvtConfig):
    # The position embeddings fix the grids, so the image size is static (see the
    # module docstring); ImageNet mean and std, resize 256 and crop 224 for the paper's.
    return image_classification_spec(
        name, config_name, img_size=cfg.img_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        dynamic_size=False,
    )


register_model(
    "pvt",
    configs=CONFIGS,
    spec=_spec,
    paper="Wang et al., Pyramid Vision Transformer, ICCV 2021",
    checkpoint_filter=checkpoint_filter,
    checkpoint_formats=("huggingface PvtForImageClassification", "authors' PVT v1 (whai362/PVT)"),
)(PyramidVisionTransformer)
