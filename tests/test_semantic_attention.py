"""Semantic attention captioning (You et al. 2016): the attribute predictor, both
attentions over the attributes, and the parts against the whole graph. Token equality of
the exported parts is in test_seq2seq.py, with every generative model."""

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.errors import InputError
from attnserve.models import create_model
from attnserve.text import SPECIALS, Vocabulary

NAME = "semantic_attention_caption"


@pytest.fixture(scope="module")
def model():
    return create_model(NAME)


def random_images(batch: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32))


def test_input_and_output_attention_are_distributions_over_the_attributes(model):
    K = model.cfg.num_attributes
    tokens = torch.tensor([Vocabulary.bos_id, 5, 17])
    with torch.inference_mode():
        *static, hidden, cell, _ = model.encode(random_images(3))
        _, _, _, beta, alpha = model.step(tokens, *static, hidden, cell)
    for weights in (alpha, beta):
        assert weights.shape == (3, K) and (weights > 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    # Not a constant: the previous word steers the input attention (alpha_t ∝ exp(y_{t-1}^T U~ y^i)).
    with torch.inference_mode():
        other = model.step(torch.tensor([6, 6, 6]), *static, hidden, cell)[4]
    assert not torch.allclose(alpha, other)


def test_attributes_are_the_predictors_top_k_words(model):
    cfg = model.cfg
    images = random_images(4, seed=1)
    with torch.inference_mode():
        probabilities = torch.sigmoid(model.cnn.fc(model.image_feature(images)))  # multi-label
        embedded, *_, attributes = model.encode(images)
        words = model.embed(attributes)
    assert attributes.dtype == torch.int64 and attributes.shape == (4, cfg.num_attributes)
    assert (attributes >= len(SPECIALS)).all() and (attributes < cfg.vocab_size).all()
    for row, probs in zip(attributes, probabilities, strict=True):
        chosen = row - len(SPECIALS)
        assert len(set(chosen.tolist())) == cfg.num_attributes
        # Most likely first, and no word left out is more likely than one chosen.
        assert (probs[chosen].diff() <= 0).all()
        left_out = torch.ones_like(probs, dtype=torch.bool).index_fill(0, chosen, False)
        assert probs[left_out].max() < probs[chosen].min()
    # Attributes are words: they share the caption's embedding matrix.
    torch.testing.assert_close(embedded, words, rtol=0, atol=0)


def test_teacher_forcing_equals_stepping_the_parts(model):
    parts = model.export_parts()
    encoder, encoder_spec = parts["encoder"]
    step, step_spec = parts["decoder_step"]
    config = model.generation_config()
    images = random_images(2, seed=2)
    tgt = torch.randint(len(SPECIALS), model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    tgt[:, 0] = config.bos_id
    with torch.inference_mode():
        whole = model(images, tgt)
        encoded = dict(zip(encoder_spec.output_names, encoder(images), strict=True))
        static = [encoded[n] for n in config.static]
        state = [encoded[n] for n in config.state]
        for t in range(tgt.shape[1]):
            out = dict(zip(step_spec.output_names, step(tgt[:, t], *static, *state), strict=True))
            torch.testing.assert_close(out["logits"], whole[:, t], rtol=0, atol=1e-6)
            state = [out[f"next_{n}"] for n in config.state]
    assert whole.shape == (2, 6, model.cfg.vocab_size)


@pytest.mark.parametrize("shape", [(1, 3, 40, 40), (1, 1, 32, 32)], ids=["size", "channels"])
def test_a_wrong_image_is_an_input_error(shape, model, exported_tiny):
    encoder, _, _ = runtime.load_generator(exported_tiny(NAME).out_dir, "ort")
    images = np.zeros(shape, dtype=np.float32)
    with pytest.raises(InputError, match=rf"images has shape \({', '.join(map(str, shape))}\), "
                                         r"expected \(batch, 3, 32, 32\)"):
        encoder.run({"images": images})
    # The trunk pools globally, so the eager model would run; it refuses too.
    with pytest.raises(InputError, match=r"images of shape \(batch, 3, 32, 32\)"):
        model(torch.from_numpy(images), torch.ones(1, 3, dtype=torch.int64))
