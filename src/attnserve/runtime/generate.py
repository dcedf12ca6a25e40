"""Greedy and beam search that drive any pair of Runners: no torch.

A generative model is exported in two parts:

- the encoder, run once: its outputs are the `static` tensors every step reads
  unchanged (encoder memory, source lengths) and the initial value of each `state`
  tensor (RNN hidden and cell state, attention context, a key/value cache);
- the decoder step, run once per token: inputs `tokens` (B,) int64 plus the static and
  state tensors; outputs `logits` (B, V), `next_<name>` for each state tensor, and
  optionally the attention weights.

Every static and state tensor has the batch on axis 0, which is how beam search
expands and reorders them. The same functions run the eager parts (TorchRunner) and the
exported ones (OrtRunner), so their tokens can be compared exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from attnserve.errors import AttnserveError
from attnserve.runtime.base import Runner


@dataclass(frozen=True)
class GenerationConfig:
    """How the two parts of a generative model fit together.

    Attributes:
        bos_id, eos_id: the start token fed first and the token that ends a sequence.
        static: encoder outputs passed unchanged to every step.
        state: recurrent tensors: the encoder's output `name` is the initial value; the
            step takes `name` and returns `next_<name>`.
        max_length: default limit on generated tokens (the end token included).
        attention_output: the step output holding attention weights, if any.
        length_limit: the most tokens the step graph can take (a learned position
            table's length); None when unbounded.
    """

    bos_id: int
    eos_id: int
    static: tuple[str, ...]
    state: tuple[str, ...]
    max_length: int = 32
    token_input: str = "tokens"
    logits_output: str = "logits"
    attention_output: str | None = None
    length_limit: int | None = None


@dataclass
class Generation:
    """One generated sequence: tokens without the start token, ending with the end
    token when the model produced it; its score; the attention weights per token."""

    tokens: list[int]
    score: float
    attention: list[np.ndarray] = field(default_factory=list)


def _check(encoder: Runner, step: Runner, config: GenerationConfig, max_length: int) -> None:
    if max_length < 1:
        raise AttnserveError(f"max_length must be at least 1, got {max_length}")
    if config.length_limit is not None and max_length > config.length_limit:
        raise AttnserveError(
            f"max_length {max_length} is more than this model's {config.length_limit} positions"
        )
    missing_out = [n for n in config.static + config.state if n not in encoder.output_names]
    step_inputs = (config.token_input,) + config.static + config.state
    missing_in = [n for n in step_inputs if n not in step.input_names]
    step_outputs = (config.logits_output,) + tuple(f"next_{n}" for n in config.state)
    missing_step_out = [n for n in step_outputs if n not in step.output_names]
    if missing_out or missing_in or missing_step_out:
        raise AttnserveError(
            "the encoder and step graphs do not fit the generation config: "
            + "; ".join(f"{what} lack {', '.join(names)}" for what, names in
                        (("encoder outputs", missing_out), ("step inputs", missing_in),
                         ("step outputs", missing_step_out)) if names)
        )


def _step_feed(config: GenerationConfig, tokens: np.ndarray, static: dict, state: dict) -> dict:
    return {config.token_input: tokens.astype(np.int64), **static, **state}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def greedy_search(encoder: Runner, step: Runner, inputs: Mapping[str, np.ndarray],
                  config: GenerationConfig, max_length: int | None = None) -> list[Generation]:
    """The most likely token at every step, per batch item, until the end token or
    `max_length` tokens."""
    max_length = config.max_length if max_length is None else max_length
    _check(encoder, step, config, max_length)
    enc = encoder.run(inputs)
    static = {n: enc[n] for n in config.static}
    state = {n: enc[n] for n in config.state}
    batch = next(iter(enc.values())).shape[0]
    tokens = np.full(batch, config.bos_id, dtype=np.int64)
    results = [Generation([], 0.0) for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_length):
        out = step.run(_step_feed(config, tokens, static, state))
        logp = _log_softmax(out[config.logits_output])
        tokens = logp.argmax(axis=-1)  # first maximum on ties, as torch.argmax on CPU
        for b in np.flatnonzero(~done):
            results[b].tokens.append(int(tokens[b]))
            results[b].score += float(logp[b, tokens[b]])
            if config.attention_output:
                results[b].attention.append(out[config.attention_output][b])
        done |= tokens == config.eos_id
        if done.all():
            break
        state = {n: out[f"next_{n}"] for n in config.state}
    return results


def _length_penalty(length: int, alpha: float) -> float:
    """GNMT's length normalisation (Wu et al. 2016, eq. 14); alpha 0 is none."""
    return ((5.0 + length) / 6.0) ** alpha


def _finish(tokens: list[int], log_prob: float, history: list, alpha: float) -> Generation:
    return Generation(tokens, float(log_prob) / _length_penalty(len(tokens), alpha), history)


def beam_search(encoder: Runner, step: Runner, inputs: Mapping[str, np.ndarray],
                config: GenerationConfig, beam_width: int = 4, length_penalty: float = 1.0,
                max_length: int | None = None) -> list[Generation]:
    """Beam search with GNMT length normalisation.

    Keeps `beam_width` live hypotheses per batch item; a hypothesis that emits the end
    token is set aside with score log p / lp(length). A batch item is done when it has
    `beam_width` finished hypotheses; at `max_length` the live ones are finished as
    they are. The best normalised score wins; ties go to the first found. Candidates
    are ranked with a stable sort, so the result is deterministic.
    """
    max_length = config.max_length if max_length is None else max_length
    _check(encoder, step, config, max_length)
    if beam_width < 1:
        raise AttnserveError(f"beam width must be at least 1, got {beam_width}")
    enc = encoder.run(inputs)
    batch = next(iter(enc.values())).shape[0]
    K = beam_width
    static = {n: np.repeat(enc[n], K, axis=0) for n in config.static}  # (B * K, ...)
    state = {n: np.repeat(enc[n], K, axis=0) for n in config.state}
    beam_scores = np.full((batch, K), -np.inf)
    beam_scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    sequences: list[list[int]] = [[] for _ in range(batch * K)]
    attentions: list[list[np.ndarray]] = [[] for _ in range(batch * K)]
    tokens = np.full(batch * K, config.bos_id, dtype=np.int64)
    finished: list[list[Generation]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for t in range(max_length):
        out = step.run(_step_feed(config, tokens, static, state))
        logp = _log_softmax(out[config.logits_output])  # (B * K, V)
        vocab = logp.shape[-1]
        if K > vocab:
            raise AttnserveError(f"beam width {K} is larger than the vocabulary ({vocab} tokens)")
        attn = out.get(config.attention_output) if config.attention_output else None
        candidates = (beam_scores[:, :, None] + logp.reshape(batch, K, vocab)).reshape(batch, K * vocab)
        rows = np.zeros(batch * K, dtype=np.int64)
        next_tokens = np.full(batch * K, config.eos_id, dtype=np.int64)
        next_scores = np.full((batch, K), -np.inf)
        for b in range(batch):
            if done[b]:
                rows[b * K:(b + 1) * K] = b * K  # keep feeding something; results ignored
                continue
            order = np.argsort(-candidates[b], kind="stable")
            chosen = 0
            for idx in order[: 2 * K]:
                score = candidates[b, idx]
                if not np.isfinite(score):
                    break
                beam, token = divmod(int(idx), vocab)
                row = b * K + beam
                history = attentions[row] + ([attn[row]] if attn is not None else [])
                if token == config.eos_id:
                    finished[b].append(_finish(sequences[row] + [token], score, history, length_penalty))
                else:
                    rows[b * K + chosen] = row
                    next_tokens[b * K + chosen] = token
                    next_scores[b, chosen] = score
                    chosen += 1
                if chosen == K or len(finished[b]) >= K:
                    break
            if len(finished[b]) >= K or chosen == 0:
                done[b] = True
        if done.all():
            break
        if t + 1 < max_length:
            new_sequences, new_attentions = [], []
            for i, row in enumerate(rows):
                new_sequences.append(sequences[row] + [int(next_tokens[i])])
                new_attentions.append(attentions[row] + ([attn[row]] if attn is not None else []))
            sequences, attentions = new_sequences, new_attentions
            state = {n: out[f"next_{n}"][rows] for n in config.state}
            tokens = next_tokens
            beam_scores = next_scores
        else:  # out of length: the live hypotheses end here, as they are
            for b in np.flatnonzero(~done):
                for k in range(K):
                    if np.isfinite(next_scores[b, k]):
                        row = rows[b * K + k]
                        seq = sequences[row] + [int(next_tokens[b * K + k])]
                        history = attentions[row] + ([attn[row]] if attn is not None else [])
                        finished[b].append(_finish(seq, next_scores[b, k], history, length_penalty))
    best = []
    for b in range(batch):
        if not finished[b]:  # every step hit the length limit before any candidate
            raise AttnserveError("beam search produced no hypothesis; is max_length at least 1?")
        best.append(max(finished[b], key=lambda g: g.score))  # max keeps the first of equals
    return best
