"""The Transformer for translation.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017. https://arxiv.org/abs/1706.03762

The base model (sec. 3, table 3): d_model = 512, h = 8, d_ff = 2048, N = 6 post-norm
layers in encoder and decoder, sinusoidal positions, one embedding matrix shared by
source, target and the pre-softmax projection over a joint 37000-token BPE vocabulary
(sec. 3.4, 5.1), embeddings scaled by sqrt(d_model). Dropout is training-only and left
out. Source padding is masked in the encoder's self-attention and in every
cross-attention; the decoder's self-attention is causal.

Exported three ways, as the recurrent translators are: the whole teacher-forced model,
the encoder (run once: it also projects the memory into every decoder layer's cross
keys and values), and one decoder step whose self-attention key/value cache goes in and
out with a dynamic past length (see layers/transformer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.layers import padding_bias
from attnserve.models.layers.transformer import (
    EncoderLayer,
    TransformerDecoder,
    sinusoidal_positions,
)
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import CACHE_AXIS, ModelSpec, TensorSpec, source_specs, translation_spec
from attnserve.text import Vocabulary


@dataclass(frozen=True)
class TransformerConfig:
    src_vocab: int = 37000
    tgt_vocab: int = 37000
    dim: int = 512  # d_model
    num_heads: int = 8  # h
    ffn_dim: int = 2048  # d_ff
    depth: int = 6  # N, in the encoder and in the decoder
    share_embeddings: bool = True  # one matrix for source and target (needs one vocabulary)
    tie_output: bool = True  # and the pre-softmax projection
    example_src_len: int = 12
    target_len: int = 10  # the teacher-forced graph's target length
    example_past_len: int = 4  # cache length of the decoder step's example inputs
    max_length: int = 50


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.share_embeddings and cfg.src_vocab != cfg.tgt_vocab:
            raise ValueError("share_embeddings needs one vocabulary: src_vocab must equal tgt_vocab")
        self.cfg = cfg
        self.decoder = TransformerDecoder(cfg.tgt_vocab, cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.depth,
                                          tie_output=cfg.tie_output)
        self.src_embed = self.decoder.embed if cfg.share_embeddings else nn.Embedding(cfg.src_vocab, cfg.dim)
        if not cfg.share_embeddings:
            nn.init.normal_(self.src_embed.weight, std=cfg.dim**-0.5)
        self.encoder = nn.ModuleList(
            EncoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim) for _ in range(cfg.depth)
        )

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor):
        """-> cross keys and values (B, N, h, S, d_k), memory_bias (B, S), and the empty
        self-attention cache (B, N, h, 0, d_k) twice."""
        positions = sinusoidal_positions(torch.arange(src.shape[1]), self.cfg.dim)
        x = self.src_embed(src) * self.cfg.dim**0.5
        x = x + positions.to(x.dtype)
        memory_bias = padding_bias(src_lengths, src.shape[1], x.dtype)
        attention_bias = memory_bias[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, attention_bias)
        cross_keys, cross_values = self.decoder.cross_keys_values(x)
        return (cross_keys, cross_values, memory_bias) + self.decoder.empty_cache(x)

    def step(self, tokens, cross_keys, cross_values, memory_bias, self_keys, self_values):
        """One target word for each sequence: -> logits (B, V), the caches one longer,
        cross-attention over the source (B, S)."""
        logits, keys, values, attention = self.decoder(
            tokens.unsqueeze(1), self_keys, self_values, cross_keys, cross_values, memory_bias
        )
        return logits[:, 0], keys, values, attention[:, 0]

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing, all target positions at once: tgt (B, T) starts with <bos>."""
        cross_keys, cross_values, memory_bias, keys, values = self.encode(src, src_lengths)
        return self.decoder(tgt, keys, values, cross_keys, cross_values, memory_bias)[0]

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id,
            static=("cross_keys", "cross_values", "memory_bias"), state=("self_keys", "self_values"),
            max_length=self.cfg.max_length, attention_output="attention",
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        static = cross_attention_specs(cfg.depth, cfg.num_heads, cfg.dim, "src_len") + (
            TensorSpec("memory_bias", "float32", ("batch", "src_len")),)
        dims = {"src_len": cfg.example_src_len, CACHE_AXIS: cfg.example_past_len}
        encoder = ModelSpec("transformer.encoder", "part", "encoder", source_specs(cfg),
                            static + cache_specs(cfg.depth, cfg.num_heads, cfg.dim, past=0), dims)
        step = decoder_step_spec("transformer", cfg.tgt_vocab, static, cfg.depth, cfg.num_heads, cfg.dim,
                                 "src_len", dims)
        return encoder_and_step(self, encoder, step)


def cross_attention_specs(depth: int, heads: int, dim: int, memory_axis: str) -> tuple[TensorSpec, ...]:
    shape = ("batch", depth, heads, memory_axis, dim // heads)
    return (TensorSpec("cross_keys", "float32", shape), TensorSpec("cross_values", "float32", shape))


def cache_specs(depth: int, heads: int, dim: int, past: int | str = CACHE_AXIS, prefix: str = ""):
    """The self-attention cache; `past` 0 for the empty cache the encoder hands over."""
    shape = ("batch", depth, heads, past, dim // heads)
    return tuple(TensorSpec(f"{prefix}self_{kind}", "float32", shape) for kind in ("keys", "values"))


def decoder_step_spec(name: str, vocab: int, static: tuple[TensorSpec, ...], depth: int, heads: int, dim: int,
                      memory_axis: str, dims: dict) -> ModelSpec:
    """One token in; its logits, the caches one longer and the cross-attention over the
    memory out."""
    return ModelSpec(
        f"{name}.decoder_step", "part", "decoder-step",
        (TensorSpec("tokens", "int64", ("batch",), (0, vocab)),) + static + cache_specs(depth, heads, dim),
        (TensorSpec("logits", "float32", ("batch", vocab)),)
        + cache_specs(depth, heads, dim, f"{CACHE_AXIS} + 1", prefix="next_")
        + (TensorSpec("attention", "float32", ("batch", memory_axis)),),
        dims,
    )


CONFIGS = {
    # Untrained and tied, the output projection maps a token back onto itself: <bos> forever.
    # Untied, the random tiny model says something different for each input (as a test wants).
    "tiny": TransformerConfig(src_vocab=40, tgt_vocab=40, dim=32, num_heads=4, ffn_dim=64, depth=2,
                              share_embeddings=False, tie_output=False,
                              example_src_len=7, target_len=5, example_past_len=3, max_length=12),
    "base": TransformerConfig(),
}


register_model(
    "transformer",
    configs=CONFIGS,
    spec=translation_spec,
    paper="Vaswani et al., Attention Is All You Need, NeurIPS 2017",
)(Transformer)
