"""Image captioning with semantic attention.

You, Jin, Wang, Fang and Luo, "Image Captioning with Semantic Attention", CVPR 2016.
https://arxiv.org/abs/1603.03925

An LSTM captioner that attends to visual attributes {A_i}, words detected in the image,
twice per word: on its input and on its output (sec. 3). Attributes are words of the
caption vocabulary and share its embedding matrix E: y = E Y for a one-hot word Y.

- Image (sec. 3.1): the global CNN feature v is the LSTM's input once, before any
  word: x_{-1} = W^{x,v} v from a zero state; the caption then starts from <bos>.
- Input attention (sec. 3.2): the previous word y_{t-1} scores each attribute with a
  bilinear form, alpha_t^i ∝ exp(y_{t-1}^T U~ y^i), and the LSTM reads
  x_t = W^{x,Y} (y_{t-1} + diag(w^{x,A}) sum_i alpha_t^i y^i);  h_t = LSTM(x_t, h_{t-1}).
- Output attention (sec. 3.3): the new state scores the attributes,
  beta_t^i ∝ exp(h_t^T V tanh(U y^i)), and the word distribution is
  p_t ∝ exp(E W^{Y,h} (h_t + diag(w^{Y,A}) sum_i beta_t^i tanh(U y^i))),
  the output layer reusing the embedding matrix E. The tanh is the paper's sigma, the
  nonlinearity the LSTM applies to its state, so attributes and h_t are comparable;
  U (n x d) brings y^i to the state's size, so d and n need not be equal.
- Attributes: the paper trains separate detectors (k-NN retrieval, or an FCN with
  multiple-instance learning); here a multi-label head (sigmoid per word) on the same
  CNN feature v predicts them and the top k words are A_i (k = 10 in the paper).

The attention regulariser of sec. 3.4 only shapes training and is not in the graphs.
The paper's v is GoogLeNet's; here it is the ResNet trunk of `layers.resnet` (ResNet-50
in "base"). Exported three ways, as the seq2seq models: the teacher-forced whole model
(images and caption in, logits out), the encoder (images -> attributes, their
projections, the state after the image) and one decoder step that generation drives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.errors import InputError
from attnserve.models.layers import ResNet
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import ModelSpec, TensorSpec, image_captioning_spec
from attnserve.text import SPECIALS, Vocabulary

_NAME = "semantic_attention_caption"
# Attribute candidates are ordinary words: the ids after the special tokens.
_FIRST_WORD = len(SPECIALS)


@dataclass(frozen=True)
class SemanticAttentionConfig:
    vocab_size: int = 10000
    embed_dim: int = 512  # d: words and attributes
    hidden_dim: int = 512  # n: the LSTM
    num_attributes: int = 10  # k: the top attributes attended to (sec. 4)
    # The candidates are the first `attribute_vocab` words after the special tokens,
    # the most frequent ones in a Vocabulary built from captions.
    attribute_vocab: int = 1000
    img_size: int = 224
    trunk_layers: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    trunk_width: int = 64
    target_len: int = 16  # the teacher-forced graph unrolls this many steps
    max_length: int = 20  # not given in the paper: the default cap on generated words


class SemanticAttentionCaptioner(nn.Module):
    def __init__(self, cfg: SemanticAttentionConfig):
        super().__init__()
        if not 1 <= cfg.num_attributes <= cfg.attribute_vocab <= cfg.vocab_size - _FIRST_WORD:
            raise ValueError(
                f"need 1 <= num_attributes ({cfg.num_attributes}) <= attribute_vocab "
                f"({cfg.attribute_vocab}) <= vocab_size - {_FIRST_WORD} ({cfg.vocab_size - _FIRST_WORD})"
            )
        self.cfg = cfg
        E, H = cfg.embed_dim, cfg.hidden_dim
        # The trunk's classifier is the attribute predictor: one logit per candidate word,
        # read as independent probabilities (multi-label), not a softmax.
        self.cnn = ResNet(cfg.trunk_layers, num_classes=cfg.attribute_vocab, stem_width=cfg.trunk_width)
        self.image_proj = nn.Linear(self.cnn.num_features, E, bias=False)  # W^{x,v}
        self.embed = nn.Embedding(cfg.vocab_size, E)  # E, shared by words, attributes and the output
        self.input_bilinear = nn.Linear(E, E, bias=False)  # U~
        self.input_attribute_weight = nn.Parameter(torch.ones(E))  # w^{x,A}
        self.input_proj = nn.Linear(E, E, bias=False)  # W^{x,Y}
        self.lstm = nn.LSTMCell(E, H)
        self.attribute_proj = nn.Linear(E, H, bias=False)  # U
        self.output_bilinear = nn.Linear(H, H, bias=False)  # V
        self.output_attribute_weight = nn.Parameter(torch.ones(H))  # w^{Y,A}
        self.output_proj = nn.Linear(H, E, bias=False)  # W^{Y,h}

    def _check_images(self, images: torch.Tensor) -> None:
        # The trunk pools globally, so a wrong size would run silently; the spec fixes it.
        S = self.cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise InputError(
                f"semantic_attention_caption takes images of shape (batch, 3, {S}, {S}), got "
                f"{tuple(images.shape)}; resize and centre-crop to {S} x {S} RGB first"
            )

    def image_feature(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> v (B, C): the trunk's stages, then global average pooling."""
        self._check_images(images)
        return self.cnn.forward_features(images).mean(dim=(2, 3))

    # -- the two parts -------------------------------------------------------------
    def encode(self, images: torch.Tensor):
        """-> attribute embeddings y^i (B, K, E), input keys U~ y^i (B, K, E), output
        features tanh(U y^i) (B, K, H), output keys V tanh(U y^i) (B, K, H), the hidden
        and cell state after the image (B, H), and the attribute word ids (B, K)."""
        v = self.image_feature(images)
        # Top-k of the logits, not of the sigmoid: the same ranking, and no ties where
        # the sigmoid saturates to 1.0 in float32.
        _, top = self.cnn.fc(v).topk(self.cfg.num_attributes, dim=-1)
        attributes = top + _FIRST_WORD
        embedded = self.embed(attributes)  # y^i
        features = torch.tanh(self.attribute_proj(embedded))
        hidden, cell = self.lstm(self.image_proj(v))  # t = -1: from the zero state
        return (embedded, self.input_bilinear(embedded), features, self.output_bilinear(features),
                hidden, cell, attributes)

    def step(self, tokens, attribute_embeddings, input_keys, attribute_features, output_keys, hidden, cell):
        """One word: -> logits (B, V), next hidden and cell (B, H), output attention
        beta (B, K), input attention alpha (B, K)."""
        previous = self.embed(tokens)  # y_{t-1}
        alpha = torch.bmm(input_keys, previous.unsqueeze(2)).squeeze(2).softmax(dim=-1)
        attended = torch.bmm(alpha.unsqueeze(1), attribute_embeddings).squeeze(1)
        x = self.input_proj(previous + self.input_attribute_weight * attended)
        hidden, cell = self.lstm(x, (hidden, cell))
        beta = torch.bmm(output_keys, hidden.unsqueeze(2)).squeeze(2).softmax(dim=-1)
        attended = torch.bmm(beta.unsqueeze(1), attribute_features).squeeze(1)
        out = self.output_proj(hidden + self.output_attribute_weight * attended)
        return out @ self.embed.weight.t(), hidden, cell, beta, alpha

    def forward(self, images: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tgt (B, T) starts with <bos>; -> logits (B, T, V)."""
        *static, hidden, cell, _ = self.encode(images)
        logits = []
        for i in range(tgt.shape[1]):
            out, hidden, cell, _, _ = self.step(tgt[:, i], *static, hidden, cell)
            logits.append(out)
        return torch.stack(logits, dim=1)

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id, static=_STATIC, state=("hidden", "cell"),
            max_length=self.cfg.max_length, attention_output="attention",
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        E, H, K, V, S = cfg.embed_dim, cfg.hidden_dim, cfg.num_attributes, cfg.vocab_size, cfg.img_size
        static = tuple(TensorSpec(name, "float32", ("batch", K, dim))
                       for name, dim in zip(_STATIC, (E, E, H, H), strict=True))
        state_shapes = {"hidden": ("batch", H), "cell": ("batch", H)}
        state = tuple(TensorSpec(n, "float32", shape) for n, shape in state_shapes.items())
        next_state = tuple(TensorSpec(f"next_{n}", "float32", shape) for n, shape in state_shapes.items())
        encoder = ModelSpec(
            f"{_NAME}.encoder", "part", "encoder",
            (TensorSpec("images", "float32", ("batch", 3, S, S)),),
            static + state + (TensorSpec("attributes", "int64", ("batch", K)),),
            # The encoder takes the images, so clients need their preprocessing too.
            preprocessing=caption_spec(_NAME, "part", cfg).preprocessing,
        )
        step = ModelSpec(
            f"{_NAME}.decoder_step", "part", "decoder-step",
            (TensorSpec("tokens", "int64", ("batch",), (0, V)),) + static + state,
            (TensorSpec("logits", "float32", ("batch", V)),) + next_state
            + (TensorSpec("attention", "float32", ("batch", K)),
               TensorSpec("input_attention", "float32", ("batch", K))),
        )
        return encoder_and_step(self, encoder, step)


# The encoder outputs every step reads unchanged.
_STATIC = ("attribute_embeddings", "input_keys", "attribute_features", "output_keys")


CONFIGS = {
    "tiny": SemanticAttentionConfig(vocab_size=40, embed_dim=16, hidden_dim=24, num_attributes=5,
                                    attribute_vocab=30, img_size=32, trunk_layers=(1, 1),
                                    trunk_width=8, target_len=5, max_length=12),
    # Sec. 4: 512-d embeddings and LSTM, the top 10 attributes, a ~10k-word vocabulary.
    "base": SemanticAttentionConfig(),
}


def caption_spec(name: str, config_name: str, cfg: SemanticAttentionConfig) -> ModelSpec:
    return image_captioning_spec(name, config_name, img_size=cfg.img_size, vocab_size=cfg.vocab_size,
                                 target_len=cfg.target_len)


register_model(
    _NAME,
    configs=CONFIGS,
    spec=caption_spec,
    paper="You et al., Image Captioning with Semantic Attention, CVPR 2016",
)(SemanticAttentionCaptioner)
