"""The Image Transformer: a decoder-only Transformer over pixel-channel intensities with
local 1-D or local 2-D masked self-attention.

Parmar, Vaswani, Uszkoreit, Kaiser, Shazeer, Ku, Tran, "Image Transformer", ICML 2018.
https://arxiv.org/abs/1802.05751

Implemented (the decoder-only configuration of sec. 3.2, for unconditional and
class-conditional generation):

- Representation (sec. 3.1, the categorical "cat" one): an h x w RGB image is the
  (h, w * 3) map of its channel intensities, each a 256-way category. Inputs are embedded
  with a channel-specific table of 256 d-dimensional embeddings per channel; the output
  logits come from one separate set of 256 embeddings shared by the channels. To every
  position a d-dimensional coordinate encoding is added, d/2 dimensions for the row and
  d/2 for the column-and-channel index (sinusoidal as Vaswani et al. or learned; sec. 5.1
  found no difference), in the first layer only (sec. 3.2).
- Class conditioning (sec. 5.2): a learned d-dimensional embedding per class added to
  every input representation (`num_classes > 0`; 0 is unconditional).
- Layers (sec. 3.2, eq. 1-2): q_a = LN(q + MultiHead(q, M)); q' = LN(q_a + W_1 ReLU(W_2
  q_a)), post-norm. W_q, W_k, W_v are matrices (no bias, as eq. 1 writes them), heads
  concatenated through an output matrix as in Vaswani et al.; logits scaled by
  1/sqrt(d_head).
- Local 1-D attention (sec. 3.3): the map flattened in raster order, cut into query
  blocks of l_q positions; each block's memory is the block and the l_m positions before
  it; positions not yet generated are masked. Local 2-D attention (sec. 3.3): query
  blocks of h_q x w_q positions of the map, generated block after block in raster order
  and in raster order inside a block; the memory block extends the query block h_m rows
  up and w_m columns left and right; the rows above are all visible, the columns left
  of the block visible, those right of it masked, and inside the block the positions
  after the query masked. Memory positions outside the image are excluded (the paper
  pads with zeros; excluding is the custom op's definition and never lets a padded key
  take attention weight). The model predicts p(x_t | x_<t) in that generation order
  (sec. 3.4): the input at a position is the value generated just before it (the first
  one reads the zero vector).

Both attentions are the `attnserve::window_attention` op in "block" mode: 1-D is exactly
window=l_q, memory_before=l_m, causal=True. For 2-D the op's `causal` flag cannot be
used: it excludes keys later in *raster* order of the whole map, but the paper's order is
block-raster, so it would hide the left neighbour block's lower rows (already generated)
and show the right neighbour block's upper rows (not yet generated). The op's additive
`mask` (windows, N_q, N_k) expresses the paper's pattern exactly (0 / -inf, the same for
every window; the op excludes keys outside the map), so 2-D is window=(h_q, w_q),
memory_before=(h_m, w_m), memory_after=(0, w_m), causal=False and that mask.

Generation is exported in two parts (`export_parts`, driven by
`attnserve.postprocess_image_transformer.sample_images` or the generic
`attnserve.runtime.generate.greedy_search`):

- encoder: `class_id` (B,) -> the static `class_embedding` (B, d) (zeros when
  unconditional: the model then has the single class 0, and class_id only says how many
  images to start) and the initial state, `position` = 0 and empty caches;
- decoder step: the previous value `tokens` (B,) (START_TOKEN = 256 at step 0, where the
  input is the zero vector), the static and state tensors -> `logits` (B, 256) for the
  value generated at step `position`, its raster index `pixel_index` (B,) in the
  (h, w, 3) image, and the next state. The key/value cache is fixed-size: per layer the
  keys and values of the last S generated values, (B, layers, heads, S, d_head), shifted
  by one every step; S is the longest look-back of any query's memory block in
  generation order (l_q + l_m for 1-D; computed from the block geometry for 2-D), and a
  mask built from `position` keeps exactly that query's visible memory. A step costs the
  same at every position.

Not implemented: the encoder-decoder configuration for super-resolution (sec. 3.2, 5.3),
the ordinal DMOL representation and loss (sec. 3.1, 3.4), and dropout (training only).

The whole graph (`forward`) is the teacher-forced one: `pixels` (B, h, w, 3) intensities
(and `class_id`) in, `logits` (B, h, w, 3, 256) out, each p(x_t | x_<t): the model's
likelihood, in bits per dimension with `postprocess_image_transformer.bits_per_dim`. The
op's general (gathered) path, in torch and in its ONNX function body, materialises every
query's memory, (B, heads, h * w * 3, memory size, d_head) per gathered tensor: 3.2 GB
per image for `cifar10_1d` and 8 GB for `cifar10_2d`, several alive at once. The paper
configs therefore score images only on a large machine; generation, which runs the step
and not the op, needs a few MB. The tiny configs are what the tests export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attnserve.errors import InputError
from attnserve.models.layers.mlp import Mlp
from attnserve.models.layers.transformer import sinusoidal_positions
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.ops import window_attention
from attnserve.postprocess_image_transformer import (
    ATTENTION_TYPES,
    CHANNELS,
    INTENSITIES,
    START_TOKEN,
    TASK,
    generation_order,
)
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec

POSITION_TYPES = ("sinusoidal", "learned")


@dataclass(frozen=True)
class ImageTransformerConfig:
    img_height: int = 32
    img_width: int = 32
    attention: str = "local_1d"  # or "local_2d" (sec. 3.3)
    # local_1d: query blocks of l_q positions, memory l_m positions before the block.
    block_length: int = 256
    memory_length: int = 256
    # local_2d: query blocks of (h_q, w_q) positions of the (h, w * 3) map; the memory
    # extends h_m rows up and w_m columns left and right.
    query_shape: tuple[int, int] = (8, 16)
    memory_flange: tuple[int, int] = (8, 32)
    dim: int = 512  # d
    num_heads: int = 4
    ffn_dim: int = 2048
    depth: int = 12
    num_classes: int = 0  # 0: unconditional; > 0: class-conditional (sec. 5.2)
    positions: str = "sinusoidal"  # or "learned" (sec. 3.1)


def check_config(cfg: ImageTransformerConfig) -> None:
    """Raise InputError, one sentence, for a configuration the model cannot be built with."""
    if cfg.attention not in ATTENTION_TYPES:
        raise InputError(f"image_transformer attention must be one of {ATTENTION_TYPES}, "
                         f"got {cfg.attention!r}")
    if cfg.positions not in POSITION_TYPES:
        raise InputError(f"image_transformer positions must be one of {POSITION_TYPES}, "
                         f"got {cfg.positions!r}")
    if cfg.img_height < 1 or cfg.img_width < 1:
        raise InputError(f"image size must be positive, got {cfg.img_height} x {cfg.img_width}")
    if cfg.dim % cfg.num_heads:
        raise InputError(f"dim {cfg.dim} does not split into {cfg.num_heads} heads")
    if cfg.dim % 4:
        # Half the encoding is the row, half the column and channel (sec. 3.1), each in sin/cos pairs.
        raise InputError(f"dim must be a multiple of 4 (row and column encodings of sine/cosine pairs), "
                         f"got {cfg.dim}")
    if cfg.num_classes < 0:
        raise InputError(f"num_classes must be >= 0 (0: unconditional), got {cfg.num_classes}")
    values = cfg.img_height * cfg.img_width * CHANNELS
    if cfg.attention == "local_1d":
        if cfg.block_length < 1 or cfg.memory_length < 0:
            raise InputError(f"local_1d needs block_length >= 1 and memory_length >= 0, got "
                             f"{cfg.block_length} and {cfg.memory_length}")
        if values % cfg.block_length:
            raise InputError(
                f"a {cfg.img_height} x {cfg.img_width} image has {values} channel values, which do not split "
                f"into query blocks of {cfg.block_length}; choose a block_length that divides {values}"
            )
    else:
        # Raises if the map does not split into query blocks.
        generation_order(cfg.img_height, cfg.img_width, cfg.attention, cfg.query_shape)
        if len(cfg.memory_flange) != 2 or min(cfg.memory_flange) < 0:
            raise InputError(f"memory_flange must be (h_m, w_m) >= 0, got {cfg.memory_flange!r}")


def block_raster_mask(query_shape: tuple[int, int], memory_flange: tuple[int, int]) -> torch.Tensor:
    """Local 2-D attention's visibility (sec. 3.3, fig. 2 right), the same for every block:
    (N_q, N_k) bool, queries row-major over the (h_q, w_q) block, keys row-major over the
    (h_m + h_q, w_m + w_q + w_m) memory block (the window_attention op's key order)."""
    hq, wq = query_shape
    hm, wm = memory_flange
    key_row = torch.arange(hm + hq).unsqueeze(1)  # (K0, 1)
    key_col = torch.arange(wm + wq + wm).unsqueeze(0)  # (1, K1)
    above = (key_row < hm).expand(-1, key_col.shape[1])  # earlier block rows: generated
    left = (key_row >= hm) & (key_col < wm)  # the blocks to the left: generated
    inside = (key_row >= hm) & (key_col >= wm) & (key_col < wm + wq)
    key_in_block = (key_row - hm) * wq + (key_col - wm)  # raster index inside the query block
    query = torch.arange(hq * wq).reshape(-1, 1, 1)
    visible = above | left | (inside & (key_in_block <= query))  # right of the block: not yet
    return visible.flatten(1)


def cache_length(cfg: ImageTransformerConfig, order: np.ndarray) -> int:
    """S, the fewest most recent values the step must keep: the longest distance in
    generation steps from a query back to the earliest key of its memory block."""
    height, map_width = cfg.img_height, cfg.img_width * CHANNELS
    values = height * map_width
    if cfg.attention == "local_1d":
        return min(values, cfg.block_length + cfg.memory_length)
    step_of = np.empty(values, dtype=np.int64)
    step_of[order] = np.arange(values)
    step_map = step_of.reshape(height, map_width)
    (hq, wq), (hm, wm) = cfg.query_shape, cfg.memory_flange
    longest = 0
    for top in range(0, height, hq):
        for left in range(0, map_width, wq):
            memory = step_map[max(0, top - hm):top + hq, max(0, left - wm):left + wq + wm]
            last = step_map[top:top + hq, left:left + wq].max()
            longest = max(longest, int(last - memory.min()) + 1)
    return longest


class LocalSelfAttention(nn.Module):
    """Multi-head masked local self-attention over the (h, w * 3) map, 1-D or 2-D
    (sec. 3.3), with the one-query step that generation runs."""

    def __init__(self, cfg: ImageTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        # W_q, W_k, W_v of eq. 1 and the heads' output matrix: no biases.
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        if cfg.attention == "local_2d":
            visible = block_raster_mask(cfg.query_shape, cfg.memory_flange)
            mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
            self.register_buffer("block_mask", mask, persistent=False)  # (N_q, N_k)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d_head)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The masked local attention of q, k, v (B, h, N, d_head), N the raster-ordered
        (h, w * 3) map -> (B, h, N, d_head)."""
        cfg = self.cfg
        if cfg.attention == "local_1d":
            return window_attention(q, k, v, window=(cfg.block_length,), memory_before=(cfg.memory_length,),
                                    causal=True)
        height, map_width = cfg.img_height, cfg.img_width * CHANNELS
        (hq, wq), (hm, wm) = cfg.query_shape, cfg.memory_flange
        q, k, v = (t.reshape(-1, self.num_heads, height, map_width, self.head_dim) for t in (q, k, v))
        windows = (height // hq) * (map_width // wq)
        mask = self.block_mask.expand(windows, *self.block_mask.shape)  # (windows, N_q, N_k)
        out = window_attention(q, k, v, window=(hq, wq), memory_before=(hm, wm), memory_after=(0, wm),
                               mask=mask.to(q.dtype))
        return out.flatten(2, 3)  # (B, h, N, d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, d) -> (B, N, d)."""
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        out = self.attend(q, k, v).transpose(1, 2).flatten(2)  # (B, N, h * d_head)
        return self.out_proj(out)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor):
        """One query x (B, d) over the cache of the last S values' keys and values
        (B, h, S, d_head), which this value's key and value join as the oldest leaves;
        bias (B, 1, 1, S) is 0 on the query's visible memory and -inf elsewhere.
        -> output (B, d), keys, values."""
        x = x.unsqueeze(1)
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        keys = torch.cat([keys[:, :, 1:], k], dim=2)  # (B, h, S, d_head)
        values = torch.cat([values[:, :, 1:], v], dim=2)
        scores = (q * self.head_dim**-0.5) @ keys.transpose(-2, -1) + bias  # (B, h, 1, S)
        out = (scores.softmax(dim=-1) @ values).transpose(1, 2).flatten(2)  # (B, 1, h * d_head)
        return self.out_proj(out[:, 0]), keys, values


class DecoderLayer(nn.Module):
    """Eq. 1-2: local self-attention and a ReLU feed-forward network, each with a residual
    connection and post layer norm (dropout is training-only)."""

    def __init__(self, cfg: ImageTransformerConfig):
        super().__init__()
        self.attn = LocalSelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, cfg.ffn_dim, act_layer=nn.ReLU)
        self.norm2 = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))

    def step(self, x, keys, values, bias):
        a, keys, values = self.attn.step(x, keys, values, bias)
        x = self.norm1(x + a)
        return self.norm2(x + self.mlp(x)), keys, values


class ImageTransformer(nn.Module):
    def __init__(self, cfg: ImageTransformerConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        d, height, width = cfg.dim, cfg.img_height, cfg.img_width
        self.map_width = width * CHANNELS
        self.num_values = height * self.map_width
        # Sec. 3.1: channel-specific input embeddings (channel c, intensity v -> row
        # 256 c + v), one output set shared by the channels.
        self.input_embed = nn.Embedding(CHANNELS * INTENSITIES, d)
        self.output_embed = nn.Linear(d, INTENSITIES, bias=False)
        nn.init.normal_(self.input_embed.weight, std=d**-0.5)
        nn.init.normal_(self.output_embed.weight, std=d**-0.5)
        self.class_embed = nn.Embedding(cfg.num_classes, d) if cfg.num_classes else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=d**-0.5)
        # Sec. 3.1: d/2 dimensions encode the row, d/2 the column-and-channel index.
        if cfg.positions == "learned":
            self.row_embed = nn.Parameter(torch.randn(height, d // 2) * d**-0.5)
            self.col_embed = nn.Parameter(torch.randn(self.map_width, d // 2) * d**-0.5)
        else:
            self.register_buffer("row_embed", sinusoidal_positions(torch.arange(height), d // 2),
                                 persistent=False)
            self.register_buffer("col_embed", sinusoidal_positions(torch.arange(self.map_width), d // 2),
                                 persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.depth))

        order = generation_order(height, width, cfg.attention, cfg.query_shape)
        step_of = np.empty_like(order)
        step_of[order] = np.arange(self.num_values)
        # The input at each raster position: the value generated one step before it,
        # as an index into the embeddings with a zero row prepended (the first reads it).
        shifted = np.where(step_of > 0, order[np.maximum(step_of - 1, 0)] + 1, 0)
        self.register_buffer("order", torch.from_numpy(order), persistent=False)
        self.register_buffer("shifted_index", torch.from_numpy(shifted), persistent=False)
        channel_offset = torch.arange(self.num_values) % CHANNELS * INTENSITIES
        self.register_buffer("channel_offset", channel_offset, persistent=False)
        self.cache_len = cache_length(cfg, order)

    # -- the whole, teacher-forced graph ---------------------------------------------
    def forward(self, pixels: torch.Tensor, class_id: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, h, w, 3) intensities 0..255 -> logits (B, h, w, 3, 256), each for
        p(x_t | x_<t) in generation order (sec. 3.4)."""
        cfg = self.cfg
        self._check_pixels(pixels)
        tokens = pixels.reshape(-1, self.num_values)  # raster over (h, w, 3) = over (h, w * 3)
        emb = self.input_embed(tokens + self.channel_offset)  # (B, N, d)
        emb = F.pad(emb, (0, 0, 1, 0))[:, self.shifted_index]  # each position reads its predecessor
        x = emb + self._positions(torch.arange(self.num_values, device=pixels.device))
        x = x + self._class_embedding(class_id, pixels.shape[0]).unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        logits = self.output_embed(x)  # (B, N, 256)
        return logits.reshape(-1, cfg.img_height, cfg.img_width, CHANNELS, INTENSITIES)

    # -- the two parts generation runs ------------------------------------------------
    def encode(self, class_id: torch.Tensor):
        """class_id (B,) -> class_embedding (B, d), position (B,) = 0, and the empty
        key and value caches (B, layers, heads, S, d_head)."""
        cfg = self.cfg
        embedding = self._class_embedding(class_id, class_id.shape[0])
        shape = (class_id.shape[0], cfg.depth, cfg.num_heads, self.cache_len, cfg.dim // cfg.num_heads)
        dtype = self.input_embed.weight.dtype
        return (embedding, torch.zeros_like(class_id), class_id.new_zeros(shape, dtype=dtype),
                class_id.new_zeros(shape, dtype=dtype))

    def step(self, tokens, class_embedding, position, keys, values):
        """The value generated at step t = `position` from the one before it (`tokens`):
        -> logits (B, 256), pixel_index (B,) (its raster index in the (h, w, 3) image),
        position t + 1, and the caches with this value's keys and values."""
        self._check_step(tokens, position)
        previous = self.order[(position - 1).clamp(min=0)]
        emb = self.input_embed(previous % CHANNELS * INTENSITIES + tokens.clamp(0, INTENSITIES - 1))
        emb = emb * (position > 0).unsqueeze(-1).to(emb.dtype)  # step 0 reads the zero vector
        here = self.order[position.clamp(max=self.num_values - 1)]
        x = emb + self._positions(here) + class_embedding
        bias = self._memory_bias(position, here).to(x.dtype)
        next_keys, next_values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer.step(x, keys[:, i], values[:, i], bias)
            next_keys.append(k)
            next_values.append(v)
        return (self.output_embed(x), here, position + 1, torch.stack(next_keys, dim=1),
                torch.stack(next_values, dim=1))

    def _memory_bias(self, position: torch.Tensor, here: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, S): 0 where the cache slot holds a key of this query's memory block
        (sec. 3.3), -inf elsewhere. Slot s holds generation step t - (S - 1) + s, all
        <= t, so what is left to check is that the step exists and lies in the block."""
        cfg = self.cfg
        slots = torch.arange(self.cache_len, device=position.device)
        key_step = position.unsqueeze(1) - (self.cache_len - 1) + slots  # (B, S)
        visible = key_step >= 0
        if cfg.attention == "local_1d":
            block_start = position // cfg.block_length * cfg.block_length
            visible = visible & (key_step >= (block_start - cfg.memory_length).unsqueeze(1))
        else:
            (hq, wq), (hm, wm) = cfg.query_shape, cfg.memory_flange
            key = self.order[key_step.clamp(min=0)]  # raster index of each slot's value
            key_row, key_col = key // self.map_width, key % self.map_width
            top = (here // self.map_width // hq * hq).unsqueeze(1)  # the query block's corner
            left = (here % self.map_width // wq * wq).unsqueeze(1)
            visible = (visible & (key_row >= top - hm) & (key_row < top + hq)
                       & (key_col >= left - wm) & (key_col < left + wq + wm))
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(visible, zero, torch.full((), float("-inf"))).unsqueeze(1).unsqueeze(1)

    def generation_config(self) -> GenerationConfig:
        # No end token (-1 is never a value): every image is h * w * 3 values long.
        return GenerationConfig(
            bos_id=START_TOKEN, eos_id=-1, static=("class_embedding",), state=("position", "keys", "values"),
            max_length=self.num_values, length_limit=self.num_values,
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        cache = ("batch", cfg.depth, cfg.num_heads, self.cache_len, cfg.dim // cfg.num_heads)
        static = (TensorSpec("class_embedding", "float32", ("batch", cfg.dim)),)
        state = {"position": TensorSpec("position", "int64", ("batch",), (0, self.num_values)),
                 "keys": TensorSpec("keys", "float32", cache),
                 "values": TensorSpec("values", "float32", cache)}
        next_state = tuple(TensorSpec(f"next_{n}", t.dtype, t.shape) for n, t in state.items())
        whole = image_transformer_spec("image_transformer", "part", cfg)
        encoder = ModelSpec("image_transformer.encoder", "part", "encoder", (class_id_spec(cfg),),
                            static + tuple(state.values()), preprocessing=whole.preprocessing)
        step = ModelSpec(
            "image_transformer.decoder_step", "part", "decoder-step",
            (TensorSpec("tokens", "int64", ("batch",), (0, INTENSITIES)),) + static + tuple(state.values()),
            (TensorSpec("logits", "float32", ("batch", INTENSITIES)),
             TensorSpec("pixel_index", "int64", ("batch",))) + next_state,
            preprocessing=whole.preprocessing,
        )
        return encoder_and_step(self, encoder, step)

    # -- helpers -------------------------------------------------------------------------
    def _positions(self, index: torch.Tensor) -> torch.Tensor:
        """Coordinate encodings of raster indices (...,) of the (h, w * 3) map -> (..., d)."""
        rows, cols = index // self.map_width, index % self.map_width
        return torch.cat([self.row_embed[rows], self.col_embed[cols]], dim=-1)

    def _class_embedding(self, class_id: torch.Tensor | None, batch) -> torch.Tensor:
        """(B, d): the class's embedding (sec. 5.2), zeros for an unconditional model."""
        cfg = self.cfg
        if class_id is not None:
            _check_class_ids(class_id, max(cfg.num_classes, 1))
        if self.class_embed is None:
            template = self.input_embed.weight
            return template.new_zeros(batch, cfg.dim) if class_id is None else class_id.new_zeros(
                (batch, cfg.dim), dtype=template.dtype)
        if class_id is None:
            raise InputError(f"this Image Transformer is class-conditional ({cfg.num_classes} classes): "
                             "pass class_id")
        return self.class_embed(class_id)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.img_height, cfg.img_width, CHANNELS)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            raise InputError(f"image_transformer takes pixels of shape (batch, {', '.join(map(str, want))}), "
                             f"got {tuple(pixels.shape)}")
        if pixels.dtype not in (torch.int64, torch.int32):
            raise InputError(f"pixels must be integer intensities 0..255 (int64), got {pixels.dtype}")
        if not torch.compiler.is_exporting():  # ONNX Runtime's Gather refuses bad values itself
            bad = pixels[(pixels < 0) | (pixels >= INTENSITIES)]
            if bad.numel():
                raise InputError(f"pixels must be intensities 0..255, got {bad[:8].tolist()}")

    def _check_step(self, tokens: torch.Tensor, position: torch.Tensor) -> None:
        if tokens.dim() != 1 or position.shape != tokens.shape:
            raise InputError(f"tokens and position must both be (batch,), got {tuple(tokens.shape)} and "
                             f"{tuple(position.shape)}")
        if torch.compiler.is_exporting():
            return
        bad = (tokens < 0) | (tokens > START_TOKEN) | ((tokens == START_TOKEN) & (position != 0))
        if bad.any():
            raise InputError(f"tokens must be intensities 0..255 (or {START_TOKEN}, the start, at "
                             f"position 0), got {tokens[bad][:8].tolist()}")
        late = position[(position < 0) | (position >= self.num_values)]
        if late.numel():
            raise InputError(f"position must be a generation step 0..{self.num_values - 1}, "
                             f"got {late[:8].tolist()}")


def _check_class_ids(class_id: torch.Tensor, num_classes: int) -> None:
    if class_id.dim() != 1:
        raise InputError(f"class_id must have shape (batch,), got {tuple(class_id.shape)}")
    if class_id.dtype not in (torch.int64, torch.int32):
        raise InputError(f"class_id must be int64, got {class_id.dtype}")
    if not torch.compiler.is_exporting():
        bad = class_id[(class_id < 0) | (class_id >= num_classes)]
        if bad.numel():
            kind = "an unconditional model has the one class 0" if num_classes == 1 else f"[0, {num_classes})"
            raise InputError(f"class_id values must be in {kind}, got {bad[:8].tolist()}")


def class_id_spec(cfg: ImageTransformerConfig) -> TensorSpec:
    # An unconditional model's encoder takes class ids too (all 0): they say how many images.
    return TensorSpec("class_id", "int64", ("batch",), (0, max(cfg.num_classes, 1)))


def image_transformer_spec(name: str, config_name: str, cfg: ImageTransformerConfig) -> ModelSpec:
    """The whole teacher-forced graph: pixels (and the class) in, logits per channel value out.

    Conditioning: class-conditional generation (sec. 5.2) when `num_classes` > 0, with a
    `class_id` input; super-resolution (the encoder-decoder of sec. 3.2 and 5.3) is not
    implemented. Generation runs the two parts of `ImageTransformer.export_parts`, not
    this graph: `attnserve.postprocess_image_transformer.sample_images` draws each value
    by inverse transform from softmax(logits / temperature) with one uniform per value
    from numpy.random.default_rng(seed), one generator per image, so a (model, class,
    seed, temperature) names an image on every backend; temperature 0 is greedy.
    """
    check_config(cfg)
    h, w = cfg.img_height, cfg.img_width
    inputs = (TensorSpec("pixels", "int64", ("batch", h, w, CHANNELS), (0, INTENSITIES)),)
    if cfg.num_classes:
        inputs += (class_id_spec(cfg),)
    return ModelSpec(
        name=name, config=config_name, task=TASK, inputs=inputs,
        outputs=(TensorSpec("logits", "float32", ("batch", h, w, CHANNELS, INTENSITIES)),),
        tolerances=dict(DEFAULT_TOLERANCES),
        # Raw intensities, not normalised: each is a category (sec. 3.1).
        preprocessing={"height": h, "width": w, "channels": CHANNELS, "color": "RGB", "layout": "NHWC",
                       "value_range": [0, INTENSITIES - 1]},
    )


CONFIGS = {
    # 8 x 8 images (192 values), 1-D blocks of 16 with a memory of 32 before them (so the
    # memory spans two earlier blocks), class-conditional; about 50k parameters.
    "tiny": ImageTransformerConfig(img_height=8, img_width=8, block_length=16, memory_length=32, dim=32,
                                   num_heads=4, ffn_dim=64, depth=2, num_classes=10),
    # The 2-D counterpart: blocks of 2 x 6 values of the 8 x 24 map, memory 3 rows up (more
    # than one block row) and 6 columns each side; unconditional, learned positions.
    "tiny_2d": ImageTransformerConfig(img_height=8, img_width=8, attention="local_2d", query_shape=(2, 6),
                                      memory_flange=(3, 6), dim=32, num_heads=4, ffn_dim=64, depth=2,
                                      positions="learned"),
    # Sec. 5.1, CIFAR-10, categorical: 12 layers, d = 512, 4 heads, feed-forward 2048;
    # 1-D local attention, l_q = 256 and a memory of 512 in all (l_m = 256).
    "cifar10_1d": ImageTransformerConfig(),
    # Sec. 5.2: the same, conditioned on the 10 CIFAR-10 classes.
    "cifar10_1d_cond": ImageTransformerConfig(num_classes=10),
    # The sec. 5.1 CIFAR-10 model with local 2-D attention (sec. 3.3). The paper gives no
    # 2-D block sizes for CIFAR-10; these (8 x 16 query blocks, memory 8 rows up and 32
    # columns each side) are the authors' tensor2tensor `img2img_transformer2d_q3`.
    "cifar10_2d": ImageTransformerConfig(attention="local_2d"),
    # Sec. 5.1, ImageNet 32 x 32 (unconditional): 12 layers, d = 512, 8 heads, 2048.
    "imagenet32_1d": ImageTransformerConfig(num_heads=8),
}


register_model(
    "image_transformer",
    configs=CONFIGS,
    spec=image_transformer_spec,
    paper="Parmar et al., Image Transformer, ICML 2018",
    custom_ops=("WindowAttention",),
)(ImageTransformer)
