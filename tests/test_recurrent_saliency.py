"""RACDNN: the spatial transformer reads the sub-region theta names and writes the refined
features back there and nowhere else, the recurrence is the one the model file states,
the VGG-16 conv-deconv trunk has the paper's layers, and numpy turns the outputs into
masks and boxes.

The tiny config's export with parity (custom ops and standard ops only, fp32 and fp16) is
test_export.py's; here the graph's sampler nodes and a batch size the export did not
check are.
"""

import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import InputError
from attnserve.models import create_model, get_spec
from attnserve.models.layers.lstm_step import lstm_step
from attnserve.models.recurrent_saliency import (
    CONFIGS,
    VGG16,
    attention_theta,
    inverse_attention_theta,
    read_region,
    write_region,
)
from attnserve.postprocess_saliency import region_boxes, saliency_mask

NAME = "recurrent_saliency"
TINY = CONFIGS["tiny"]


def _images(batch: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32))


def _theta(scale: float, x: float, y: float, batch: int = 1) -> torch.Tensor:
    one = torch.ones(batch)
    return attention_theta(scale * one, x * one, y * one)


def _interpolation(centre: float, step: float, width: int, size: int) -> np.ndarray:
    """(width, size): bilinear weights of `width` samples `step` pixels apart centred on
    the pixel-centre coordinate `centre`, zero for pixels outside the map."""
    positions = centre + (np.arange(width) - (width - 1) / 2) * step
    m = np.zeros((width, size))
    low = np.floor(positions).astype(int)
    for i, (lo, f) in enumerate(zip(low, positions - low, strict=True)):
        if 0 <= lo < size:
            m[i, lo] += 1 - f
        if 0 <= lo + 1 < size:
            m[i, lo + 1] += f
    return m


def test_spec_images_in_saliency_and_regions_out():
    spec = get_spec(NAME)
    assert spec.task == "salient-object-detection"
    assert [(t.name, t.shape) for t in spec.inputs] == [("images", ("batch", 3, 32, 32))]
    assert [(t.name, t.shape) for t in spec.outputs] == [("saliency", ("batch", 1, 32, 32)),
                                                         ("theta", ("batch", 3, 2, 3))]
    assert spec.preprocessing["resize"] == spec.preprocessing["image_size"] == 32
    standard = get_spec(NAME, "vgg16")
    assert standard.inputs[0].shape == ("batch", 3, 224, 224)
    assert standard.outputs[1].shape == ("batch", CONFIGS["vgg16"].iterations, 2, 3)


def test_identity_theta_reads_and_writes_the_whole_map():
    features = torch.randn(2, 5, 16, 16)
    region = torch.randn(2, 5, 16, 16)
    identity = _theta(1.0, 0.0, 0.0, batch=2)
    # The grid's float32 coordinates are off the pixel centres by ~1e-6 pixel (3e-6 measured).
    torch.testing.assert_close(read_region(features, identity, 16), features, atol=1e-5, rtol=0)
    torch.testing.assert_close(write_region(features, region, identity), region, atol=1e-5, rtol=0)
    torch.testing.assert_close(inverse_attention_theta(identity), identity)


def test_inverse_theta_undoes_theta():
    theta = attention_theta(torch.tensor([0.3, 0.9]), torch.tensor([-0.4, 0.2]), torch.tensor([0.7, -0.1]))
    def homogeneous(t):
        return torch.cat([t, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(t.shape[0], 1, 3)], dim=1)
    product = homogeneous(theta) @ homogeneous(inverse_attention_theta(theta))
    torch.testing.assert_close(product, torch.eye(3).expand(2, 3, 3))


def test_a_quadrant_is_read_as_the_crop_and_written_back_only_there():
    """s = 1/2 at centre (-1/2, -1/2) is the top-left quadrant: read at its own size it is
    the crop; magnified x2 it is the bilinear interpolation of the crop; written back, the
    quadrant holds the region (2 x 2 means of the magnified one) and the rest is untouched."""
    features = torch.randn(1, 4, 16, 16)
    theta = _theta(0.5, -0.5, -0.5)
    torch.testing.assert_close(read_region(features, theta, 8), features[..., :8, :8], atol=1e-5, rtol=0)
    magnified = read_region(features, theta, 16)[0].numpy()
    # Pixel-centre coordinate 3.5 is the quadrant's centre; samples half a pixel apart.
    m = _interpolation(3.5, 0.5, 16, 16)
    want = np.einsum("ih,chw,jw->cij", m, features[0].numpy(), m)
    np.testing.assert_allclose(magnified, want, atol=1e-5)

    region = torch.randn(1, 4, 16, 16)
    written = write_region(features, region, theta)
    torch.testing.assert_close(written[..., :8, :8], F.avg_pool2d(region, 2), atol=1e-5, rtol=0)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:8, :8] = False
    assert torch.equal(written[..., outside], features[..., outside])


def _forced(model, scale_logit: float, x: float, y: float):
    """Make the emission network name one region whatever the state."""
    with torch.no_grad():
        model.attention.emission.weight.zero_()
        model.attention.emission.bias.copy_(torch.tensor([scale_logit, math.atanh(x), math.atanh(y)]))
    return model


def test_refinement_changes_the_saliency_only_around_the_attended_region():
    """One iteration on the top-left quadrant of the 16 x 16 refined map: the map's
    features change there only, so the saliency (after one more x2 deconvolution and a
    3 x 3 convolution) equals the plain conv-deconv network's below and right of it."""
    model = _forced(create_model(NAME, iterations=1), 0.0, -0.5, -0.5)
    images = _images(2, seed=1)
    with torch.inference_mode():
        saliency, theta = model(images)
        before = model.refine_features(images)
        after, _ = model.attention(before)
        baseline = model.decode(before)  # the CNN-DecNN alone
    torch.testing.assert_close(theta, _theta(0.5, -0.5, -0.5, batch=2).unsqueeze(1))
    assert torch.equal(after[..., 8:, :], before[..., 8:, :]) and torch.equal(after[..., :, 8:], before[..., :, 8:])
    assert (after[..., :8, :8] - before[..., :8, :8]).abs().max() > 1e-3
    # Map pixel 7 reaches output pixels up to 2 * 7 + 1 + 1 (deconvolution, then 3 x 3).
    assert torch.equal(saliency[..., 17:, :], baseline[..., 17:, :])
    assert torch.equal(saliency[..., :, 17:], baseline[..., :, 17:])
    assert (saliency[..., :16, :16] - baseline[..., :16, :16]).abs().max() > 1e-4


def test_forward_is_the_stated_recurrence():
    model = create_model(NAME)
    ran = model.attention
    images = _images(2, seed=2)
    with torch.inference_mode():
        saliency, theta = model(images)
        features = model.refine_features(images)
        assert features.shape == (2, 16, 16, 16)  # decoder stage 1 of a 32 x 32 image
        r2 = torch.tanh(ran.context(ran.encoder(features)))  # context: the whole map
        r1 = c1 = c2 = torch.zeros_like(r2)
        for t in range(TINY.iterations):
            z = ran.emission(r2)
            want = attention_theta(torch.sigmoid(z[:, 0]), torch.tanh(z[:, 1]), torch.tanh(z[:, 2]))
            torch.testing.assert_close(theta[:, t], want)
            region = read_region(features, want, TINY.glimpse_size)
            r1, c1 = ran.rnn1(ran.encoder(region), (r1, c1))  # torch's own LSTM cells
            r2, c2 = ran.rnn2(r1, (r2, c2))
            state = F.relu(ran.decoder_up(ran.decoder(r1).reshape(2, TINY.hidden_channels, 4, 4)))
            refined = region + ran.refine(torch.cat([region, state], dim=1))
            features = write_region(features, refined, want)
        torch.testing.assert_close(saliency, torch.sigmoid(model.head(model.decoder[2](features))))
    assert not torch.allclose(theta[:, 0], theta[:, 1]), "the regions move from iteration to iteration"


def test_lstm_step_is_torchs_cell():
    cell = torch.nn.LSTMCell(6, 5)
    x, h, c = torch.randn(3, 6), torch.randn(3, 5), torch.randn(3, 5)
    for got, want in zip(lstm_step(cell, x, h, c), cell(x, (h, c)), strict=True):
        torch.testing.assert_close(got, want)


def test_outputs_are_deterministic_per_image():
    model = create_model(NAME)
    images = _images(3, seed=3)
    with torch.inference_mode():
        saliency, theta = model(images)
        again = model(images)
        alone = [model(images[i:i + 1]) for i in range(3)]
    assert torch.equal(again[0], saliency) and torch.equal(again[1], theta)
    assert saliency.min() > 0 and saliency.max() < 1
    for i, (s, th) in enumerate(alone):
        torch.testing.assert_close(s[0], saliency[i])
        torch.testing.assert_close(th[0], theta[i])
    # The scale is in (0, 1) and the transform keeps the attention form.
    assert (theta[..., 0, 0] > 0).all() and (theta[..., 0, 0] < 1).all()
    assert torch.equal(theta[..., 0, 0], theta[..., 1, 1])
    assert (theta[..., 0, 1] == 0).all() and (theta[..., 1, 0] == 0).all()


def test_tiny_export_reads_and_writes_with_the_sampler(exported_tiny):
    result = exported_tiny(NAME)
    graph = onnx.load(str(result.onnx_path), load_external_data=False).graph
    samplers = [n for n in graph.node if n.domain == "attnserve"]
    # A read and a write per iteration; the context reads the whole map without one.
    assert [n.op_type for n in samplers] == ["AffineGridSampler"] * (2 * TINY.iterations)
    assert {tuple(a.ints) for n in samplers for a in n.attribute if a.name == "out_size"} == {(16, 16)}
    spec = get_spec(NAME)
    feed = spec.example_inputs(4, seed=12)
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
    assert report.passed, report.failures()
    assert all(o.max_abs_error < 1e-5 for o in report.outputs), report.summary()


def test_vgg16_config_is_the_conv_deconv_network():
    cfg = CONFIGS["vgg16"]
    assert cfg.encoder == VGG16 and sum(len(b) for b in cfg.encoder) == 13
    # A 64 x 64 image keeps the test quick; the layers are the 224 x 224 model's.
    model = create_model(NAME, "vgg16", img_size=64)
    convs = [m for block in model.encoder for m in block if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size) for m in convs] == [(w, (3, 3)) for b in VGG16 for w in b]
    ups = [m for stage in model.decoder for m in stage if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 5 and all(m.stride == (2, 2) for m in ups)
    with torch.inference_mode():
        features = model.refine_features(_images(1, size=64))
        saliency, theta = model(_images(1, size=64))
    assert features.shape == (1, 128, 16, 16)  # 56 x 56 x 128 at 224
    assert saliency.shape == (1, 1, 64, 64) and theta.shape == (1, cfg.iterations, 2, 3)


def test_saliency_mask():
    saliency = np.array([[[[0.1, 0.6], [0.5, 0.9]]]], dtype=np.float32)
    assert saliency_mask(saliency).tolist() == [[[False, True], [True, True]]]
    assert saliency_mask(saliency[0, 0], threshold=0.7).tolist() == [[False, False], [False, True]]
    # Adaptive: twice the mean, 2 * 0.525 = 1.05: nothing in this flat-ish map is salient.
    assert not saliency_mask(saliency, threshold="adaptive").any()
    peaked = np.zeros((1, 1, 8, 8), np.float32)
    peaked[..., 2:4, 2:4] = 1.0
    mask = saliency_mask(peaked, threshold="adaptive")
    assert mask.sum() == 4 and mask[0, 2:4, 2:4].all()
    big = saliency_mask(peaked, size=(15, 22))
    assert big.shape == (1, 15, 22) and big.dtype == bool
    assert big[0, 5, 6] and not big[0, 14, 21]
    with pytest.raises(InputError, match="threshold must be"):
        saliency_mask(saliency, threshold=1.5)
    with pytest.raises(InputError, match="one saliency channel"):
        saliency_mask(np.zeros((1, 2, 4, 4), np.float32))


def test_region_boxes():
    theta = _theta(0.5, -0.5, -0.5).numpy()
    np.testing.assert_allclose(region_boxes(theta, (32, 32)), [[0, 0, 16, 16]])
    whole = region_boxes(_theta(1.0, 0.0, 0.0).numpy()[None], (20, 40))
    assert whole.shape == (1, 1, 4)
    np.testing.assert_allclose(whole[0, 0], [0, 0, 40, 20])
    with pytest.raises(InputError, match=r"\(\.\.\., 2, 3\)"):
        region_boxes(np.zeros((2, 3, 3)), (32, 32))


def test_bad_inputs_are_one_clear_error():
    model = create_model(NAME)
    with pytest.raises(InputError, match=r"takes images of shape \(batch, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(InputError, match="multiple of 2"):
        create_model(NAME, img_size=36)
    with pytest.raises(InputError, match="glimpse_size 12 must be a multiple of"):
        create_model(NAME, glimpse_size=12, ran_widths=(8, 8, 8))


def test_postprocessing_imports_no_torch():
    code = "import sys, attnserve.postprocess_saliency; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
