"""Greedy and beam search over Runners, checked on a small NumPy model whose every
probability is known: by hand, against exhaustive search, and across batch padding."""

import itertools

import numpy as np
import pytest

from attnserve.errors import AttnserveError
from attnserve.runtime.base import Runner
from attnserve.runtime.generate import GenerationConfig, _log_softmax, beam_search, greedy_search
from attnserve.spec import TensorSpec

V, H, EOS, BOS = 6, 5, 2, 1
W = np.random.default_rng(7)
EMBED, W_H, W_OUT, W_MEM = (W.standard_normal(s) for s in ((V, H), (H, H), (H, V), (H, H)))


class ToyEncoder(Runner):
    """memory = tanh(embedding of the source); h0 = mean of the valid positions."""

    backend = "toy"

    def __init__(self):
        super().__init__([TensorSpec("src", "int64", ("batch", "src_len")), TensorSpec("lengths", "int64", ("batch",))],
                         [TensorSpec("memory", "float64", ("batch", "src_len", H)),
                          TensorSpec("lengths", "int64", ("batch",)), TensorSpec("h", "float64", ("batch", H))])

    def _run(self, feed):
        memory = np.tanh(EMBED[feed["src"]])
        valid = np.arange(memory.shape[1])[None] < feed["lengths"][:, None]
        h = (memory * valid[..., None]).sum(1) / feed["lengths"][:, None]
        return {"memory": memory, "lengths": feed["lengths"], "h": h}


class ToyStep(Runner):
    """h' = tanh(h W + E[token] + attention-read memory); logits = h' U."""

    backend = "toy"

    def __init__(self):
        super().__init__(
            [TensorSpec("tokens", "int64", ("batch",)), TensorSpec("memory", "float64", ("batch", "src_len", H)),
             TensorSpec("lengths", "int64", ("batch",)), TensorSpec("h", "float64", ("batch", H))],
            [TensorSpec("logits", "float64", ("batch", V)), TensorSpec("next_h", "float64", ("batch", H)),
             TensorSpec("attention", "float64", ("batch", "src_len"))],
        )

    def _run(self, feed):
        memory, h = feed["memory"], feed["h"]
        scores = np.einsum("bsh,bh->bs", memory @ W_MEM, h)
        valid = np.arange(memory.shape[1])[None] < feed["lengths"][:, None]
        scores = np.where(valid, scores, -np.inf)
        attention = np.exp(scores - scores.max(1, keepdims=True))
        attention /= attention.sum(1, keepdims=True)
        context = np.einsum("bs,bsh->bh", attention, memory)
        h = np.tanh(h @ W_H + EMBED[feed["tokens"]] + context)
        return {"logits": 3 * h @ W_OUT, "next_h": h, "attention": attention}


CONFIG = GenerationConfig(bos_id=BOS, eos_id=EOS, static=("memory", "lengths"), state=("h",), max_length=8,
                          attention_output="attention")


def source(batch=4, length=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([length, 2, 4, 1][:batch] if batch <= 4 else [length] * batch, dtype=np.int64)
    return {"src": rng.integers(3, V, size=(batch, length)).astype(np.int64), "lengths": lengths}


def manual_greedy(feed, steps):
    enc = ToyEncoder().run(feed)
    h = enc["h"]
    tokens, out = np.full(len(h), BOS), []
    for _ in range(steps):
        o = ToyStep().run({"tokens": tokens, "memory": enc["memory"], "lengths": enc["lengths"], "h": h})
        tokens, h = o["logits"].argmax(-1), o["next_h"]
        out.append(tokens)
    return np.stack(out, 1)


def test_greedy_follows_the_argmax_and_stops_at_the_end_token():
    feed = source()
    results = greedy_search(ToyEncoder(), ToyStep(), feed, CONFIG)
    manual = manual_greedy(feed, CONFIG.max_length)
    for b, r in enumerate(results):
        expected = list(manual[b])
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert r.tokens == expected
        assert len(r.attention) == len(r.tokens)
        assert np.allclose(r.attention[0][feed["lengths"][b]:], 0), "padding gets no attention"


def test_padding_does_not_change_a_sequence():
    feed = source()
    together = greedy_search(ToyEncoder(), ToyStep(), feed, CONFIG)
    together_beam = beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=3)
    for b in range(4):
        n = feed["lengths"][b]
        alone = {"src": feed["src"][b:b + 1, :n], "lengths": feed["lengths"][b:b + 1]}
        assert greedy_search(ToyEncoder(), ToyStep(), alone, CONFIG)[0].tokens == together[b].tokens
        one = beam_search(ToyEncoder(), ToyStep(), alone, CONFIG, beam_width=3)[0]
        assert one.tokens == together_beam[b].tokens and one.score == pytest.approx(together_beam[b].score)


def test_beam_of_one_is_greedy():
    feed = source()
    greedy = greedy_search(ToyEncoder(), ToyStep(), feed, CONFIG)
    beam = beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=1, length_penalty=0.0)
    assert [g.tokens for g in greedy] == [b.tokens for b in beam]
    for g, b in zip(greedy, beam, strict=True):
        assert g.score == pytest.approx(b.score)


def _sequence_logp(feed, seq):
    enc = ToyEncoder().run(feed)
    h, token, total = enc["h"], np.array([BOS]), 0.0
    for t in seq:
        o = ToyStep().run({"tokens": token, "memory": enc["memory"], "lengths": enc["lengths"], "h": h})
        total += _log_softmax(o["logits"])[0, t]
        token, h = np.array([t]), o["next_h"]
    return total


@pytest.mark.parametrize("seed", range(5))
def test_full_width_beam_finds_the_exhaustive_best(seed):
    """With beam width V and two steps every sequence is a candidate."""
    feed = source(batch=1, seed=seed)
    result = beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=V, length_penalty=0.0, max_length=2)[0]
    sequences = [[EOS]] + [[a, b] for a, b in itertools.product(range(V), repeat=2) if a != EOS]
    best = max(sequences, key=lambda s: _sequence_logp(feed, s))
    assert result.tokens == best
    assert result.score == pytest.approx(_sequence_logp(feed, best))


def test_length_penalty_prefers_longer_sequences_when_positive():
    feed = source(batch=4)
    short = beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=4, length_penalty=0.0)
    long = beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=4, length_penalty=2.0)
    assert sum(len(r.tokens) for r in long) >= sum(len(r.tokens) for r in short)


def test_max_length_bounds_every_result():
    feed = source()
    for r in greedy_search(ToyEncoder(), ToyStep(), feed, CONFIG, max_length=3):
        assert 1 <= len(r.tokens) <= 3
    for r in beam_search(ToyEncoder(), ToyStep(), feed, CONFIG, beam_width=3, max_length=3):
        assert 1 <= len(r.tokens) <= 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: greedy_search(ToyEncoder(), ToyStep(), source(), CONFIG, max_length=0), "max_length must be at least 1"),
        (lambda: beam_search(ToyEncoder(), ToyStep(), source(), CONFIG, beam_width=V + 1), "larger than the vocabulary"),
        (lambda: beam_search(ToyEncoder(), ToyStep(), source(), CONFIG, beam_width=0), "at least 1"),
        (lambda: greedy_search(ToyEncoder(), ToyStep(), source(),
                               GenerationConfig(BOS, EOS, static=("memory", "keys"), state=("h", "c"))),
         "encoder outputs lack keys, c; step inputs lack keys, c; step outputs lack next_c"),
    ],
)
def test_bad_settings_are_one_clear_error(call, message):
    with pytest.raises(AttnserveError, match=message):
        call()
