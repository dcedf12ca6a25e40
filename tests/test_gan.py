"""SAGAN and SelectionGAN: the attention does what the papers say, spectral norm holds
and is frozen at inference, generation is a deterministic function of the seed, and the
exports with non-trivial weights match the eager models.

The generic suites (test_export.py, test_registry.py) export both tiny models as
initialised; there SAGAN's attention is switched off (gamma = 0) and batch norm's
statistics are the defaults, so the exports here first give them values.
"""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from attnserve.errors import InputError
from attnserve.export import export_onnx, save_state_dict
from attnserve.models import create_model, get_spec
from attnserve.models.gan import (
    SAGAN_CONFIGS,
    ConditionalBatchNorm2d,
    SAGANDiscriminator,
    SelfAttention,
    SNConv2d,
    _SpectralNormed,
    hinge_losses,
)
from attnserve.postprocess_gan import sample_latents, to_uint8_images

TINY = SAGAN_CONFIGS["tiny"]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a fresh model what training would: attention switched on, class-dependent
    batch-norm scales and shifts, moving statistics other than (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.gamma.fill_(0.7)
            elif isinstance(m, ConditionalBatchNorm2d):
                m.gamma.weight.copy_(1 + 0.3 * torch.randn(m.gamma.weight.shape, generator=g))
                m.beta.weight.copy_(0.3 * torch.randn(m.beta.weight.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _sn_layers(model: torch.nn.Module) -> list[tuple[str, _SpectralNormed]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SpectralNormed)]


def _top_singular_value(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().flatten(1), ord=2).item()


# -- SAGAN: the self-attention block ---------------------------------------------------


def test_attention_block_is_the_identity_at_init():
    block = SelfAttention(32).eval()
    assert block.gamma.item() == 0.0
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(block(x), x)
    # And in the generator: the same image as with no attention block at all.
    model = _randomise(create_model("sagan"))
    with torch.no_grad():
        model.attn.gamma.zero_()
    z, y = torch.from_numpy(sample_latents(2, TINY.z_dim, seed=0)), torch.tensor([1, 7])
    with torch.inference_mode():
        with_attn = model(z, y)
        model.attn = torch.nn.Identity()
        assert torch.equal(model(z, y), with_attn)


def test_attention_follows_equations_1_to_3():
    block = SelfAttention(32).eval()
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(2, 32, 6, 5)
    f, g, h, v = (layer.weight.detach()[:, :, 0, 0] for layer in (block.f, block.g, block.h, block.v))
    xs = x.flatten(2)  # (B, C, N)
    s = torch.einsum("kc,bci,kd,bdj->bji", f, xs, g, xs)  # s[b, j, i] = f(x_i) . g(x_j)
    beta = s.softmax(dim=-1)  # eq. 1: over the positions i, for each output position j
    o = torch.einsum("ek,bji,kc,bci->bej", v, beta, h, xs)  # eq. 2: v(sum_i beta_ji h(x_i))
    y = 0.5 * o + xs  # eq. 3
    with torch.no_grad():
        torch.testing.assert_close(block.attention(x), beta, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block(x).flatten(2), y, atol=1e-5, rtol=1e-5)
    assert torch.allclose(beta.sum(-1), torch.ones(2, 30))


def test_attention_reaches_distant_positions_once_gamma_is_nonzero():
    block = SelfAttention(32).eval()
    x = torch.randn(1, 32, 8, 8)
    bumped = x.clone()
    bumped[0, :, 0, 0] += 3 * torch.randn(32)  # one corner's features
    with torch.no_grad():
        assert torch.equal(block(bumped)[..., 7, 7], block(x)[..., 7, 7])  # gamma = 0: local
        block.gamma.fill_(1.0)
        changed = (block(bumped) - block(x)).abs().amax(dim=1)[0]  # (8, 8)
    assert changed[7, 7] > 1e-3  # the opposite corner, beyond any convolution's reach
    assert (changed > 1e-6).all(), "every position attends to the bumped one"


# -- SAGAN: spectral normalisation ---------------------------------------------------------


@pytest.mark.parametrize("net", ["generator", "discriminator"])
def test_spectral_norm_keeps_the_largest_singular_value_near_one(net):
    torch.manual_seed(0)
    model = create_model("sagan").train() if net == "generator" else SAGANDiscriminator(TINY).train()
    layers = _sn_layers(model)
    # G: the z projection, 3 blocks x 3 convs, f g h v, the output conv; D: 3 + 3 + 3 + 2
    # block convs (the last block keeps its width: no shortcut conv), f g h v, psi, embed.
    assert len(layers) == (15 if net == "generator" else 17)
    z, y = torch.randn(4, TINY.z_dim), torch.randint(0, TINY.num_classes, (4,))
    for _ in range(5):  # a few power iterations (one per training forward, as SAGAN trains)
        model(z, y) if net == "generator" else model(torch.randn(4, 3, 32, 32), y)
    model.eval()
    raw = [_top_singular_value(m.parametrizations.weight.original) for _, m in layers]
    normalised = [_top_singular_value(m.weight) for _, m in layers]
    # The power-iteration estimate never exceeds the true value, so W / sigma_est is >= 1;
    # 15 initial + 5 iterations bring it within a few percent (measured: <= 1.03).
    assert all(1 - 1e-5 <= s <= 1.05 for s in normalised), normalised
    assert max(abs(s - 1) for s in raw) > 0.2, "the raw weights are far from norm 1"


def test_eval_freezes_the_power_iteration():
    model = create_model("sagan")  # eval mode
    u = {n: m.parametrizations.weight[0]._u.clone() for n, m in _sn_layers(model)}
    z, y = torch.randn(3, TINY.z_dim), torch.tensor([0, 1, 2])
    with torch.no_grad():
        first = model(z, y)
        second = model(z, y)
    assert torch.equal(first, second)
    assert all(torch.equal(m.parametrizations.weight[0]._u, u[n]) for n, m in _sn_layers(model))
    model.train()
    with torch.no_grad():
        model(z, y)
    assert not any(torch.equal(m.parametrizations.weight[0]._u, u[n]) for n, m in _sn_layers(model))


def test_loading_weights_refreshes_the_exported_normalised_weight():
    a, b = create_model("sagan", seed=0), create_model("sagan", seed=1)
    layer = dict(_sn_layers(a))["conv_out"]
    assert torch.equal(layer.weight_sn, layer.weight)
    a.load_state_dict(b.state_dict())
    assert torch.equal(layer.weight_sn, dict(_sn_layers(b))["conv_out"].weight)


# -- SAGAN: conditioning, the discriminator, determinism --------------------------------


def test_conditional_batch_norm_uses_the_class():
    cbn = ConditionalBatchNorm2d(8, num_classes=5, eps=1e-5, momentum=1e-3).eval()
    with torch.no_grad():
        cbn.gamma.weight.copy_(torch.randn(5, 8))
        cbn.beta.weight.copy_(torch.randn(5, 8))
        cbn.bn.running_mean.copy_(torch.randn(8))
    x, y = torch.randn(3, 8, 4, 4), torch.tensor([4, 0, 4])
    normed = (x - cbn.bn.running_mean[:, None, None]) / torch.sqrt(cbn.bn.running_var[:, None, None] + 1e-5)
    want = normed * cbn.gamma.weight[y][:, :, None, None] + cbn.beta.weight[y][:, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(cbn(x, y), want)
    # In the generator, a sample's class changes that sample's image and no other.
    model = _randomise(create_model("sagan"))
    z = torch.from_numpy(sample_latents(2, TINY.z_dim, seed=5))
    with torch.inference_mode():
        a, b = model(z, torch.tensor([3, 1])), model(z, torch.tensor([3, 2]))
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-3


def test_generation_is_deterministic_given_the_seed():
    model = _randomise(create_model("sagan"))
    y = torch.tensor([0, 4, 9])
    z = sample_latents(3, TINY.z_dim, seed=42)
    np.testing.assert_array_equal(z, sample_latents(3, TINY.z_dim, seed=42))
    assert z.dtype == np.float32 and z.shape == (3, TINY.z_dim)
    rebuilt = _randomise(create_model("sagan"))
    with torch.inference_mode():
        image = model(torch.from_numpy(z), y)
        again = rebuilt(torch.from_numpy(sample_latents(3, TINY.z_dim, seed=42)), y)
        other = model(torch.from_numpy(sample_latents(3, TINY.z_dim, seed=43)), y)
        alone = model(torch.from_numpy(z[1:2]), y[1:2])
    assert torch.equal(image, again)
    assert (image - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "another seed, other images"
    torch.testing.assert_close(alone[0], image[1], atol=1e-6, rtol=0)  # batch-independent
    assert image.shape == (3, 3, 32, 32) and image.abs().max() <= 1


def test_truncated_latents():
    z = sample_latents(64, 16, seed=1, truncation=0.5)
    assert np.abs(z).max() <= 0.5 and z.std() > 0.2  # redrawn, not clipped to the bound
    np.testing.assert_array_equal(z, sample_latents(64, 16, seed=1, truncation=0.5))
    assert np.abs(sample_latents(64, 16, seed=1)).max() > 2  # untruncated
    for bad in ({"truncation": 0}, {"truncation": float("nan")}, {"seed": -1}, {"batch": 0}):
        args = {"batch": 2, "z_dim": 4, "seed": 0, **bad}
        with pytest.raises(InputError, match="must be"):
            sample_latents(**args)


def test_uint8_images():
    image = np.array([-1.0, -0.5, 0.0, 1.0, 1.2], dtype=np.float32).reshape(1, 1, 1, 5).repeat(3, axis=1)
    pixels = to_uint8_images(image)
    assert pixels.shape == (1, 1, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]
    assert to_uint8_images(np.zeros((2, 3, 4, 6), np.float16)).shape == (2, 4, 6, 3)
    with pytest.raises(InputError, match="NCHW"):
        to_uint8_images(np.zeros((4, 6, 3), np.float32))
    with pytest.raises(InputError, match="floating-point"):
        to_uint8_images(np.zeros((1, 3, 4, 4), np.uint8))


def test_postprocessing_imports_no_torch():
    code = "import sys, attnserve.postprocess_gan; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_discriminator_scores_by_class_and_gradients_reach_every_weight():
    torch.manual_seed(0)
    generator, discriminator = _randomise(create_model("sagan")).train(), SAGANDiscriminator(TINY).train()
    with torch.no_grad():
        discriminator.attn.gamma.fill_(0.5)
    z, y = torch.randn(4, TINY.z_dim), torch.tensor([0, 3, 3, 9])
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    fake = generator(z, y)
    d_real, d_fake = discriminator(real, y), discriminator(fake.detach(), y)
    assert d_real.shape == d_fake.shape == (4,)
    d_loss, _ = hinge_losses(d_real, d_fake)
    d_loss.backward()
    for name, p in discriminator.named_parameters():
        assert p.grad is not None, name
        # psi's bias gets (#fakes - #reals inside the margin) / B, 0 while all are inside.
        assert name == "linear.bias" or p.grad.abs().sum() > 0, name
    _, g_loss = hinge_losses(d_real.detach(), discriminator(fake, y))
    g_loss.backward()
    for name, p in generator.named_parameters():
        assert p.grad is not None, name
        if ".gamma." in name or ".beta." in name:  # class embeddings: only the classes used
            assert p.grad[[0, 3, 9]].abs().sum(1).min() > 0 and p.grad[[1, 2]].abs().sum() == 0, name
        else:
            assert p.grad.abs().sum() > 0, name
    # The projection term makes the score depend on the class.
    discriminator.eval()
    with torch.no_grad():
        assert not torch.equal(discriminator(real, y), discriminator(real, torch.tensor([1, 1, 1, 1])))


def test_bad_inputs_are_one_clear_error():
    model = create_model("sagan")
    z = torch.randn(2, TINY.z_dim)
    with pytest.raises(InputError, match=r"class_id values must be in \[0, 10\), got \[10\]"):
        model(z, torch.tensor([3, 10]))
    with pytest.raises(InputError, match=r"z must have shape \(batch, 32\)"):
        model(torch.randn(2, 16), torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"class_id must have shape \(batch,\) = \(2,\)"):
        model(z, torch.tensor([0]))
    with pytest.raises(InputError, match="4 times a power of 2"):
        create_model("sagan", img_size=48)
    selection = create_model("selection_gan")
    with pytest.raises(InputError, match=r"semantics must have shape \(1, 3, 32, 32\)"):
        selection(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 64, 64))
    with pytest.raises(InputError, match="multiples of 32"):
        selection(torch.zeros(1, 3, 40, 40), torch.zeros(1, 3, 40, 40))


# -- SAGAN: export -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sagan_trained_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("sagan")
    model = _randomise(create_model("sagan"))
    checkpoint = save_state_dict(model, root / "sagan.pt")
    return model, export_onnx("sagan", root / "export", checkpoint=checkpoint)


def test_sagan_export_matches_with_attention_on(sagan_trained_export):
    model, result = sagan_trained_export
    assert result.passed
    for report in result.parity:
        assert report.outputs[0].max_abs_error < 1e-5  # measured 1e-7
    spec = get_spec("sagan")
    assert spec.task == "image-generation" and spec.output_names == ["image"]
    assert spec.inputs[1].value_range == (0, 10) and spec.preprocessing["deterministic"] is True


def test_sagan_export_carries_the_normalised_weights(sagan_trained_export):
    model, result = sagan_trained_export
    graph = onnx.load(str(result.onnx_path))
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert not [n for n in initializers if "parametrizations" in n], "no raw weights, u or v"
    convs = [(n, m) for n, m in _sn_layers(model) if isinstance(m, SNConv2d)]
    assert len(convs) == 14 and all(f"{n}.weight_sn" in initializers for n, _ in convs)
    # The ONNX optimizer folds the batch norm that follows each block's conv1 into its
    # weight; the others are W / sigma exactly as eager eval computes it.
    unfused = [(n, m) for n, m in convs if not n.endswith("conv1")]
    assert len(unfused) == 11
    for name, layer in unfused:
        np.testing.assert_array_equal(initializers[f"{name}.weight_sn"], layer.weight.detach().numpy())


# -- SelectionGAN ----------------------------------------------------------------------


def _selection(seed: int = 0):
    """A tiny SelectionGAN with peaked, position-dependent attention."""
    model = _randomise(create_model("selection_gan"), seed)
    with torch.no_grad():
        model.selection.attention.weight.mul_(300)
    return model


def test_selection_gan_outputs():
    spec = get_spec("selection_gan")
    assert spec.input_names == ["image", "semantics"]
    assert spec.output_names == ["final", "coarse", "attention", "uncertainty"]
    assert [t.shape[1] for t in spec.outputs] == [3, 3, 4, 1]
    feed = {k: torch.from_numpy(v).clamp(-1, 1) for k, v in spec.example_inputs(2).items()}
    with torch.inference_mode():
        out = _selection().generate(**feed)
    assert out.final.shape == out.coarse.shape == (2, 3, 32, 32)
    assert out.attention.shape == (2, 4, 32, 32) and out.uncertainty.shape == (2, 1, 32, 32)
    assert out.generations.shape == (2, 4, 3, 32, 32) and out.coarse_semantics.shape == (2, 3, 32, 32)
    assert ((out.uncertainty > 0) & (out.uncertainty < 1)).all()


def test_attention_maps_sum_to_one_over_the_generations_per_pixel():
    spec = get_spec("selection_gan")
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(2, seed=1).items()}
    with torch.inference_mode():
        attention = _selection()(**feed)[2]
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2, 32, 32), atol=1e-6, rtol=0)
    # Selection, not averaging: at most pixels one generation dominates, not always the same.
    assert (attention.amax(dim=1) > 0.5).float().mean() > 0.5
    assert len(attention.argmax(dim=1).unique()) > 1


def test_final_image_is_the_attention_weighted_sum_of_the_generations():
    spec = get_spec("selection_gan")
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(2, seed=2).items()}
    with torch.inference_mode():
        out = _selection().generate(**feed)
    want = torch.einsum("bnhw,bnchw->bchw", out.attention, out.generations)  # sum_i A_i * I_i
    torch.testing.assert_close(out.final, want, atol=1e-6, rtol=0)
    assert (out.final - out.generations.mean(dim=1)).abs().max() > 1e-2, "not a plain average"


def test_the_target_semantics_guide_both_stages():
    spec = get_spec("selection_gan")
    feed = {k: torch.from_numpy(v) for k, v in spec.example_inputs(1, seed=3).items()}
    other = dict(feed, semantics=-feed["semantics"])
    model = _selection()
    with torch.inference_mode():
        a, b = model.generate(**feed), model.generate(**other)
    assert (a.coarse - b.coarse).abs().max() > 1e-4 and (a.final - b.final).abs().max() > 1e-4


def test_dayton_config_is_the_authors_network():
    # Parameter counts of the authors' Gi (unet_256, 6 -> 3, ngf 64, batch norm), Gs
    # (3 -> 3, ngf 4) and Ga (less its unused conv330), built from their networks.py.
    model = create_model("selection_gan", "dayton")

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(model.image_generator) == 54_417_027
    assert count(model.semantic_generator) == 213_675
    assert count(model) - count(model.image_generator) - count(model.semantic_generator) == 523_241
    spec = get_spec("selection_gan", "dayton")
    assert spec.outputs[2].shape == ("batch", 10, 256, 256)  # N = 10


def test_selection_gan_export_matches_with_trained_statistics(tmp_path):
    model = _selection(seed=4)
    checkpoint = save_state_dict(model, tmp_path / "selection.pt")
    result = export_onnx("selection_gan", tmp_path / "export", checkpoint=checkpoint)
    assert result.passed
    for report in result.parity:
        assert [o.name for o in report.outputs] == ["final", "coarse", "attention", "uncertainty"]
        assert max(o.max_abs_error for o in report.outputs) < 1e-5  # measured 2e-7
