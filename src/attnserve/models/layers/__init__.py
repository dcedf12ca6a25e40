"""Blocks shared by the model families: attention, MLP, patch embedding, ResNet."""

from attnserve.models.layers.attention import (
    Attention,
    ClassAttention,
    TalkingHeadAttention,
    explicit_attention,
    padding_bias,
    scaled_dot_product,
)
from attnserve.models.layers.block import Block
from attnserve.models.layers.mlp import GeluTanh, Mlp
from attnserve.models.layers.patch_embed import PatchEmbed, TubeletEmbed, resample_pos_embed
from attnserve.models.layers.resnet import Bottleneck, ResNet
from attnserve.models.layers.squeeze_excite import Cbam, SqueezeExcite

__all__ = [
    "Attention", "Block", "Bottleneck", "Cbam", "ClassAttention", "GeluTanh", "Mlp", "PatchEmbed",
    "ResNet", "SqueezeExcite", "TalkingHeadAttention", "TubeletEmbed", "explicit_attention",
    "padding_bias", "resample_pos_embed", "scaled_dot_product",
]
