"""Handwriting synthesis (Graves 2013, sec. 5): the whole graph and both parts export with
parity; sampling on the exported parts draws exactly the eager parts' strokes, over
padded batches; the window and the mixture keep the paper's invariants."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attnserve import runtime
from attnserve.errors import AttnserveError
from attnserve.export import export_onnx
from attnserve.models import create_model, get_spec
from attnserve.models.handwriting import CONFIGS
from attnserve.runtime.sampling import (
    encode_texts,
    handwriting_vocabulary,
    load_stroke_sampler,
    sample_strokes,
    window_passed_end,
)

VOCAB = handwriting_vocabulary(CONFIGS["tiny"].vocab_size)
TEXTS = ["a quick fox", "hi", "ink well"]  # 11, 2 and 8 characters: a padded batch
STEPS = 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_onnx("handwriting_synthesis", tmp_path_factory.mktemp("handwriting"), config="tiny",
                       vocabularies={"source": VOCAB})


@pytest.fixture(scope="module")
def eager_parts(exported):
    return load_stroke_sampler(exported.out_dir, "torch")


@pytest.fixture(scope="module")
def onnx_parts(exported):
    return load_stroke_sampler(exported.out_dir, "ort")


def run_step(parts, texts, bias=0.0):
    """The encoder, then one step from the null point: -> the step's outputs."""
    encoder, step = parts
    feed = encode_texts(VOCAB, texts)
    enc = encoder.run(feed)
    batch = len(texts)
    return step.run({"stroke": np.zeros((batch, 3), np.float32), "bias": np.full(batch, bias, np.float32),
                     **{n: enc[n] for n in ("characters", "text_mask", "hidden", "cell", "window", "kappa")}})


def assert_same_strokes(got, want):
    assert got.finished == want.finished
    assert got.strokes.shape == want.strokes.shape
    np.testing.assert_array_equal(got.strokes[:, 2], want.strokes[:, 2])  # pen lifts, exactly
    np.testing.assert_array_equal(got.components, want.components)
    np.testing.assert_allclose(got.strokes[:, :2], want.strokes[:, :2], atol=1e-4)
    np.testing.assert_allclose(got.attention, want.attention, atol=1e-4)


def test_whole_graph_and_both_parts_pass_parity(exported):
    assert exported.passed and set(exported.parts) == {"encoder", "decoder_step"}
    assert all(r.passed for reports in exported.part_parity.values() for r in reports)
    manifest = json.loads((exported.out_dir / "attnserve.json").read_text())
    assert manifest["spec"]["task"] == "handwriting-synthesis"
    assert manifest["generation"] is None, "strokes are not tokens: no GenerationConfig"
    assert all(manifest["parts"][p]["parity_passed"] for p in ("encoder", "decoder_step"))
    assert runtime.load_vocabularies(exported.out_dir) == {"source": VOCAB}


def test_the_handwriting_export_is_not_a_token_generator(exported):
    with pytest.raises(AttnserveError, match="not a generative model export"):
        runtime.load_generator(exported.out_dir)


@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS], ids=["batch1", "padded-batch3"])
def test_exported_parts_draw_the_eager_strokes(eager_parts, onnx_parts, texts):
    feed = encode_texts(VOCAB, texts)
    eager = sample_strokes(*eager_parts, feed, steps=STEPS, seed=0)
    exported = sample_strokes(*onnx_parts, feed, steps=STEPS, seed=0)
    for got, want in zip(exported, eager, strict=True):
        assert_same_strokes(got, want)
    # A degenerate sampler proves nothing: several points, both pen states, several components.
    points = np.concatenate([s.strokes for s in eager])
    assert len(points) >= 8 and set(points[:, 2]) == {0.0, 1.0}
    assert len(set(np.concatenate([s.components for s in eager]))) > 1
    assert all(s.finished for s in eager), "the window should pass the end of these short texts"


def test_the_same_seed_draws_the_same_strokes(onnx_parts):
    feed = encode_texts(VOCAB, TEXTS)
    first, again = (sample_strokes(*onnx_parts, feed, steps=STEPS, seed=7) for _ in range(2))
    other = sample_strokes(*onnx_parts, feed, steps=STEPS, seed=8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.strokes, b.strokes)
    assert any(a.strokes.shape != o.strokes.shape or not np.array_equal(a.strokes, o.strokes)
               for a, o in zip(first, other, strict=True))


def test_each_sequence_of_a_padded_batch_writes_as_it_does_alone(onnx_parts):
    seeds = [3, 4, 5]
    together = sample_strokes(*onnx_parts, encode_texts(VOCAB, TEXTS), steps=STEPS, seed=seeds)
    for text, seed, sample in zip(TEXTS, seeds, together, strict=True):
        alone = sample_strokes(*onnx_parts, encode_texts(VOCAB, [text]), steps=STEPS, seed=seed)[0]
        assert_same_strokes(sample, alone)
        assert sample.attention.shape[1] == len(text)


def test_the_window_moves_forward_and_ignores_padding(exported, onnx_parts):
    for sample in sample_strokes(*onnx_parts, encode_texts(VOCAB, TEXTS), steps=STEPS, seed=1):
        assert (np.diff(sample.kappa, axis=0) >= 0).all() and (sample.kappa > 0).all()
    out = run_step(onnx_parts, TEXTS)
    for b, text in enumerate(TEXTS):
        assert (out["attention"][b, len(text):] == 0).all() and (out["attention"][b, :len(text)] > 0).all()
    # The whole graph: padding a text changes none of its outputs.
    spec = get_spec("handwriting_synthesis")
    strokes = spec.example_inputs(1, seed=4)["strokes"]
    padded = encode_texts(VOCAB, TEXTS)
    with runtime.load(exported.out_dir) as whole:
        batch = whole.run({"strokes": np.repeat(strokes, 3, axis=0), **padded})
        for b, text in enumerate(TEXTS):
            alone = whole.run({"strokes": strokes, **encode_texts(VOCAB, [text])})
            assert (batch["attention"][b, :, len(text):] == 0).all()
            for name, value in alone.items():
                np.testing.assert_allclose(batch[name][b, ..., :value.shape[-1]] if name == "attention"
                                           else batch[name][b], value[0], atol=1e-5)


def test_the_step_continues_the_teacher_forced_graph(exported, onnx_parts):
    """Stepping the step part over strokes gives the whole graph's outputs point by point."""
    spec = get_spec("handwriting_synthesis")
    strokes = spec.example_inputs(3, seed=2)["strokes"]
    feed = encode_texts(VOCAB, TEXTS)
    with runtime.load(exported.out_dir) as whole:
        expected = whole.run({"strokes": strokes, **feed})
    encoder, step = onnx_parts
    enc = encoder.run(feed)
    static = {n: enc[n] for n in ("characters", "text_mask")}
    state = {n: enc[n] for n in ("hidden", "cell", "window", "kappa")}
    for t in range(strokes.shape[1]):
        out = step.run({"stroke": strokes[:, t], "bias": np.zeros(3, np.float32), **static, **state})
        for name in ("mixture_weights", "means", "stddevs", "correlations", "end_of_stroke", "attention"):
            np.testing.assert_allclose(out[name], expected[name][:, t], atol=1e-5, err_msg=name)
        state = {n: out[f"next_{n}"] for n in state}


def test_the_mixture_is_a_distribution(exported, onnx_parts):
    spec = get_spec("handwriting_synthesis")
    with runtime.load(exported.out_dir) as whole:
        outputs = [whole.run(spec.example_inputs(3, seed=9))]
    outputs += [run_step(onnx_parts, TEXTS, bias) for bias in (0.0, 2.0)]
    for out in outputs:
        np.testing.assert_allclose(out["mixture_weights"].sum(-1), 1, atol=1e-5)
        assert (out["mixture_weights"] >= 0).all() and (out["stddevs"] > 0).all()
        assert (np.abs(out["correlations"]) < 1).all()
        assert ((out["end_of_stroke"] > 0) & (out["end_of_stroke"] < 1)).all()


def test_a_larger_bias_narrows_the_mixture(onnx_parts):
    unbiased, biased = run_step(onnx_parts, TEXTS, 0.0), run_step(onnx_parts, TEXTS, 2.0)
    # Eq. 61: sigma = exp(sigma_hat - b); eq. 62: pi = softmax(pi_hat (1 + b)).
    np.testing.assert_allclose(biased["stddevs"], unbiased["stddevs"] * np.exp(-2.0), rtol=1e-5)
    assert (biased["mixture_weights"].max(-1) > unbiased["mixture_weights"].max(-1)).all()
    np.testing.assert_array_equal(biased["end_of_stroke"], unbiased["end_of_stroke"])
    # As b grows the draw loses its variance: two seeds put the first point in one place.
    feed = encode_texts(VOCAB, TEXTS[:1])
    a, b = (sample_strokes(*onnx_parts, feed, steps=1, bias=30.0, seed=s)[0] for s in (0, 1))
    np.testing.assert_allclose(a.strokes[0, :2], b.strokes[0, :2], atol=1e-6)


def test_unknown_characters_become_unk():
    feed = encode_texts(VOCAB, ["Hi!", "ok"])
    i, o, k = (VOCAB.encode(c, add_eos=False)[0] for c in "iok")
    np.testing.assert_array_equal(feed["text"], [[VOCAB.unk_id, i, VOCAB.unk_id], [o, k, VOCAB.pad_id]])
    np.testing.assert_array_equal(feed["text_lengths"], [3, 2])  # no <bos> or <eos>
    assert feed["text"].dtype == np.int64 and feed["text_lengths"].dtype == np.int64
    with pytest.raises(AttnserveError, match="not in the char-level vocabulary"):
        VOCAB.encode("Hi!", strict=True)


def test_an_unknown_character_is_still_written(onnx_parts):
    sample = sample_strokes(*onnx_parts, encode_texts(VOCAB, ["Hi!"]), steps=STEPS)[0]
    assert sample.finished and sample.attention.shape[1] == 3


@pytest.mark.parametrize(("feed", "kwargs", "message"), [
    (encode_texts(VOCAB, ["ok"]), dict(steps=0), "steps must be an integer of at least 1"),
    (encode_texts(VOCAB, ["ok"]), dict(steps=2.5), "steps must be an integer"),
    ({"text": np.array([[5, 6], [5, 0]]), "text_lengths": np.array([2, 0])}, dict(steps=5), "text 1 .*empty"),
    ({"text": np.zeros((1, 0), np.int64), "text_lengths": np.array([0])}, dict(steps=5), "empty"),
    ({"text": np.array([[5, 6]]), "text_lengths": np.array([3])}, dict(steps=5), "exceed the text's 2 columns"),
    ({"text": np.array([[5, 6]])}, dict(steps=5), "lack text_lengths"),
    (encode_texts(VOCAB, ["ok"]), dict(steps=5, bias=-1.0), "bias must be a finite number >= 0"),
    (encode_texts(VOCAB, ["ok"]), dict(steps=5, bias=float("nan")), "bias must be"),
    (encode_texts(VOCAB, ["ok", "no"]), dict(steps=5, seed=[1, 2, 3]), "3 values of seed for a batch of 2"),
], ids=["steps0", "steps-float", "length0", "no-columns", "too-long", "no-lengths", "negative-bias", "nan-bias",
        "seeds"])
def test_bad_sampling_input_is_one_clear_error(onnx_parts, feed, kwargs, message):
    with pytest.raises(AttnserveError, match=message):
        sample_strokes(*onnx_parts, feed, **kwargs)


def test_bad_texts_and_exports_are_clear_errors(tmp_path):
    with pytest.raises(AttnserveError, match="empty text"):
        encode_texts(VOCAB, ["ok", ""])
    with pytest.raises(AttnserveError, match="no texts"):
        encode_texts(VOCAB, [])
    with pytest.raises(AttnserveError, match="no default handwriting vocabulary of 500"):
        handwriting_vocabulary(500)
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "attnserve.json").write_text(json.dumps({"spec": {"task": "translation"}, "parts": {}}))
    with pytest.raises(AttnserveError, match="not a handwriting synthesis export"):
        load_stroke_sampler(tmp_path)


def test_unknown_backend_is_refused(exported):
    with pytest.raises(AttnserveError, match="unknown backend 'tensorflow'"):
        load_stroke_sampler(exported.out_dir, "tensorflow")


def test_sampling_imports_no_torch():
    code = ("import sys, attnserve.runtime.sampling; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampling_stops_at_the_step_limit(onnx_parts):
    samples = sample_strokes(*onnx_parts, encode_texts(VOCAB, TEXTS), steps=3, seed=0)
    assert all(len(s.strokes) <= 3 for s in samples)
    assert not samples[0].finished  # 11 characters are not written in 3 points


def test_the_stopping_heuristic():
    # Sec. 5.3: phi(t, U + 1) above every phi(t, u <= U).
    assert window_passed_end(np.array([0.1, 0.2]), 0.3, np.array([2.5]), 2)
    assert not window_passed_end(np.array([0.1, 0.4]), 0.3, np.array([2.5]), 2)
    # Every phi underflowed to 0 with the window far past the text: still the end.
    assert window_passed_end(np.zeros(2), 0.0, np.array([40.0, 50.0]), 2)


def test_base_config_is_the_papers_synthesis_network():
    """Sec. 5.2: three layers of 400 LSTM cells, window vectors of size 57, 10 window
    Gaussians, 20 mixture components, approximately 3.7M weights."""
    model = create_model("handwriting_synthesis", "base")
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_dim, cfg.vocab_size, cfg.window_gaussians,
            cfg.mixture_components) == (3, 400, 57, 10, 20)
    assert model.window_params.out_features == 30 and model.mixture_params.out_features == 121
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.7e6, abs=0.1e6)
    assert "".join(handwriting_vocabulary(57).tokens[4:]) == " " + "".join(map(chr, range(97, 123))) + "".join(
        map(chr, range(65, 91)))
