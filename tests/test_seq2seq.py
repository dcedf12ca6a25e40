"""Generative models exported in parts: the encoder and decoder step on ONNX Runtime
produce exactly the eager model's tokens, greedy and beam, over padded batches."""

import json

import numpy as np
import pytest

from attnserve import runtime
from attnserve.errors import AttnserveError
from attnserve.models import get_entry, get_spec, list_models
from attnserve.runtime.generate import beam_search, greedy_search
from attnserve.spec import ModelSpec

# Text generators, whose steps attend over a source; handwriting_synthesis samples strokes
# (tests/test_handwriting.py) and image_transformer pixels (tests/test_image_transformer.py).
GENERATIVE = [n for n in list_models() if hasattr(get_entry(n).model_cls, "generation_config")
              and get_spec(n).task in ("translation", "image-captioning")]
# Every attention variant the family has, in its tiny form.
VARIANTS = {"luong_seq2seq": ["tiny", "tiny_dot", "tiny_concat", "tiny_local"], "show_attend_tell": ["tiny", "tiny_hard"]}
CASES = [(n, c) for n in GENERATIVE for c in VARIANTS.get(n, ["tiny"])]


def test_every_generative_model_is_covered():
    for name in GENERATIVE:
        tiny = [c for c in get_entry(name).configs if c.startswith("tiny")]
        assert sorted(tiny) == sorted(VARIANTS.get(name, ["tiny"])), f"add {name}'s tiny variants to VARIANTS"


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def exported(request, exported_tiny):
    name, config = request.param
    return name, exported_tiny(name, config)


def padded_sources(lengths, src_len, vocab, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, vocab, size=(len(lengths), src_len)).astype(np.int64)
    for b, n in enumerate(lengths):
        src[b, n:] = 0  # <pad>
    return {"src": src, "src_lengths": np.array(lengths, dtype=np.int64)}


def encoder_feed(result, lengths, src_len, seed=0):
    """Padded token sources for translators; images (one per length) for captioners."""
    encoder_spec = ModelSpec.from_dict(json.loads((result.out_dir / "attnserve.json").read_text())
                                       ["parts"]["encoder"]["spec"])
    if "src_lengths" in encoder_spec.input_names:
        return padded_sources(lengths, src_len, result.spec.inputs[0].value_range[1], seed)
    return encoder_spec.example_inputs(len(lengths), seed=seed)


def test_parts_are_exported_with_parity(exported):
    name, result = exported
    assert result.passed and set(result.parts) == {"encoder", "decoder_step"}
    manifest = json.loads((result.out_dir / "attnserve.json").read_text())
    assert manifest["generation"]["state"] and manifest["parts"]["decoder_step"]["parity_passed"]


@pytest.mark.parametrize(("lengths", "src_len"), [([7], 7), ([7, 3, 5, 1], 7), ([11, 2, 9, 6], 11)])
def test_exported_parts_give_the_eager_tokens(exported, lengths, src_len):
    name, result = exported
    feed = encoder_feed(result, lengths, src_len)
    if "src_lengths" not in feed and src_len != 7:
        pytest.skip("captioners take images: the source-length cases are the same batch of 4")
    enc_t, step_t, config = runtime.load_generator(result.out_dir, "torch")
    enc_o, step_o, _ = runtime.load_generator(result.out_dir, "ort")
    greedy_t = greedy_search(enc_t, step_t, feed, config)
    greedy_o = greedy_search(enc_o, step_o, feed, config)
    assert [g.tokens for g in greedy_o] == [g.tokens for g in greedy_t]
    assert any(len(g.tokens) > 1 for g in greedy_t), "a degenerate model proves nothing"
    beam_t = beam_search(enc_t, step_t, feed, config, beam_width=3)
    beam_o = beam_search(enc_o, step_o, feed, config, beam_width=3)
    assert [b.tokens for b in beam_o] == [b.tokens for b in beam_t]
    for b, o in zip(beam_t, beam_o, strict=True):
        assert o.score == pytest.approx(b.score, abs=1e-4)
    # Attention covers the real source only; it sums to 1, except local-p's, which is
    # weighted by a Gaussian after the softmax and not renormalised (Luong et al., eq. 10).
    local = "local" in result.spec.config
    padded = "src_lengths" in feed
    for g, n in zip(greedy_o, lengths, strict=True):
        weights = np.stack(g.attention)
        assert (weights >= 0).all() and (not padded or np.allclose(weights[:, n:], 0))
        sums = weights.sum(1)
        assert (sums <= 1 + 1e-5).all() if local else np.allclose(sums, 1)


def test_a_padded_batch_gives_each_sequence_its_own_tokens(exported):
    name, result = exported
    lengths = [7, 3, 5, 1]
    feed = encoder_feed(result, lengths, 7, seed=3)
    enc, step, config = runtime.load_generator(result.out_dir, "ort")
    together = beam_search(enc, step, feed, config, beam_width=2)
    for b, n in enumerate(lengths):
        alone = {k: v[b:b + 1] for k, v in feed.items()}
        if "src" in alone:
            alone["src"] = alone["src"][:, :n]
        assert beam_search(enc, step, alone, config, beam_width=2)[0].tokens == together[b].tokens


def test_generation_limits_are_clear_errors(exported):
    name, result = exported
    enc, step, config = runtime.load_generator(result.out_dir, "ort")
    feed = encoder_feed(result, [3], 3)
    with pytest.raises(AttnserveError, match="max_length must be at least 1"):
        greedy_search(enc, step, feed, config, max_length=0)
    with pytest.raises(AttnserveError, match="larger than the vocabulary"):
        beam_search(enc, step, feed, config, beam_width=10_000)


def test_a_classifier_export_is_not_a_generator(exported_tiny):
    with pytest.raises(AttnserveError, match="not a generative model export"):
        runtime.load_generator(exported_tiny("vit").out_dir)
