"""Multi-head self-attention, written once for every transformer in the zoo.

`Attention` keeps timm's parameter names (`qkv`, `proj`) so that timm and DeiT
checkpoints load by name. The fused kernel (`F.scaled_dot_product_attention`) is used
in eager mode; `explicit_attention()` switches every block to the plain
matmul-softmax-matmul path, which is the form exported graphs and custom kernels are
checked against.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

_state = threading.local()


def use_fused_attention() -> bool:
    return not getattr(_state, "explicit", False)


@contextlib.contextmanager
def explicit_attention():
    """Within this block, attention runs as explicit matmul/softmax/matmul."""
    previous = getattr(_state, "explicit", False)
    _state.explicit = True
    try:
        yield
    finally:
        _state.explicit = previous


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two axes; q, k, v: (B, heads, T, head_dim)."""
    if use_fused_attention():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, heads, Tq, Tk)
    return attn.softmax(dim=-1) @ v


def padding_bias(lengths: torch.Tensor, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) lengths -> (B, size): 0 for real positions, -inf for padding."""
    valid = torch.arange(size, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.zeros(valid.shape, dtype=dtype, device=lengths.device).masked_fill(~valid, float("-inf"))


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, sec. 3.2.2) with a fused qkv."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = scaled_dot_product(q, k, v, self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * head_dim)
        return self.proj(x)


class TalkingHeadAttention(nn.Module):
    """Talking-heads attention (Shazeer et al. 2020) as CaiT uses it: the attention
    logits are mixed across heads before the softmax (`proj_l`) and the weights after it
    (`proj_w`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # mix heads
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ClassAttention(nn.Module):
    """CaiT's class attention: only the class token queries; keys and values come from
    the class token and all patch tokens (Touvron et al. 2021, sec. 3)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape  # x[:, 0] is the class token
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x_cls = scaled_dot_product(q, k, v, self.scale)  # (B, heads, 1, head_dim)
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj(x_cls)
