"""Show, Attend and Tell: the 14 x 14 annotation grid, soft and hard attention over it,
the beta gate, the parts stepping as the whole graph does, and hard attention on ONNX
Runtime giving the eager tokens."""

import re

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.errors import InputError
from attnserve.models import create_model, get_spec
from attnserve.models.show_attend_tell import CONFIGS, ShowAttendTell
from attnserve.runtime.generate import beam_search, greedy_search


def images(batch: int, config: str = "tiny", seed: int = 0) -> np.ndarray:
    return get_spec("show_attend_tell", config).example_inputs(batch, seed=seed)["images"]


@pytest.mark.parametrize("config", ["base", "base_hard"])
def test_base_annotates_a_14x14_grid_of_1024(config):
    # Shapes only: ResNet-101 at 224 on two cores would take longer than the whole file.
    with torch.device("meta"):
        model = ShowAttendTell(CONFIGS[config]).eval()
        annotations, keys, hidden, cell = model.encode(torch.empty(2, 3, 224, 224))
    assert annotations.shape == (2, 14 * 14, 1024) and keys.shape == (2, 196, 512)
    assert hidden.shape == cell.shape == (2, 512)
    encoder_spec = model.export_parts()["encoder"][1]
    assert [t.shape for t in encoder_spec.outputs] == [
        ("batch", 196, 1024), ("batch", 196, 512), ("batch", 512), ("batch", 512)]
    assert model.export_parts()["decoder_step"][1].outputs[-1].shape == ("batch", 196)


@pytest.mark.parametrize("config", ["tiny", "tiny_hard"])
def test_one_step_follows_the_papers_equations(config):
    model = create_model("show_attend_tell", config)
    with torch.inference_mode():
        a, keys, h, c = model.encode(torch.from_numpy(images(3, config)))
        mean = a.mean(dim=1)  # sec. 3.1.2: the initial state from the mean annotation
        torch.testing.assert_close(h, torch.tanh(model.init_hidden(mean)), rtol=0, atol=0)
        torch.testing.assert_close(c, torch.tanh(model.init_cell(mean)), rtol=0, atol=0)
        tokens = torch.tensor([1, 7, 20])
        h = torch.randn_like(h)  # a state away from h_0, so the gate sees varied input
        z, weights, beta = model.attend(a, keys, h)
        logits, next_h, next_c, attention = model.step(tokens, a, keys, h, c)
        # e_ti = w^T tanh(W_a a_i + W_h h_{t-1}); alpha = softmax over the L locations.
        e = torch.tanh(a @ model.attend_annotation.weight.T + model.attend_annotation.bias
                       + (h @ model.attend_hidden.weight.T).unsqueeze(1)) @ model.attend_score.weight[0]
        alpha = e.softmax(dim=-1)
        if config == "tiny_hard":  # the most likely location, one-hot
            expected_weights = torch.nn.functional.one_hot(alpha.argmax(-1), a.shape[1]).float()
        else:
            expected_weights = alpha
        torch.testing.assert_close(weights, expected_weights)
        torch.testing.assert_close(attention, weights, rtol=0, atol=0)
        assert ((0 < beta) & (beta < 1)).all() and beta.shape == (3, 1) and beta.std() > 0
        torch.testing.assert_close(z, beta * (expected_weights.unsqueeze(-1) * a).sum(1))
        # The LSTM reads [E y_{t-1}; z_t]; eq. 7's deep output reads E y_{t-1}, h_t and z_t.
        embedded = model.embed(tokens)
        want_h, want_c = model.lstm(torch.cat([embedded, z], -1), (h, c))
        torch.testing.assert_close((next_h, next_c), (want_h, want_c))
        torch.testing.assert_close(
            logits, model.out_proj(embedded + model.out_hidden(want_h) + model.out_context(z)))


@pytest.mark.parametrize("config", ["tiny", "tiny_hard"])
def test_attention_is_a_distribution_over_locations(config):
    model = create_model("show_attend_tell", config)
    with torch.inference_mode():
        a, keys, h, c = model.encode(torch.from_numpy(images(4, config, seed=1)))
        for token in (1, 9, 30):
            _, h, c, attention = model.step(torch.full((4,), token), a, keys, h, c)
            assert attention.shape == (4, 16)  # the tiny grid: 64 px / 16 = 4 x 4
            torch.testing.assert_close(attention.sum(-1), torch.ones(4))
            if config == "tiny_hard":
                assert set(attention.unique().tolist()) <= {0.0, 1.0}
            else:
                assert (attention > 0).all()


@pytest.mark.parametrize("config", ["tiny", "tiny_hard"])
def test_the_whole_graph_equals_stepping_the_parts(config):
    model = create_model("show_attend_tell", config)
    parts = model.export_parts()
    encoder, step = parts["encoder"][0], parts["decoder_step"][0]
    x = torch.from_numpy(images(3, config, seed=2))
    tgt = torch.tensor([[1, 5, 9, 2, 0], [1, 30, 4, 4, 12], [1, 7, 7, 7, 2]])
    with torch.inference_mode():
        whole = model(x, tgt)
        annotations, keys, hidden, cell = encoder(x)
        stepped = []
        for i in range(tgt.shape[1]):
            logits, hidden, cell, _ = step(tgt[:, i], annotations, keys, hidden, cell)
            stepped.append(logits)
    torch.testing.assert_close(whole, torch.stack(stepped, 1), rtol=0, atol=0)


def test_an_unknown_attention_kind_is_refused():
    with pytest.raises(ValueError, match="'soft' or 'hard', got 'sharp'"):
        create_model("show_attend_tell", attention="sharp")


@pytest.fixture(scope="module")
def hard_export(exported_tiny):
    return exported_tiny("show_attend_tell", "tiny_hard")  # shared with test_seq2seq's export


@pytest.mark.parametrize("batch", [1, 4])
def test_hard_attention_on_onnx_runtime_gives_the_eager_tokens(hard_export, batch):
    assert hard_export.passed
    enc_t, step_t, config = runtime.load_generator(hard_export.out_dir, "torch")
    enc_o, step_o, _ = runtime.load_generator(hard_export.out_dir, "ort")
    feed = {"images": images(batch, "tiny_hard", seed=10 + batch)}
    greedy_t = greedy_search(enc_t, step_t, feed, config)
    greedy_o = greedy_search(enc_o, step_o, feed, config)
    assert [g.tokens for g in greedy_o] == [g.tokens for g in greedy_t]
    assert any(len(g.tokens) > 1 for g in greedy_t), "a degenerate model proves nothing"
    for g in greedy_o:  # one location per word, drawn from the 4 x 4 grid
        weights = np.stack(g.attention)
        assert weights.shape == (len(g.tokens), 16) and (weights.sum(1) == 1).all()
        assert set(np.unique(weights)) <= {0.0, 1.0}
    beam_t = beam_search(enc_t, step_t, feed, config, beam_width=3)
    beam_o = beam_search(enc_o, step_o, feed, config, beam_width=3)
    assert [b.tokens for b in beam_o] == [b.tokens for b in beam_t]
    for b, o in zip(beam_t, beam_o, strict=True):
        assert o.score == pytest.approx(b.score, abs=1e-4)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 1, 64, 64)], ids=["size", "channels"])
def test_the_encoder_refuses_images_of_the_wrong_size_or_channels(hard_export, shape):
    encoder, _, _ = runtime.load_generator(hard_export.out_dir, "ort")
    with pytest.raises(InputError, match=re.escape(f"images has shape {shape}, expected (batch, 3, 64, 64)")):
        encoder.run({"images": np.zeros(shape, np.float32)})
