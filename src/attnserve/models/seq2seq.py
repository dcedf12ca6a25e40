"""Recurrent encoder-decoders with attention.

Bahdanau, Cho and Bengio, "Neural Machine Translation by Jointly Learning to Align and
Translate", ICLR 2015. https://arxiv.org/abs/1409.0473

RNNsearch (appendix A): a bidirectional GRU encoder whose annotations h_j concatenate
both directions; a GRU decoder whose state starts at s_0 = tanh(W_s h<-_1); additive
alignment e_ij = v_a^T tanh(W_a s_{i-1} + U_a h_j) on the *previous* decoder state,
softmax-normalised over the source (padding excluded); the context c_i feeds the GRU
with the previous target word; the output layer is a maxout over
U_o s_{i-1} + V_o E y_{i-1} + C_o c_i.

Exported three ways: the whole teacher-forced model (source + target in, logits out,
for scoring), and the two parts generation uses (`export_parts`): the encoder, run
once, and one decoder step with its state in and out (see attnserve.runtime.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnserve.models.registry import register_model
from attnserve.ops import gru_layer
from attnserve.runtime.generate import GenerationConfig
from attnserve.spec import DEFAULT_TOLERANCES, ModelSpec, TensorSpec
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
        valid = torch.arange(src.shape[1], device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)
        memory_bias = torch.zeros(valid.shape, dtype=memory.dtype).masked_fill(~valid, float("-inf"))
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
        src = _source_specs(cfg)
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
        return {"encoder": (_Encoder(self), encoder), "decoder_step": (_DecoderStep(self), step)}


class _Encoder(nn.Module):
    """The encoder part: run once per source."""

    def __init__(self, model: BahdanauSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, src, src_lengths):
        return self.model.encode(src, src_lengths)


class _DecoderStep(nn.Module):
    """The decoder-step part: run once per generated token."""

    def __init__(self, model: BahdanauSeq2Seq):
        super().__init__()
        self.model = model

    def forward(self, tokens, memory, keys, memory_bias, state):
        return self.model.step(tokens, memory, keys, memory_bias, state)


def _source_specs(cfg: BahdanauConfig) -> tuple[TensorSpec, ...]:
    return (TensorSpec("src", "int64", ("batch", "src_len"), (4, cfg.src_vocab)),
            # Lengths from 1 to the example length: padded batches in every example.
            TensorSpec("src_lengths", "int64", ("batch",), (1, cfg.example_src_len + 1)))


CONFIGS = {
    "tiny": BahdanauConfig(src_vocab=40, tgt_vocab=36, embed_dim=16, hidden_dim=24, align_dim=20,
                           maxout_dim=12, example_src_len=7, target_len=5, max_length=12),
    # RNNsearch as trained in the paper (sec. 4.2); 30k-word vocabularies.
    "rnnsearch": BahdanauConfig(),
}


def bahdanau_spec(name: str, config_name: str, cfg: BahdanauConfig) -> ModelSpec:
    target = TensorSpec("tgt", "int64", ("batch", cfg.target_len), (4, cfg.tgt_vocab))
    return ModelSpec(
        name=name, config=config_name, task="translation",
        inputs=_source_specs(cfg) + (target,),
        outputs=(TensorSpec("logits", "float32", ("batch", cfg.target_len, cfg.tgt_vocab)),),
        default_dims={"src_len": cfg.example_src_len},
        tolerances=dict(DEFAULT_TOLERANCES),
    )


register_model(
    "bahdanau_seq2seq",
    configs=CONFIGS,
    spec=bahdanau_spec,
    paper="Bahdanau et al., Neural Machine Translation by Jointly Learning to Align and Translate, ICLR 2015",
)(BahdanauSeq2Seq)
