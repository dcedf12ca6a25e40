"""An image captioner: a ViT encoder and a Transformer decoder.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (the encoder) and
Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (the decoder): the modern
captioner of the seeds' Transformer lectures.

The image goes through the ViT trunk (models/vit.py, timm's parameter names under
`encoder.`); its patch tokens, projected to the decoder's width, are the memory the
decoder cross-attends to. The class token is left out of the memory so the step's
cross-attention (averaged over heads, last layer) is one weight per patch: reshaped to
the patch grid it is the map users draw over the image. The decoder is pre-norm with a
learned position table (or sinusoidal positions, `learned_positions=False`), and ties
its embedding to the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.layers.transformer import TransformerDecoder
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.models.transformer import cache_specs, cross_attention_specs, decoder_step_spec
from attnserve.models.vit import VisionTransformer, ViTConfig
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import CACHE_AXIS, ModelSpec, image_captioning_spec
from attnserve.text import Vocabulary


@dataclass(frozen=True)
class ViTCaptionerConfig:
    encoder: ViTConfig = ViTConfig()  # ViT-B/16 at 224
    vocab_size: int = 10000
    dim: int = 512  # the decoder: Transformer base
    num_heads: int = 8
    ffn_dim: int = 2048
    depth: int = 6
    learned_positions: bool = True
    tie_output: bool = True
    target_len: int = 16  # the teacher-forced graph's caption length
    example_past_len: int = 4
    max_length: int = 32  # also the length of the learned position table


class ViTCaptioner(nn.Module):
    def __init__(self, cfg: ViTCaptionerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.encoder)
        self.encoder.head = nn.Identity()  # the captioner reads tokens, not class logits
        width = cfg.encoder.embed_dim
        self.memory_proj = nn.Linear(width, cfg.dim) if width != cfg.dim else nn.Identity()
        self.decoder = TransformerDecoder(
            cfg.vocab_size, cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.depth, norm_first=True,
            max_positions=cfg.max_length if cfg.learned_positions else 0, tie_output=cfg.tie_output,
        )

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def encode(self, images: torch.Tensor):
        """-> cross keys and values (B, N, h, patches, d_k) and the empty self-attention cache."""
        tokens = self.encoder.forward_features(images)[:, self.encoder.num_prefix_tokens:]
        cross_keys, cross_values = self.decoder.cross_keys_values(self.memory_proj(tokens))
        return (cross_keys, cross_values) + self.decoder.empty_cache(tokens)

    def step(self, tokens, cross_keys, cross_values, self_keys, self_values):
        """One word per caption: -> logits (B, V), the caches one longer, attention (B, patches)."""
        logits, keys, values, attention = self.decoder(tokens.unsqueeze(1), self_keys, self_values,
                                                       cross_keys, cross_values)
        return logits[:, 0], keys, values, attention[:, 0]

    def forward(self, images: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        cross_keys, cross_values, keys, values = self.encode(images)
        return self.decoder(tgt, keys, values, cross_keys, cross_values)[0]

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id,
            static=("cross_keys", "cross_values"), state=("self_keys", "self_values"),
            max_length=self.cfg.max_length, attention_output="attention",
            length_limit=self.cfg.max_length if self.cfg.learned_positions else None,
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        static = cross_attention_specs(cfg.depth, cfg.num_heads, cfg.dim, self.num_patches)
        whole = captioning_spec("vit_captioner", "part", cfg)
        encoder = ModelSpec("vit_captioner.encoder", "part", "encoder", whole.inputs[:1],
                            static + cache_specs(cfg.depth, cfg.num_heads, cfg.dim, past=0),
                            preprocessing=whole.preprocessing)
        step = decoder_step_spec("vit_captioner", cfg.vocab_size, static, cfg.depth, cfg.num_heads, cfg.dim,
                                 self.num_patches, {CACHE_AXIS: cfg.example_past_len})
        return encoder_and_step(self, encoder, step)


def captioning_spec(name: str, config_name: str, cfg: ViTCaptionerConfig) -> ModelSpec:
    return image_captioning_spec(name, config_name, img_size=cfg.encoder.img_size, vocab_size=cfg.vocab_size,
                                 target_len=cfg.target_len, in_chans=cfg.encoder.in_chans,
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


CONFIGS = {
    "tiny": ViTCaptionerConfig(
        encoder=ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
        vocab_size=40, dim=32, num_heads=4, ffn_dim=64, depth=2, tie_output=False,  # see transformer.py
        target_len=5, example_past_len=3, max_length=12,
    ),
    # ViT-B/16 at 224 and the Transformer base decoder; a 10k-word caption vocabulary.
    "base": ViTCaptionerConfig(),
    # The demo (attnserve.train.captions): 64 x 64 pictures of two coloured shapes, 8 x 8
    # patches of 8 px, and their 15-token vocabulary.
    "shapes": ViTCaptionerConfig(
        encoder=ViTConfig(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4),
        vocab_size=15, dim=64, num_heads=4, ffn_dim=128, depth=2, target_len=9, example_past_len=3,
        max_length=12,
    ),
}


register_model(
    "vit_captioner",
    configs=CONFIGS,
    spec=captioning_spec,
    paper="Dosovitskiy et al., ICLR 2021 + Vaswani et al., NeurIPS 2017",
)(ViTCaptioner)
