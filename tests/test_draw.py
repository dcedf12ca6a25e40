"""DRAW (Gregor et al. 2015): the filterbanks are eq. 19-26 (normalised rows, 1-based pixel
grid, A wide and B high), read and write are eq. 27 and 29, generation is eq. 12-14 and
a deterministic function of its noise, the encoder-decoder is a trainable VAE (eq. 1-11),
and both exported graphs match the eager model with every learned bias non-zero.

The generic suites (test_export.py, test_registry.py) export the tiny config as
initialised, where c_0, h^enc_0 and h^dec_0 are still zero; the export here gives them
values first.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from attnserve import runtime
from attnserve.errors import InputError
from attnserve.export import export_onnx, save_state_dict
from attnserve.models import create_model, get_spec
from attnserve.models.draw import (
    CONFIGS,
    DRAWConfig,
    GaussianAttention,
    filterbanks,
    read_glimpses,
    write_patches,
)
from attnserve.postprocess_draw import attention_boxes, sample_noise, to_uint8_images

TINY = CONFIGS["tiny"]  # 12 high (B), 16 wide (A), T = 3, read 3 x 3, write 4 x 4


def _attention(size: int, height: int, width: int, bias) -> GaussianAttention:
    """A filterbank whose five parameters are `bias` whatever h^dec is."""
    attention = GaussianAttention(4, size, height, width)
    with torch.no_grad():
        attention.params.weight.zero_()
        attention.params.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return attention


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a fresh model what training would: non-zero learned biases c_0, h^enc_0, h^dec_0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.canvas0, model.h_enc0, model.h_dec0):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


# -- the filterbanks (sec. 3.2) ------------------------------------------------------------


def test_filterbanks_are_eq_25_26_with_normalised_rows():
    torch.manual_seed(0)
    gx, gy = torch.rand(5) * 20 - 2, torch.rand(5) * 16 - 2  # some grids partly off the image
    stride, variance = torch.rand(5) * 3 + 0.2, torch.rand(5) * 2 + 0.1
    N, B, A = 4, 12, 16
    fx, fy = filterbanks(gx, gy, stride, variance, N, B, A)
    assert fx.shape == (5, N, A) and fy.shape == (5, N, B)
    # eq. 19-20 and 25-26 written out in float64: mu^i = g + (i - N/2 - 0.5) delta, i = 1..N,
    # pixels a = 1..A, each row divided by its sum Z.
    i = torch.arange(1, N + 1, dtype=torch.float64)
    for f, g, pixels in ((fx, gx, A), (fy, gy, B)):
        mu = g.double()[:, None] + (i - N / 2 - 0.5) * stride.double()[:, None]  # (5, N)
        a = torch.arange(1, pixels + 1, dtype=torch.float64)
        e = torch.exp(-(a - mu[..., None]) ** 2 / (2 * variance.double()[:, None, None]))
        torch.testing.assert_close(f.double(), e / e.sum(-1, keepdim=True), atol=1e-6, rtol=0)
        torch.testing.assert_close(f.sum(-1), torch.ones(5, N), atol=1e-6, rtol=0)
    # The module computes the same filters from its five parameters (eq. 21-24).
    attention = GaussianAttention(8, N, B, A)
    with torch.no_grad():
        attention.params.weight.mul_(5)  # windows of every size and place
        packed, mfx, mfy = attention(torch.randn(6, 8))
    gx, gy, variance, stride = packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3]
    rfx, rfy = filterbanks(gx, gy, stride, variance, N, B, A)
    torch.testing.assert_close(mfx, rfx, atol=1e-6, rtol=0)
    torch.testing.assert_close(mfy, rfy, atol=1e-6, rtol=0)


def test_filters_far_outside_the_image_stay_normalised():
    # g~_X = 10 puts the grid ~90 pixels right of a 16-pixel image: every exp of eq. 25
    # underflows, which a plain quotient turns into 0/0.
    _, fx, fy = _attention(4, 12, 16, [10.0, -10.0, math.log(0.5), 0.0, 0.0])(torch.zeros(1, 4))
    assert torch.isfinite(fx).all() and torch.isfinite(fy).all()
    torch.testing.assert_close(fx.sum(-1), torch.ones(1, 4))
    torch.testing.assert_close(fy.sum(-1), torch.ones(1, 4))
    assert (fx.argmax(-1) == 15).all() and (fy.argmax(-1) == 0).all()  # the nearest edge


def test_parameters_are_scaled_as_eq_22_24_on_a_non_square_image():
    # With g~ = 0 and delta~ = 1 the grid is centred and its N filters reach from pixel 1
    # to pixel A, "roughly covering the whole input image" (sec. 3.2).
    A, B, N = 16, 12, 4
    packed, fx, fy = _attention(N, B, A, [0.0, 0.0, math.log(0.3), 0.0, math.log(2.0)])(torch.zeros(1, 4))
    g_x, g_y, variance, stride, gamma = packed[0].tolist()
    assert (g_x, g_y) == ((A + 1) / 2, (B + 1) / 2)  # eq. 22-23: 8.5 and 6.5
    assert stride == pytest.approx((max(A, B) - 1) / (N - 1))  # eq. 24: one stride for both axes, 5
    assert variance == pytest.approx(0.3) and gamma == pytest.approx(2.0)
    assert fx.argmax(-1)[0].tolist() == [0, 5, 10, 15]  # filter centres at pixels 1, 6, 11, 16
    # F_Y uses the same stride: centres 6.5 -+ 2.5, -+ 7.5 = -1, 4, 9, 14 (two off the image).
    assert fy.argmax(-1)[0].tolist() == [0, 3, 8, 11]
    # g~ = -1 and +1 put the centre at 0 and A + 1, half a pixel beyond the edge pixels.
    packed, _, _ = _attention(N, B, A, [-1.0, 1.0, 0.0, 0.0, 0.0])(torch.zeros(1, 4))
    assert packed[0, :2].tolist() == [0.0, B + 1]


def test_read_over_the_whole_image_at_n_equals_a_reproduces_it():
    # N = A filters, centred (g~ = 0), 1 pixel apart (delta~ = 1: delta = (A - 1)/(N - 1)):
    # filter i sits on pixel i, so F_X ~ I and F_Y x F_X^T ~ x, up to the filters' tails.
    # With row mass eps off the diagonal, F = I + E with row sums of |E| <= 2 eps, so
    # |F_Y x F_X^T - x| <= (4 eps + 4 eps^2) max|x|: that bound is the tolerance.
    # sigma^2 = 0.05 puts eps at 9e-5 (measured: error 1.5e-4, bound 3.6e-4); a grid
    # half a pixel off (0-based pixels) would split each filter over two pixels, error ~0.5.
    A = 12
    torch.manual_seed(0)
    x = torch.rand(2, 3, A, A)
    x_hat = x - torch.rand(2, 3, A, A)
    packed, fx, fy = _attention(A, A, A, [0.0, 0.0, math.log(0.05), 0.0, math.log(2.0)])(torch.zeros(2, 4))
    eps = (1 - fx.diagonal(dim1=-2, dim2=-1)).max().item()
    assert eps < 1e-4
    bound = 4 * eps * (1 + eps)
    glimpses = read_glimpses(x, x_hat, fx, fy, packed[:, 4]) / 2  # gamma = 2 scales both (eq. 27)
    assert glimpses.shape == (2, 6, A, A)
    assert (glimpses[:, :3] - x).abs().max() <= bound * x.abs().max()
    assert (glimpses[:, 3:] - x_hat).abs().max() <= bound * x_hat.abs().max()
    # Writing an A x A patch over the same grid puts it back (eq. 29, gamma^ = 2 divides).
    written = write_patches(x, fx, fy, packed[:, 4]) * 2
    assert (written - x).abs().max() <= bound * x.abs().max()
    # Through the model's read (eq. 4), with x_hat = x - sigmoid(c_0) at the first step.
    model = create_model("draw", height=A, width=A, in_chans=3, read_size=A)
    with torch.no_grad():
        model.read_attention.params.weight.zero_()
        model.read_attention.params.bias.copy_(torch.tensor([0.0, 0.0, math.log(0.05), 0.0, 0.0]))
        r, _ = model._read(x, x_hat, torch.randn(2, TINY.dec_hidden))
    assert (r.unflatten(1, (6, A, A))[:, :3] - x).abs().max() <= bound


def test_write_is_the_transpose_of_read():
    # eq. 27 and 29 with the same filters and gamma = 1: <F_Y x F_X^T, w> = <x, F_Y^T w F_X>.
    torch.manual_seed(1)
    attention = GaussianAttention(8, 5, 12, 16)
    with torch.no_grad():
        attention.params.weight.mul_(3)
        packed, fx, fy = attention(torch.randn(3, 8))
    ones = torch.ones(3)
    x, w = torch.randn(3, 2, 12, 16), torch.randn(3, 2, 5, 5)
    read = read_glimpses(x, torch.zeros_like(x), fx, fy, ones)[:, :2]  # (3, 2, 5, 5)
    written = write_patches(w, fx, fy, ones)  # (3, 2, 12, 16)
    torch.testing.assert_close((read * w).sum(dim=(1, 2, 3)), (x * written).sum(dim=(1, 2, 3)),
                               atol=1e-5, rtol=1e-5)
    # gamma^ divides the write (eq. 29).
    torch.testing.assert_close(write_patches(w, fx, fy, 4 * ones), written / 4)


# -- generation (sec. 2.3) -----------------------------------------------------------------


def test_generation_is_eq_12_14_step_by_step():
    model = _randomise(create_model("draw"))
    noise = torch.from_numpy(sample_noise(2, TINY.steps, TINY.z_dim, seed=3))
    N, C = TINY.write_size, TINY.in_chans
    with torch.no_grad():
        out = model.generate(noise)
        # The canvas written step by step, eq. 29 as an explicit sum over the patch.
        h, c = model.h_dec0.expand(2, -1), torch.zeros(2, TINY.dec_hidden)
        canvas = model.canvas0.expand(2, -1, -1, -1)
        for t in range(TINY.steps):
            h, c = model.decoder(noise[:, t], h, c)  # eq. 13
            packed, fx, fy = model.write_attention(h)
            w = model.write_patch(h).view(2, C, N, N)  # eq. 28
            write = torch.einsum("bjy,bcji,bix->bcyx", fy, w, fx) / packed[:, 4, None, None, None]
            canvas = canvas + write  # eq. 14
            torch.testing.assert_close(out.canvases[:, t], torch.sigmoid(canvas), atol=1e-6, rtol=0)
            torch.testing.assert_close(out.write.centre[:, t], packed[:, :2])
        exported = model(noise)
    torch.testing.assert_close(out.image, torch.sigmoid(canvas), atol=1e-6, rtol=0)
    torch.testing.assert_close(exported[0], out.image, atol=1e-6, rtol=0)
    assert [tuple(o.shape) for o in exported] == [(2, 1, 12, 16), (2, 3, 2), (2, 3), (2, 3)]
    assert ((out.image > 0) & (out.image < 1)).all()
    # The window moves: the decoder steers it step by step.
    assert (out.write.centre[:, 1:] - out.write.centre[:, :-1]).abs().max() > 1e-3


def test_generation_is_deterministic_given_the_noise():
    model = _randomise(create_model("draw"))
    noise = sample_noise(3, TINY.steps, TINY.z_dim, seed=42)
    np.testing.assert_array_equal(noise, sample_noise(3, TINY.steps, TINY.z_dim, seed=42))
    assert noise.dtype == np.float32 and noise.shape == (3, TINY.steps, TINY.z_dim)
    rebuilt = _randomise(create_model("draw"))
    with torch.inference_mode():
        first = model(torch.from_numpy(noise))
        again = rebuilt(torch.from_numpy(sample_noise(3, TINY.steps, TINY.z_dim, seed=42)))
        other = model(torch.from_numpy(sample_noise(3, TINY.steps, TINY.z_dim, seed=43)))
        alone = model(torch.from_numpy(noise[1:2]))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert (first[0] - other[0]).abs().amax(dim=(1, 2, 3)).min() > 1e-4, "other noise, other images"
    for a, b in zip(alone, first, strict=True):
        torch.testing.assert_close(a[0], b[1], atol=1e-6, rtol=0)  # batch-independent


# -- inference: the VAE (sec. 2.1-2.2) -------------------------------------------------------


def test_reconstruction_uses_the_posterior_mean_and_the_loss_is_eq_9_11():
    model = _randomise(create_model("draw"))
    torch.manual_seed(0)
    images = (torch.rand(2, 1, 12, 16) > 0.5).float()  # binarized, as the paper's MNIST
    with torch.no_grad():
        trace = model.draw(images)
        mean_pass = model.draw(images, torch.zeros(2, TINY.steps, TINY.z_dim))  # mu + sigma * 0
        outputs = model.reconstruct(images)
        sampled = model.draw(images, torch.randn(2, TINY.steps, TINY.z_dim))
        other = model.reconstruct(1 - images)
    torch.testing.assert_close(trace.canvases, mean_pass.canvases)
    torch.testing.assert_close(outputs[0], torch.sigmoid(trace.canvases[:, -1]))
    assert [tuple(o.shape) for o in outputs] == [(2, 1, 12, 16)] + [(2, 3, 2), (2, 3), (2, 3)] * 2
    assert (sampled.canvases - trace.canvases).abs().max() > 1e-4, "eps moves z off the mean"
    assert (other[0] - outputs[0]).abs().max() > 1e-4, "the encoder reads the image"
    # The first read comes from h^dec_0 alone, the same for every image; later ones differ.
    torch.testing.assert_close(trace.read.centre[0, 0], trace.read.centre[1, 0])
    assert (trace.read.centre[0, 1:] - trace.read.centre[1, 1:]).abs().max() > 1e-6

    model.train()
    eps = torch.randn(2, TINY.steps, TINY.z_dim)
    reconstruction, latent = model.loss(images, eps)
    trace = model.draw(images, eps)
    q = Normal(trace.means, torch.exp(trace.log_sigmas))
    torch.testing.assert_close(latent, kl_divergence(q, Normal(0.0, 1.0)).sum(dim=(1, 2)))  # eq. 10-11
    bernoulli = torch.distributions.Bernoulli(logits=trace.canvases[:, -1])
    torch.testing.assert_close(reconstruction, -bernoulli.log_prob(images).sum(dim=(1, 2, 3)))  # eq. 9
    (reconstruction + latent).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_without_attention_read_and_write_see_the_whole_image():
    model = _randomise(create_model("draw", attention=False))
    H, W, hidden = TINY.height, TINY.width, TINY.dec_hidden
    # eq. 17: r_t = [x, x_hat]; eq. 18: write = W(h^dec), an image.
    assert model.encoder.weight_ih.shape[1] == 2 * H * W + hidden
    assert model.write_patch.out_features == H * W
    assert model.read_attention is None and model.write_attention is None
    spec = get_spec("draw", attention=False)
    assert spec.output_names == ["image"]
    assert model.export_parts()["reconstruct"][1].output_names == ["reconstruction"]
    noise = torch.from_numpy(sample_noise(2, TINY.steps, TINY.z_dim, seed=0))
    with torch.no_grad():
        image = model(noise)
        out = model.generate(noise)
        x = torch.rand(2, 1, H, W)
        r, window = model._read(x, x - 0.5, torch.zeros(2, hidden))
    assert image.shape == (2, 1, H, W) and out.write is None and window is None
    torch.testing.assert_close(out.image, image, atol=1e-6, rtol=0)
    torch.testing.assert_close(r, torch.cat([x.flatten(1), (x - 0.5).flatten(1)], dim=1))


def test_paper_configs_are_table_3():
    # (T, LSTM units, z, read N, write N, image) per Table 3 and sec. 4.
    rows = {"mnist": (64, 256, 100, 2, 5, (1, 28, 28)), "svhn": (32, 800, 100, 12, 12, (3, 64, 64)),
            "cifar10": (64, 400, 200, 5, 5, (3, 32, 32))}
    for name, (steps, hidden, z, read, write, image) in rows.items():
        cfg = CONFIGS[name]
        assert (cfg.steps, cfg.enc_hidden, cfg.dec_hidden, cfg.z_dim, cfg.read_size, cfg.write_size) == (
            steps, hidden, hidden, z, read, write), name
        assert (cfg.in_chans, cfg.height, cfg.width) == image and cfg.attention and cfg.peepholes
    assert not CONFIGS["mnist_no_attention"].attention
    spec = get_spec("draw", "mnist")
    assert spec.inputs[0].shape == ("batch", 64, 100) and spec.outputs[1].shape == ("batch", 64, 2)
    assert spec.preprocessing["deterministic"] is True


def test_peephole_cell_is_graves_2013_and_lstm_cell_without_peepholes():
    from attnserve.models.draw import PeepholeLSTMCell

    torch.manual_seed(0)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    plain = PeepholeLSTMCell(5, 7, peepholes=False)
    reference = torch.nn.LSTMCell(5, 7)
    reference.load_state_dict(plain.state_dict())  # the same keys and layout
    torch.testing.assert_close(plain(x, h, c), reference(x, (h, c)))
    cell = PeepholeLSTMCell(5, 7)
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=1)
    w_ci, w_cf, w_co = cell.peephole
    c_new = torch.sigmoid(f + w_cf * c) * c + torch.sigmoid(i + w_ci * c) * torch.tanh(g)  # eq. 7-9
    h_new = torch.sigmoid(o + w_co * c_new) * torch.tanh(c_new)  # eq. 10-11
    torch.testing.assert_close(cell(x, h, c), (h_new, c_new))


# -- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_are_one_clear_error():
    model = create_model("draw")
    with pytest.raises(InputError, match=r"noise must be a float tensor of shape \(batch, T, z_dim\) = "
                                         r"\(batch, 3, 8\).*got torch.float32 \(2, 4, 8\)"):
        model(torch.randn(2, 4, 8))  # T = 4 steps for a 3-step model
    for bad in (torch.randn(2, 3, 9), torch.randn(2, 24), torch.zeros(2, 3, 8, dtype=torch.int64)):
        with pytest.raises(InputError, match="noise must be"):
            model(bad)
    with pytest.raises(InputError, match=r"images must be a float tensor of shape \(batch, 1, 12, 16\)"):
        model.reconstruct(torch.rand(2, 1, 16, 12))  # height and width swapped
    with pytest.raises(InputError, match=r"eps must have shape"):
        model.loss(torch.rand(2, 1, 12, 16), torch.randn(2, 3, 7))
    with pytest.raises(InputError, match="read_size .* must be at least 2"):
        create_model("draw", read_size=1)
    DRAWConfig(attention=False, read_size=1)  # no filterbank, no N to check
    for bad in ({"steps": 0}, {"z_dim": -1}):
        with pytest.raises(InputError, match="noise|steps|z_dim"):
            sample_noise(**{"batch": 1, "steps": 3, "z_dim": 8, "seed": 0, **bad})


# -- numpy post-processing ------------------------------------------------------------------


def test_uint8_images_and_attention_boxes():
    image = np.array([0.0, 0.25, 0.5, 1.0, 1.2, -0.1], np.float32).reshape(1, 1, 1, 6)
    pixels = to_uint8_images(image)
    assert pixels.shape == (1, 1, 6, 1) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 0]
    with pytest.raises(InputError, match="NCHW"):
        to_uint8_images(np.zeros((12, 16, 1), np.float32))
    with pytest.raises(InputError, match=r"floating-point images in \[0, 1\]"):
        to_uint8_images(np.zeros((1, 1, 4, 4), np.uint8))
    # A grid of N = A filters 1 apart, centred, covers the whole image: [0, A] x [0, B].
    boxes = attention_boxes(np.array([[[8.5, 6.5]]]), np.array([[1.0]]), size=16)
    np.testing.assert_allclose(boxes, [[[0.0, -2.0, 16.0, 14.0]]])  # 16 x 16 grid on 12 rows
    np.testing.assert_allclose(attention_boxes(np.array([5.0, 3.0]), np.array(2.0), 4), [0.5, -1.5, 8.5, 6.5])
    with pytest.raises(InputError, match="same steps"):
        attention_boxes(np.zeros((2, 3, 2)), np.zeros((2, 4)), 4)


def test_postprocessing_imports_no_torch():
    code = "import sys, attnserve.postprocess_draw; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- export --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("draw")
    model = _randomise(create_model("draw"))
    checkpoint = save_state_dict(model, root / "draw.pt")
    return model, export_onnx("draw", root / "export", checkpoint=checkpoint)


def test_both_graphs_export_with_parity(trained_export):
    model, result = trained_export
    assert result.passed and list(result.parts) == ["reconstruct"]
    for reports in (result.parity, result.part_parity["reconstruct"]):
        assert [r.label for r in reports] == ["batch 1", "batch 3"]
        for report in reports:
            # Every output: the images and each window parameter (measured <= 2e-6, on the
            # centres, which are O(10) pixels).
            assert max(o.max_abs_error for o in report.outputs) < 1e-5, report


def test_exported_generation_is_deterministic_and_checks_its_input(trained_export):
    model, result = trained_export
    noise = sample_noise(5, TINY.steps, TINY.z_dim, seed=7)  # a batch size parity did not use
    with runtime.load(result.out_dir, "ort") as ort:
        first, again = ort.run({"noise": noise}), ort.run({"noise": noise})
        with pytest.raises(InputError, match=r"noise has shape \(5, 4, 8\), expected \(batch, 3, 8\)"):
            ort.run({"noise": sample_noise(5, 4, TINY.z_dim, seed=7)})
    np.testing.assert_array_equal(first["image"], again["image"])
    with torch.inference_mode():
        eager = model.generate(torch.from_numpy(noise))
    np.testing.assert_allclose(first["image"], eager.image.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(first["write_centre"], eager.write.centre.numpy(), atol=1e-4, rtol=0)
    _, parts = runtime.load_parts(result.out_dir, "ort")
    images = (np.random.default_rng(0).random((2, 1, 12, 16)) > 0.5).astype(np.float32)
    with parts["reconstruct"] as reconstruct:
        out = reconstruct.run({"images": images})
    with torch.inference_mode():
        want = model.reconstruct(torch.from_numpy(images))
    np.testing.assert_allclose(out["reconstruction"], want[0].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["read_centre"], want[4].numpy(), atol=1e-4, rtol=0)
