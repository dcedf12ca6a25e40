"""ViViT: A Video Vision Transformer.

Arnab, Dehghani, Heigold, Sun, Lučić, Schmid, "ViViT: A Video Vision Transformer",
ICCV 2021. https://arxiv.org/abs/2103.15691

A clip is cut into non-overlapping t x h x w tubelets, each projected to a token (sec. 3.2,
fig. 3), on an n_t x n_h x n_w grid of n_t temporal and n_s = n_h * n_w spatial indices.
One of the paper's four encoders then models the tokens (sec. 3.3, fig. 4-6):

1. Spatio-temporal attention: every token attends to every other, ViT over the whole
   clip, with a class token and a learned 1-D position embedding (eq. 1-4).
2. Factorised encoder: a spatial encoder (L_s layers) runs on the tokens of each temporal
   index separately, with a class token of its own; the n_t class-token outputs, behind
   a temporal class token, go through a temporal encoder (L_t layers).
3. Factorised self-attention: each block attends first among the tokens of one temporal
   index (spatial), then among those of one spatial index (temporal), then applies the
   MLP (eq. 7-9). No class token ("to avoid ambiguities when reshaping the input tokens
   between spatial and temporal dimensions"): the final tokens are averaged.
4. Factorised dot-product attention: model 1's parameters, but half of the heads attend
   over the keys and values of the query's temporal index, the other half over those of
   its spatial index; the two halves are concatenated and projected (eq. 10). Pooled as
   model 3.

Uniform frame sampling (sec. 3.2, fig. 2) is `sample_frames=n` with a 1 x h x w tubelet:
n of the clip's frames, evenly spaced as in the authors' code, embedded one by one.

Blocks are pre-norm with GELU in its tanh form, the default of the JAX code the models
were trained with (Hugging Face's `gelu_fast`), and LayerNorm epsilon 1e-6. The input is
(batch, frames, channels, height, width), Hugging Face's `pixel_values` layout. Model 1's
keys are ViT's (timm names), and `checkpoint_filter` maps Hugging Face
`VivitForVideoClassification` checkpoints onto them (`base` has the shapes of
google/vivit-b-16x2-kinetics400, transformers' default `VivitConfig`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from attnserve.errors import CheckpointError
from attnserve.models.layers import (
    Attention,
    Block,
    GeluTanh,
    Mlp,
    TubeletEmbed,
    scaled_dot_product,
)
from attnserve.models.registry import register_model
from attnserve.spec import video_classification_spec

# The paper's four models (sec. 3.3), by the name of their attention.
SPATIO_TEMPORAL = "spatio_temporal"  # model 1
FACTORISED_ENCODER = "factorised_encoder"  # model 2
FACTORISED_SELF_ATTENTION = "factorised_self_attention"  # model 3
FACTORISED_DOT_PRODUCT = "factorised_dot_product"  # model 4
MODELS = (SPATIO_TEMPORAL, FACTORISED_ENCODER, FACTORISED_SELF_ATTENTION, FACTORISED_DOT_PRODUCT)


@dataclass(frozen=True)
class ViViTConfig:
    model: str = SPATIO_TEMPORAL  # one of MODELS
    img_size: int = 224
    num_frames: int = 32  # frames in the input clip
    tubelet: tuple[int, int, int] = (2, 16, 16)  # (frames, height, width)
    # 0: embed every frame; n: uniform frame sampling of n frames (use a 1 x h x w tubelet).
    sample_frames: int = 0
    in_chans: int = 3
    num_classes: int = 400  # Kinetics-400
    embed_dim: int = 768
    depth: int = 12  # L; for model 2 the spatial encoder's L_s
    temporal_depth: int = 4  # model 2's L_t (the authors' ViViT-B config); unused by the others
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6  # the JAX code's (and Hugging Face's) LayerNorm epsilon
    frame_stride: int = 2  # source frames between the clip's frames (the K400 configs); clients read it


class FactorisedSelfAttentionBlock(nn.Module):
    """Model 3's block (eq. 7-9): spatial self-attention among the tokens of each temporal
    index, temporal self-attention among the tokens of each spatial index, each pre-norm
    with its residual, then the MLP.

    The spatial half keeps the names of ViT's block (norm1, attn), so that image weights
    initialise it as the paper does (sec. 3.4); the temporal half is `temporal_*`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=GeluTanh)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """y_s = MSA(LN(z_s)) + z_s over the tokens of each temporal index (eq. 7)."""
        B, T, S, D = x.shape
        y = self.attn(self.norm1(x.reshape(B * T, S, D)))  # (B * T, S, D): frames apart
        return x + y.reshape(B, T, S, D)

    def temporal(self, x: torch.Tensor) -> torch.Tensor:
        """y_t = MSA(LN(y_s)) + y_s over the tokens of each spatial index (eq. 8)."""
        B, T, S, D = x.shape
        y = x.transpose(1, 2).reshape(B * S, T, D)  # (B * S, T, D): locations apart
        y = self.temporal_attn(self.temporal_norm(y))
        return x + y.reshape(B, S, T, D).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D) tokens on their time x space grid."""
        x = self.temporal(self.spatial(x))
        return x + self.mlp(self.norm2(x))  # eq. 9


class FactorisedDotProductAttention(nn.Module):
    """Model 4's attention (eq. 10): the first half of the heads attend over the keys and
    values of the query's temporal index (spatial heads), the second half over those of
    its spatial index (temporal heads); Concat(Y_s, Y_t) W_O.

    The parameters are `Attention`'s (qkv, proj), so the model has exactly model 1's
    weights less the class token. (The authors' code gives the first half of the heads to
    time; the paper's equation, followed here, puts the spatial heads first.)
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads or num_heads % 2:
            raise ValueError(
                f"factorised dot-product attention splits its heads between space and time: "
                f"num_heads must be even and divide dim, got {num_heads} heads of dim {dim}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D) tokens on their time x space grid."""
        B, T, S, D = x.shape
        qkv = self.qkv(x).reshape(B, T, S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each (B, heads, T, S, head_dim)
        half = self.num_heads // 2
        # Spatial heads: for each (batch, head, temporal index), attention over S.
        spatial = scaled_dot_product(q[:, :half], k[:, :half], v[:, :half], self.scale)
        # Temporal heads: for each (batch, head, spatial index), attention over T.
        q_t, k_t, v_t = (t[:, half:].transpose(2, 3) for t in (q, k, v))  # (B, heads / 2, S, T, head_dim)
        temporal = scaled_dot_product(q_t, k_t, v_t, self.scale).transpose(2, 3)
        x = torch.cat([spatial, temporal], dim=1)  # (B, heads, T, S, head_dim)
        x = x.permute(0, 2, 3, 1, 4).reshape(B, T, S, D)  # (B, T, S, heads * head_dim)
        return self.proj(x)


class ViViT(nn.Module):
    """One of the paper's four video transformers, chosen by `cfg.model`; video
    (B, frames, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: ViViTConfig):
        super().__init__()
        if cfg.model not in MODELS:
            raise ValueError(f"unknown ViViT model {cfg.model!r}; choose one of: {', '.join(MODELS)}")
        self.cfg = cfg
        frames = cfg.num_frames
        if cfg.sample_frames:
            if not 0 < cfg.sample_frames <= cfg.num_frames:
                raise ValueError(f"cannot sample {cfg.sample_frames} frames of a clip of {cfg.num_frames}")
            frames = cfg.sample_frames
            # Evenly spaced from the first frame, floor(i * T / n), as the authors'
            # `sample_frames_uniformly`; not a parameter, so not in the state dict.
            index = torch.arange(frames) * cfg.num_frames // frames
            self.register_buffer("frame_index", index, persistent=False)
        else:
            self.frame_index = None
        dim = cfg.embed_dim
        self.patch_embed = TubeletEmbed(cfg.img_size, frames, tuple(cfg.tubelet), cfg.in_chans, dim)
        num_t, grid_h, grid_w = self.patch_embed.grid_size
        num_s = grid_h * grid_w
        block = partial(Block, dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps,
                        act_layer=GeluTanh)

        if cfg.model in (SPATIO_TEMPORAL, FACTORISED_ENCODER):
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.model == SPATIO_TEMPORAL:
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_t * num_s, dim) * 0.02)
            self.blocks = nn.Sequential(*[block() for _ in range(cfg.depth)])
        elif cfg.model == FACTORISED_ENCODER:
            # The spatial encoder's position embedding is that of one frame, shared by all.
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_s, dim) * 0.02)
            self.blocks = nn.Sequential(*[block() for _ in range(cfg.depth)])
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.temporal_pos_embed = nn.Parameter(torch.randn(1, 1 + num_t, dim) * 0.02)
            self.temporal_blocks = nn.Sequential(*[block() for _ in range(cfg.temporal_depth)])
            self.temporal_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        elif cfg.model == FACTORISED_SELF_ATTENTION:
            self.pos_embed = nn.Parameter(torch.randn(1, num_t * num_s, dim) * 0.02)
            self.blocks = nn.Sequential(*[
                FactorisedSelfAttentionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps)
                for _ in range(cfg.depth)
            ])
        else:  # FACTORISED_DOT_PRODUCT
            self.pos_embed = nn.Parameter(torch.randn(1, num_t * num_s, dim) * 0.02)
            self.blocks = nn.Sequential(*[
                block(attn_cls=FactorisedDotProductAttention) for _ in range(cfg.depth)
            ])
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)  # model 2: the spatial encoder's
        self.head = nn.Linear(dim, cfg.num_classes)
        self.apply(_init_weights)
        for name in ("cls_token", "temporal_cls_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=1e-6)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, frames, C, H, W) -> tubelet tokens on their grid (B, n_t, n_s, D)."""
        if self.frame_index is not None:
            video = video.index_select(1, self.frame_index)
        return self.patch_embed(video)

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Model 2's spatial encoder: tokens (B, n_t, n_s, D) -> the class-token output
        of each temporal index, (B, n_t, D). No token sees another temporal index."""
        B, T, S, D = x.shape
        x = x.reshape(B * T, S, D)  # every temporal index its own sequence
        x = torch.cat([self.cls_token.expand(B * T, -1, -1), x], dim=1) + self.pos_embed  # (B * T, 1 + S, D)
        x = self.norm(self.blocks(x))[:, 0]  # (B * T, D)
        return x.reshape(B, T, D)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """video -> the representation the head classifies, (B, D)."""
        x = self.embed(video)  # (B, T, S, D)
        B, T, S, D = x.shape
        model = self.cfg.model
        if model == SPATIO_TEMPORAL:
            x = x.reshape(B, T * S, D)  # time-major, Hugging Face's token order
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
            return self.norm(self.blocks(x))[:, 0]
        if model == FACTORISED_ENCODER:
            x = self.encode_frames(x)  # (B, T, D)
            x = torch.cat([self.temporal_cls_token.expand(B, -1, -1), x], dim=1) + self.temporal_pos_embed
            return self.temporal_norm(self.temporal_blocks(x))[:, 0]
        # Models 3 and 4: the blocks keep the (time, space) grid; global average pooling.
        x = (x.reshape(B, T * S, D) + self.pos_embed).reshape(B, T, S, D)
        return self.norm(self.blocks(x)).mean(dim=(1, 2))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(video))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# Hugging Face key layouts -> ours. Checkpoints on the Hub (written by transformers 4)
# name the layers encoder.layer.N.* with query/key/value; transformers 5 writes
# layers.N.* with q/k/v_proj (its own conversion mapping reads the old names).
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(q)uery\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(k)ey\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(v)alue\.", r"blocks.\1.attn.\2."),
    (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.mlp\.(fc[12])\.", r"blocks.\1.mlp.\2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _is_huggingface(sd: dict[str, torch.Tensor]) -> bool:
    return any(re.match(r"^(?:vivit\.)?embeddings\.patch_embeddings\.", k) for k in sd)


def checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `VivitForVideoClassification` state dict (the Hub's layout or
    transformers 5's) onto model 1: rename, and stack each layer's separate query, key
    and value projections into one qkv. Our own layout passes through."""
    if not _is_huggingface(sd):
        return sd
    if model.cfg.model != SPATIO_TEMPORAL:
        raise CheckpointError(
            "this is a Hugging Face ViViT checkpoint, which is model 1 (spatio-temporal "
            f"attention), but the config builds {model.cfg.model!r}; load it with a "
            "spatio_temporal config such as `base` (or `tiny`)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = re.sub(r"^vivit\.", "", key)
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    # blocks.N.attn.{q,k,v}.{weight,bias} -> blocks.N.attn.qkv.*: rows q, then k, then v,
    # each head-major, which is the order Attention splits its qkv output in.
    separate = {k for k in out if re.match(r"^blocks\.\d+\.attn\.[qkv]\.", k)}
    for key in sorted(k for k in separate if ".attn.q." in k):
        prefix, param = key.split(".attn.q.")
        parts = [f"{prefix}.attn.{p}.{param}" for p in "qkv"]
        missing = [p for p in parts if p not in out]
        if missing:
            raise CheckpointError(f"the Hugging Face ViViT checkpoint has {key} but not {missing[0]}")
        out[f"{prefix}.attn.qkv.{param}"] = torch.cat([out[p] for p in parts], dim=0)
    return {k: v for k, v in out.items() if k not in separate}


def _tiny(model: str = SPATIO_TEMPORAL, **kw) -> ViViTConfig:
    # 32 x 32, 8 frames, 2 x 8 x 8 tubelets: a 4 x 4 x 4 grid of 64 tokens; ~0.15M
    # parameters, for tests on two CPU cores.
    return ViViTConfig(model=model, img_size=32, num_frames=8, tubelet=(2, 8, 8), num_classes=10,
                       embed_dim=64, depth=2, temporal_depth=1, num_heads=4, **kw)


CONFIGS = {
    "tiny": _tiny(),
    "tiny_fe": _tiny(FACTORISED_ENCODER),
    "tiny_fsa": _tiny(FACTORISED_SELF_ATTENTION),
    "tiny_fdpa": _tiny(FACTORISED_DOT_PRODUCT),
    # The demo's synthetic actions (attnserve.train.actions): 8 consecutive frames of
    # 32 x 32, 7 classes. Model 1 on a 2 x 4 x 4 grid of 4 x 8 x 8 tubelets (a tubelet
    # spanning 4 frames sees the motion; 2 x 8 x 8 ones learned far slower), 3 layers 64
    # wide, ~0.2M parameters.
    "shapes": ViViTConfig(img_size=32, num_frames=8, tubelet=(4, 8, 8), num_classes=7, embed_dim=64,
                          depth=3, num_heads=4, frame_stride=1),
    # ViViT-B/16x2 (ViT-Base: 12 layers, 768 wide, 12 heads) on 32 frames of 224 x 224,
    # Kinetics-400: the paper's Kinetics models and google/vivit-b-16x2-kinetics400.
    "base": ViViTConfig(),
    "base_fe": ViViTConfig(model=FACTORISED_ENCODER),  # L_s = 12, L_t = 4
    "base_fsa": ViViTConfig(model=FACTORISED_SELF_ATTENTION),
    "base_fdpa": ViViTConfig(model=FACTORISED_DOT_PRODUCT),
}


def _spec(name: str, config_name: str, cfg: ViViTConfig):
    # Pixels scaled to [-1, 1] (the authors' `zero_centering`); the clip is short side
    # 256, centre crop 224 for `base`.
    return video_classification_spec(
        name, config_name, num_frames=cfg.num_frames, img_size=cfg.img_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        frame_stride=cfg.frame_stride,
    )


register_model(
    "vivit",
    configs=CONFIGS,
    # The position embedding covers the whole clip, so frames and image size are static.
    spec=_spec,
    paper="Arnab et al., ViViT: A Video Vision Transformer, ICCV 2021",
    checkpoint_filter=checkpoint_filter,
    checkpoint_formats=("huggingface VivitForVideoClassification",),  # model 1 configs
)(ViViT)
