"""Non-local networks: every pairwise function computes eq. 1 as written, the block starts
as the identity and is non-local once it is not, sub-sampling quarters the keys, the
space-time block mixes frames, the trunks follow table 1, and the variants export.

Registered tiny configs are exported with parity by test_export.py, with their blocks at
the identity (W_z's BN scale 0), which parity cannot see into; here every pairwise
variant is exported with live blocks, and nonlocal_i3d also run at other clip lengths.
"""

import dataclasses
import itertools

import pytest
import torch

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.errors import InputError
from attnserve.export import export_onnx, save_state_dict
from attnserve.models import create_model, get_spec
from attnserve.models.layers import ResNet
from attnserve.models.layers.resnet3d import ResNet3d, inflate_2d_state_dict
from attnserve.models.nonlocal_net import (
    CONCATENATION,
    DOT_PRODUCT,
    EMBEDDED_GAUSSIAN,
    GAUSSIAN,
    I3D_CONFIGS,
    NONLOCAL_1_BLOCK,
    PAIRWISE,
    RESNET_CONFIGS,
    NonLocalBlock,
    NonLocalI3D,
    NonLocalResNet,
    i3d_temporal_kernels,
)

C = 8  # channels of the blocks under test; the bottleneck is C / 2


def _block(pairwise: str, dims: int, sub_sample: bool = True, seed: int = 0) -> NonLocalBlock:
    """A block in eval mode whose W_z is live: BN scale, shift and statistics random."""
    torch.manual_seed(seed)
    block = NonLocalBlock(C, pairwise, dims, sub_sample=sub_sample).double().eval()
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 1.5)
        for conv in (block.g, block.theta, block.phi, block.W_z):
            if conv is not None:
                conv.bias.uniform_(-0.2, 0.2)
    return block


def _input(dims: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    grid = (4, 6) if dims == 2 else (2, 2, 4)  # (H, W) or (T, H, W)
    return torch.randn(2, C, *grid, dtype=torch.float64) * 0.5


def _linear(conv, v: torch.Tensor) -> torch.Tensor:
    """A 1x1(x1) convolution applied to one position's vector."""
    return conv.weight.flatten(1) @ v + conv.bias


def _pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Max over each 2 x 2 window of the last two axes, written out (floor at odd sizes)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    corners = [x[..., i::2, j::2] for i, j in itertools.product((0, 1), repeat=2)]
    return torch.stack(corners).amax(dim=0)


def _eq1_reference(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """z_i = BN(W_z y_i) + x_i with y_i = 1/C(x) sum_j f(x_i, x^_j) g(x^_j), position by
    position (eq. 1-6), with f and C(x) as sec. 3.2 defines them."""
    x_hat = _pool_2x2(x) if block.sub_sample else x
    queries = x.flatten(2)  # (B, C, N)
    keys = x_hat.flatten(2)  # (B, C, M)
    out = torch.empty_like(queries)
    bn = block.bn
    for b in range(x.shape[0]):
        for i in range(queries.shape[2]):
            xi = queries[b, :, i]
            fs, gs = [], []
            for j in range(keys.shape[2]):
                xj = keys[b, :, j]
                if block.pairwise == GAUSSIAN:  # eq. 2
                    f = torch.exp(xi @ xj)
                elif block.pairwise == EMBEDDED_GAUSSIAN:  # eq. 3
                    f = torch.exp(_linear(block.theta, xi) @ _linear(block.phi, xj))
                elif block.pairwise == DOT_PRODUCT:  # eq. 4
                    f = _linear(block.theta, xi) @ _linear(block.phi, xj)
                else:  # eq. 5
                    pair = torch.cat([_linear(block.theta, xi), _linear(block.phi, xj)])
                    f = torch.relu(block.w_f.weight[0] @ pair)
                fs.append(f)
                gs.append(_linear(block.g, xj))
            norm = sum(fs) if block.pairwise in (GAUSSIAN, EMBEDDED_GAUSSIAN) else len(fs)  # C(x)
            y = sum(f * g for f, g in zip(fs, gs, strict=True)) / norm
            wz = _linear(block.W_z, y)
            out[b, :, i] = (wz - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias + xi
    return out.reshape(x.shape)


@pytest.mark.parametrize("sub_sample", [True, False], ids=["subsampled", "dense"])
@pytest.mark.parametrize("dims", [2, 3], ids=["space", "spacetime"])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_every_pairwise_function_is_eq_1(pairwise, dims, sub_sample):
    block = _block(pairwise, dims, sub_sample)
    x = _input(dims)
    with torch.inference_mode():
        got = block(x)
    want = _eq1_reference(block, x)
    assert not torch.allclose(got, x), "W_z is live: the block is not the identity here"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_a_new_block_is_the_identity(pairwise, dims):
    """Sec. 4.1: W_z's BN scale starts at zero, in training (batch statistics) and in
    evaluation alike."""
    block = NonLocalBlock(C, pairwise, dims)
    assert torch.equal(block.bn.weight, torch.zeros(C))
    x = _input(dims).float()
    assert torch.equal(block.train()(x), x)
    assert torch.equal(block.eval()(x), x)


@pytest.mark.parametrize("name", ["nonlocal_resnet", "nonlocal_i3d"])
def test_a_new_network_is_its_trunk(name):
    """With identity blocks the network computes its trunk (C2D / I3D) exactly: the blocks
    can go into a pre-trained network without changing it (sec. 3.3, 4.1)."""
    model = create_model(name)
    assert len(model.nonlocal_blocks) == 2
    bare = type(model)(dataclasses.replace(model.cfg, nonlocal_blocks=((),) * 4)).eval()
    missing, unexpected = bare.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("nonlocal_blocks.") for k in unexpected)
    x = torch.from_numpy(get_spec(name).example_inputs(2)[get_spec(name).input_names[0]])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), bare(x), rtol=0, atol=0)


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_sub_sampling_quarters_the_keys_in_space_only(pairwise):
    for dims, grid in ((2, (4, 6)), (3, (3, 4, 6))):
        x = torch.randn(2, C, *grid)
        queries = torch.Size(grid).numel()
        keys = queries // 4  # 2 x 2 in space; frames all kept
        attn, g = NonLocalBlock(C, pairwise, dims, sub_sample=True).affinity(x)
        assert attn.shape == (2, queries, keys) and g.shape == (2, keys, C // 2)
        attn, g = NonLocalBlock(C, pairwise, dims, sub_sample=False).affinity(x)
        assert attn.shape == (2, queries, queries) and g.shape == (2, queries, C // 2)


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_normalisation_per_pairwise_function(pairwise):
    """Softmax rows sum to 1 (gaussian forms); dot product and concatenation divide by the
    number of keys N, so their rows are the mean of f."""
    block = _block(pairwise, 2, sub_sample=True)
    x = _input(2)
    attn, _ = block.affinity(x)
    if pairwise in (GAUSSIAN, EMBEDDED_GAUSSIAN):
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    else:
        assert not torch.allclose(attn.sum(-1), torch.ones_like(attn.sum(-1)))
        keys = attn.shape[-1]
        assert keys == 6  # 4 x 6 map, 2 x 2 pooled
        if pairwise == CONCATENATION:
            assert (attn >= 0).all()  # ReLU in f


def test_scaled_logits_are_the_authors_code_option():
    """scale_logits (the released code's USE_SCALE) divides the embedded gaussian's
    logits by sqrt(C'); off by default, as in eq. 3."""
    torch.manual_seed(0)
    plain = NonLocalBlock(C, EMBEDDED_GAUSSIAN, 2, sub_sample=False)
    scaled = NonLocalBlock(C, EMBEDDED_GAUSSIAN, 2, sub_sample=False, scale_logits=True)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, C, 4, 6)
    logits = plain.theta(x).flatten(2).transpose(1, 2) @ plain.phi(x).flatten(2)  # (B, N, N)
    torch.testing.assert_close(plain.affinity(x)[0], logits.softmax(-1))
    torch.testing.assert_close(scaled.affinity(x)[0], (logits / (C // 2) ** 0.5).softmax(-1))


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) twice -> the grid positions where any batch element or channel differs."""
    return (a != b).any(dim=1).any(dim=0)


def _keys_rise_with_features(block: NonLocalBlock) -> None:
    """Concatenation's ReLU passes a key's change only to queries whose affinity to it is
    positive. With phi's and w_f's weights positive, a key's affinity grows with its
    features, so a large enough increase reaches every query."""
    if block.pairwise == CONCATENATION:
        with torch.no_grad():
            block.phi.weight.abs_()
            block.w_f.weight.abs_()


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_a_change_at_one_position_reaches_every_position(pairwise):
    """Non-locality: once W_z is non-zero, a change at the top-left position changes the
    output at the bottom-right one (and everywhere), in one block, where a 3x3 convolution
    would reach one neighbour; with W_z's BN scale at zero only the changed position does."""
    block = _block(pairwise, 2, sub_sample=True)
    _keys_rise_with_features(block)
    x = _input(2)
    y = x.clone()
    y[:, :, 0, 0] += 5.0  # large and positive: it wins its 2 x 2 max-pool window
    with torch.inference_mode():
        changed = _changed(block(x), block(y))
        assert changed[-1, -1] and changed.all()
        block.bn.weight.zero_()
        block.bn.bias.zero_()
        block.bn.running_mean.zero_()
        only_there = torch.zeros_like(changed)
        only_there[0, 0] = True
        assert torch.equal(_changed(block(x), block(y)), only_there)


@pytest.mark.parametrize("pairwise", PAIRWISE)
def test_the_spacetime_block_mixes_frames(pairwise):
    """3-D blocks sum over j in space-time: a change in the first frame reaches the last
    frame at every location."""
    block = _block(pairwise, 3, sub_sample=True)
    _keys_rise_with_features(block)
    x = _input(3)  # 2 frames of 2 x 4
    y = x.clone()
    y[:, :, 0, 1, 2] += 5.0
    with torch.inference_mode():
        changed = _changed(block(x), block(y))
    assert changed[-1].all() and changed.all()


def test_unknown_pairwise_and_bad_placement_are_refused():
    with pytest.raises(ValueError, match="unknown pairwise function 'cosine'.*gaussian"):
        NonLocalBlock(C, "cosine")
    with pytest.raises(ValueError, match="nonlocal_blocks must list"):
        create_model("nonlocal_resnet", nonlocal_blocks=((), (5,), (), ()))
    with pytest.raises(ValueError, match="nonlocal_blocks must list"):
        create_model("nonlocal_i3d", nonlocal_blocks=((), ()))


def test_maps_too_small_to_sub_sample_are_refused():
    model = create_model("nonlocal_resnet")
    with pytest.raises(InputError, match="sub-samples its map 2 x 2.*is 1 x 1; give the model larger images"):
        model(torch.randn(1, 3, 16, 16))  # res4 is 1 x 1


def test_placements_follow_table_2():
    """5 blocks: every other residual block of res3 (2) and res4 (3), as the authors'
    code places them; 1 block: right before the last block of res4."""
    with torch.device("meta"):
        five = NonLocalResNet(RESNET_CONFIGS["resnet50"])
        one = NonLocalResNet(RESNET_CONFIGS["resnet50_1block"])
        r101 = NonLocalResNet(RESNET_CONFIGS["resnet101"])
        i3d = NonLocalI3D(I3D_CONFIGS["i3d_resnet50"])
    assert list(five.nonlocal_blocks) == ["layer2_1", "layer2_3", "layer3_1", "layer3_3", "layer3_5"]
    assert list(i3d.nonlocal_blocks) == list(five.nonlocal_blocks)
    assert RESNET_CONFIGS["resnet50_1block"].nonlocal_blocks == NONLOCAL_1_BLOCK
    assert list(one.nonlocal_blocks) == ["layer3_4"] and len(one.layer3) == 6
    assert len(r101.nonlocal_blocks) == 5 and len(RESNET_CONFIGS["resnet50_10blocks"].nonlocal_blocks[2]) == 6
    # Bottleneck of C / 2 (sec. 3.3): 512 -> 256 in res3, 1024 -> 512 in res4.
    for key, channels in (("layer2_1", 512), ("layer3_1", 1024)):
        block = five.nonlocal_blocks[key]
        assert block.theta.in_channels == channels and block.theta.out_channels == channels // 2
        assert block.W_z.out_channels == channels and block.pairwise == EMBEDDED_GAUSSIAN
    assert i3d.nonlocal_blocks["layer2_1"].dims == 3


def _count(module: torch.nn.Module, skip: str = "nonlocal_blocks.") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


def test_parameter_counts_match_the_papers():
    with torch.device("meta"):
        nl_r50 = NonLocalResNet(RESNET_CONFIGS["resnet50"])
        i3d_r101 = NonLocalI3D(I3D_CONFIGS["i3d_resnet101"])
        c2d_r101 = ResNet3d((3, 4, 23, 3), 400, [[1] * n for n in (3, 4, 23, 3)], stem_temporal_kernel=1)
    # The trunk is torchvision's / timm's ResNet-50 (25,557,032 parameters).
    assert _count(nl_r50) == 25_557_032
    # Table 2e, to its precision: C2D R101 has 43.2M parameters, I3D_{3x1x1} 1.2x as
    # many, and the 5-block R101 non-local C2D 1.2x too.
    c2d = _count(c2d_r101)
    assert c2d / 1e6 == pytest.approx(43.2, abs=0.15)
    assert round(_count(i3d_r101) / c2d, 1) == 1.2
    nl_params = sum(p.numel() for p in i3d_r101.nonlocal_blocks.parameters())
    assert round((c2d + nl_params) / c2d, 1) == 1.2


def test_i3d_follows_table_1():
    """32 x 224 x 224 in: 16 x 112 x 112 after conv1, 8 x 56 x 56 after pool1 and res2,
    4 x 56 x 56 after pool2, then 4 x 28 x 28, 4 x 14 x 14, 4 x 7 x 7; conv1 5 x 7 x 7 and
    I3D_{3x1x1} in one block of two."""
    with torch.device("meta"):
        model = NonLocalI3D(I3D_CONFIGS["i3d_resnet50"])
    shapes = {}
    modules = {"conv1": model.conv1, "maxpool": model.maxpool, "pool2": model.pool2,
               **{f"layer{i}": getattr(model, f"layer{i}")[-1] for i in range(1, 5)}}  # stage outputs
    for name, module in modules.items():
        module.register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, out.shape))
    model(torch.empty(1, 32, 3, 224, 224, device="meta"))
    assert {k: tuple(v[2:]) for k, v in shapes.items()} == {
        "conv1": (16, 112, 112), "maxpool": (8, 56, 56), "layer1": (8, 56, 56), "pool2": (4, 56, 56),
        "layer2": (4, 28, 28), "layer3": (4, 14, 14), "layer4": (4, 7, 7)}
    assert model.conv1.kernel_size == (5, 7, 7) and model.fc.out_features == 400
    assert i3d_temporal_kernels((3, 4, 6, 3)) == ((3, 3, 3), (3, 1, 3, 1), (3, 1, 3, 1, 3, 1), (1, 3, 1))
    assert model.layer2[0].conv1.kernel_size == (3, 1, 1) and model.layer2[0].conv2.kernel_size == (1, 3, 3)
    assert model.layer2[1].conv1.kernel_size == (1, 1, 1)


def test_inflated_c2d_on_a_still_clip_is_the_2d_resnet():
    """Inflation (sec. 4): 2-D ImageNet weights, each kernel plane divided by t. With
    every kernel 1 in time (C2D), a clip of one repeated frame gives the 2-D ResNet's
    features at every remaining frame."""
    torch.manual_seed(0)
    resnet = ResNet((1, 1, 1, 1), num_classes=10, stem_width=8).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in resnet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    c2d = ResNet3d((1, 1, 1, 1), 10, [[1]] * 4, stem_width=8, stem_temporal_kernel=1).eval()
    c2d.load_state_dict(inflate_2d_state_dict(resnet.state_dict(), c2d))
    frame = torch.randn(2, 3, 64, 64)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1)  # (B, C, T, H, W)
    with torch.inference_mode():
        want = resnet.forward_features(frame)
        got = c2d.forward_features(clip)
        assert got.shape[2] == 1
        torch.testing.assert_close(got[:, :, 0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2d(clip), resnet(frame), rtol=1e-5, atol=1e-5)
    # A 3-tap temporal kernel gets each 2-D plane / 3.
    i3d = ResNet3d((1, 1, 1, 1), 10, [[3]] * 4, stem_width=8).eval()
    inflated = inflate_2d_state_dict(resnet.state_dict(), i3d)
    torch.testing.assert_close(inflated["layer1.0.conv1.weight"][:, :, 1], resnet.state_dict()["layer1.0.conv1.weight"] / 3)
    torch.testing.assert_close(inflated["conv1.weight"].sum(2), resnet.state_dict()["conv1.weight"])


def test_clips_shorter_than_the_temporal_stride_are_refused():
    model = create_model("nonlocal_i3d")
    with pytest.raises(InputError, match="at least 8 frames .* got 7; send a longer clip"):
        model(torch.randn(1, 7, 3, 64, 64))
    with pytest.raises(InputError, match=r"\(batch, frames, 3, height, width\)"):
        model(torch.randn(1, 3, 16, 64, 64))  # NCTHW instead of NTCHW
    with torch.inference_mode():
        assert model(torch.randn(1, 8, 3, 64, 64)).shape == (1, 10)


def test_i3d_spec_has_a_dynamic_frame_axis():
    spec = get_spec("nonlocal_i3d")
    assert spec.task == "video-classification"
    assert spec.inputs[0].name == "video" and spec.inputs[0].shape == ("batch", "frames", 3, 64, 64)
    assert spec.default_dims == {"frames": 16} and spec.preprocessing["num_frames"] == 16
    assert spec.preprocessing["layout"] == "NTCHW" and spec.preprocessing["frame_stride"] == 2
    assert get_spec("nonlocal_i3d", "i3d_resnet50").default_dims == {"frames": 32}
    assert get_spec("nonlocal_i3d", dynamic_frames=False).inputs[0].shape == ("batch", 16, 3, 64, 64)
    assert get_spec("nonlocal_resnet").inputs[0].shape == ("batch", 3, "height", "width")


def _live_checkpoint(name: str, config: str, path):
    """Weights of `config` whose non-local blocks are not the identity (W_z's BN scale is
    0 at init, which would hide the pairwise path from any parity check), with BN
    statistics measured on a batch as training leaves them (without, the dot product's
    unnormalised affinities grow the activations to 1e6); -> the file."""
    model = create_model(name, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.nonlocal_blocks.values():
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.bias.uniform_(-0.1, 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    feed = {k: torch.from_numpy(v) for k, v in get_spec(name, config).example_inputs(4, seed=9).items()}
    with torch.no_grad():
        model.train()(**feed)
    model.eval()
    with torch.inference_mode():
        assert not torch.allclose(model(**feed), create_model(name, config)(**feed)), "the blocks count"
    return save_state_dict(model, path)


# Every pairwise function in space-time; in 2-D only the default (after flattening the
# positions the pairwise code is the same, and each export costs ~10 s of the suite).
VARIANTS = [("nonlocal_resnet", "tiny")] + [("nonlocal_i3d", config) for config in
                                            ("tiny", "tiny_gaussian", "tiny_dot", "tiny_concat")]
PAIRWISE_OF = {"tiny": EMBEDDED_GAUSSIAN, "tiny_gaussian": GAUSSIAN, "tiny_dot": DOT_PRODUCT,
               "tiny_concat": CONCATENATION}


@pytest.mark.parametrize(("name", "config"), VARIANTS)
def test_pairwise_variants_export_with_parity(name, config, tmp_path):
    """Every pairwise function, in space and in space-time, exports with parity at batch 1
    and 3 (the exporter's check), with live non-local blocks; nonlocal_i3d, exported at 16
    frames, also runs clips of 8 and 27 frames."""
    assert create_model(name, config).nonlocal_blocks["layer2_0"].pairwise == PAIRWISE_OF[config]
    checkpoint = _live_checkpoint(name, config, tmp_path / "live.pt")
    result = export_onnx(name, tmp_path / config, config=config, checkpoint=checkpoint)
    assert result.passed
    assert [r.label for r in result.parity] == ["batch 1", "batch 3"]
    # Within the spec's tolerance (result.passed); live blocks put logits at O(1-5), where
    # float32 round-off through the trunk measured up to 5e-5 (2e-5 relative).
    assert all(r.outputs[0].cosine_similarity > 0.99999 for r in result.parity)
    if name != "nonlocal_i3d":
        return
    spec = get_spec(name, config)
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        for frames, batch in ((8, 1), (27, 3)):
            feed = spec.example_inputs(batch, seed=frames, frames=frames)
            report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
            assert report.passed, (frames, report.failures())
            assert report.outputs[0].shape == (batch, 10)
