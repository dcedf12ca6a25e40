"""Separable STA: the attention weights are distributions over m x n and over t, driven by
the poses alone; alpha weighs locations and beta time steps of the feature map as the
formula says; the pose LSTM is nn.LSTM's computation; the paper's configuration is
built; pose sequences of any length export and run; mismatched inputs are refused."""

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import InputError
from attnserve.imaging import top_k
from attnserve.models import create_model, get_spec
from attnserve.models.separable_sta import CONFIGS, SeparableSTA

T, M, N, C = 4, 3, 3, 32  # the tiny config's feature map


def _inputs(batch: int = 2, frames: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, C, T, M, N, generator=g, dtype=torch.float64),
            torch.randn(batch, frames, 13, 3, generator=g, dtype=torch.float64))


def _model():
    return create_model("separable_sta").double()


def test_attention_weights_are_distributions_over_their_axes():
    model = _model()
    features, skeleton = _inputs(3)
    with torch.inference_mode():
        _, alpha, beta = model(features, skeleton)
    assert alpha.shape == (3, M, N) and beta.shape == (3, T)
    assert (alpha > 0).all() and (beta > 0).all()
    torch.testing.assert_close(alpha.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(beta.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.allclose(alpha[0], alpha[1]), "each clip's poses give its own weights"


def test_the_poses_alone_drive_the_attention():
    model = _model()
    features, skeleton = _inputs()
    other_features, other_skeleton = _inputs(seed=1)
    with torch.inference_mode():
        logits, alpha, beta = model(features, skeleton)
        logits2, alpha2, beta2 = model(other_features, skeleton)
        _, alpha3, beta3 = model(features, other_skeleton)
    assert torch.equal(alpha, alpha2) and torch.equal(beta, beta2)
    assert not torch.equal(logits, logits2)
    assert not torch.allclose(alpha, alpha3) and not torch.allclose(beta, beta3)


def _pooled(model: SeparableSTA, features, skeleton) -> torch.Tensor:
    """The classifier's input, caught by a hook: [GAP(g_s); GAP(g_t)], (B, 2c)."""
    caught = []
    handle = model.classifier.register_forward_hook(lambda m, args, out: caught.append(args[0]))
    with torch.inference_mode():
        model(features, skeleton)
    handle.remove()
    return caught[0]


def test_alpha_weighs_locations_and_beta_time_steps():
    """A feature map that is zero but for one (t0, i0, j0) location: the spatially
    attended map pools to alpha[i0, j0] times it, the temporally attended one to beta[t0]
    times it (GAP over t m n), whatever the other weights are."""
    model = _model()
    _, skeleton = _inputs(1)
    with torch.inference_mode():
        _, alpha, beta = model(torch.zeros(1, C, T, M, N, dtype=torch.float64), skeleton)
    value = torch.linspace(-1, 1, C, dtype=torch.float64)
    for t0, i0, j0 in ((0, 0, 0), (3, 1, 2), (2, 2, 0)):
        features = torch.zeros(1, C, T, M, N, dtype=torch.float64)
        features[0, :, t0, i0, j0] = value
        pooled = _pooled(model, features, skeleton)[0]
        torch.testing.assert_close(pooled[:C], alpha[0, i0, j0] * value / (T * M * N), rtol=1e-12, atol=0)
        torch.testing.assert_close(pooled[C:], beta[0, t0] * value / (T * M * N), rtol=1e-12, atol=0)


def test_logits_are_the_classifier_of_both_attended_maps():
    model = _model()
    features, skeleton = _inputs()
    with torch.inference_mode():
        logits, alpha, beta = model(features, skeleton)
    g_s = torch.einsum("bctmn,bmn->bc", features, alpha) / (T * M * N)
    g_t = torch.einsum("bctmn,bt->bc", features, beta) / (T * M * N)
    want = torch.cat([g_s, g_t], dim=1) @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(logits, want, rtol=1e-12, atol=1e-12)


def test_pose_encoding_is_the_last_hidden_state_of_the_3_layer_lstm():
    """attnserve::lstm_layer, layer by layer, against nn.LSTM's own forward; and the
    attention heads read h* as written: softmax(W2 tanh(W1 h* + b1) + b2)."""
    model = _model()
    attention = model.attention
    _, skeleton = _inputs(frames=11)
    with torch.inference_mode():
        h = attention.encode(skeleton)
        _, (h_n, _) = attention.lstm(skeleton.flatten(2))
        torch.testing.assert_close(h, h_n[-1], rtol=1e-12, atol=1e-12)
        assert attention.lstm.num_layers == 3 and attention.lstm.input_size == 13 * 3
        alpha, beta = attention(skeleton)
        s1, _, s2 = attention.spatial
        want = (s2(torch.tanh(s1(h)))).softmax(-1).reshape(-1, M, N)
        torch.testing.assert_close(alpha, want, rtol=1e-12, atol=1e-12)
        t1, _, t2 = attention.temporal
        torch.testing.assert_close(beta, t2(torch.tanh(t1(h))).softmax(-1), rtol=1e-12, atol=1e-12)


def test_paper_configuration():
    """Toyota Smarthome: I3D Mixed_5c of a 64-frame 224 x 224 clip (8 x 7 x 7 x 1024),
    13 LCR-Net joints, a 3-layer LSTM of 512 units, 31 classes."""
    with torch.device("meta"):
        model = SeparableSTA(CONFIGS["smarthome"])
    lstm = model.attention.lstm
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers) == (39, 512, 3)
    assert model.attention.spatial[-1].out_features == 49 and model.attention.temporal[-1].out_features == 8
    assert (model.classifier.in_features, model.classifier.out_features) == (2 * 1024, 31)
    spec = get_spec("separable_sta", "smarthome")
    assert spec.inputs[0].shape == ("batch", 1024, 8, 7, 7)
    assert spec.inputs[1].shape == ("batch", "frames", 13, 3) and spec.default_dims == {"frames": 64}
    assert [t.name for t in spec.outputs] == ["logits", "spatial_attention", "temporal_attention"]


def test_pose_sequences_of_other_lengths_run_on_onnx_runtime(exported_tiny):
    """Exported with 16 poses per clip; 4 (one per feature step), 9 and 50 run with parity,
    and the clip's top-k (attnserve.imaging.top_k, the video clients') agrees."""
    result = exported_tiny("separable_sta")
    spec = get_spec("separable_sta")
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        for frames, batch in ((4, 1), (9, 2), (50, 3)):
            feed = spec.example_inputs(batch, seed=frames, frames=frames)
            want, got = ref.run(feed), ort.run(feed)
            report = compare_outputs(want, got, spec.tolerance("fp32"))
            assert report.passed, (frames, report.failures())
            # Small logits at init (pooled maps of N(0, 1) features): direction too.
            assert all(o.cosine_similarity > 0.99999 for o in report.outputs)
            np.testing.assert_allclose(got["temporal_attention"].sum(-1), 1, rtol=1e-6)
            assert np.array_equal(top_k(got["logits"], 3)[1], top_k(want["logits"], 3)[1])


def test_mismatched_inputs_are_refused():
    model = create_model("separable_sta")
    features, skeleton = (x.float() for x in _inputs(2))
    with pytest.raises(InputError, match=r"\(batch, 32, 4, 3, 3\) \(batch, c, t, m, n\), got \(2, 4, 3, 3, 32\)"):
        model(features.permute(0, 2, 3, 4, 1), skeleton)  # channels last
    with pytest.raises(InputError, match=r"\(batch, frames, 13, 3\), got \(2, 16, 17, 3\)"):
        model(features, torch.randn(2, 16, 17, 3))
    with pytest.raises(InputError, match="2 feature maps but 1 pose sequences"):
        model(features, skeleton[:1])
    with pytest.raises(InputError, match="3 frames but the feature map 4 steps"):
        model(features, skeleton[:, :3])
    with torch.inference_mode():  # one pose per feature step is enough
        assert model(features, skeleton[:, :4])[0].shape == (2, 10)
