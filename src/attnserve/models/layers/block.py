"""The pre-norm transformer encoder block of ViT (Dosovitskiy et al. 2021, eq. 2-3)."""

from torch import nn

from attnserve.models.layers.attention import Attention
from attnserve.models.layers.mlp import Mlp


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, attn_cls: type[nn.Module] = Attention,
                 act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn_cls(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
