"""PDAN: the DAL computes its formula over the dilated kernel {t - r, t, t + r} (both
border rules, per-channel and multi-head), a change at one frame reaches exactly the
frames the kernel and the pyramid say, the paper's network is built, clips of any length
export and run, bad inputs are refused, and the numpy post-processing turns hand-made
scores into the segments they hold."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import InputError
from attnserve.models import create_model, get_entry, get_spec
from attnserve.models.pdan import CONFIGS, PDAN, DilatedAttentionLayer
from attnserve.postprocess_pdan import Segment, detect, frame_scores, segments


def _dal(dilation: int, border: str, num_heads: int | None = None, dim: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return DilatedAttentionLayer(dim, dilation, 3, num_heads, border).double().eval()


def _dal_reference(dal: DilatedAttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """DAL(f)_t = sum_i softmax_i(q_t . k_i) v_i over the taps i = t - r, t, t + r, head by
    head, frame by frame; a tap outside the clip is a zero frame (k = v = 0, logit 0) with
    border "zeros" and is left out with "exclude"."""
    q, k, v = (torch.einsum("oc,bct->bot", conv.weight[:, :, 0], x)
               for conv in (dal.query_conv, dal.key_conv, dal.value_conv))
    B, d, T = x.shape
    hd = dal.head_dim
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(dal.num_heads):
                ch = slice(h * hd, (h + 1) * hd)
                logits, values = [], []
                for tap in (t - dal.dilation, t, t + dal.dilation):
                    if 0 <= tap < T:
                        logits.append(q[b, ch, t] @ k[b, ch, tap])  # unscaled
                        values.append(v[b, ch, tap])
                    elif dal.border == "zeros":
                        logits.append(torch.zeros((), dtype=x.dtype))
                        values.append(torch.zeros(hd, dtype=x.dtype))
                weights = torch.stack(logits).softmax(0)
                out[b, ch, t] = sum(w * val for w, val in zip(weights, values, strict=True))
    return out


@pytest.mark.parametrize("num_heads", [None, 2], ids=["per_channel", "two_heads"])
@pytest.mark.parametrize("border", ["zeros", "exclude"])
@pytest.mark.parametrize("dilation", [1, 3, 8])
def test_dal_is_attention_over_the_dilated_kernel(dilation, border, num_heads):
    """Dilation 8 on 7 frames leaves only the centre tap inside the clip."""
    dal = _dal(dilation, border, num_heads)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    with torch.inference_mode():
        got = dal(x)
    torch.testing.assert_close(got, _dal_reference(dal, x), rtol=1e-12, atol=1e-12)
    assert dal.num_heads == (4 if num_heads is None else 2)


def _changed_frames(a: torch.Tensor, b: torch.Tensor, frame_axis: int) -> set[int]:
    axes = tuple(i for i in range(a.dim()) if i != frame_axis)
    return set(torch.nonzero((a != b).any(dim=axes)).flatten().tolist())


@pytest.mark.parametrize("border", ["zeros", "exclude"])
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_dal_at_rate_r_mixes_only_frames_t_minus_r_t_t_plus_r(dilation, border):
    """A change at frame s reaches the outputs at s - r, s and s + r and nowhere else: the
    frames whose kernel holds s."""
    dal = _dal(dilation, border)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 20, dtype=torch.float64)
    for s in (9, 2, 19):
        y = x.clone()
        y[:, :, s] += 1.0
        with torch.inference_mode():
            changed = _changed_frames(dal(x), dal(y), frame_axis=2)
        assert changed == {t for t in (s - dilation, s, s + dilation) if 0 <= t < 20}, s


def test_borders_differ_only_where_a_tap_leaves_the_clip():
    zeros, exclude = _dal(4, "zeros"), _dal(4, "exclude")
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    with torch.inference_mode():
        a, b = zeros(x), exclude(x)
    assert _changed_frames(a, b, frame_axis=2) == set(range(4)) | set(range(12, 16))


@pytest.mark.parametrize("border", ["zeros", "exclude"])
def test_the_pyramid_reaches_31_frames_each_way(border):
    """Rates 1, 2, 4, 8, 16: every offset in [-31, 31] is a sum of +-rates, so a change
    at frame s reaches every frame within 31 of s (with weights in general position) and
    none beyond."""
    model = create_model("pdan", border=border).double()
    assert model.cfg.dilations == (1, 2, 4, 8, 16) and model.cfg.receptive_field == 63
    torch.manual_seed(3)
    x = torch.randn(1, 90, 64, dtype=torch.float64)
    for s in (45, 0):
        y = x.clone()
        y[:, s] += 1.0
        with torch.inference_mode():
            changed = _changed_frames(model(x), model(y), frame_axis=1)
        assert changed == {t for t in range(90) if abs(t - s) <= 31}, s


def test_blocks_are_dal_relu_conv_dropout_residual():
    model = create_model("pdan").double()
    block = model.layers[2]
    x = torch.randn(2, 32, 11, dtype=torch.float64)
    with torch.inference_mode():
        want = x + block.conv_1x1(torch.relu(block.conv_attention(x)))  # dropout: identity in eval
        torch.testing.assert_close(block(x), want, rtol=0, atol=0)
    assert block.conv_attention.dilation == 4 and block.dropout.p == 0.5
    assert [b.conv_attention.dilation for b in model.layers] == [1, 2, 4, 8, 16]


def test_paper_network():
    """Charades: 1024-d I3D features -> 1x1 to d = 512, 5 blocks, 157 classes; the DAL's
    q, k, v are bias-free 1x1 convolutions with one head per channel."""
    with torch.device("meta"):
        model = PDAN(CONFIGS["charades"])
    assert (model.conv_1x1.in_channels, model.conv_1x1.out_channels) == (1024, 512)
    assert len(model.layers) == 5 and model.conv_out.out_channels == 157
    dal = model.layers[4].conv_attention
    assert dal.dilation == 16 and dal.num_heads == 512 and dal.head_dim == 1 and dal.border == "zeros"
    assert all(c.bias is None and c.kernel_size == (1,) for c in (dal.query_conv, dal.key_conv, dal.value_conv))
    d = 512
    per_block = 3 * d * d + (d * d + d)  # q, k, v; the block's 1x1 convolution
    assert sum(p.numel() for p in model.parameters()) == (1024 * d + d) + 5 * per_block + (d * 157 + 157)
    assert CONFIGS["multithumos"].num_classes == 65 and CONFIGS["tsu"].num_classes == 51
    assert get_entry("pdan").custom_ops == ("WindowAttention",)


def test_spec_has_a_dynamic_frame_axis():
    spec = get_spec("pdan")
    assert spec.task == "temporal-action-detection"
    assert spec.inputs[0].name == "features" and spec.inputs[0].shape == ("batch", "frames", 64)
    assert spec.outputs[0].shape == ("batch", "frames", 10) and spec.default_dims == {"frames": 40}
    assert get_spec("pdan", "charades").inputs[0].shape == ("batch", "frames", 1024)


def test_clips_of_other_lengths_run_on_onnx_runtime(exported_tiny):
    """Exported at 40 frames; one frame (every tap but the centre beyond the clip), 5
    frames (shorter than the largest rate) and 97 frames run with parity."""
    result = exported_tiny("pdan")
    spec = get_spec("pdan")
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        for frames, batch in ((1, 1), (5, 2), (97, 3)):
            feed = spec.example_inputs(batch, seed=frames, frames=frames)
            report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
            assert report.passed, (frames, report.failures())
            assert report.outputs[0].shape == (batch, frames, 10)
            assert report.outputs[0].max_abs_error < 1e-5  # measured 5e-7 at 97 frames


def test_bad_inputs_are_refused():
    model = create_model("pdan")
    with pytest.raises(InputError, match=r"\(batch, frames, 64\), got \(1, 40, 32\)"):
        model(torch.randn(1, 40, 32))
    with pytest.raises(InputError, match=r"\(batch, frames, 64\), got \(40, 64\)"):
        model(torch.randn(40, 64))
    with pytest.raises(InputError, match="at least one frame"):
        model(torch.randn(1, 0, 64))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        create_model("pdan", kernel_size=4)
    with pytest.raises(ValueError, match="border must be one of"):
        create_model("pdan", border="reflect")
    with torch.inference_mode():  # a one-frame clip is a clip
        assert model(torch.randn(2, 1, 64)).shape == (2, 1, 10)


# Post-processing


def test_frame_scores_are_the_sigmoid_of_every_logit():
    logits = np.array([[[0.0, 2.0, -2.0, 1000.0, -1000.0]]], dtype=np.float32)
    scores = frame_scores(logits)
    assert scores.dtype == np.float32 and scores.shape == logits.shape
    np.testing.assert_allclose(scores[0, 0], [0.5, 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2)), 1.0, 0.0],
                               rtol=1e-6)
    # Multi-label: independent per class, no normalisation over classes.
    assert scores[0, 0, :3].sum() == pytest.approx(1.5)


def test_segments_of_hand_made_scores():
    # 8 frames, 3 classes: class 0 runs over frames 1-3 (0.5 counts: the threshold is
    # inclusive) and again at 6-7 (to the end of the clip); class 1 covers the whole clip
    # at once with class 0 (multi-label); class 2 only touches the threshold from below.
    scores = np.array([
        [0.1, 0.9, 0.49],
        [0.5, 0.8, 0.2],
        [0.9, 0.7, 0.2],
        [0.7, 0.6, 0.2],
        [0.2, 0.6, 0.2],
        [0.3, 0.7, 0.2],
        [0.8, 0.8, 0.2],
        [0.6, 0.9, 0.2],
    ], dtype=np.float32)
    found = segments(scores, 0.5, labels=("walk", "hold cup", "sit"))
    assert [(s.start, s.end, s.class_id, s.label) for s in found] == [
        (0, 8, 1, "hold cup"), (1, 4, 0, "walk"), (6, 8, 0, "walk")]
    assert found[0].score == pytest.approx(np.mean(scores[:, 1], dtype=np.float64))
    assert found[1].score == pytest.approx((0.5 + 0.9 + 0.7) / 3)
    assert found[2].score == pytest.approx(0.7)
    # min_frames drops the 2-frame run; a higher threshold splits class 1.
    assert [(s.start, s.end, s.class_id) for s in segments(scores, 0.5, min_frames=3)] == [(0, 8, 1), (1, 4, 0)]
    assert [(s.start, s.end, s.class_id) for s in segments(scores, 0.75)] == [
        (0, 2, 1), (2, 3, 0), (6, 7, 0), (6, 8, 1)]
    assert segments(scores, 1.0) == [] and segments(np.zeros((0, 3), np.float32)) == []
    assert segments(np.ones((1, 1), np.float32)) == [Segment(0, 1, 0, 1.0)]


def test_detect_runs_every_video_of_a_batch():
    logits = np.full((2, 5, 2), -4.0, dtype=np.float32)
    logits[0, 1:3, 1] = 3.0
    logits[1, 4, 0] = 0.0  # sigmoid 0.5: at the threshold
    found = detect(logits)
    assert [[(s.start, s.end, s.class_id) for s in video] for video in found] == [[(1, 3, 1)], [(4, 5, 0)]]
    assert found[0][0].score == pytest.approx(1 / (1 + np.exp(-3.0)))


def test_detect_on_the_model_output():
    """The model's logits go straight in: every segment lies inside the clip."""
    model = create_model("pdan")
    with torch.inference_mode():
        logits = model(torch.randn(2, 30, 64)).numpy()
    found = detect(logits, threshold=0.5)
    scores = frame_scores(logits)
    assert len(found) == 2
    for video, segs in enumerate(found):
        assert sum(s.end - s.start for s in segs) == int((scores[video] >= 0.5).sum())
        assert all(0 <= s.start < s.end <= 30 and s.score >= 0.5 for s in segs)


def test_post_processing_refuses_bad_arguments():
    scores = np.full((4, 2), 0.5, dtype=np.float32)
    with pytest.raises(InputError, match=r"shape \(frames, classes\).*use detect"):
        segments(scores[None])
    with pytest.raises(InputError, match="scores in \\[0, 1\\].*frame_scores"):
        segments(scores * 3)
    with pytest.raises(InputError, match="threshold must lie in"):
        segments(scores, 0.0)
    with pytest.raises(InputError, match="min_frames must be an integer >= 1"):
        segments(scores, min_frames=0)
    with pytest.raises(InputError, match="3 labels for 2 classes"):
        segments(scores, labels=("a", "b", "c"))
    with pytest.raises(InputError, match=r"\(batch, frames, classes\)"):
        detect(scores)


def test_post_processing_needs_no_torch():
    code = "import sys, attnserve.postprocess_pdan; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
