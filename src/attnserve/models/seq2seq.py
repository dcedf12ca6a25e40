"""Recurrent encoder-decoders with attention.

Bahdanau, Cho and Bengio, "Neural Machine Translation by Jointly Learning to Align and
Translate", ICLR 2015. https://arxiv.org/abs/1409.0473
Luong, Pham and Manning, "Effective Approaches to Attention-based Neural Machine
Translation", EMNLP 2015. https://arxiv.org/abs/1508.04025

RNNsearch (appendix A): a bidirectional GRU encoder whose annotations h_j concatenate
both directions; a GRU decoder whose state starts at s_0 = tanh(W_s h<-_1); additive
alignment e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j) on the *previous* decoder state,
softmax-normalised over the source (padding excluded); the context c_i feeds the GRU
with the previous target word; the output layer is a maxout over
U_o s_{i-1} + V_o E y_{i-1} + C_o c_i.

Luong's global and local attention (sec. 3): stacked LSTMs; the score is taken on the
*current* top state h_t, as dot, general (h_t^T W_a h_s) or concat
(v_a^T tanh(W_a [h_t; h_s])); the attentional state h~_t = tanh(W_c [c_t; h_t]) gives the
logits and is fed to the next step's input (input feeding, sec. 3.3). Local-p attention
predicts a centre p_t = S sigmoid(v_p^T tanh(W_p h_t)) per sequence length S, keeps the
window [p_t - D, p_t + D] and weights it by exp(-(s - p_t)^2 / (2 sigma^2)), sigma = D/2
(eq. 9-10).

Both are exported three ways: the whole teacher-forced model (source + target in, logits out,
for scoring), and the two parts generation uses (`export_parts`): the encoder, run
once, and one decoder step with its state in and out (see attnserve.runtime.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.layers import padding_bias
from attnserve.models.parts import encoder_and_step
from attnserve.models.registry import register_model
from attnserve.ops import gru_layer, lstm_layer
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import ModelSpec, TensorSpec, source_specs, translation_spec
from attnserve.text import Vocabulary


@dataclass(frozen=True)
class BahdanauConfig:
    src_vocab: int = 30000
    tgt_vocab: int = 30000
    embed_dim: int = 620  # m in the paper
    hidden_dim: int = 1000  # n
    align_dim: int = 1000  # n'
    maxout_dim: int = 500  # l
    # Shapes used for example inputs; the source length is dynamic in every graph.
    example_src_len: int = 12
    target_len: int = 10  # the teacher-forced graph unrolls this many steps
    max_length: int = 50


class BahdanauSeq2Seq(nn.Module):
    def __init__(self, cfg: BahdanauConfig):
        super().__init__()
        self.cfg = cfg
        E, H, A, M = cfg.embed_dim, cfg.hidden_dim, cfg.align_dim, cfg.maxout_dim
        self.src_embed = nn.Embedding(cfg.src_vocab, E, padding_idx=Vocabulary.pad_id)
        self.encoder_fwd = nn.GRU(E, H, batch_first=True)
        self.encoder_bwd = nn.GRU(E, H, batch_first=True)
        self.init_state = nn.Linear(H, H)  # W_s
        self.align_state = nn.Linear(H, A, bias=False)  # W_a
        self.align_memory = nn.Linear(2 * H, A, bias=False)  # U_a
        self.align_score = nn.Linear(A, 1, bias=False)  # v_a
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, E)
        self.decoder = nn.GRUCell(E + 2 * H, H)
        self.out_state = nn.Linear(H, 2 * M)  # U_o
        self.out_embed = nn.Linear(E, 2 * M, bias=False)  # V_o
        self.out_context = nn.Linear(2 * H, 2 * M, bias=False)  # C_o
        self.out_proj = nn.Linear(M, cfg.tgt_vocab)  # W_o

    # -- the two parts -------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor):
        """-> memory (B, S, 2H), keys U_a h (B, S, A), memory_bias (B, S), state s_0."""
        x = self.src_embed(src)  # (B, S, E)
        forward, _ = gru_layer(self.encoder_fwd, x, src_lengths)
        backward, backward_last = gru_layer(self.encoder_bwd, x, src_lengths, reverse=True)
        memory = torch.cat([forward, backward], dim=-1)  # (B, S, 2H): h_j = [h->_j; h<-_j]
        memory_bias = padding_bias(src_lengths, src.shape[1], memory.dtype)
        state = torch.tanh(self.init_state(backward_last))  # s_0 = tanh(W_s h<-_1)
        return memory, self.align_memory(memory), memory_bias, state

    def step(self, tokens, memory, keys, memory_bias, state):
        """One target word: -> logits (B, V), next state s_i, attention (B, S)."""
        e = self.align_score(torch.tanh(self.align_state(state).unsqueeze(1) + keys)).squeeze(-1)
        attention = (e + memory_bias).softmax(dim=-1)  # (B, S)
        context = torch.bmm(attention.unsqueeze(1), memory).squeeze(1)  # (B, 2H)
        embedded = self.tgt_embed(tokens)  # (B, E)
        t = self.out_state(state) + self.out_embed(embedded) + self.out_context(context)
        t = t.reshape(t.shape[0], -1, 2).amax(dim=-1)  # maxout over pairs: (B, M)
        next_state = self.decoder(torch.cat([embedded, context], dim=-1), state)
        return self.out_proj(t), next_state, attention

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tgt (B, T) starts with <bos>; -> logits (B, T, V)."""
        memory, keys, memory_bias, state = self.encode(src, src_lengths)
        logits = []
        for i in range(tgt.shape[1]):
            out, state, _ = self.step(tgt[:, i], memory, keys, memory_bias, state)
            logits.append(out)
        return torch.stack(logits, dim=1)

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id,
            static=("memory", "keys", "memory_bias"), state=("state",),
            max_length=self.cfg.max_length, attention_output="attention",
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        H, A = cfg.hidden_dim, cfg.align_dim
        src = source_specs(cfg)
        memory = (TensorSpec("memory", "float32", ("batch", "src_len", 2 * H)),
                  TensorSpec("keys", "float32", ("batch", "src_len", A)),
                  TensorSpec("memory_bias", "float32", ("batch", "src_len")))
        state = TensorSpec("state", "float32", ("batch", H))
        dims = {"src_len": cfg.example_src_len}
        encoder = ModelSpec("bahdanau_seq2seq.encoder", "part", "encoder", src, memory + (state,), dims)
        step = ModelSpec(
            "bahdanau_seq2seq.decoder_step", "part", "decoder-step",
            (TensorSpec("tokens", "int64", ("batch",), (0, cfg.tgt_vocab)),) + memory + (state,),
            (TensorSpec("logits", "float32", ("batch", cfg.tgt_vocab)),
             TensorSpec("next_state", "float32", ("batch", H)),
             TensorSpec("attention", "float32", ("batch", "src_len"))),
            dims,
        )
        return encoder_and_step(self, encoder, step)


CONFIGS = {
    "tiny": BahdanauConfig(src_vocab=40, tgt_vocab=36, embed_dim=16, hidden_dim=24, align_dim=20,
                           maxout_dim=12, example_src_len=7, target_len=5, max_length=12),
    # RNNsearch as trained in the paper (sec. 4.2); 30k-word vocabularies.
    "rnnsearch": BahdanauConfig(),
}


register_model(
    "bahdanau_seq2seq",
    configs=CONFIGS,
    spec=translation_spec,
    paper="Bahdanau et al., Neural Machine Translation by Jointly Learning to Align and Translate, ICLR 2015",
)(BahdanauSeq2Seq)


@dataclass(frozen=True)
class LuongConfig:
    src_vocab: int = 50000
    tgt_vocab: int = 50000
    embed_dim: int = 1000
    hidden_dim: int = 1000
    num_layers: int = 4  # sec. 4.1: stacking LSTMs with 4 layers, 1000 cells each
    score: str = "general"  # "dot", "general" or "concat"
    local_window: int = 0  # D of local-p attention (sec. 3.2); 0: global attention
    example_src_len: int = 12
    target_len: int = 10
    max_length: int = 50


class LuongSeq2Seq(nn.Module):
    def __init__(self, cfg: LuongConfig):
        super().__init__()
        if cfg.score not in ("dot", "general", "concat"):
            raise ValueError(f"score must be 'dot', 'general' or 'concat', got {cfg.score!r}")
        self.cfg = cfg
        E, H, L = cfg.embed_dim, cfg.hidden_dim, cfg.num_layers
        self.src_embed = nn.Embedding(cfg.src_vocab, E, padding_idx=Vocabulary.pad_id)
        self.encoder = nn.LSTM(E, H, num_layers=L, batch_first=True)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, E)
        # Input feeding: the previous attentional state joins the word embedding.
        self.decoder = nn.ModuleList([nn.LSTMCell(E + H if i == 0 else H, H) for i in range(L)])
        if cfg.score == "general":
            self.score_proj = nn.Linear(H, H, bias=False)  # W_a
        elif cfg.score == "concat":
            self.score_proj = nn.Linear(2 * H, H, bias=False)  # W_a
            self.score_vector = nn.Linear(H, 1, bias=False)  # v_a
        if cfg.local_window:
            self.position_proj = nn.Linear(H, H, bias=False)  # W_p
            self.position_vector = nn.Linear(H, 1, bias=False)  # v_p
        self.combine = nn.Linear(2 * H, H, bias=False)  # W_c
        self.out_proj = nn.Linear(H, cfg.tgt_vocab)  # W_s

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor):
        """-> memory (B, S, H), memory_bias (B, S), memory_length (B,) float, the
        decoder's initial hidden and cell states (B, L, H), and the zero h~_0 (B, H)."""
        x = self.src_embed(src)
        hidden, cell = [], []
        for layer in range(self.cfg.num_layers):
            x, h, c = lstm_layer(self.encoder, x, src_lengths, layer)
            hidden.append(h)
            cell.append(c)
        memory_bias = padding_bias(src_lengths, src.shape[1], x.dtype)
        feed = torch.zeros_like(hidden[-1])
        return (x, memory_bias, src_lengths.to(x.dtype), torch.stack(hidden, dim=1), torch.stack(cell, dim=1),
                feed)

    def _scores(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.cfg.score == "dot":
            return torch.bmm(memory, h.unsqueeze(2)).squeeze(2)
        if self.cfg.score == "general":
            return torch.bmm(self.score_proj(memory), h.unsqueeze(2)).squeeze(2)
        expanded = h.unsqueeze(1).expand(-1, memory.shape[1], -1)  # (B, S, H)
        return self.score_vector(torch.tanh(self.score_proj(torch.cat([expanded, memory], -1)))).squeeze(-1)

    def step(self, tokens, memory, memory_bias, memory_length, hidden, cell, feed):
        """One target word: -> logits, next hidden/cell (B, L, H), next h~ (B, H), attention."""
        x = torch.cat([self.tgt_embed(tokens), feed], dim=-1)  # input feeding
        next_hidden, next_cell = [], []
        for layer, lstm in enumerate(self.decoder):
            h, c = lstm(x, (hidden[:, layer], cell[:, layer]))
            next_hidden.append(h)
            next_cell.append(c)
            x = h
        scores = self._scores(x, memory) + memory_bias  # (B, S)
        if self.cfg.local_window:
            D = self.cfg.local_window
            p = memory_length.unsqueeze(1) * torch.sigmoid(
                self.position_vector(torch.tanh(self.position_proj(x))))  # (B, 1): p_t in [0, S]
            s = torch.arange(memory.shape[1], device=memory.device, dtype=memory.dtype).unsqueeze(0)
            outside = (s < p - D) | (s > p + D)
            attention = scores.masked_fill(outside, float("-inf")).softmax(dim=-1)
            attention = torch.nan_to_num(attention) * torch.exp(-((s - p) ** 2) / (2 * (D / 2) ** 2))
        else:
            attention = scores.softmax(dim=-1)
        context = torch.bmm(attention.unsqueeze(1), memory).squeeze(1)  # c_t
        attentional = torch.tanh(self.combine(torch.cat([context, x], dim=-1)))  # h~_t
        return (self.out_proj(attentional), torch.stack(next_hidden, 1), torch.stack(next_cell, 1),
                attentional, attention)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory, memory_bias, memory_length, hidden, cell, feed = self.encode(src, src_lengths)
        logits = []
        for i in range(tgt.shape[1]):
            out, hidden, cell, feed, _ = self.step(
                tgt[:, i], memory, memory_bias, memory_length, hidden, cell, feed
            )
            logits.append(out)
        return torch.stack(logits, dim=1)

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            bos_id=Vocabulary.bos_id, eos_id=Vocabulary.eos_id,
            static=("memory", "memory_bias", "memory_length"), state=("hidden", "cell", "feed"),
            max_length=self.cfg.max_length, attention_output="attention",
        )

    def export_parts(self) -> dict[str, tuple[nn.Module, ModelSpec]]:
        cfg = self.cfg
        H, L = cfg.hidden_dim, cfg.num_layers
        static = (TensorSpec("memory", "float32", ("batch", "src_len", H)),
                  TensorSpec("memory_bias", "float32", ("batch", "src_len")),
                  TensorSpec("memory_length", "float32", ("batch",)))
        state_shapes = {"hidden": ("batch", L, H), "cell": ("batch", L, H), "feed": ("batch", H)}
        state = tuple(TensorSpec(n, "float32", shape) for n, shape in state_shapes.items())
        next_state = tuple(TensorSpec(f"next_{n}", "float32", shape) for n, shape in state_shapes.items())
        dims = {"src_len": cfg.example_src_len}
        encoder = ModelSpec("luong_seq2seq.encoder", "part", "encoder", source_specs(cfg), static + state,
                            dims)
        step = ModelSpec(
            "luong_seq2seq.decoder_step", "part", "decoder-step",
            (TensorSpec("tokens", "int64", ("batch",), (0, cfg.tgt_vocab)),) + static + state,
            (TensorSpec("logits", "float32", ("batch", cfg.tgt_vocab)),) + next_state
            + (TensorSpec("attention", "float32", ("batch", "src_len")),),
            dims,
        )
        return encoder_and_step(self, encoder, step)


def _tiny_luong(**kw) -> LuongConfig:
    return LuongConfig(src_vocab=40, tgt_vocab=36, embed_dim=16, hidden_dim=24, num_layers=2,
                       example_src_len=7, target_len=5, max_length=12, **kw)


LUONG_CONFIGS = {
    "tiny": _tiny_luong(),
    "tiny_dot": _tiny_luong(score="dot"),
    "tiny_concat": _tiny_luong(score="concat"),
    "tiny_local": _tiny_luong(local_window=2),
    # Table 1 of the paper: global attention (general score) and local-p, D = 10.
    "global_general": LuongConfig(),
    "local_p": LuongConfig(local_window=10),
}


register_model(
    "luong_seq2seq",
    configs=LUONG_CONFIGS,
    spec=translation_spec,
    paper="Luong et al., Effective Approaches to Attention-based Neural Machine Translation, EMNLP 2015",
)(LuongSeq2Seq)
