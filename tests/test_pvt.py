"""PVT v1: the pyramid has the paper's shapes, spatial-reduction attention takes its keys
from the reduced map, bad image sizes say why, Hugging Face checkpoints load, and the
model exports.

Parity with transformers' own PvtForImageClassification (same random weights) is in
test_timm_parity.py, which runs the library in the reference environment.
"""

import math
import re

import onnx
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from attnserve.errors import CheckpointError, InputError
from attnserve.models import create_model, get_spec
from attnserve.models.pvt import CONFIGS, PyramidVisionTransformer, SpatialReductionAttention

TINY_DIMS = (16, 32, 40, 64)
SR = (8, 4, 2, 1)


def test_images_in_logits_out():
    spec = get_spec("pvt")
    assert spec.task == "image-classification"
    assert spec.inputs[0].name == "images" and spec.inputs[0].shape == ("batch", 3, 64, 64)
    assert spec.outputs[0].shape == ("batch", 10)
    assert spec.preprocessing["image_size"] == 64
    assert get_spec("pvt", "pvt_small").inputs[0].shape == ("batch", 3, 224, 224)
    model = create_model("pvt")
    for batch in (1, 3):
        images = torch.from_numpy(spec.example_inputs(batch)["images"])
        with torch.inference_mode():
            assert model(images).shape == (batch, 10)


@pytest.mark.parametrize(("config", "size", "dims"), [
    ("tiny", 64, TINY_DIMS),
    ("pvt_tiny", 224, (64, 128, 320, 512)),  # fig. 3 / Table 1: 56, 28, 14, 7 at C = 64 .. 512
])
def test_pyramid_has_strides_4_8_16_32(config, size, dims):
    if config == "tiny":
        model = create_model("pvt", config)
        images = torch.randn(2, 3, size, size)
    else:  # shapes only
        with torch.device("meta"):
            model = PyramidVisionTransformer(CONFIGS[config])
            images = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        maps = model.forward_pyramid(images)
        tokens = model.forward_features(images)
    want = [(2, d, size // s, size // s) for d, s in zip(dims, (4, 8, 16, 32), strict=True)]
    assert [tuple(m.shape) for m in maps] == want
    assert tuple(tokens.shape) == (2, 1 + (size // 32) ** 2, dims[-1])  # the class token only in stage 4
    assert [tuple(getattr(model, f"pos_embed{i}").shape) for i in range(1, 5)] == [
        (1, (size // s) ** 2 + (s == 32), d) for d, s in zip(dims, (4, 8, 16, 32), strict=True)]


@pytest.mark.parametrize(("config", "size"), [("tiny", 64), ("pvt_small", 224)])
def test_sra_takes_keys_and_values_from_the_reduced_map(config, size):
    """Eq. 2-3: queries from all H W tokens, keys and values from (H / R)(W / R) of them."""
    if config == "tiny":
        model = create_model("pvt", config)
    else:
        with torch.device("meta"):
            model = PyramidVisionTransformer(CONFIGS[config])
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, []).append(tuple(args[0].shape))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, SpatialReductionAttention):
            module.q.register_forward_hook(record(f"{name}.q"))
            module.kv.register_forward_hook(record(f"{name}.kv"))
    images = torch.randn(2, 3, size, size, device="meta" if config != "tiny" else "cpu")
    with torch.inference_mode():
        model(images)
    depths = CONFIGS[config].depths
    dims = CONFIGS[config].embed_dims
    assert len(seen) == 2 * sum(depths)
    for i, (r, stride) in enumerate(zip(SR, (4, 8, 16, 32), strict=True)):
        side, cls = size // stride, int(i == 3)
        for j in range(depths[i]):
            assert seen[f"block{i + 1}.{j}.attn.q"] == [(2, side * side + cls, dims[i])]
            assert seen[f"block{i + 1}.{j}.attn.kv"] == [(2, (side // r) ** 2 + cls, dims[i])]


def test_spatial_reduction_is_a_linear_map_of_each_r_by_r_cell():
    """SR(x) = Norm(Reshape(x, R) W^S) (eq. 3): each R x R cell's R^2 C values, flattened,
    times one (R^2 C, C) matrix; the model does it as a convolution with kernel = stride = R."""
    attn = create_model("pvt").block1[0].attn  # C = 16, R = 8
    C, R, H, W = 16, 8, 16, 24
    x = torch.randn(2, H * W, C)
    grid = x.reshape(2, H // R, R, W // R, R, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/R, W/R, R, R, C)
    cells = grid.reshape(2, (H // R) * (W // R), R * R * C)  # Reshape(x, R): (HW / R^2, R^2 C)
    w_s = attn.sr.weight.permute(2, 3, 1, 0).reshape(R * R * C, C)  # (R^2 C, C), rows (r_h, r_w, c)
    want = F.layer_norm(cells @ w_s + attn.sr.bias, (C,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    with torch.inference_mode():
        got = attn.reduce(x, (H, W))
    assert got.shape == (2, (H // R) * (W // R), C)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_is_eq_4_over_the_reduced_keys():
    """softmax(Q K^T / sqrt(d_head)) V per head with K, V from SR(x), then W^O."""
    attn = create_model("pvt").block2[0].attn  # C = 32, 2 heads, R = 4
    x = torch.randn(2, 8 * 8, 32)
    with torch.inference_mode():
        got = attn(x, (8, 8))
        reduced = attn.reduce(x, (8, 8))  # (2, 4, 32)
        q = attn.q(x).reshape(2, 64, 2, 16).transpose(1, 2)
        k, v = attn.kv(reduced).reshape(2, 4, 2, 2, 16).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(-1)  # (2, heads, 64, 4)
        want = attn.proj((weights @ v).transpose(1, 2).reshape(2, 64, 32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("shape", "message"), [
    ((1, 3, 48, 48), "multiples of 32; got 48 x 48"),
    ((1, 3, 64, 80), "multiples of 32; got 64 x 80"),
    ((1, 3, 96, 96), "fix the image size at 64 x 64, got 96 x 96.*square images.*img_size=96"),
    ((1, 1, 64, 64), r"images of shape \(batch, 3, 64, 64\), got \(1, 1, 64, 64\)"),
])
def test_bad_image_sizes_say_what_to_do(shape, message):
    model = create_model("pvt")
    with pytest.raises(InputError, match=message), torch.inference_mode():
        model(torch.randn(*shape))
    with pytest.raises(ValueError, match="img_size 72 is not a multiple of the total reduction 32"):
        create_model("pvt", img_size=72)


def test_other_sizes_are_a_config():
    model = create_model("pvt", img_size=96)
    assert get_spec("pvt", img_size=96).inputs[0].shape == ("batch", 3, 96, 96)
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_paper_configs_have_the_papers_sizes():
    """Table 2 of the paper: PVT-Tiny 13.2M, Small 24.5M, Medium 44.2M, Large 61.4M."""
    want = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}
    with torch.device("meta"):
        got = {c: sum(p.numel() for p in PyramidVisionTransformer(CONFIGS[c]).parameters()) / 1e6
               for c in want}
    assert got == pytest.approx(want, abs=0.05)


def _huggingface_state_dict(model: PyramidVisionTransformer, prefix: str = "pvt.") -> dict:
    """Our weights under transformers' PvtForImageClassification names."""
    sd = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        stage = parts[0][-1]
        if key == "cls_token":
            sd[f"{prefix}encoder.patch_embeddings.3.cls_token"] = value
        elif parts[0].startswith("pos_embed"):
            sd[f"{prefix}encoder.patch_embeddings.{int(stage) - 1}.position_embeddings"] = value
        elif parts[0].startswith("patch_embed"):
            name = {"proj": "projection", "norm": "layer_norm"}[parts[1]]
            sd[f"{prefix}encoder.patch_embeddings.{int(stage) - 1}.{name}.{parts[2]}"] = value
        elif parts[0].startswith("block"):
            layer = f"{prefix}encoder.block.{int(stage) - 1}.{parts[1]}"
            rest = ".".join(parts[2:])
            if rest.startswith("attn.kv."):
                k, v = value.chunk(2)
                sd[f"{layer}.attention.self.key.{parts[-1]}"] = k
                sd[f"{layer}.attention.self.value.{parts[-1]}"] = v
                continue
            for ours, theirs in (("norm1.", "layer_norm_1."), ("norm2.", "layer_norm_2."),
                                 ("attn.q.", "attention.self.query."),
                                 ("attn.sr.", "attention.self.sequence_reduction."),
                                 ("attn.norm.", "attention.self.layer_norm."),
                                 ("attn.proj.", "attention.output.dense."),
                                 ("mlp.fc1.", "mlp.dense1."), ("mlp.fc2.", "mlp.dense2.")):
                rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
            sd[f"{layer}.{rest}"] = value
        elif parts[0] == "norm":
            sd[f"{prefix}encoder.layer_norm.{parts[1]}"] = value
        else:
            assert parts[0] == "head"
            sd[f"classifier.{parts[1]}"] = value
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def test_huggingface_layout_loads_through_the_filter(tmp_path):
    trained = create_model("pvt", seed=7)
    sd = _huggingface_state_dict(trained)
    kv_layers = sum(CONFIGS["tiny"].depths)
    assert len(sd) == len(trained.state_dict()) + 2 * kv_layers  # key and value apart
    save_file(sd, str(tmp_path / "hf.safetensors"))
    loaded = create_model("pvt", checkpoint=str(tmp_path / "hf.safetensors"))
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(images), trained(images))


def test_huggingface_class_token_outside_the_last_stage_is_refused(tmp_path):
    sd = _huggingface_state_dict(create_model("pvt"))
    sd["pvt.encoder.patch_embeddings.1.cls_token"] = sd.pop("pvt.encoder.patch_embeddings.3.cls_token")
    save_file(sd, str(tmp_path / "hf.safetensors"))
    with pytest.raises(CheckpointError, match="class token in stage 2; PVT v1 has one only in its last"):
        create_model("pvt", checkpoint=str(tmp_path / "hf.safetensors"))


def test_exports_with_standard_ops_only(exported_tiny):
    """SRA is plain attention over a convolution's output: no custom op in the graph."""
    result = exported_tiny("pvt")
    assert result.passed
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert not model.functions and all(n.domain != "attnserve" for n in model.graph.node)
    # Four SR convolutions (stages 1-3 reduce; stage 4 does not) beside the four patch embeddings.
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 4 + 3


def test_parameter_names_are_the_authors():
    """whai362/PVT classification/pvt.py: patch_embed{i}, pos_embed{i}, block{i}.{j} with
    attn.q / attn.kv / attn.sr / attn.norm, cls_token, norm, head; so their checkpoints
    load by name."""
    pattern = re.compile(
        r"(patch_embed[1-4]\.(proj|norm)|block[1-4]\.\d+\.(norm1|norm2|attn\.(q|kv|sr|norm|proj)|mlp\.fc[12])"
        r"|norm|head)\.(weight|bias)|pos_embed[1-4]|cls_token"
    )
    keys = list(create_model("pvt").state_dict())
    assert [k for k in keys if not pattern.fullmatch(k)] == []
    assert "block1.0.attn.sr.weight" in keys and "block4.0.attn.sr.weight" not in keys  # R_4 = 1
