"""Show, Attend and Tell: an image captioner that attends over a grid of CNN features.

Xu et al., "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention", ICML 2015. https://arxiv.org/abs/1502.03044

Encoder (sec. 3.1.1): a convolutional layer's output read as L annotation vectors
a_i in R^D, one per grid location. The paper used VGG's conv5_4 (14 x 14 x 512); here
it is a ResNet-101 stopped after its third stage, 14 x 14 x 1024 at 224 x 224 (L = 196,
D = 1024), locations in row-major order so the attention reshapes onto the grid.

Decoder (sec. 3.1.2), one LSTM step per word:
- initial state h_0 = f_init,h(mean_i a_i), c_0 = f_init,c(mean_i a_i), each one tanh
  layer, as in the authors' released code;
- f_att: e_ti = w^T tanh(W_a a_i + W_h h_{t-1}), alpha_t = softmax_i(e_t) (eq. 4-5);
  W_a a_i does not depend on t, so the encoder computes it once;
- the context z_t = beta_t sum_i alpha_ti a_i (soft attention, sec. 4.2) with the
  gating scalar beta_t = sigmoid(f_beta(h_{t-1})) (sec. 4.2.1);
- the LSTM reads [E y_{t-1}; z_t] (eq. 1-3);
- the deep output p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)) (eq. 7). The released
  code puts a tanh before L_o; eq. 7 has none, and neither has this.

Hard (stochastic) attention (sec. 4.1) samples one location s_t ~ Multinoulli(alpha_t)
in training; at inference this takes the most likely one, so alpha_t becomes one-hot
and z_t = beta_t a_{s_t}.

The "base" sizes: the paper gives the vocabulary (10,000 words, sec. 5.1) but not all
layer widths; embedding, LSTM and attention are 512 each, the sizes most
reimplementations use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.layers import Bottleneck, ResNet
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import ModelSpec, TensorSpec, Tolerance, image_captioning_spec
from attnserve.text import Vocabulary

# The annotations are the raw output of 30 bottleneck blocks (ResNet-101 to layer 3).
# Measured with batch-norm statistics calibrated to a trained network's scale
# (benchmarks/generation.py): eager float32 and ONNX Runtime float32 each differ from a
# float64 run by up to 4e-3 where |a| <= 22, so neither meets 1e-4 absolute; this is the
# trunk's float32 round-off, not a disagreement between the two.
TRUNK_TOLERANCE = Tolerance(atol=1e-2, rtol=1e-3)


@dataclass(frozen=True)
class ShowAttendTellConfig:
    vocab_size: int = 10000  # sec. 5.1
    img_size: int = 224
    # The stages of ResNet-101 ([3, 4, 23, 3]) up to the third: stride 16, 14 x 14 at 224.
    trunk_layers: tuple[int, ...] = (3, 4, 23)
    stem_width: int = 64
    embed_dim: int = 512  # m
    hidden_dim: int = 512  # n
    attention_dim: int = 512
    attention: str = "soft"  # "soft" (deterministic) or "hard" (stochastic; argmax at inference)
    target_len: int = 16  # the teacher-forced graph unrolls this many steps
    max_length: int = 50

    @property
    def grid_size(self) -> int:
        """Side of the annotation grid: the stem halves the image twice (stride-2
        convolution, max pool), every stage after the first once more."""
        side = self.img_size
        for _ in range(2 + len(self.trunk_layers) - 1):
            side = (side + 1) // 2  # kernel 3 or 7, padding 1 or 3: ceil(side / 2)
        return side

    @property
    def annotation_dim(self) -> int:
        return self.stem_width * 2 ** (len(self.trunk_layers) - 1) * Bottleneck.expansion


class ShowAttendTell(nn.Module):
    def __init__(self, cfg: ShowAttendTellConfig):
        super().__init__()
        if cfg.attention not in ("soft", "hard"):
            raise ValueError(f"attention must be 'soft' or 'hard', got {cfg.attention!r}")
        self.cfg = cfg
        E, H, A, D, V = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.annotation_dim, cfg.vocab_size
        self.trunk = ResNet(cfg.trunk_layers, num_classes=1, stem_width=cfg.stem_width)
        self.trunk.fc = nn.Identity()  # the annotations are the trunk's output; no classifier
        self.init_hidden = nn.Linear(D, H)  # f_init,h
        self.init_cell = nn.Linear(D, H)  # f_init,c
        self.attend_annotation = nn.Linear(D, A)  # W_a, with the MLP's bias
        self.attend_hidden = nn.Linear(H, A, bias=False)  # W_h
        self.attend_score = nn.Linear(A, 1, bias=False)  # w; a bias would cancel in the softmax
        self.gate = nn.Linear(H, 1)  # f_beta
        self.embed = nn.Embedding(V, E)  # E
        self.lstm = nn.LSTMCell(E + D, H)
        self.out_hidden = nn.Linear(H, E)  # L_h
        self.out_context = nn.Linear(D, E, bias=False)  # L_z
        self.out_proj = nn.Linear(E, V)  # L_o

    # -- the two parts -------------------------------------------------------------
    def annotate(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> annotations a (B, L, D), L = grid_size^2, row-major."""
        return self.trunk.forward_features(images).flatten(2).transpose(1, 2)

    def encode(self, images: torch.Tensor):
        """-> annotations (B, L, D), their projection W_a a (B, L, A), h_0 and c_0 (B, H)."""
        annotations = self.annotate(images)
        mean = annotations.mean(dim=1)
        return (annotations, self.attend_annotation(annotations),
                torch.tanh(self.init_hidden(mean)), torch.tanh(self.init_cell(mean)))

    def attend(self, annotations, annotation_keys, hidden):
        """-> the gated context z_t (B, D), the weights over locations (B, L) and the
        gate beta_t (B, 1), all from the previous hidden state."""
        scores = self.attend_score(
            torch.tanh(annotation_keys + self.attend_hidden(hidden).unsqueeze(1))).squeeze(-1)
        if self.cfg.attention == "hard":
            # The one-hot of the released code's argmax option; taken on the scores, which
            # order the locations as alpha does, without the softmax's rounding.
            locations = torch.arange(scores.shape[1], device=scores.device)
            weights = (locations.unsqueeze(0) == scores.argmax(dim=-1, keepdim=True)).to(scores.dtype)
        else:
            weights = scores.softmax(dim=-1)
        # beta gates both kinds: the authors' code applies it after either, and a model
        # trained with it would see unscaled contexts at inference without it.
        beta = torch.sigmoid(self.gate(hidden))
        context = torch.bmm(weights.unsqueeze(1), annotations).squeeze(1)
        return beta * context, weights, beta

    def step(self, tokens, annotations, annotation_keys, hidden, cell):
        """One word: -> logits (B, V), next hidden and cell (B, H), attention (B, L)."""
        context, attention, _ = self.attend(annotations, annotation_keys, hidden)
        embedded = self.embed(tokens)
        next_hidden, next_cell = self.lstm(torch.cat([embedded, context], dim=-1), (hidden, cell))
        logits = self.out_proj(embedded + self.out_hidden(next_hidden) + self.out_context(context))
        return logits, next_hidden, next_cell, attention

    def forward(self, images: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tgt (B, T) starts with <bos>; -> logits (B, T, V)."""
        annotations, annotation_keys, hidden, cell = self.encode(images)
        logits = []
        for i in range(tgt.shape[1]):
            out, hidden, cell, _ = self.step(tgt[:, i], annotations, annotation_keys, hidden, cell)
            logits.append(out)
        return torch.stack(logits, dim=1)

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id,
            static=("annotations", "annotation_keys"), state=("hidden", "cell"),
            max_length=self.cfg.max_length, attention_output="attention",
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        L, H = cfg.grid_size**2, cfg.hidden_dim
        static = (TensorSpec("annotations", "float32", ("batch", L, cfg.annotation_dim)),
                  TensorSpec("annotation_keys", "float32", ("batch", L, cfg.attention_dim)))
        state = (TensorSpec("hidden", "float32", ("batch", H)), TensorSpec("cell", "float32", ("batch", H)))
        whole = captioning_spec("show_attend_tell", "part", cfg)  # the images and their preprocessing
        encoder = ModelSpec("show_attend_tell.encoder", "part", "encoder", whole.inputs[:1], static + state,
                            tolerances={**whole.tolerances, "fp32": TRUNK_TOLERANCE},
                            preprocessing=whole.preprocessing)
        step = ModelSpec(
            "show_attend_tell.decoder_step", "part", "decoder-step",
            (TensorSpec("tokens", "int64", ("batch",), (0, cfg.vocab_size)),) + static + state,
            (TensorSpec("logits", "float32", ("batch", cfg.vocab_size)),
             TensorSpec("next_hidden", "float32", ("batch", H)),
             TensorSpec("next_cell", "float32", ("batch", H)),
             TensorSpec("attention", "float32", ("batch", L))),
        )
        return encoder_and_step(self, encoder, step)


def _tiny(**kw) -> ShowAttendTellConfig:
    # 64 x 64 through a one-block-per-stage trunk: a 4 x 4 grid of 128-d annotations.
    return ShowAttendTellConfig(vocab_size=36, img_size=64, trunk_layers=(1, 1, 1), stem_width=8,
                                embed_dim=16, hidden_dim=32, attention_dim=24, target_len=5,
                                max_length=12, **kw)


CONFIGS = {
    "tiny": _tiny(),
    "tiny_hard": _tiny(attention="hard"),
    "base": ShowAttendTellConfig(),
    "base_hard": ShowAttendTellConfig(attention="hard"),
    # The demo (attnserve.train.captions): 64 x 64 pictures of two coloured shapes and their
    # 15-token vocabulary. Two one-block stages give an 8 x 8 grid (8 px a cell) of 128-d
    # annotations, fine enough for the attention to pick out one shape.
    "shapes": ShowAttendTellConfig(vocab_size=15, img_size=64, trunk_layers=(1, 1), stem_width=16,
                                   embed_dim=32, hidden_dim=64, attention_dim=32, target_len=9,
                                   max_length=12),
}


def captioning_spec(name: str, config_name: str, cfg: ShowAttendTellConfig) -> ModelSpec:
    return image_captioning_spec(name, config_name, img_size=cfg.img_size, vocab_size=cfg.vocab_size,
                                 target_len=cfg.target_len)


register_model(
    "show_attend_tell",
    configs=CONFIGS,
    spec=captioning_spec,
    paper="Xu et al., Show, Attend and Tell: Neural Image Caption Generation with Visual Attention, "
          "ICML 2015",
)(ShowAttendTell)
