"""Hierarchical Attention Networks.

Yang et al., "Hierarchical Attention Networks for Document Classification", NAACL 2016.
https://aclanthology.org/N16-1174

Words -> sentence vectors -> document vector, with the same two pieces at each level
(sec. 2): a bidirectional GRU, then attention against a learned context vector,
u_it = tanh(W h_it + b), alpha_it = softmax_t(u_it^T u_w), s_i = sum_t alpha_it h_it.
The document vector goes to a linear classifier. The numbers of sentences and of words
per sentence are dynamic in the exported graph; padding is excluded by the counts at
both levels (the GRUs are `attnserve::gru_layer`, ONNX GRU with sequence_lens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.registry import register_model
from attnserve.ops import gru_layer
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec
from attnserve.text import Vocabulary


@dataclass(frozen=True)
class HANConfig:
    vocab_size: int = 50000
    num_classes: int = 5  # Yelp reviews
    embed_dim: int = 200  # sec. 3.3
    hidden_dim: int = 50  # per direction: bidirectional GRUs of 100
    context_dim: int = 100  # word and sentence context vectors
    example_sentences: int = 6
    example_words: int = 10


class AttentionPool(nn.Module):
    """u = tanh(W h + b); alpha = softmax(u^T u_ctx) over valid positions; sum alpha h."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, context_dim)
        self.context = nn.Parameter(torch.randn(context_dim) * 0.1)  # u_w / u_s

    def forward(self, h: torch.Tensor, counts: torch.Tensor):
        scores = torch.tanh(self.proj(h)) @ self.context  # (N, T)
        valid = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < counts.unsqueeze(1)
        weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights  # (N, D), (N, T)


class BiGRU(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.forward_gru = nn.GRU(in_dim, hidden, batch_first=True)
        self.backward_gru = nn.GRU(in_dim, hidden, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        forward, _ = gru_layer(self.forward_gru, x, lengths)
        backward, _ = gru_layer(self.backward_gru, x, lengths, reverse=True)
        return torch.cat([forward, backward], dim=-1)  # (N, T, 2H)


class HierarchicalAttentionNetwork(nn.Module):
    def __init__(self, cfg: HANConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=Vocabulary.pad_id)
        self.word_encoder = BiGRU(cfg.embed_dim, H)
        self.word_attention = AttentionPool(2 * H, cfg.context_dim)
        self.sentence_encoder = BiGRU(2 * H, H)
        self.sentence_attention = AttentionPool(2 * H, cfg.context_dim)
        self.classifier = nn.Linear(2 * H, cfg.num_classes)

    def forward(self, tokens: torch.Tensor, word_counts: torch.Tensor, sentence_counts: torch.Tensor):
        """tokens (B, S, W), word_counts (B, S), sentence_counts (B,) -> logits (B, C),
        word attention (B, S, W), sentence attention (B, S)."""
        B, S, W = tokens.shape
        # Padding sentences may say 0 words; they are excluded at the sentence level, and
        # one word keeps their (ignored) word attention finite.
        words = word_counts.clamp(min=1).reshape(B * S)
        h = self.word_encoder(self.embed(tokens.reshape(B * S, W)), words)  # (B*S, W, 2H)
        sentences, word_weights = self.word_attention(h, words)  # (B*S, 2H), (B*S, W)
        h = self.sentence_encoder(sentences.reshape(B, S, -1), sentence_counts)  # (B, S, 2H)
        document, sentence_weights = self.sentence_attention(h, sentence_counts)
        return self.classifier(document), word_weights.reshape(B, S, W), sentence_weights


CONFIGS = {
    "tiny": HANConfig(vocab_size=200, num_classes=4, embed_dim=32, hidden_dim=16, context_dim=16,
                      example_sentences=4, example_words=6),
    "yelp": HANConfig(),  # sec. 3.3
}


def han_spec(name: str, config_name: str, cfg: HANConfig) -> ModelSpec:
    return ModelSpec(
        name=name, config=config_name, task="document-classification",
        inputs=(
            TensorSpec("tokens", "int64", ("batch", "sentences", "words"), (4, cfg.vocab_size)),
            TensorSpec("word_counts", "int64", ("batch", "sentences"), (1, cfg.example_words + 1)),
            TensorSpec("sentence_counts", "int64", ("batch",), (1, cfg.example_sentences + 1)),
        ),
        outputs=(
            TensorSpec("logits", "float32", ("batch", cfg.num_classes)),
            TensorSpec("word_attention", "float32", ("batch", "sentences", "words")),
            TensorSpec("sentence_attention", "float32", ("batch", "sentences")),
        ),
        default_dims={"sentences": cfg.example_sentences, "words": cfg.example_words},
        tolerances=dict(DEFAULT_TOLERANCES),
        vocab_sizes={"source": cfg.vocab_size},
    )


register_model(
    "han",
    configs=CONFIGS,
    spec=han_spec,
    paper="Yang et al., Hierarchical Attention Networks for Document Classification, NAACL 2016",
)(HierarchicalAttentionNetwork)
