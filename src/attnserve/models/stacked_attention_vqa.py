"""Stacked attention networks: a question queries the image regions, twice.

Yang, He, Gao, Deng, Smola, "Stacked Attention Networks for Image Question Answering",
CVPR 2016. https://arxiv.org/abs/1511.02274

- Image model (sec. 3.1): VGGNet's last pooling layer on a 448 x 448 image, 14 x 14 x 512
  (eq. 1), one 512-d vector f_i per region (m = 196 regions, row-major), each mapped to the
  question vector's size by a single-layer perceptron, v_I = tanh(W_I f_I + b_I) (eq. 2).
  The trunk is VGG-19's convolutional part in torchvision's layout (`features.*`), so
  torchvision's ImageNet VGG-19 loads with `load_trunk`.
- Question model, LSTM (sec. 3.2.1): word embeddings x_t = W_e q_t (eq. 3), an LSTM over
  them (eq. 4-9), v_Q = h_T, the state after each question's last word (eq. 10). The LSTM
  is `attnserve::lstm_layer`, ONNX's LSTM with sequence_lens: positions past a question's
  length change nothing, whatever ids they hold.
- Question model, CNN (sec. 3.2.2, `question_model="cnn"`): unigram, bigram and trigram
  convolutions h_c,t = tanh(W_c x_{t:t+c-1} + b_c) (eq. 12), max-pooled over the windows
  (eq. 13) and concatenated, v_Q = [h~_1, h~_2, h~_3] (eq. 14). Words past the length are
  zeros to the convolutions and windows that start past the last full one are left out of
  the max, so a question reads as if padded to exactly max(length, c) words; padding
  beyond that changes nothing.
- Stacked attention (sec. 3.3): h_A = tanh(W_I,A v_I (+) (W_Q,A v_Q + b_A)) (eq. 15),
  p_I = softmax(W_P h_A + b_P) over the regions (eq. 16), v~_I = sum_i p_i v_i (eq. 17),
  u = v~_I + v_Q (eq. 18); layer k repeats this with u^{k-1} as the query (eq. 19-22); two
  layers (SAN(2)). The answer is softmax(W_u u^K + b_u) over the top answers (eq. 23);
  `logits` are W_u u^K + b_u.

Sizes the paper leaves open follow the authors' released configuration (imageqa-san):
500-d word embeddings, a 1024-d LSTM (the question vector d, and so v_I), 512-d attention
(k), a 13,746-word question vocabulary and the 1,000 most frequent VQA answers; the CNN
question model has 256 unigram, 512 bigram and 512 trigram filters (d = 1280).

Inputs: images (as the zoo's other image models take them: the trunk is in the graph, so
clients send pixels), question token ids padded to the batch's longest question, and
each question's length. The question vocabulary is the zoo's `attnserve.text.Vocabulary`
(ids 0-3 reserved, <pad> = 0), saved beside an export as vocab-source.json like the
translation models' source vocabularies; `attnserve.postprocess_vqa` turns text into
these inputs and logits into answers, without torch.

There is no maximum question length: the LSTM (ONNX LSTM) and the CNN's max-pool run any
number of words, and the exported graph's word axis is dynamic. Questions are never
truncated; `postprocess_vqa.encode_questions(max_len=...)` refuses longer ones for a
deployment that wants a cap. Ids outside the vocabulary raise InputError in eager mode
(ONNX Runtime's Gather refuses them itself; `postprocess_vqa.check_questions` checks
them before a request is sent).

The paper rescales images to 448 x 448 whatever their shape; clients here resize the
short side to 448 and centre-crop (the zoo's preprocessing keeps the aspect ratio).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from attnserve.errors import CheckpointError, InputError, first_line
from attnserve.models.registry import register_model
from attnserve.ops import lstm_layer
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec, image_preprocessing
from attnserve.text import SPECIALS, Vocabulary

# VGG-19's convolutional part (Simonyan & Zisserman, configuration E): channels of each
# 3x3 convolution, "M" a 2x2 max pool; the last pool is pool5.
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M")
QUESTION_MODELS = ("lstm", "cnn")


@dataclass(frozen=True)
class StackedAttentionConfig:
    vocab_size: int = 13746  # the released code's VQA question vocabulary
    num_answers: int = 1000  # VQA: the 1000 most frequent answers
    img_size: int = 448  # sec. 3.1: 448 x 448 -> 14 x 14 regions
    trunk: tuple[int | str, ...] = VGG19
    question_model: str = "lstm"
    embed_dim: int = 500
    lstm_dim: int = 1024  # the LSTM's state: d, the question vector's size
    cnn_filters: tuple[int, int, int] = (256, 512, 512)  # unigram, bigram, trigram
    attention_dim: int = 512  # k, the size of h_A
    num_attention_layers: int = 2  # SAN(2)
    example_question_len: int = 12  # example inputs only; any length runs

    @property
    def question_dim(self) -> int:
        """d: v_Q, v_I and u all have it."""
        return self.lstm_dim if self.question_model == "lstm" else sum(self.cnn_filters)

    @property
    def grid_size(self) -> int:
        return self.img_size // 2 ** sum(1 for c in self.trunk if c == "M")

    @property
    def region_dim(self) -> int:
        return [c for c in self.trunk if c != "M"][-1]


def vgg_features(layers: tuple[int | str, ...], in_chans: int = 3) -> nn.Sequential:
    """3x3 convolutions with ReLU and 2x2 max pools, indexed as torchvision's
    `vgg.features` (conv, relu, ..., pool), so its state dict loads as is."""
    modules: list[nn.Module] = []
    for c in layers:
        if c == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_chans, c, kernel_size=3, padding=1)
            # torchvision's VGG init: the default would shrink the regions to ~1e-4 by
            # pool5, leaving an untrained model's attention blind to the image.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            modules += [conv, nn.ReLU(inplace=True)]
            in_chans = c
    return nn.Sequential(*modules)


class AttentionLayer(nn.Module):
    """One attention layer (eq. 15-18 / 19-22): the query u^{k-1} (B, d) over the regions
    v_I (B, m, d) -> the refined query u^k (B, d) and p_I (B, m)."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.image = nn.Linear(dim, attention_dim, bias=False)  # W_I,A
        self.query = nn.Linear(dim, attention_dim)  # W_Q,A, b_A
        self.score = nn.Linear(attention_dim, 1)  # W_P, b_P (b_P cancels in the softmax)

    def forward(self, regions: torch.Tensor, query: torch.Tensor):
        # (+): the query's row is added to every region's (eq. 15).
        h = torch.tanh(self.image(regions) + self.query(query).unsqueeze(1))  # (B, m, k)
        p = self.score(h).squeeze(-1).softmax(dim=-1)  # (B, m), eq. 16
        attended = torch.bmm(p.unsqueeze(1), regions).squeeze(1)  # (B, d), eq. 17
        return attended + query, p  # eq. 18


class StackedAttentionVQA(nn.Module):
    """images (B, 3, S, S), question (B, W) ids, question_lengths (B,) -> answer logits
    (B, A) and each attention layer's p_I over the grid (B, K, G, G)."""

    def __init__(self, cfg: StackedAttentionConfig):
        super().__init__()
        if cfg.question_model not in QUESTION_MODELS:
            raise ValueError(f"question_model must be one of {QUESTION_MODELS}, got {cfg.question_model!r}")
        if cfg.num_attention_layers < 1:
            raise ValueError(f"num_attention_layers must be at least 1, got {cfg.num_attention_layers}")
        self.cfg = cfg
        d = cfg.question_dim
        self.features = vgg_features(cfg.trunk)  # torchvision's name for VGG's trunk
        self.image_proj = nn.Linear(cfg.region_dim, d)  # W_I, b_I (eq. 2)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=Vocabulary.pad_id)  # W_e
        if cfg.question_model == "lstm":
            self.lstm = nn.LSTM(cfg.embed_dim, cfg.lstm_dim, batch_first=True)
        else:
            self.convs = nn.ModuleList([nn.Conv1d(cfg.embed_dim, n, kernel_size=c)  # W_c, b_c (eq. 12)
                                        for c, n in enumerate(cfg.cnn_filters, start=1)])
        self.attention = nn.ModuleList([AttentionLayer(d, cfg.attention_dim)
                                        for _ in range(cfg.num_attention_layers)])
        self.classifier = nn.Linear(d, cfg.num_answers)  # W_u, b_u (eq. 23)

    def forward(self, images: torch.Tensor, question: torch.Tensor, question_lengths: torch.Tensor):
        self._check(images, question, question_lengths)
        regions = self.encode_image(images)  # (B, m, d)
        query = self.encode_question(question, question_lengths)  # v_Q = u^0, (B, d)
        maps = []
        for layer in self.attention:
            query, p = layer(regions, query)
            maps.append(p)
        G = self.cfg.grid_size
        return self.classifier(query), torch.stack(maps, dim=1).unflatten(-1, (G, G))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """-> v_I (B, m, d): pool5's regions row-major, through eq. 2."""
        f = self.features(images).flatten(2).transpose(1, 2)  # (B, m, 512)
        return torch.tanh(self.image_proj(f))

    def encode_question(self, question: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> v_Q (B, d), from each question's first `lengths` words only."""
        x = self.embed(question)  # (B, W, E), eq. 3
        if self.cfg.question_model == "lstm":
            _, h, _ = lstm_layer(self.lstm, x, lengths)  # h: the state after the last word
            return h
        positions = torch.arange(question.shape[1], device=question.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, W)
        x = (x * real.unsqueeze(-1).to(x.dtype)).transpose(1, 2)  # (B, E, W), padding zeroed
        pooled = []
        for c, conv in enumerate(self.convs, start=1):
            # c - 1 zeros on the right: a window at every position, also for questions
            # shorter than c words.
            h = torch.tanh(conv(F.pad(x, (0, c - 1))))  # (B, n_c, W), eq. 12
            # Windows starting at t < max(length - c + 1, 1) hold no padding past the
            # question's first c words.
            valid = positions.unsqueeze(0) < (lengths - (c - 1)).clamp(min=1).unsqueeze(1)  # (B, W)
            pooled.append(h.masked_fill(~valid.unsqueeze(1), -2.0).amax(dim=-1))  # eq. 13; tanh > -2
        return torch.cat(pooled, dim=-1)  # eq. 14

    def _check(self, images, question, question_lengths) -> None:
        cfg = self.cfg
        S = cfg.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise InputError(f"stacked_attention_vqa takes images of shape (batch, 3, {S}, {S}), "
                             f"got {tuple(images.shape)}")
        if question.dim() != 2 or question_lengths.dim() != 1:
            raise InputError(f"question must be (batch, words) token ids and question_lengths (batch,), got "
                             f"{tuple(question.shape)} and {tuple(question_lengths.shape)}")
        if question.dtype != torch.int64 or question_lengths.dtype != torch.int64:
            raise InputError(f"question and question_lengths must be int64, got {question.dtype} and "
                             f"{question_lengths.dtype}")
        # Values can be checked only in eager mode; ONNX Runtime's Gather refuses bad ids itself.
        if torch.compiler.is_exporting():
            return
        if question.shape[0] != images.shape[0] or question_lengths.shape[0] != images.shape[0]:
            raise InputError(f"images, question and question_lengths must have one batch size, got "
                             f"{images.shape[0]}, {question.shape[0]} and {question_lengths.shape[0]}")
        bad = question[(question < 0) | (question >= cfg.vocab_size)]
        if bad.numel():
            raise InputError(f"question ids must be in [0, {cfg.vocab_size}) (the question vocabulary), "
                             f"got {sorted(set(bad.tolist()))[:8]}; encode questions with the model's "
                             "vocab-source.json")
        bad = question_lengths[(question_lengths < 1) | (question_lengths > question.shape[1])]
        if bad.numel():
            raise InputError(f"question_lengths must be in [1, {question.shape[1]}] (the question axis), "
                             f"got {bad[:8].tolist()}")

    def load_trunk(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision's VGG weights (`torchvision.models.vgg19(...).state_dict()`)
        into the trunk; the classifier's are dropped."""
        trunk = {k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")}
        try:
            missing, unexpected = self.features.load_state_dict(trunk, strict=False)
        except RuntimeError as e:  # shapes that do not fit: another VGG
            raise CheckpointError(f"the VGG weights do not fit this trunk: {first_line(e)}") from None
        if missing or unexpected or not trunk:
            raise CheckpointError(f"not a torchvision VGG state dict for this trunk: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")


def _tiny(**kw) -> StackedAttentionConfig:
    # 128 x 128 images through a five-stage VGG of one convolution each: 4 x 4 regions.
    return StackedAttentionConfig(**{**dict(
        vocab_size=60, num_answers=10, img_size=128, trunk=(8, "M", 16, "M", 16, "M", 32, "M", 32, "M"),
        embed_dim=16, lstm_dim=32, cnn_filters=(8, 12, 12), attention_dim=24, example_question_len=7), **kw})


CONFIGS = {
    "tiny": _tiny(),
    "tiny_cnn": _tiny(question_model="cnn"),
    "vqa": StackedAttentionConfig(),  # SAN(2, LSTM)
    "vqa_cnn": StackedAttentionConfig(question_model="cnn"),  # SAN(2, CNN)
}


def vqa_spec(name: str, config_name: str, cfg: StackedAttentionConfig) -> ModelSpec:
    S, G = cfg.img_size, cfg.grid_size
    # The paper rescales to 448 x 448; the zoo resizes the short side to it and centre-crops.
    preprocessing = {**image_preprocessing(S, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "resize": S}
    return ModelSpec(
        name=name, config=config_name, task="visual-question-answering",
        inputs=(TensorSpec("images", "float32", ("batch", 3, S, S)),
                # Example ids are words, not the reserved <pad>, <bos>, <eos>, <unk>.
                TensorSpec("question", "int64", ("batch", "words"), (len(SPECIALS), cfg.vocab_size)),
                # Lengths from 1 to the example length: padded batches in every example.
                TensorSpec("question_lengths", "int64", ("batch",), (1, cfg.example_question_len + 1))),
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.num_answers)),
                 TensorSpec("attention", "float32", ("batch", cfg.num_attention_layers, G, G))),
        default_dims={"words": cfg.example_question_len},
        tolerances=dict(DEFAULT_TOLERANCES),
        preprocessing=preprocessing,
        vocab_sizes={"source": cfg.vocab_size},
    )


register_model(
    "stacked_attention_vqa",
    configs=CONFIGS,
    spec=vqa_spec,
    paper="Yang et al., Stacked Attention Networks for Image Question Answering, CVPR 2016",
)(StackedAttentionVQA)
