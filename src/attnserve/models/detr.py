"""DETR: DEtection TRansformer.

Carion, Massa, Synnaeve, Usunier, Kirillov, Zagoruyko, "End-to-End Object Detection with
Transformers", ECCV 2020. https://arxiv.org/abs/2005.12872

Detection as direct set prediction (sec. 3.2, fig. 2 and 10): a ResNet turns the image
into its C5 map f (2048 x H/32 x W/32), a 1x1 convolution reduces it to d channels, the
d x HW tokens go through a Transformer encoder, and a decoder turns N learned object
queries into N output embeddings at once (no autoregression, no NMS). Each embedding
goes through a linear class head (num_classes + 1 logits, the last being "no object",
the empty set class) and a 3-layer perceptron with ReLU whose sigmoid gives the box as
normalised (cx, cy, w, h) relative to the input image.

Faithful details:
- Fixed 2-D sine positional encodings (appendix A.4, the reference code's
  `PositionEmbeddingSine(normalize=True)`): d/2 channels encode the row and d/2 the
  column, each with sine and cosine at d/4 frequencies over coordinates normalised to
  (0, 2 pi]. They are computed from the feature map's size, so the exported graph takes
  any image size.
- Positional encodings are added to the queries and keys of every attention layer, never
  to the values (sec. 3.2 and fig. 10): the spatial encoding in the encoder's
  self-attention and at the keys of the decoder's cross-attention, the object queries at
  the queries (and keys) of the decoder's self-attention and the queries of its
  cross-attention. The decoder's input is zero (fig. 10: the queries enter only as
  positional encodings).
- Post-norm layers, LN(x + Sublayer(x)), as the paper's transformer; a final LayerNorm
  after the decoder (the reference code's decoder norm, applied before the heads).
- Frozen BatchNorm in the backbone (sec. 4, technical details: an ImageNet-pretrained
  ResNet with frozen batchnorm layers): the backbone's BatchNorm layers stay in eval mode
  whatever `train()` says (eval BatchNorm is Hugging Face's DetrFrozenBatchNorm2d up to
  float round-off).
- Auxiliary decoding losses (sec. 3.2) only matter when training: only the last decoder
  layer's output goes through the heads.

Inference on a batch of one image size needs no padding mask: the reference code's mask
only marks padding added to batch images of different sizes, and with none every
position is valid (its cumulative sums over the mask reduce to 1..H and 1..W). Batch
images of one size; pad-and-mask batching is not implemented.

Parameter names follow the reference implementation where they can (`input_proj`,
`query_embed`, `class_embed`, `bbox_embed`, norm1..3) with timm's ResNet names in the
backbone; `checkpoint_filter` maps Hugging Face `DetrForObjectDetection` checkpoints (the
Hub's transformers-4 layout and transformers 5's, with a timm or a transformers ResNet
backbone) onto them. `resnet50` has the shapes of facebook/detr-resnet-50 (91 COCO
category ids + no object = 92 logits, as Hugging Face has it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from attnserve.errors import CheckpointError
from attnserve.models.layers import Mlp, ResNet, scaled_dot_product
from attnserve.models.registry import register_model
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetrConfig:
    img_size: int = 800  # example size only (the paper's shortest side); the graph takes any
    in_chans: int = 3
    num_classes: int = 91  # COCO category ids 0..90; one more logit for "no object"
    layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    stem_width: int = 64
    dim: int = 256  # d
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    num_queries: int = 100  # N
    temperature: float = 10000.0  # of the sine encoding, as Vaswani et al.'s
    norm_eps: float = 1e-5  # torch's LayerNorm default, which the reference code uses


def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0,
                           eps: float = 1e-6) -> torch.Tensor:
    """The 2-D sine encoding of an unpadded height x width map -> (height * width, dim),
    row-major, in float32.

    Per axis, positions 1..n are normalised to (0, 2 pi] (normalize=True: the last row
    and column are at 2 pi whatever the size), then channel 2i is sin(p / T^(2i / (d/2)))
    and 2i + 1 is cos(p / T^(2i / (d/2))). The first d/2 channels encode the row (y), the
    last d/2 the column (x), the reference code's order.
    """
    half = dim // 2
    # 1..n as the reference code's cumulative sum over an all-valid mask; divided by the
    # last value (a tensor, not the size: the size may be symbolic during export).
    y = torch.arange(1, height + 1, dtype=torch.float32)
    x = torch.arange(1, width + 1, dtype=torch.float32)
    y = y / (y[-1:] + eps) * (2 * math.pi)
    x = x / (x[-1:] + eps) * (2 * math.pi)
    exponent = 2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half
    dim_t = temperature ** exponent.to(torch.float32)  # (d/2,): each frequency twice

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p[:, None] / dim_t  # (n, d/2)
        # sin on even channels, cos on odd ones, interleaved.
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)  # (H, W, d/2)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat([pos_y, pos_x], dim=-1).reshape(height * width, dim)  # (HW, d)


class DetrAttention(nn.Module):
    """Multi-head attention whose query, key and value inputs differ: DETR adds the
    positional encodings to the queries and keys only (sec. 3.2)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, Tq, dim), key and value (B, Tk, dim) -> (B, Tq, dim)."""
        B, T, C = query.shape
        x = scaled_dot_product(self._heads(self.q_proj(query)), self._heads(self.k_proj(key)),
                               self._heads(self.v_proj(value)), self.scale)
        x = x.transpose(1, 2).reshape(B, T, C)  # (B, Tq, heads * head_dim)
        return self.out_proj(x)


class EncoderLayer(nn.Module):
    """Self-attention over the image tokens with the spatial encoding at queries and
    keys, then the FFN; post-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.self_attn = DetrAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn = Mlp(dim, ffn_dim, act_layer=nn.ReLU)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.self_attn(q, k, x))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    """Self-attention among the object queries, cross-attention to the encoder memory,
    FFN; post-norm. The query embeddings are added to the queries (and self-attention
    keys), the spatial encoding to the memory's keys."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.self_attn = DetrAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = DetrAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = Mlp(dim, ffn_dim, act_layer=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt))
        tgt = self.norm2(tgt + self.cross_attn(tgt + query_pos, memory + pos, memory))
        return self.norm3(tgt + self.ffn(tgt))


class Encoder(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.enc_layers)
        )

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x  # post-norm: no final norm (the reference code's encoder_norm is None)


class Decoder(nn.Module):
    def __init__(self, cfg: DetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.norm_eps) for _ in range(cfg.dec_layers)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, query_pos: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        tgt = torch.zeros_like(query_pos)  # fig. 10: the decoder input starts at zero
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class BoxHead(nn.Module):
    """The box FFN (sec. 3.2): Linear-ReLU-Linear-ReLU-Linear, hidden width d."""

    def __init__(self, dim: int, out_dim: int = 4, num_layers: int = 3):
        super().__init__()
        sizes = [dim] * num_layers + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class Backbone(ResNet):
    """The ResNet trunk up to C5 (stride 32), without pooling and classifier, with its
    BatchNorm frozen (sec. 4): stored statistics always, never batch statistics."""

    def __init__(self, layers: tuple[int, ...], in_chans: int, stem_width: int):
        super().__init__(layers, num_classes=1, in_chans=in_chans, stem_width=stem_width)
        del self.fc  # DETR reads the C5 map; there is no classifier

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # frozen: normalise with the stored statistics, never update them
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)  # (B, C5, H / 32, W / 32)


class DETR(nn.Module):
    """images (B, 3, H, W) -> class logits (B, N, num_classes + 1) and boxes (B, N, 4),
    (cx, cy, w, h) normalised to [0, 1] relative to the image."""

    def __init__(self, cfg: DetrConfig):
        super().__init__()
        if cfg.dim % 4:
            raise ValueError(f"dim must be a multiple of 4 (sine and cosine per axis), got {cfg.dim}")
        self.cfg = cfg
        self.backbone = Backbone(cfg.layers, cfg.in_chans, cfg.stem_width)
        self.input_proj = nn.Conv2d(self.backbone.num_features, cfg.dim, kernel_size=1)  # C -> d
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.dim)  # the object queries
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.class_embed = nn.Linear(cfg.dim, cfg.num_classes + 1)  # last: "no object"
        self.bbox_embed = BoxHead(cfg.dim)
        # The reference code's Transformer._reset_parameters: Xavier-uniform matrices.
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def position_encoding(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """(1, height * width, dim) in the model's dtype (computed in float32)."""
        pos = sine_position_encoding(height, width, self.cfg.dim, self.cfg.temperature)
        return pos.to(dtype).unsqueeze(0)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the decoder's output embeddings (B, N, d)."""
        src = self.input_proj(self.backbone(images))  # (B, d, h, w)
        B, _, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)  # (B, hw, d), row-major like the encoding
        pos = self.position_encoding(h, w, src.dtype)  # (1, hw, d): one image size per batch
        memory = self.encoder(src, pos)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, N, d)
        return self.decoder(query_pos, memory, pos)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hs = self.forward_features(images)
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()


# Hugging Face DetrForObjectDetection -> ours. The Hub's checkpoints (transformers 4)
# name the backbone model.backbone.conv_encoder.model and the attention output out_proj,
# with fc1/fc2 directly in the layer; transformers 5 writes model.backbone.model, o_proj
# and mlp.fc1/fc2. The backbone is timm's ResNet (our names) or transformers' ResNet.
_HF_BACKBONE = r"^model\.backbone\.(?:conv_encoder\.)?model\."
_LAYER = r"^model\.(encoder|decoder)\.layers\.(\d+)\."  # -> \1.layers.\2.
_DEC = r"^model\.decoder\.layers\.(\d+)\."  # -> decoder.layers.\1.
_HF_RENAMES = [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (_LAYER + r"self_attn\.(?:o|out)_proj\.", r"\1.layers.\2.self_attn.out_proj."),
    (_LAYER + r"self_attn\.([qkv]_proj)\.", r"\1.layers.\2.self_attn.\3."),
    (_DEC + r"encoder_attn\.(?:o|out)_proj\.", r"decoder.layers.\1.cross_attn.out_proj."),
    (_DEC + r"encoder_attn\.([qkv]_proj)\.", r"decoder.layers.\1.cross_attn.\2."),
    (_LAYER + r"self_attn_layer_norm\.", r"\1.layers.\2.norm1."),
    (_DEC + r"encoder_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.norm2."),
    (_DEC + r"final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (_LAYER + r"(?:mlp\.)?(fc[12])\.", r"\1.layers.\2.ffn.\3."),
    (r"^model\.decoder\.layernorm\.", "decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.layers\.", "bbox_embed.layers."),
]


def _block(m: re.Match) -> str:
    return f"layer{int(m.group(1)) + 1}.{m.group(2)}."


# transformers' ResNet (the "no_timm" checkpoints and DetrConfig(use_timm_backbone=False))
# -> timm's names. Its bottleneck puts the stride on the 3x3 convolution (the default
# downsample_in_bottleneck=False), as ours does.
_BLOCK = r"^encoder\.stages\.(\d+)\.layers\.(\d+)\."  # -> layer{stage + 1}.{block}.
_HF_RESNET_RENAMES = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (_BLOCK + r"shortcut\.convolution\.", lambda m: _block(m) + "downsample.0."),
    (_BLOCK + r"shortcut\.normalization\.", lambda m: _block(m) + "downsample.1."),
    (_BLOCK + r"layer\.(\d)\.convolution\.", lambda m: _block(m) + f"conv{int(m.group(3)) + 1}."),
    (_BLOCK + r"layer\.(\d)\.normalization\.", lambda m: _block(m) + f"bn{int(m.group(3)) + 1}."),
]


def _is_huggingface(sd: dict[str, torch.Tensor]) -> bool:
    return "model.query_position_embeddings.weight" in sd


def checkpoint_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a Hugging Face `DetrForObjectDetection` state dict (the Hub's layout or
    transformers 5's; timm or transformers ResNet backbone) onto ours by renaming. Our
    own layout passes through."""
    if not _is_huggingface(sd):
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        backbone = re.match(_HF_BACKBONE, key)
        if backbone:
            new = key[backbone.end():]
            for pattern, repl in _HF_RESNET_RENAMES:
                new = re.sub(pattern, repl, new)
            new = "backbone." + new
        else:
            new = key
            for pattern, repl in _HF_RENAMES:
                new = re.sub(pattern, repl, new)
            if new == key:
                raise CheckpointError(
                    f"the Hugging Face DETR checkpoint has {key!r}, which DetrForObjectDetection "
                    "does not have; is it another model (DetrForSegmentation, Conditional or "
                    "Deformable DETR)? Only DetrForObjectDetection checkpoints load into detr"
                )
        out[new] = value
    return out


def _spec(name: str, config_name: str, cfg: DetrConfig) -> ModelSpec:
    classes = cfg.num_classes + 1
    return ModelSpec(
        name=name,
        config=config_name,
        task="object-detection",
        # Any image size: the backbone is convolutional and the sine encoding is computed
        # from the feature map's size. One size per batch (no padding mask).
        inputs=(TensorSpec("images", "float32", ("batch", cfg.in_chans, "height", "width")),),
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.num_queries, classes)),
                 TensorSpec("boxes", "float32", ("batch", cfg.num_queries, 4))),
        default_dims={"height": cfg.img_size, "width": cfg.img_size},
        tolerances=dict(DEFAULT_TOLERANCES),
        # DETR's evaluation transform: resize the shortest side to 800 keeping the aspect
        # ratio, the longest at most 1333; no crop. Boxes come out relative to the
        # resized image, so postprocess_detr scales them to the original size directly.
        preprocessing={"resize": cfg.img_size, "max_size": round(cfg.img_size * 1333 / 800),
                       "crop": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "color": "RGB", "layout": "NCHW"},
    )


CONFIGS = {
    # 64 x 64 images, a one-block-per-stage ResNet of width 16 (512-channel C5 on a 2 x 2
    # grid), d = 64, 10 queries, 10 classes: ~0.7M parameters. One encoder layer (each
    # layer adds ~3 s to the export with dynamic image sizes) and two decoder layers, the
    # fewest in which the queries exchange information (the first layer's self-attention
    # sees only zeros as values).
    "tiny": DetrConfig(img_size=64, num_classes=10, layers=(1, 1, 1, 1), stem_width=16, dim=64,
                       num_heads=4, enc_layers=1, dec_layers=2, ffn_dim=128, num_queries=10),
    # DETR-R50 and DETR-R101 (Table 1): d = 256, 8 heads, FFN 2048, 6 + 6 layers, N = 100.
    "resnet50": DetrConfig(),
    "resnet101": DetrConfig(layers=(3, 4, 23, 3)),
}


register_model(
    "detr",
    configs=CONFIGS,
    spec=_spec,
    paper="Carion et al., End-to-End Object Detection with Transformers, ECCV 2020",
    checkpoint_filter=checkpoint_filter,
    checkpoint_formats=("transformers DetrForObjectDetection",),
)(DETR)
