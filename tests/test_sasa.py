"""SASA ResNets: the attention is local and is eq. 3 of the paper, it replaces the 3x3
convolutions where the paper says (with pooling where they had stride 2), the paper's
ResNets have the paper's sizes, and the model exports through the WindowAttention op
(and without it) at any image size."""

import onnx
import pytest
import torch
import torch.nn.functional as F

from attnserve import runtime
from attnserve.compare import compare_outputs
from attnserve.export import export_onnx
from attnserve.models import create_model, get_spec
from attnserve.models.sasa import CONFIGS, LocalSelfAttention, SasaResNet


def _eq3(layer: LocalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3 in plain torch, written from the paper: for each pixel, the k x k pixels
    around it (those inside the image), logits q^T k + q^T r with r the concatenated row-
    and column-offset embeddings, split depthwise into heads."""
    B, _, H, W = x.shape
    k, N, d = layer.kernel_size, layer.num_heads, layer.out_chs
    pad = (k - 1) // 2
    q, key, v = layer.qkv(x).chunk(3, dim=1)  # (B, d, H, W) each
    # F.unfold: channel-major, then the k x k positions row-major (offset = index - pad).
    keys = F.unfold(key, k, padding=pad).reshape(B, d, k * k, H, W)
    values = F.unfold(v, k, padding=pad).reshape(B, d, k * k, H, W)
    inside = F.unfold(torch.ones(1, 1, H, W), k, padding=pad).reshape(1, 1, k * k, H, W) > 0
    r = torch.empty(k, k, d)
    for a in range(k):  # row offset a - pad
        for b in range(k):  # column offset b - pad
            r[a, b] = torch.cat([layer.rel_rows[a], layer.rel_cols[b]])
    r = r.reshape(k * k, d).T[None, :, :, None, None]  # (1, d, k^2, 1, 1)
    products = q[:, :, None] * (keys + r)  # (B, d, k^2, H, W)
    logits = products.reshape(B, N, d // N, k * k, H, W).sum(2)  # per head: (B, N, k^2, H, W)
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
    out = weights[:, :, None] * values.reshape(B, N, d // N, k * k, H, W)
    return out.sum(3).reshape(B, d, H, W)


@pytest.mark.parametrize(("kernel", "heads", "size"), [(7, 8, (9, 11)), (3, 2, (6, 5)), (7, 4, (4, 3))])
def test_attention_is_eq_3(kernel, heads, size):
    torch.manual_seed(0)
    layer = LocalSelfAttention(12, 16, kernel, heads)
    x = torch.randn(2, 12, *size)
    with torch.inference_mode():
        got = layer(x)
        torch.testing.assert_close(got, _eq3(layer, x), atol=1e-5, rtol=1e-5)
        # The relative term matters: without it the output is another one.
        layer.rel_rows.zero_()
        layer.rel_cols.zero_()
        assert (layer(x) - got).abs().max() > 1e-2


def test_attention_is_local():
    """A change at one pixel reaches exactly the outputs whose k x k neighbourhood holds
    it, after one attention layer (k = 7: 3 pixels either way)."""
    torch.manual_seed(0)
    layer = LocalSelfAttention(8, 16, 7, 8)
    x = torch.randn(2, 8, 20, 20)
    y = x.clone()
    y[:, :, 12, 5] += torch.randn(8)
    with torch.inference_mode():
        changed = (layer(x) != layer(y)).any(dim=1).any(dim=0)  # (H, W)
    want = torch.zeros(20, 20, dtype=torch.bool)
    want[12 - 3:12 + 4, 5 - 3:5 + 4] = True
    assert torch.equal(changed, want)


def test_bottlenecks_attend_then_pool_where_resnet_had_stride_2():
    """Sec. 3.1: attention runs at the block's input resolution; 2x2 average pooling with
    stride 2 follows it in the first block of stages 2-4. Maps at strides 4, 8, 16, 32."""
    model = create_model("sasa_resnet")
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (tuple(args[0].shape), tuple(out.shape))  # returns None: keeps the output
        return hook

    for name, module in model.named_modules():
        if isinstance(module, LocalSelfAttention):
            module.register_forward_hook(record(name))
    with torch.inference_mode():
        x = model.maxpool(model.act1(model.bn1(model.conv1(torch.randn(2, 3, 64, 64)))))
        maps = []
        for i in range(4):
            x = getattr(model, f"layer{i + 1}")(x)
            maps.append(tuple(x.shape))
    assert maps == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    planes = (16, 32, 64, 128)
    inputs = (16, 16, 8, 4)  # the block's input map: pooling comes after the attention
    assert seen == {f"layer{i + 1}.0.attn": ((2, p, s, s), (2, p, s, s))
                    for i, (p, s) in enumerate(zip(planes, inputs, strict=True))}
    pools = [type(getattr(model, f"layer{i + 1}")[0].pool).__name__ for i in range(4)]
    assert pools == ["Identity", "AvgPool2d", "AvgPool2d", "AvgPool2d"]
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())


def test_odd_maps_keep_the_shortcut_size():
    """Ceil-mode pooling: 40 x 56 -> 10 x 14 -> 5 x 7 -> 3 x 4 -> 2 x 2."""
    model = create_model("sasa_resnet")
    with torch.inference_mode():
        assert model.forward_features(torch.randn(1, 3, 40, 56)).shape == (1, 512, 2, 2)
        assert model(torch.randn(1, 3, 37, 53)).shape == (1, 10)


def test_paper_resnets_have_the_papers_sizes():
    """Table 1, "conv-stem + attention": ResNet-26 10.3M, ResNet-50 18.0M parameters."""
    with torch.device("meta"):
        got = {c: sum(p.numel() for p in SasaResNet(CONFIGS[c]).parameters()) / 1e6
               for c in ("resnet26", "resnet50")}
    assert got == pytest.approx({"resnet26": 10.3, "resnet50": 18.0}, abs=0.05)
    assert CONFIGS["resnet26"].layers == (1, 2, 4, 1) and CONFIGS["resnet50"].layers == (3, 4, 6, 3)
    assert {(c.kernel_size, c.num_heads) for n, c in CONFIGS.items() if n != "tiny"} == {(7, 8)}


def _check_other_sizes(out_dir) -> None:
    spec = get_spec("sasa_resnet")
    assert spec.inputs[0].shape == ("batch", 3, "height", "width")
    for height, width in ((96, 80), (37, 53)):  # 37 x 53: odd maps in every stage
        feed = spec.example_inputs(2, seed=5, height=height, width=width)
        with runtime.load(out_dir, "ort") as ort, runtime.load(out_dir, "torch") as ref:
            report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
        assert report.passed, report.failures()


def test_exports_one_window_attention_node_per_bottleneck(exported_tiny):
    result = exported_tiny("sasa_resnet")
    assert result.passed
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == "attnserve"]
    assert [n.op_type for n in nodes] == ["WindowAttention"] * sum(CONFIGS["tiny"].layers)
    modes = {a.s for n in nodes for a in n.attribute if a.name == "mode"}
    assert modes == {b"sliding"}
    _check_other_sizes(result.out_dir)


def test_exports_with_standard_ops_only_at_any_size(tmp_path):
    result = export_onnx("sasa_resnet", tmp_path / "sasa", custom_ops=False)
    assert result.passed
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert not model.functions and all(n.domain != "attnserve" for n in model.graph.node)
    _check_other_sizes(result.out_dir)
