"""The encoder-decoder Transformer's blocks, with a key/value cache for generation.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017. https://arxiv.org/abs/1706.03762

Scaled dot-product attention softmax(Q K^T / sqrt(d_k) + bias) V (eq. 1) in h heads with
separate Q, K, V projections (sec. 3.2.2); additive biases of 0 / -inf carry the padding
and causal masks. Sinusoidal positions PE(pos, 2i) = sin(pos / 10000^(2i/d)),
PE(pos, 2i+1) = cos(...) (sec. 3.5); embeddings scaled by sqrt(d) (sec. 3.4). The
paper's sublayers are post-norm, LN(x + Sublayer(x)); `norm_first` gives the pre-norm
form most modern decoders (and ViT) use.

Generation runs the decoder one token at a time. Each layer's self-attention keys and
values of the tokens so far are the state ("self_keys" / "self_values", shape
(B, layers, heads, past_len, d_k), empty before the first token); the cross-attention
keys and values of the encoder memory are computed once ("cross_keys" /
"cross_values"). One step appends its token's keys and values and attends over the
past, so its cost grows linearly with the past length instead of re-running the prefix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnserve.models.layers.mlp import Mlp


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(T,) float positions -> (T, dim) encodings, sin and cos interleaved (sec. 3.5)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32).unsqueeze(1) * inv_freq  # (T, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


def causal_bias(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(T, T): position t sees positions <= t (the decoder's mask, sec. 3.2.3)."""
    return torch.full((size, size), float("-inf"), dtype=dtype).triu(1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query, key and value projections.

    The weights are computed explicitly (matmul, softmax, matmul) in eager mode too: the
    decoder step returns the cross-attention weights, which users draw over the input.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d_k)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) -> keys and values, each (B, h, S, d_k)."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries from x (B, T, dim) over keys/values (B, h, S, d_k); bias broadcasts to
        (B, h, T, S). -> output (B, T, dim), weights (B, h, T, S)."""
        q = self._heads(self.q_proj(x)) * self.head_dim**-0.5
        scores = q @ keys.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        weights = scores.softmax(dim=-1)
        out = (weights @ values).transpose(1, 2).flatten(2)  # (B, T, h * d_k)
        return self.out_proj(out), weights


class _Sublayers(nn.Module):
    """Residual connection and layer norm around each sublayer, pre- or post-norm."""

    def __init__(self, dim: int, count: int, norm_first: bool, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(count))
        self.norm_first = norm_first

    def input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.norms[i](x) if self.norm_first else x

    def residual(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y if self.norm_first else self.norms[i](x + y)


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the position-wise FFN (sec. 3.1)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.ffn = Mlp(dim, ffn_dim, act_layer=nn.ReLU)
        self.sub = _Sublayers(dim, 2, norm_first, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.sub.input(0, x)
        x = self.sub.residual(0, x, self.self_attn.attend(h, *self.self_attn.keys_values(h), bias)[0])
        return self.sub.residual(1, x, self.ffn(self.sub.input(1, x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, attention over the encoder memory, FFN (sec. 3.1)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.cross_attn = MultiHeadAttention(dim, num_heads)
        self.ffn = Mlp(dim, ffn_dim, act_layer=nn.ReLU)
        self.sub = _Sublayers(dim, 3, norm_first, eps)

    def forward(self, x, past_keys, past_values, cross_keys, cross_values, self_bias, memory_bias):
        """x (B, T, dim): T new tokens after past_len cached ones. -> x, the keys and
        values of all past_len + T tokens, the cross-attention weights (B, h, T, S)."""
        h = self.sub.input(0, x)
        keys, values = self.self_attn.keys_values(h)
        keys = torch.cat([past_keys, keys], dim=2)
        values = torch.cat([past_values, values], dim=2)
        x = self.sub.residual(0, x, self.self_attn.attend(h, keys, values, self_bias)[0])
        h = self.sub.input(1, x)
        attended, weights = self.cross_attn.attend(h, cross_keys, cross_values, memory_bias)
        x = self.sub.residual(1, x, attended)
        x = self.sub.residual(2, x, self.ffn(self.sub.input(2, x)))
        return x, keys, values, weights


class TransformerDecoder(nn.Module):
    """Token embedding and positions, N decoder layers, and the output projection.

    Args:
        vocab_size, dim, num_heads, ffn_dim, depth: the sizes (d_model, h, d_ff, N).
        norm_first: pre-norm layers plus a final layer norm; False is the paper's post-norm.
        max_positions: 0 for sinusoidal positions; otherwise a learned table that long.
        tie_output: share the embedding matrix with the pre-softmax projection (sec. 3.4).
    """

    def __init__(self, vocab_size: int, dim: int, num_heads: int, ffn_dim: int, depth: int,
                 norm_first: bool = False, max_positions: int = 0, tie_output: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.dim, self.num_heads, self.depth = dim, num_heads, depth
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)  # unit variance after the sqrt(d) scale
        self.pos_embed = nn.Parameter(torch.randn(max_positions, dim) * 0.02) if max_positions else None
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, norm_first, eps) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim, eps=eps) if norm_first else None
        self.out_proj = nn.Linear(dim, vocab_size, bias=not tie_output)
        if tie_output:
            self.out_proj.weight = self.embed.weight

    def cross_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder memory (B, S, dim) -> every layer's cross keys and values, (B, N, h, S, d_k)."""
        kv = [layer.cross_attn.keys_values(memory) for layer in self.layers]
        return torch.stack([k for k, _ in kv], dim=1), torch.stack([v for _, v in kv], dim=1)

    def empty_cache(self, batch_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-attention cache before the first token: (B, N, h, 0, d_k), twice."""
        shape = (batch_like.shape[0], self.depth, self.num_heads, 0, self.dim // self.num_heads)
        empty = torch.zeros(shape, dtype=batch_like.dtype, device=batch_like.device)
        return empty, empty.clone()

    def _positions(self, start, length: int) -> torch.Tensor:
        if self.pos_embed is not None:
            return self.pos_embed[start:start + length]
        return sinusoidal_positions(torch.arange(length) + start, self.dim)

    def forward(self, tokens, self_keys, self_values, cross_keys, cross_values, memory_bias=None):
        """tokens (B, T) following the past_len tokens cached in self_keys/values.
        -> logits (B, T, V), the updated caches, last layer's cross-attention (B, T, S)
        averaged over heads."""
        past = self_keys.shape[3]
        T = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.dim)
        x = x + self._positions(past, T).to(x.dtype)
        # A token sees every cached token and the new ones up to itself.
        self_bias = torch.cat([torch.zeros(T, past, dtype=x.dtype), causal_bias(T, x.dtype)], dim=1)
        if memory_bias is not None:
            memory_bias = memory_bias[:, None, None, :]  # (B, 1, 1, S): every head and query
        next_keys, next_values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v, weights = layer(x, self_keys[:, i], self_values[:, i], cross_keys[:, i],
                                     cross_values[:, i], self_bias, memory_bias)
            next_keys.append(k)
            next_values.append(v)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return (self.out_proj(x), torch.stack(next_keys, dim=1), torch.stack(next_values, dim=1),
                weights.mean(dim=1))
