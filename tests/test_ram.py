"""RAM: the glimpse sensor reads the patches the paper describes (checked against crops
and an interpolation written here in pixel space), the networks follow sec. 4.1, the
scan path is a deterministic function of the image (or of the seeded noise when sampling),
and the exports match the eager model.

The tiny config's export with parity (custom ops and standard ops only, fp32 and fp16) is
test_export.py's; here the graph's sampler nodes, the sampling variant's export and the
LSTM core's are checked.
"""

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
from attnserve.export import export_onnx
from attnserve.models import create_model, get_spec
from attnserve.models.ram import CONFIGS, glimpse_sensor
from attnserve.postprocess_ram import glimpse_boxes, sample_location_noise

NAME = "ram"
TINY = CONFIGS["tiny"]


def _images(batch: int = 2, seed: int = 0, size: int = 28) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random((batch, 1, size, size), dtype=np.float32))


def _location_of_edge(kx: int, ky: int, size: int) -> list[float]:
    """The location whose centre is the pixel edge (kx, ky): l = 2k / size - 1."""
    return [2 * kx / size - 1, 2 * ky / size - 1]


def _crop(image: np.ndarray, kx: int, ky: int, width: int) -> np.ndarray:
    """image[ky - w/2 : ky + w/2, kx - w/2 : kx + w/2], zeros outside the image."""
    pad = width
    padded = np.pad(image, pad)
    top, left = ky - width // 2 + pad, kx - width // 2 + pad
    return padded[top:top + width, left:left + width]


def _interpolation(centre: float, width: int, size: int) -> np.ndarray:
    """(width, size): bilinear weights of `width` pixel-spaced samples centred on the
    pixel-centre coordinate `centre`, zero for pixels outside the image."""
    positions = centre + np.arange(width) - (width - 1) / 2
    m = np.zeros((width, size))
    low = np.floor(positions).astype(int)
    frac = positions - low
    for i, (lo, f) in enumerate(zip(low, frac, strict=True)):
        if 0 <= lo < size:
            m[i, lo] += 1 - f
        if 0 <= lo + 1 < size:
            m[i, lo + 1] += f
    return m


def _sensor(image: np.ndarray, loc: np.ndarray, patch: int, scales: int) -> np.ndarray:
    """rho(x, l) for one (H, W) image, in pixel space: patch j is w = g 2^j pixel-spaced
    bilinear samples around l's pixel, averaged over 2^j x 2^j blocks -> (scales, g, g)."""
    h, w = image.shape
    cx, cy = ((loc[0] + 1) * w - 1) / 2, ((loc[1] + 1) * h - 1) / 2  # pixel-centre coordinates
    out = []
    for j in range(scales):
        width, f = patch * 2**j, 2**j
        p = _interpolation(cy, width, h) @ image @ _interpolation(cx, width, w).T
        out.append(p.reshape(patch, f, patch, f).mean(axis=(1, 3)))
    return np.stack(out)


def test_spec_images_in_logits_and_locations_out():
    spec = get_spec(NAME)
    assert spec.task == "image-classification"
    assert [(t.name, t.shape) for t in spec.inputs] == [("images", ("batch", 1, 28, 28))]
    assert [(t.name, t.shape) for t in spec.outputs] == [("logits", ("batch", 10)),
                                                         ("locations", ("batch", 3, 2))]
    assert spec.preprocessing["location_policy"].startswith("mean")
    assert spec.preprocessing["resize"] == spec.preprocessing["image_size"] == 28
    sampled = get_spec(NAME, sample_locations=True)
    assert [(t.name, t.shape) for t in sampled.inputs] == [("images", ("batch", 1, 28, 28)),
                                                           ("location_noise", ("batch", 3, 2))]
    assert "sample_location_noise" in sampled.preprocessing["location_policy"]


@pytest.mark.parametrize(("kx", "ky"), [(14, 14), (10, 20), (0, 0), (27, 3)])
def test_glimpse_on_the_pixel_grid_is_the_crop(kx, ky):
    """Scale 0 is the g x g crop centred on l; scale 1 the 2g x 2g crop averaged over
    2 x 2 blocks; pixels beyond the image are zeros (corners, edges)."""
    images = _images(1, seed=kx + ky)
    loc = torch.tensor([_location_of_edge(kx, ky, 28)])
    patches = glimpse_sensor(images, loc, patch_size=8, num_scales=2)[0].numpy()
    image = images[0, 0].numpy()
    np.testing.assert_allclose(patches[0], _crop(image, kx, ky, 8), atol=1e-5)
    wide = _crop(image, kx, ky, 16).reshape(8, 2, 8, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(patches[1], wide, atol=1e-5)
    if (kx, ky) == (0, 0):  # l = (-1, -1), the top-left corner: three quarters are outside
        assert loc.tolist() == [[-1.0, -1.0]]
        assert np.abs(patches[:, :4]).max() < 1e-6 and np.abs(patches[:, :, :4]).max() < 1e-6


def test_glimpse_between_pixels_interpolates():
    """Off the pixel grid the sensor interpolates bilinearly: the same as the pixel-space
    interpolation written above, at three scales, with a 3-channel image."""
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.random((2, 3, 30, 30), dtype=np.float32))
    loc = torch.tensor([[0.137, -0.58], [-0.91, 0.333]])
    patches = glimpse_sensor(images, loc, patch_size=4, num_scales=3).numpy()
    assert patches.shape == (2, 9, 4, 4)  # (B, scales * C, g, g): scale-major
    for b in range(2):
        for c in range(3):
            want = _sensor(images[b, c].numpy(), loc[b].numpy(), 4, 3)
            np.testing.assert_allclose(patches[b, c::3], want, atol=1e-5)


def test_forward_is_the_papers_recurrence():
    """Sec. 4.1 step by step, with the sensor written in pixel space: l_0 = f_l(0),
    g_t = Rect(Linear(h_g) + Linear(h_l)), h_t = Rect(Linear(h_{t-1}) + Linear(g_t)),
    l_t = Linear(h_t), logits = Linear(h_N)."""
    model = create_model(NAME)
    images = _images(2, seed=1)
    with torch.inference_mode():
        logits, locations = model(images)
        h = torch.zeros(2, TINY.hidden_size)
        for t in range(TINY.num_glimpses):
            loc = model.locator(h)
            torch.testing.assert_close(locations[:, t], loc)
            rho = np.stack([_sensor(images[b, 0].numpy(), loc[b].numpy(), 8, 2) for b in range(2)])
            h_g = F.relu(model.glimpse_fc(torch.from_numpy(rho).float().flatten(1)))
            h_l = F.relu(model.location_fc(loc))
            g = F.relu(model.glimpse_out(h_g) + model.location_out(h_l))
            h = F.relu(model.core_hidden(h) + model.core_input(g))
        torch.testing.assert_close(logits, model.classifier(h), atol=1e-5, rtol=1e-5)
    # l_0 is the policy's mean from the zero state: the locator's bias, for every image.
    torch.testing.assert_close(locations[:, 0], model.locator.bias.detach().expand(2, 2))


def test_scan_path_is_deterministic_and_follows_the_image():
    model = create_model(NAME)
    images = _images(3, seed=2)
    with torch.inference_mode():
        logits, locations = model(images)
        again_logits, again = model(images)
        alone = [model(images[i:i + 1]) for i in range(3)]
    assert torch.equal(locations, again) and torch.equal(logits, again_logits)
    for i, (lg, loc) in enumerate(alone):  # no mixing across the batch
        torch.testing.assert_close(loc[0], locations[i])
        torch.testing.assert_close(lg[0], logits[i])
    # After the first glimpse the locations depend on what was seen.
    assert (locations[0, 1:] - locations[1, 1:]).abs().max() > 1e-4


def test_sampled_locations_are_mean_plus_sigma_noise_and_seeded():
    mean_model = create_model(NAME)
    model = create_model(NAME, sample_locations=True)
    images = _images(2, seed=4)
    noise = torch.from_numpy(sample_location_noise(2, TINY.num_glimpses, seed=7))
    with torch.inference_mode():
        want_logits, want_locations = mean_model(images)
        zero_logits, zero_locations = model(images, torch.zeros_like(noise))
        logits, locations = model(images, noise)
        again = model(images, torch.from_numpy(sample_location_noise(2, TINY.num_glimpses, seed=7)))
        other = model(images, torch.from_numpy(sample_location_noise(2, TINY.num_glimpses, seed=8)))
    # Zero noise is the mean policy: the same weights, the same scan path.
    assert torch.equal(zero_locations, want_locations) and torch.equal(zero_logits, want_logits)
    torch.testing.assert_close(locations[:, 0], model.locator.bias.detach() + TINY.location_std * noise[:, 0])
    assert torch.equal(again[1], locations) and torch.equal(again[0], logits)
    assert not torch.allclose(other[1], locations)
    np.testing.assert_array_equal(sample_location_noise(2, 3, seed=7), sample_location_noise(2, 3, seed=7))


def test_tiny_export_has_one_sampler_per_patch_and_matches(exported_tiny):
    result = exported_tiny(NAME)
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    samplers = [n for n in model.graph.node if n.domain == "attnserve"]
    assert [n.op_type for n in samplers] == ["AffineGridSampler"] * (TINY.num_glimpses * TINY.num_scales)
    sizes = sorted({tuple(a.ints) for n in samplers for a in n.attribute if a.name == "out_size"})
    assert sizes == [(8, 8), (16, 16)]
    spec = get_spec(NAME)
    feed = {"images": _images(4, seed=9).numpy()}
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
    assert report.passed, report.failures()
    assert report.outputs[1].max_abs_error < 1e-5  # the scan path itself


@pytest.mark.parametrize("overrides", [{"sample_locations": True}, {"core": "lstm"}],
                         ids=["sampled", "lstm"])
def test_variants_export_with_parity(overrides, tmp_path):
    result = export_onnx(NAME, tmp_path / "ram", **overrides)
    assert result.passed
    for report in result.parity:
        assert all(o.max_abs_error < 1e-5 for o in report.outputs), report.summary()
    if overrides.get("sample_locations"):
        assert result.spec.input_names == ["images", "location_noise"]


def test_lstm_core():
    model = create_model(NAME, core="lstm")
    assert not hasattr(model, "core_hidden") and isinstance(model.core_lstm, torch.nn.LSTMCell)
    images = _images(2, seed=5)
    with torch.inference_mode():
        logits, locations = model(images)
        # The unrolled step equals torch's own LSTM cell.
        h = c = torch.zeros(2, TINY.hidden_size)
        for t in range(TINY.num_glimpses):
            torch.testing.assert_close(locations[:, t], model.locator(h))
            h, c = model.core_lstm(model.glimpse_features(images, locations[:, t]), (h, c))
        torch.testing.assert_close(logits, model.classifier(h))


def test_paper_configs():
    """Table 1: 28 x 28 MNIST with 8 x 8 glimpses at one scale; 60 x 60 translated MNIST with
    12 x 12 glimpses at 3 scales; Table 2: 100 x 100 cluttered MNIST, 4 scales; sec. 4.1's
    layer sizes."""
    sizes = {name: (c.img_size, c.num_glimpses, c.patch_size, c.num_scales) for name, c in CONFIGS.items()}
    assert sizes["mnist"] == (28, 6, 8, 1)
    assert sizes["translated60"] == (60, 6, 12, 3)
    assert sizes["cluttered100"] == (100, 6, 12, 4)
    model = create_model(NAME, "translated60")
    assert model.glimpse_fc.in_features == 3 * 12 * 12
    assert (model.glimpse_fc.out_features, model.location_fc.out_features) == (128, 128)
    assert model.glimpse_out.out_features == 256 and model.core_hidden.out_features == 256
    with torch.inference_mode():
        logits, locations = model(_images(1, size=60))
    assert logits.shape == (1, 10) and locations.shape == (1, 6, 2)


def test_glimpse_boxes():
    boxes = glimpse_boxes(np.array([[[0.0, 0.0], [-1.0, 0.5]]]), (28, 28), patch_size=8, num_scales=2)
    assert boxes.shape == (1, 2, 2, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[0, 0], [[10, 10, 18, 18], [6, 6, 22, 22]])
    np.testing.assert_allclose(boxes[0, 1, 0], [-4, 17, 4, 25])
    # The box of the finest patch is the crop the sensor reads.
    images = _images(1, seed=6)
    loc = torch.tensor([_location_of_edge(10, 20, 28)])
    x0, y0, x1, y1 = glimpse_boxes(loc.numpy(), (28, 28), 8, 1)[0, 0].round().astype(int)
    patch = glimpse_sensor(images, loc, 8, 1)[0, 0].numpy()
    np.testing.assert_allclose(patch, images[0, 0, y0:y1, x0:x1].numpy(), atol=1e-5)
    with pytest.raises(InputError, match="locations of shape"):
        glimpse_boxes(np.zeros((2, 3)), (28, 28), 8, 1)


def test_bad_inputs_are_one_clear_error():
    model = create_model(NAME)
    with pytest.raises(InputError, match=r"takes images of shape \(batch, 1, 28, 28\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(InputError, match="takes no location_noise"):
        model(torch.zeros(1, 1, 28, 28), torch.zeros(1, 3, 2))
    sampling = create_model(NAME, sample_locations=True)
    with pytest.raises(InputError, match="pass location_noise"):
        sampling(torch.zeros(1, 1, 28, 28))
    with pytest.raises(InputError, match=r"shape \(batch, 3, 2\) = \(2, 3, 2\)"):
        sampling(torch.zeros(2, 1, 28, 28), torch.zeros(2, 4, 2))
    with pytest.raises(InputError, match="core must be one of"):
        create_model(NAME, core="gru")
    with pytest.raises(InputError, match="seed must be"):
        sample_location_noise(1, 3, seed=-1)


def test_postprocessing_imports_no_torch():
    code = "import sys, attnserve.postprocess_ram; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
