"""The custom ops' torch and ONNX faces, held to the NumPy references.

Each case runs the torch op and compares it with `attnserve.ops.reference`; then exports
a module calling it, once with attnserve nodes (model-local function overloads) and once
with the functions inlined (standard ops only), and runs both on ONNX Runtime.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attnserve.errors import AttnserveError, ExportError
from attnserve.export.onnx_export import _torch_export
from attnserve.ops import affine_grid_sample, grid_sample, reference, window_attention
from attnserve.ops.onnx_ops import DOMAIN, PLUGIN_NAMESPACE
from attnserve.spec import ModelSpec, TensorSpec

RNG = np.random.default_rng(0)

# (q shape without batch, keyword arguments, rel_pos_bias shape, mask shape)
WINDOW_CASES = {
    "swin": ((2, 8, 8, 4), dict(window=(4, 4)), (2, 16, 16), None),
    "swin-shifted": ((2, 8, 8, 4), dict(window=(4, 4), shift=(2, 2)), (2, 16, 16), (4, 16, 16)),
    "mask-only": ((2, 8, 8, 4), dict(window=(4, 4), shift=(2, 2)), None, (4, 16, 16)),
    "rect-window": ((1, 6, 8, 4), dict(window=(3, 4), shift=(1, 2)), None, None),
    "shifted-causal": ((2, 6, 6, 4), dict(window=(2, 3), shift=(1, 2), causal=True), (2, 6, 6), (6, 6, 6)),
    "1d-blocks": ((3, 12, 4), dict(window=(4,)), (3, 4, 4), None),
    "image-transformer-1d": ((2, 12, 4), dict(window=(4,), memory_before=(4,), causal=True), None, None),
    "image-transformer-2d": ((2, 8, 8, 4), dict(window=(4, 4), memory_before=(2, 2), memory_after=(0, 2),
                                                causal=True), (2, 16, 48), None),
    "sasa": ((2, 6, 7, 4), dict(window=(3, 3), mode="sliding"), (2, 9), None),
    "sasa-query-bias": ((2, 5, 5, 4), dict(window=(3, 3), mode="sliding"), "per-query", None),
    "pdan-dilated": ((2, 12, 4), dict(window=(3,), mode="sliding", dilation=(2,)), (2, 3), None),
    "dilated-2d-causal": ((2, 6, 7, 4), dict(window=(3, 5), mode="sliding", dilation=(2, 1), causal=True),
                          None, None),
}


def _bias(shape, batch, q_shape):
    if shape == "per-query":
        *spatial, _ = q_shape[1:]
        shape = (batch, q_shape[0], *spatial, 9)
    return RNG.standard_normal(shape).astype(np.float32) if shape else None


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_attention_matches_the_reference(case):
    shape, kw, bias_shape, mask_shape = WINDOW_CASES[case]
    q, k, v = (RNG.standard_normal((2, *shape)).astype(np.float32) for _ in range(3))
    bias, mask = _bias(bias_shape, 2, shape), _bias(mask_shape, 2, shape)
    want = reference.window_attention(q, k, v, rel_pos_bias=bias, mask=mask, **kw)
    got = window_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
        rel_pos_bias=None if bias is None else torch.from_numpy(bias),
        mask=None if mask is None else torch.from_numpy(mask), **kw,
    ).numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)


class _WindowModule(torch.nn.Module):
    def __init__(self, shape, kw, bias, mask):
        super().__init__()
        self.shape, self.kw = shape, kw
        self.bias = None if bias is None else torch.nn.Parameter(torch.from_numpy(bias))
        self.register_buffer("mask", None if mask is None else torch.from_numpy(mask))

    def forward(self, x):
        q = x.reshape(x.shape[0], *self.shape)  # (B, heads, *S, d)
        return window_attention(q, q.flip(-1), q * 0.5, rel_pos_bias=self.bias, mask=self.mask, **self.kw)


def _export_and_run(module, spec, tmp_path: Path, custom_ops: bool, feed):
    path = tmp_path / f"custom-{custom_ops}.onnx"
    _torch_export(module, spec, path, 20, custom_ops)
    model = onnx.load(str(path))
    out = ort.InferenceSession(str(path)).run(None, feed)[0]
    return model, out


@pytest.mark.parametrize("custom_ops", [True, False])
@pytest.mark.parametrize("case", [c for c in WINDOW_CASES if c != "sasa-query-bias"])
def test_window_attention_exports_and_runs_on_onnxruntime(case, custom_ops, tmp_path):
    shape, kw, bias_shape, mask_shape = WINDOW_CASES[case]
    module = _WindowModule(shape, kw, _bias(bias_shape, 1, shape), _bias(mask_shape, 1, shape)).eval()
    n = int(np.prod(shape))
    spec = ModelSpec("w", "t", "test", (TensorSpec("x", "float32", ("batch", n)),),
                     (TensorSpec("y", "float32", ("batch", *shape)),))
    x = RNG.standard_normal((3, n)).astype(np.float32)  # batch 3: the batch axis is dynamic
    model, out = _export_and_run(module, spec, tmp_path, custom_ops, {"x": x})
    q = x.reshape(3, *shape)
    bias = None if module.bias is None else module.bias.detach().numpy()
    mask = None if module.mask is None else module.mask.numpy()
    want = reference.window_attention(q, np.flip(q, -1), q * 0.5, rel_pos_bias=bias, mask=mask, **kw)
    np.testing.assert_allclose(out, want, atol=2e-5)
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    if custom_ops:
        assert [n.op_type for n in custom] == ["WindowAttention"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom[0].attribute}
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert list(attrs["window"]) == list(kw["window"])
        assert attrs["mode"] == kw.get("mode", "block").encode()
        fn = {(f.domain, f.name, f.overload) for f in model.functions}
        assert (DOMAIN, "WindowAttention", custom[0].overload) in fn
    else:
        assert not custom and not model.functions
        assert all(o.domain != DOMAIN for o in model.opset_import)


SAMPLER_CASES = [
    dict(), dict(mode="nearest"), dict(padding_mode="border", align_corners=True),
    dict(padding_mode="reflection"), dict(padding_mode="reflection", align_corners=True),
]


class _Sampler(torch.nn.Module):
    def __init__(self, kw, out_size=None):
        super().__init__()
        self.kw, self.out_size = kw, out_size

    def forward(self, x, g):
        if self.out_size:
            return affine_grid_sample(x, g, self.out_size, **self.kw)
        return grid_sample(x, g, **self.kw)


@pytest.mark.parametrize("custom_ops", [True, False])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("kw", SAMPLER_CASES, ids=lambda kw: "-".join(map(str, kw.values())) or "default")
def test_samplers_match_the_reference_in_torch_and_onnxruntime(rank, affine, kw, custom_ops, tmp_path):
    x_shape = (3, 6, 7) if rank == 2 else (3, 4, 6, 7)
    out_size = (5, 4) if rank == 2 else (3, 5, 4)
    g_shape = (rank, rank + 1) if affine else (*out_size, rank)
    x = RNG.standard_normal((2, *x_shape)).astype(np.float32)
    g = RNG.uniform(-1.2, 1.2, (2, *g_shape)).astype(np.float32)
    align = kw.get("align_corners", False)
    grid = reference.affine_grid(g, out_size, align) if affine else g
    want = reference.grid_sample(x, grid, **kw)
    module = _Sampler(kw, out_size if affine else None)
    got = module(torch.from_numpy(x), torch.from_numpy(g)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    spec = ModelSpec("s", "t", "test",
                     (TensorSpec("x", "float32", ("batch", *x_shape)), TensorSpec("g", "float32", ("batch", *g_shape))),
                     (TensorSpec("y", "float32", ("batch", 3, *out_size)),))
    model, out = _export_and_run(module, spec, tmp_path, custom_ops, {"x": x, "g": g})
    np.testing.assert_allclose(out, want, atol=1e-5)
    names = {n.op_type for n in model.graph.node}
    if custom_ops:
        assert names == {"AffineGridSampler" if affine else "GridSampler"}
    else:
        assert "GridSample" in names and not names & {"GridSampler", "AffineGridSampler"}


def test_op_names_are_not_onnx_names():
    from attnserve.ops.onnx_ops import SCHEMAS

    for schema in SCHEMAS:
        with pytest.raises(onnx.defs.SchemaError):
            onnx.defs.get_schema(schema.name, 22, "")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: window_attention(*[torch.zeros(1, 2, 6, 6, 4)] * 3, window=(4, 4)),
         r"spatial size \[6, 6\] is not a multiple of the window \[4, 4\]; pad"),
        (lambda: window_attention(*[torch.zeros(1, 2, 8, 4)] * 3, window=(4,), mode="diagonal"), "mode must be"),
        (lambda: window_attention(*[torch.zeros(1, 2, 8, 4)] * 3, window=(4,), dilation=(2,)), "mode 'sliding' only"),
        (lambda: window_attention(*[torch.zeros(1, 2, 8, 8, 4)] * 3, window=(4, 4),
                                  rel_pos_bias=torch.zeros(2, 16, 15)), r"rel_pos_bias must be \(heads, Nq, Nk\)"),
        (lambda: grid_sample(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 3)), r"grid of shape \(N, Ho, Wo, 2\)"),
        (lambda: grid_sample(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 2, 2)), r"\(N, Do, Ho, Wo, 3\)"),
        (lambda: grid_sample(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 2), mode="bicubic"), "mode must be"),
        (lambda: grid_sample(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, 2), padding_mode="wrap"), "padding_mode"),
        (lambda: affine_grid_sample(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4), (2, 2)), r"theta of shape \(N, 2, 3\)"),
        (lambda: affine_grid_sample(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 3), (2, 2)), "theta batch 1 differs"),
    ],
)
def test_bad_arguments_are_one_clear_error(call, message):
    with pytest.raises(AttnserveError, match=message):
        call()


def test_bad_arguments_fail_at_export_not_at_run_time(tmp_path):
    spec = ModelSpec("s", "t", "test",
                     (TensorSpec("x", "float32", ("batch", 3, 4, 4)), TensorSpec("g", "float32", ("batch", 2, 2, 3))),
                     (TensorSpec("y", "float32", ("batch", 3, 2, 2)),))
    with pytest.raises(ExportError, match=r"grid of shape \(N, Ho, Wo, 2\)"):
        _torch_export(_Sampler({}), spec, tmp_path / "m.onnx", 20)
    assert not (tmp_path / "m.onnx").exists()


def test_custom_ops_need_opset_20(tmp_path):
    module = _WindowModule((2, 8, 4), dict(window=(4,)), None, None)
    spec = ModelSpec("w", "t", "test", (TensorSpec("x", "float32", ("batch", 64)),),
                     (TensorSpec("y", "float32", ("batch", 2, 8, 4)),))
    with pytest.raises(ExportError, match="need opset 20"):
        _torch_export(module, spec, tmp_path / "m.onnx", 18)


LOWERABLE = ["swin", "swin-shifted", "mask-only", "rect-window", "1d-blocks"]


@pytest.mark.parametrize("case", LOWERABLE)
def test_onnxruntime_fused_attention_path_matches_the_reference(case, tmp_path):
    from attnserve.runtime.ort import OrtRunner

    shape, kw, bias_shape, mask_shape = WINDOW_CASES[case]
    module = _WindowModule(shape, kw, _bias(bias_shape, 1, shape), _bias(mask_shape, 1, shape)).eval()
    n = int(np.prod(shape))
    spec = ModelSpec("w", "t", "test", (TensorSpec("x", "float32", ("batch", n)),),
                     (TensorSpec("y", "float32", ("batch", *shape)),))
    _torch_export(module, spec, tmp_path / "m.onnx", 20, True)
    x = RNG.standard_normal((3, n)).astype(np.float32)
    q = x.reshape(3, *shape)
    bias = None if module.bias is None else module.bias.detach().numpy()
    mask = None if module.mask is None else module.mask.numpy()
    want = reference.window_attention(q, np.flip(q, -1), q * 0.5, rel_pos_bias=bias, mask=mask, **kw)
    with OrtRunner(tmp_path / "m.onnx", fused_custom_ops=True) as fused, OrtRunner(tmp_path / "m.onnx") as plain:
        assert fused.lowered_nodes == 1 and plain.lowered_nodes == 0
        np.testing.assert_allclose(fused.run({"x": x})["y"], want, atol=2e-5)
        np.testing.assert_allclose(plain.run({"x": x})["y"], want, atol=2e-5)


def test_the_fused_path_leaves_other_windows_alone(tmp_path):
    from attnserve.runtime.ort import OrtRunner

    shape, kw, _, _ = WINDOW_CASES["image-transformer-1d"]
    module = _WindowModule(shape, kw, None, None).eval()
    n = int(np.prod(shape))
    spec = ModelSpec("w", "t", "test", (TensorSpec("x", "float32", ("batch", n)),),
                     (TensorSpec("y", "float32", ("batch", *shape)),))
    _torch_export(module, spec, tmp_path / "m.onnx", 20, True)
    with OrtRunner(tmp_path / "m.onnx", fused_custom_ops=True) as runner:
        assert runner.lowered_nodes == 0
