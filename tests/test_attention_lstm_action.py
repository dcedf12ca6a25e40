"""attention_lstm_action: the recurrence is the paper's (eq. 1-5, sec. 2.3, the averaged
predictions of sec. 3.2) against a step-by-step reference, the attention of a frame comes
from the previous hidden state only, the exported graph is one Scan that takes clips of
any length, and the trunk is torchvision's GoogLeNet."""

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import CheckpointError, InputError
from attnserve.models import create_model, get_spec
from attnserve.models.attention_lstm_action import CONFIGS, GoogLeNetTrunk, googlenet_grid

NAME = "attention_lstm_action"
ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def _features(cfg, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, cfg.grid_size**2, cfg.feature_dim, generator=g, dtype=torch.float64) * 2


def _reference(model, features: torch.Tensor):
    """Eq. 1-5 step by step with the modules' own calls (nn.LSTMCell, nn.Linear) and
    explicit sums over locations -> the per-step class probabilities (T, B, C) and the
    attention (T, B, K*K)."""
    cfg = model.cfg
    B, T, L, D = features.shape
    u = features.mean(dim=(1, 2))  # sec. 2.3: mean over frames and locations
    u = model.init_mlp(u)
    h = [torch.tanh(f(u)) for f in model.init_hidden]
    c = [torch.tanh(f(u)) for f in model.init_cell]
    probs, attention = [], []
    for t in range(T):
        logits_l = model.locate(h[-1])  # W_i^T h_{t-1} for every i
        l_t = torch.exp(logits_l) / torch.exp(logits_l).sum(dim=-1, keepdim=True)  # eq. 4
        x = sum(l_t[:, i:i + 1] * features[:, t, i] for i in range(L))  # eq. 5
        for n, cell in enumerate(model.cells):
            h[n], c[n] = cell(x, (h[n], c[n]))  # eq. 1-3
            x = h[n]
        z = model.classifier(torch.tanh(model.out_hidden(h[-1])))
        probs.append(torch.sigmoid(z) if cfg.multi_label else torch.softmax(z, dim=-1))
        attention.append(l_t)
    return torch.stack(probs), torch.stack(attention)


@pytest.mark.parametrize("config", ["tiny", "tiny_multilabel"])
def test_recurrence_is_the_papers(config):
    model = create_model(NAME, config).double()
    features = _features(model.cfg, 2, 5)
    with torch.inference_mode():
        logits, attention = model.classify_features(features)
        probs, want_attention = _reference(model, features)
    K = model.cfg.grid_size
    torch.testing.assert_close(attention, want_attention.transpose(0, 1).unflatten(-1, (K, K)), rtol=1e-10,
                               atol=1e-12)
    # Sec. 3.2: the clip's prediction is the average of the per-step predictions; the
    # logits are chosen so that softmax (sigmoid for multi-label) gives it back exactly.
    mean = probs.mean(dim=0)
    got = torch.sigmoid(logits) if model.cfg.multi_label else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(got, mean, rtol=1e-10, atol=1e-12)
    assert (probs.std(dim=0) > 1e-6).any(), "the steps predict differently: a real average"


def test_attention_is_a_distribution_over_the_grid_of_every_frame():
    model = create_model(NAME)
    spec = get_spec(NAME)
    video = torch.from_numpy(spec.example_inputs(2, frames=3)["video"])
    with torch.inference_mode():
        logits, attention = model(video)
    K = googlenet_grid(96)
    assert K == 3 and attention.shape == (2, 3, K, K) and logits.shape == (2, 5)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(-1, -2)), torch.ones(2, 3), rtol=0, atol=1e-6)
    assert (attention[0] - attention[1]).abs().max() > 1e-3, "the frames' features reach the attention"


def test_a_frames_attention_comes_from_the_previous_hidden_state():
    """Eq. 4 reads h_{t-1}: permuting the last frame's locations (which keeps the mean that
    initialises the LSTM) leaves every frame's attention alone but changes the prediction."""
    model = create_model(NAME).double()
    features = _features(model.cfg, 1, 4, seed=3)
    permuted = features.clone()
    permuted[:, -1] = features[:, -1].flip(1)
    with torch.inference_mode():
        logits, attention = model.classify_features(features)
        logits_p, attention_p = model.classify_features(permuted)
    torch.testing.assert_close(attention_p, attention, rtol=0, atol=1e-12)  # the mean's summation order
    assert (logits_p - logits).abs().max() > 1e-9


def test_forward_is_the_recurrence_on_the_trunks_feature_slices():
    model = create_model(NAME)
    video = torch.randn(2, 3, 3, 96, 96)
    with torch.inference_mode():
        maps = model.trunk(video.flatten(0, 1))  # (6, 128, 3, 3)
        slices = maps.flatten(2).transpose(1, 2).reshape(2, 3, 9, 128)  # row-major locations
        want = model.classify_features(slices)
        got = model(video)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.fixture(scope="module")
def exported(exported_tiny):
    return exported_tiny(NAME)


def test_export_is_one_scan_over_the_frames(exported):
    graph = onnx.load(str(exported.onnx_path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Scan") == 1, "the recurrence is a loop in the graph, not unrolled"
    assert "LSTM" not in ops
    video = graph.input[0].type.tensor_type.shape.dim
    assert video[0].dim_param and video[1].dim_param and not video[1].dim_value, "frames is dynamic"


@pytest.mark.parametrize(("frames", "batch"), [(1, 2), (9, 3)])
def test_clips_of_other_lengths_match_eager(exported, frames, batch):
    """Exported with clips of 4 frames; 1 and 9 frames run and match."""
    spec = get_spec(NAME)
    feed = spec.example_inputs(batch, seed=frames, frames=frames)
    with runtime.load(exported.out_dir, "ort") as ort, runtime.load(exported.out_dir, "torch") as eager:
        want, got = eager.run(feed), ort.run(feed)
    report = compare_outputs(want, got, spec.tolerance("fp32"))
    assert report.passed, report.failures()
    assert got["attention"].shape == (batch, frames, 3, 3)
    # Measured: logits within 1.2e-7 and attention within 5e-8 of eager (fp32, 1 and 9 frames).
    assert report.outputs[0].max_abs_error < 1e-5


def test_spec_and_paper_configs():
    spec = get_spec(NAME)
    assert spec.input_names == ["video"] and spec.output_names == ["logits", "attention"]
    assert spec.inputs[0].shape == ("batch", "frames", 3, 96, 96)
    assert spec.outputs[1].shape == ("batch", "frames", 3, 3) and spec.default_dims == {"frames": 4}
    assert spec.preprocessing["num_frames"] == 4 and spec.preprocessing["layout"] == "NTCHW"
    # Sec. 3.2: 3-layer LSTMs of 512 (UCF-11, Hollywood2) and 1024 (HMDB-51), 30 frames;
    # GoogLeNet's 7 x 7 x 1024 cube at 224 x 224 (sec. 2.1).
    for config, classes, hidden in (("ucf11", 11, 512), ("hmdb51", 51, 1024), ("hollywood2", 12, 512)):
        cfg = CONFIGS[config]
        assert (cfg.num_classes, cfg.hidden_dim, cfg.num_layers, cfg.num_frames) == (classes, hidden, 3, 30)
        assert (cfg.grid_size, cfg.feature_dim) == (7, 1024)
        assert get_spec(NAME, config).outputs[1].shape == ("batch", "frames", 7, 7)
    assert CONFIGS["hollywood2"].multi_label and not CONFIGS["ucf11"].multi_label


def test_wrong_inputs_say_what_is_expected():
    model = create_model(NAME)
    with pytest.raises(InputError, match=r"video of shape \(batch, frames, 3, 96, 96\), got \(1, 2, 3, 64, 64\)"):
        model(torch.zeros(1, 2, 3, 64, 64))
    with pytest.raises(InputError, match=r"features must have shape \(batch, frames, 9, 128\)"):
        model.classify_features(torch.zeros(1, 2, 9, 64))
    with pytest.raises(InputError, match="at least one frame, got 0"):
        model(torch.zeros(1, 0, 3, 96, 96))
    with pytest.raises(CheckpointError, match="not a torchvision GoogLeNet state dict"):
        model.load_trunk({"conv1.conv.weight": torch.zeros(8, 3, 7, 7)})
    with pytest.raises(CheckpointError, match=r"do not fit this trunk \(trunk_width_divisor 8\)"):
        model.load_trunk(GoogLeNetTrunk().state_dict())  # full width into the 1/8-width tiny


# torchvision's GoogLeNet with random weights (BN statistics included), its weights and
# its inception5b output on a batch; run in the reference environment (torchvision does
# not load beside torch 2.13 here).
_GOOGLENET_REFERENCE = """
import sys, numpy as np, torch, torchvision
from safetensors.torch import save_file
torch.manual_seed(0)
model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False).eval()
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
out = {}
model.inception5b.register_forward_hook(lambda mod, i, o: out.setdefault("features", o))
images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    model(images)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1] + "/googlenet.safetensors")
np.savez(sys.argv[1] + "/googlenet.npz", images=images.numpy(), features=out["features"].numpy())
"""


@pytest.mark.reference
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="no .venv-ref: run `make reference-env`")
def test_torchvision_googlenet_loads_into_the_trunk(tmp_path):
    from safetensors.torch import load_file

    subprocess.run([str(REF_PYTHON), "-c", _GOOGLENET_REFERENCE, str(tmp_path)], check=True,
                   capture_output=True, text=True)
    state = load_file(str(tmp_path / "googlenet.safetensors"))
    assert any(k.startswith("aux1.") for k in state) and "fc.weight" in state
    model = create_model(NAME, "ucf11")
    model.load_trunk(state)  # drops fc and the auxiliary heads
    data = np.load(tmp_path / "googlenet.npz")
    with torch.inference_mode():
        got = model.trunk(torch.from_numpy(data["images"])).numpy()
    assert got.shape == (2, 1024, 7, 7)
    assert np.abs(data["features"]).max() > 0.1, "a degenerate reference proves nothing"
    np.testing.assert_allclose(got, data["features"], rtol=0, atol=1e-4 * np.abs(data["features"]).max())


def test_trunk_names_are_torchvisions():
    """The parameter names torchvision's GoogLeNet has (without fc and aux heads), so its
    state dicts load by name: a few written out."""
    names = set(GoogLeNetTrunk().state_dict())
    assert {"conv1.conv.weight", "conv1.bn.running_var", "inception3a.branch2.1.conv.weight",
            "inception4e.branch4.1.bn.weight", "inception5b.branch3.0.conv.weight"} <= names
    assert len([n for n in names if n.endswith(".conv.weight")]) == 57
