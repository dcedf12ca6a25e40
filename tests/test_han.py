"""HAN exports whole with dynamic numbers of sentences and words; padding at either
level changes nothing."""

import numpy as np
import pytest

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.models import get_spec


@pytest.fixture(scope="module")
def han_dir(exported_tiny):
    return exported_tiny("han").out_dir


@pytest.mark.parametrize("dims", [dict(sentences=9, words=3), dict(sentences=1, words=15)])
def test_parity_at_other_shapes(han_dir, dims):
    spec = get_spec("han")
    feed = spec.example_inputs(3, seed=2, **dims)
    feed["word_counts"] = np.minimum(feed["word_counts"], dims["words"])
    feed["sentence_counts"] = np.minimum(feed["sentence_counts"], dims["sentences"])
    with runtime.load(han_dir) as ort, runtime.load(han_dir, "torch") as eager:
        report = compare_outputs(eager.run(feed), ort.run(feed), spec.tolerance())
    assert report.passed, report.failures()


def test_padding_changes_nothing(han_dir):
    rng = np.random.default_rng(0)
    words = [5, 2, 4]  # one document of three sentences
    tokens = np.zeros((1, 3, 5), np.int64)
    for i, n in enumerate(words):
        tokens[0, i, :n] = rng.integers(4, 60, n)
    doc = {"tokens": tokens, "word_counts": np.array([words], np.int64), "sentence_counts": np.array([3])}
    padded_tokens = np.zeros((2, 6, 8), np.int64)
    padded_tokens[0, :3, :5] = tokens[0]
    padded = {
        "tokens": padded_tokens,
        # Padding sentences say 0 words, as a batching client would write them.
        "word_counts": np.array([words + [0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64),
        "sentence_counts": np.array([3, 6]),
    }
    with runtime.load(han_dir) as ort:
        alone, batched = ort.run(doc), ort.run(padded)
    np.testing.assert_allclose(batched["logits"][0], alone["logits"][0], atol=1e-5)
    np.testing.assert_allclose(batched["sentence_attention"][0, :3], alone["sentence_attention"][0], atol=1e-6)
    assert np.all(batched["sentence_attention"][0, 3:] == 0)
    assert np.all(batched["word_attention"][0, 1, 2:] == 0)
    assert np.isfinite(batched["word_attention"]).all()
