"""The TensorRT plugins (`attnserve.plugins`), checked here without TensorRT or a GPU.

- The contract `shapes.PLUGINS` against the ONNX schemas and against the custom nodes of
  exported models: what TensorRT's parser needs to map a node to a plugin.
- Attribute normalisation, output shapes and launch plans in plain Python, also on
  symbolic dims that allow only what TensorRT's expressions allow.
- The signatures the tensorrt.plugin decorators validate, built with stand-in classes.
- `prepare_onnx`.
- PTX for sm_80, sm_87, sm_89 and sm_90, one configuration per op per target (the full
  matrix of configurations would take minutes to compile on two cores), in a
  subprocess without TRITON_INTERPRET: target, entry name, and a parameter list equal
  to what TensorRT passes (inputs, int32 scalars, output); ptxas assembles every file.
- Numbers: each wrapper kernel launched exactly as its plan says (grid, scalars in
  TensorRT's order, constexprs) under TRITON_INTERPRET=1 in a subprocess, against
  `attnserve.ops.reference`.

The kernel modules are imported only in subprocesses: triton.jit picks the interpreter
or the compiler when a module is imported, and tests/test_kernels.py imports the same
modules in the test process with TRITON_INTERPRET=1.
"""

import functools
import importlib
import importlib.util
import inspect
import json
import operator
import os
import subprocess
import sys
import textwrap
import typing

import numpy as np
import onnx
import pytest

from attnserve.errors import AttnserveError, BackendUnavailableError
from attnserve.plugins import PLUGINS, prepare_onnx, register_plugins, shapes, trt_plugins
from attnserve.plugins import aot as plugin_aot
from attnserve.plugins.onnx_graph import ONNX_ATTR_TYPES, check_plugin_nodes, custom_nodes

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # absent, or PyPI's placeholder that cannot load NVIDIA's libraries
        return False
    return True


HAS_TENSORRT = _tensorrt_importable()
TARGETS = (80, 87, 89, 90)


# The tests' windows use scale 0.5 (larger logits than a real head's d**-0.5 exercise the softmax).
_window_attrs = functools.partial(plugin_aot.window_attrs, scale=0.5)
_sample_attrs = plugin_aot.sample_attrs


# --- the contract --------------------------------------------------------------------


def test_plugins_match_the_onnx_schemas():
    from onnx.defs import OpSchema

    from attnserve.ops import onnx_ops
    from attnserve.plugins import onnx_graph

    assert shapes.NAMESPACE == onnx_ops.PLUGIN_NAMESPACE and onnx_graph.DOMAIN == onnx_ops.DOMAIN
    assert sorted(PLUGINS) == sorted(s.name for s in onnx_ops.SCHEMAS)
    for schema in onnx_ops.SCHEMAS:
        spec = PLUGINS[schema.name]
        assert len(schema.inputs) == len(spec.inputs), schema.name
        declared = {n: a.type for n, a in schema.attributes.items() if n != "plugin_namespace"}
        assert sorted(declared) == sorted(spec.attribute_names), schema.name
        for name, kind in spec.attributes:
            assert declared[name] == OpSchema.AttrType(ONNX_ATTR_TYPES[kind]), (schema.name, name)


def test_enumerations_match_the_ops():
    # the modules, not the functions attnserve.ops re-exports under the same names
    grid_sample = importlib.import_module("attnserve.ops.grid_sample")
    window_attention = importlib.import_module("attnserve.ops.window_attention")
    assert shapes.WINDOW_MODES == window_attention.MODES
    assert shapes.SAMPLE_MODES == grid_sample.MODES
    assert tuple(shapes.PADDING_CODES) == grid_sample.PADDING_MODES  # codes: checked in the kernel subprocess


def test_normalize_attrs_takes_what_tensorrt_hands_over():
    # The ONNX parser gives INTS and INT as int32 fields, FLOAT as float32 and STRING as
    # chars with their terminating NUL; tensorrt.plugin converts them by annotation.
    raw = dict(window=np.array([7, 7], np.int32), mode="block\x00", shift=np.array([3, 3], np.int32),
               memory_before=np.zeros(2, np.int32), memory_after=np.zeros(2, np.int32),
               dilation=np.ones(2, np.int32), causal=np.array([0], np.int32), scale=np.array([0.125], np.float32))
    a = shapes.normalize_attrs("WindowAttention", raw)
    assert a == dict(window=[7, 7], mode="block", shift=[3, 3], memory_before=[0, 0], memory_after=[0, 0],
                     dilation=[1, 1], causal=0, scale=0.125)
    assert all(type(v) in (list, str, int, float) for v in a.values())
    chars = np.frombuffer(b"reflection\x00", np.int8)
    b = shapes.normalize_attrs("GridSampler", dict(mode=b"nearest\x00", padding_mode=chars, align_corners=1))
    assert b == dict(mode="nearest", padding_mode="reflection", align_corners=1)


@pytest.mark.parametrize("raw,match", [
    (dict(mode="bilinear", padding_mode="zeros"), r"missing \['align_corners'\]"),
    (dict(mode="bilinear", padding_mode="zeros", align_corners=0, aot=1), r"unknown \['aot'\]"),
    (dict(mode=3, padding_mode="zeros", align_corners=0), "mode should be str"),
    (dict(mode="bilinear", padding_mode="zeros", align_corners=[0, 1]), "align_corners should be int"),
])
def test_normalize_attrs_bad_values_are_one_sentence(raw, match):
    with pytest.raises(AttnserveError, match=match):
        shapes.normalize_attrs("GridSampler", raw)
    with pytest.raises(AttnserveError, match="no attnserve plugin named 'GridSample'"):
        shapes.normalize_attrs("GridSample", raw)


@pytest.mark.parametrize("op,in_shapes,attrs,want", [
    ("WindowAttention", [(2, 3, 8, 8, 4)] * 3 + [(3, 16, 16), (4, 16, 16)], _window_attrs([4, 4]), (2, 3, 8, 8, 4)),
    ("WindowAttention", [(2, 3, 12, 4)] * 3 + [(1,), (1,)], _window_attrs([3], mode="sliding"), (2, 3, 12, 4)),
    ("WindowAttention", [(1, 2, 5, 6, 4)] * 3 + [(1, 2, 5, 6, 9), (1,)], _window_attrs([3, 3], mode="sliding"),
     (1, 2, 5, 6, 4)),
    ("GridSampler", [(2, 3, 10, 12), (2, 5, 7, 2)], _sample_attrs(), (2, 3, 5, 7)),
    ("GridSampler", [(2, 3, 4, 10, 12), (2, 2, 5, 7, 3)], _sample_attrs(), (2, 3, 2, 5, 7)),
    ("AffineGridSampler", [(2, 1, 28, 28), (2, 2, 3)], _sample_attrs(out_size=[20, 24]), (2, 1, 20, 24)),
    ("AffineGridSampler", [(2, 1, 8, 9, 9), (2, 3, 4)], _sample_attrs(out_size=[4, 5, 6]), (2, 1, 4, 5, 6)),
])
def test_output_shapes(op, in_shapes, attrs, want):
    assert tuple(shapes.output_shape(op, in_shapes, attrs)) == want
    # symbolic dims pass through untouched (TensorRT's register function gets expressions)
    sym = [tuple(Sym.dim(f"d{i}_{j}") for j in range(len(s))) for i, s in enumerate(in_shapes)]
    out = shapes.output_shape(op, sym, attrs)
    env = {f"d{i}_{j}": d for i, s in enumerate(in_shapes) for j, d in enumerate(s)}
    assert tuple(evaluate(d, env) for d in out) == want


@pytest.mark.parametrize("op,in_shapes,attrs,match", [
    ("WindowAttention", [(2, 3, 8, 4)] * 3 + [(1,), (1,)], _window_attrs([4, 4]), "2 values for 1 spatial axes"),
    ("WindowAttention", [(2, 3, 8, 4)] * 3 + [(3, 4), (1,)], _window_attrs([4]), r"rel_pos_bias of rank \(3,\)"),
    ("WindowAttention", [(2, 3, 8, 4)] * 3 + [(1,), (2, 4, 4)], _window_attrs([4], mode="sliding"),
     r"mask of rank \(no mask\)"),
    ("WindowAttention", [(2, 3, 8, 4)] * 3 + [(1,), (1,)], _window_attrs([4], mode="dense"), "mode must be one of"),
    ("WindowAttention", [(2, 3, 8)] * 3 + [(1,), (1,)], _window_attrs([4]), "rank 4 or 5"),
    ("WindowAttention", [(2, 3, 8, 4)] * 3 + [(1,)], _window_attrs([4]), r"takes 5 inputs"),
    ("GridSampler", [(2, 3, 10, 12), (2, 1, 5, 7, 3)], _sample_attrs(), "grid of rank 4"),
    ("GridSampler", [(2, 3, 10, 12), (2, 5, 7, 2)], _sample_attrs(padding_mode="wrap"), "padding_mode must be"),
    ("AffineGridSampler", [(2, 1, 28, 28), (2, 2, 3)], _sample_attrs(out_size=[20]), "2 positive out_size"),
])
def test_output_shape_refuses_what_the_kernels_do_not_take(op, in_shapes, attrs, match):
    with pytest.raises(AttnserveError, match=match):
        shapes.output_shape(op, in_shapes, attrs)


# --- launch plans on TensorRT-like symbolic dims ----------------------------------------------------


class Sym:
    """A dimension known only at run time, with no more than tensorrt.plugin's
    SymIntExpr offers: + - * // with the expression on the left; no reflected
    operators, no %, no comparisons, no bool() or int()."""

    def __init__(self, fn):
        self.fn = fn

    @classmethod
    def dim(cls, name):
        out = cls(lambda env: env[name])
        out.name = name  # an input's dim, as opposed to an expression
        return out

    def _op(self, other, op):
        if isinstance(other, Sym):
            return Sym(lambda env: op(self.fn(env), other.fn(env)))
        if type(other) is int:
            return Sym(lambda env: op(self.fn(env), other))
        raise TypeError(f"symbolic {op.__name__} with {type(other).__name__}")

    def __add__(self, o):
        return self._op(o, operator.add)

    def __sub__(self, o):
        return self._op(o, operator.sub)

    def __mul__(self, o):
        return self._op(o, operator.mul)

    def __floordiv__(self, o):
        return self._op(o, operator.floordiv)

    def __eq__(self, o):
        raise TypeError("symbolic comparison")

    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("symbolic bool()")


def evaluate(x, env):
    return x.fn(env) if isinstance(x, Sym) else x


class SymArith:
    """shapes.Arith over Sym; `static` names the dims known at build time."""

    def __init__(self, static: dict):
        self.known = static

    def lift(self, value):
        return Sym(lambda env: value)

    def cdiv(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)
        a = self.lift(a) if isinstance(a, int) else a
        return (a + (b - 1)) // b if isinstance(b, int) else (a + b - 1) // b

    def static(self, dim):
        # the plans ask only about the inputs' own dims, as TensorRT's is_constant would be
        return dim if isinstance(dim, int) else self.known.get(dim.name)


def _sym_shapes(in_shapes):
    env = {f"d{i}_{j}": d for i, s in enumerate(in_shapes) for j, d in enumerate(s)}
    return [tuple(Sym.dim(f"d{i}_{j}") for j in range(len(s))) for i, s in enumerate(in_shapes)], env


PLAN_CASES = {
    "swin-shifted": ("WindowAttention", [(2, 3, 8, 8, 32)] * 3 + [(3, 16, 16), (4, 16, 16)],
                     _window_attrs([4, 4], shift=[2, 2])),
    "shift-beyond-size": ("WindowAttention", [(1, 2, 6, 8, 4)] * 3 + [(1,), (1,)], _window_attrs([2, 4], shift=[7, 9])),
    "pdan": ("WindowAttention", [(2, 3, 80, 4)] * 3 + [(1,), (1,)], _window_attrs([3], "sliding", dilation=[2])),
    "memory-causal": ("WindowAttention", [(1, 2, 12, 8)] * 3 + [(2, 4, 10), (1,)],
                      _window_attrs([4], before=[4], after=[2], causal=1)),
    "grid2d": ("GridSampler", [(2, 20, 6, 5), (2, 12, 13, 2)], _sample_attrs()),
    "grid3d": ("GridSampler", [(2, 3, 4, 6, 8), (2, 3, 5, 7, 3)], _sample_attrs("nearest", "reflection", 1)),
    "affine3d": ("AffineGridSampler", [(2, 3, 4, 5, 6), (2, 3, 4)], _sample_attrs(out_size=[2, 3, 4])),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_plans_on_symbolic_dims_agree_with_concrete_plans(case):
    op, in_shapes, attrs = PLAN_CASES[case]
    want = shapes.plan(op, in_shapes, attrs)
    sym, env = _sym_shapes(in_shapes)
    # every dim known at build time (a static profile): the same plan
    got = shapes.plan(op, sym, attrs, SymArith(env))
    assert got.constexprs == want.constexprs
    assert [evaluate(v, env) for v in got.scalar_values] == list(want.scalar_values)
    assert [evaluate(g, env) for g in got.grid] == list(want.grid)
    # only head_dim known (dynamic batch and map size): the same scalars, tiles for large maps
    head_dim = {f"d0_{len(in_shapes[0]) - 1}": in_shapes[0][-1]} if op == "WindowAttention" else {}
    got = shapes.plan(op, sym, attrs, SymArith(head_dim))
    assert [evaluate(v, env) for v in got.scalar_values] == list(want.scalar_values)
    flags = {k: v for k, v in got.constexprs.items() if not k.startswith("BLOCK_")}
    assert flags == {k: v for k, v in want.constexprs.items() if not k.startswith("BLOCK_")}
    grid = [evaluate(g, env) for g in got.grid]
    if op == "WindowAttention":
        assert got.constexprs["BLOCK_Q"] == max(16, min(64, 8192 // got.constexprs["BLOCK_D"]))
        assert grid[0] == want.grid[0] and grid[1] * got.constexprs["BLOCK_Q"] >= np.prod(in_shapes[0][2:-1])
    else:
        assert got.constexprs["BLOCK_C"] == 16
        positions = np.prod(in_shapes[1][1:-1]) if op == "GridSampler" else np.prod(attrs["out_size"])
        assert grid[1] == want.grid[1] and grid[0] * got.constexprs["BLOCK_P"] >= positions


def test_plan_needs_a_static_head_dim_and_wraps_shifts():
    sym, env = _sym_shapes([(2, 3, 8, 8, 32)] * 3 + [(1,), (1,)])
    with pytest.raises(AttnserveError, match="head_dim .* must be fixed"):
        shapes.plan("WindowAttention", sym, _window_attrs([4, 4]), SymArith({}))
    p = shapes.plan("WindowAttention", [(1, 2, 6, 8, 4)] * 3 + [(1,), (1,)], _window_attrs([2, 4], shift=[7, 9]))
    assert dict(p.scalars)["SHIFT0"] == 1 and dict(p.scalars)["SHIFT1"] == 1  # the kernel wants [0, S)


# --- the tensorrt.plugin signatures -------------------------------------------------------


class _TensorDesc:
    pass


class _AutoTuneCombination:
    pass


class _KernelLaunchParams:
    pass


class _SymExprs:
    pass


class _SymIntExprs(_SymExprs):
    pass


def test_signatures_follow_tensorrt_plugin_rules():
    # The schema strings tensorrt.plugin builds in _validate.py (NVIDIA/TensorRT
    # python/packaging/bindings_wheel/tensorrt/plugin): register (inputs, attributes),
    # autotune (inputs, [attributes], outputs), aot_impl (inputs, [attributes], outputs, tactic);
    # aot_impl gets all attributes because TensorRT passes them all positionally.
    sigs = trt_plugins.signatures(_TensorDesc, _AutoTuneCombination, _KernelLaunchParams, _SymIntExprs)
    assert sorted(sigs) == sorted(PLUGINS)
    for op, spec in PLUGINS.items():
        reg, tune, aot = (sigs[op][r] for r in ("register", "autotune", "aot_impl"))
        assert list(reg.parameters) == [*spec.inputs, *spec.attribute_names]
        assert list(tune.parameters) == [*spec.inputs, "outputs"]
        assert list(aot.parameters) == [*spec.inputs, *spec.attribute_names, "outputs", "tactic"]
        for sig in (reg, tune, aot):
            for p in sig.parameters.values():
                assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
            for name in spec.inputs:
                assert sig.parameters[name].annotation is _TensorDesc
        kinds = dict(spec.attributes)
        for name in spec.attribute_names:
            annotation = reg.parameters[name].annotation
            assert aot.parameters[name].annotation == annotation  # tensorrt.plugin checks equality
            if kinds[name] == "str":
                assert annotation is str
            else:  # INT and FLOAT too: one-element arrays (see test_attribute_fields_*)
                assert typing.get_origin(annotation) is np.ndarray
                want = {"ints": np.int32, "int": np.int32, "float": np.float32}[kinds[name]]
                assert typing.get_args(typing.get_args(annotation)[1]) == (want,)
        assert reg.return_annotation is _TensorDesc
        assert typing.get_args(tune.parameters["outputs"].annotation) == (_TensorDesc,)
        assert aot.parameters["tactic"].annotation is int
        name, ptx, launch, extra = typing.get_args(aot.return_annotation)
        assert set(typing.get_args(name)) == set(typing.get_args(ptx)) == {str, bytes}
        assert launch is _KernelLaunchParams and issubclass(extra, _SymExprs)


# What onnx-tensorrt's loadFields (FallbackPluginImporter, 10.1 to the 10.14+ parser)
# makes of each ONNX attribute type: (PluginFieldType, numpy dtype of PluginField.data,
# which the bindings return as a 1-D array of `length` values, pyPlugin.cpp).
_PARSER_FIELDS = {"ints": ("INT32", np.int32), "int": ("INT32", np.int32), "float": ("FLOAT32", np.float32),
                  "str": ("CHAR", np.int8)}
# The field type tensorrt.plugin declares for an annotation (_utils.py
# _numpy_to_plugin_field_type / _built_in_to_plugin_field_type; str is CHAR).
_DECLARED_FIELD = {np.int32: "INT32", np.float32: "FLOAT32", int: "INT64", float: "FLOAT64", str: "CHAR"}


def _field_data(kind, value):
    """PluginField.data as the parser fills it for an ONNX attribute of `kind`."""
    if kind == "str":  # copyField(std::string): the bytes and a terminating NUL
        return np.frombuffer(value.encode() + b"\x00", np.int8)
    return np.asarray(value if kind == "ints" else [value], dtype=_PARSER_FIELDS[kind][1])


def _create_plugin_value(annotation, data):
    """tensorrt.plugin _TemplatePluginCreator.create_plugin's conversion of one field
    (10.9 to 11.1, unchanged): NDArray annotations astype, str decodes, others call the
    annotation on the 1-D array."""
    if typing.get_origin(annotation) is np.ndarray:
        return data.astype(typing.get_args(typing.get_args(annotation)[1])[0])
    if annotation is str:
        return data.tobytes().decode("utf-8")
    return annotation(data)


@pytest.mark.parametrize("op", list(PLUGINS))
def test_attribute_fields_from_the_parser_become_the_node_values(op):
    # The declared field types match what the parser hands over, and tensorrt.plugin's
    # conversion of those fields (with this numpy) gives back the node's values.
    attrs = {"WindowAttention": _window_attrs([4, 4], shift=[2, 2], causal=1),
             "GridSampler": _sample_attrs("nearest", "reflection", 1),
             "AffineGridSampler": _sample_attrs(out_size=[5, 6], align_corners=1)}[op]
    kinds = dict(PLUGINS[op].attributes)
    fields = {}
    for name, kind in kinds.items():
        annotation = trt_plugins.ANNOTATIONS[kind]
        declared = (typing.get_args(typing.get_args(annotation)[1])[0]
                    if typing.get_origin(annotation) is np.ndarray else annotation)
        assert _DECLARED_FIELD[declared] == _PARSER_FIELDS[kind][0], (name, kind)
        fields[name] = _create_plugin_value(annotation, _field_data(kind, attrs[name]))
    assert shapes.normalize_attrs(op, fields) == shapes.normalize_attrs(op, attrs)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message when TensorRT is absent")
def test_register_plugins_without_tensorrt_is_one_clear_sentence():
    with pytest.raises(BackendUnavailableError, match=r"need the tensorrt package \(>= 10.9\)"):
        register_plugins()


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT (>= 10.9) and a CUDA GPU")
def test_register_plugins_with_tensorrt():
    import tensorrt.plugin as trtp

    ids = register_plugins()
    assert ids == [s.plugin_id for s in PLUGINS.values()]
    assert register_plugins() == ids  # idempotent
    for spec in PLUGINS.values():
        assert getattr(trtp.op.attnserve, spec.name) is not None


# --- ONNX: what the parser needs, and prepare_onnx ---------------------------------------------


def _check_node_fits_plugin(node: onnx.NodeProto) -> None:
    """Op type == plugin name, STRING plugin_namespace == "attnserve", and exactly the
    plugin's attributes with the ONNX types its declared annotations take."""
    assert node.domain == "attnserve" and node.op_type in PLUGINS, node.op_type
    spec = PLUGINS[node.op_type]
    attrs = {a.name: a for a in node.attribute}
    assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
    assert attrs["plugin_namespace"].s == b"attnserve"
    assert sorted(attrs) == sorted([*spec.attribute_names, "plugin_namespace"]), node.name
    for name, kind in spec.attributes:
        assert attrs[name].type == ONNX_ATTR_TYPES[kind], (node.name, name)
    values = {n: onnx.helper.get_attribute_value(attrs[n]) for n in spec.attribute_names}
    shapes.normalize_attrs(node.op_type, values)  # what the plugin will make of them
    assert 1 <= len(node.input) <= len(spec.inputs)


@pytest.mark.parametrize("name,config,ops", [
    ("swin", "tiny", {"WindowAttention"}),
    ("stn", "tiny", {"AffineGridSampler"}),
    ("stn", "tiny_tps", {"GridSampler"}),
])
def test_exported_nodes_carry_what_the_parser_needs(exported_tiny, name, config, ops):
    model = onnx.load(str(exported_tiny(name, config).onnx_path), load_external_data=False)
    nodes = custom_nodes(model)
    assert {n.op_type for n in nodes} == ops
    for node in nodes:
        _check_node_fits_plugin(node)
    check_plugin_nodes(model)
    prepared = prepare_onnx(model)
    assert not [f for f in prepared.functions if f.domain == "attnserve"]
    for node in custom_nodes(prepared):
        _check_node_fits_plugin(node)
        assert len(node.input) == len(PLUGINS[node.op_type].inputs) and all(node.input)


@pytest.fixture(scope="module")
def every_arity(tmp_path_factory):
    """An export with WindowAttention at every input presence (q, k, v; + bias; + mask
    without bias; + both) and the samplers in 2-D and 3-D."""
    import torch

    from attnserve.export.onnx_export import _torch_export
    from attnserve.ops import affine_grid_sample, grid_sample, window_attention
    from attnserve.spec import ModelSpec, TensorSpec

    class Every(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.randn(2, 4, 4))
            self.register_buffer("mask", torch.randn(2, 4, 4))

        def forward(self, x, img, vol):  # one output row per call: (B, 7)
            q = x.reshape(x.shape[0], 2, 8, 3)  # (B, heads, S, d)
            outs = [window_attention(q, q, q, window=[4]),
                    window_attention(q, q, q, window=[4], rel_pos_bias=self.bias),
                    window_attention(q, q, q, window=[4], shift=[2], mask=self.mask),
                    window_attention(q, q, q, window=[4], shift=[2], rel_pos_bias=self.bias, mask=self.mask)]
            theta2 = img.mean((1, 2, 3)).reshape(-1, 1, 1) * 0 + torch.eye(2, 3)
            theta3 = vol.mean((1, 2, 3, 4)).reshape(-1, 1, 1) * 0 + torch.eye(3, 4)
            grid2 = affine_grid_sample(img, theta2, [3, 3]).permute(0, 2, 3, 1)[..., :2]
            grid3 = vol[:, 0, :2, :2, :3].unsqueeze(1).expand(-1, 2, -1, -1, -1).tanh()  # (B, 2, 2, 2, 3)
            samples = [grid_sample(img, grid2.tanh()), affine_grid_sample(vol, theta3, [2, 2, 2]),
                       grid_sample(vol, grid3, mode="nearest", padding_mode="border", align_corners=True)]
            return torch.stack([t.flatten(1).sum(1) for t in outs + samples], 1)

    spec = ModelSpec("every", "t", "test",
                     (TensorSpec("x", "float32", ("batch", 48)), TensorSpec("img", "float32", ("batch", 2, 5, 5)),
                      TensorSpec("vol", "float32", ("batch", 2, 3, 4, 5))),
                     (TensorSpec("y", "float32", ("batch", 7)),))
    path = tmp_path_factory.mktemp("every") / "every.onnx"
    _torch_export(Every().eval(), spec, path, 20, True)
    return onnx.load(str(path))


def test_prepare_onnx_fills_absent_inputs_with_rank_1_placeholders(every_arity):
    from attnserve.ops.onnx_ops import register_schemas

    nodes = custom_nodes(every_arity)
    window = [n for n in nodes if n.op_type == "WindowAttention"]
    assert sorted(tuple(bool(i) for i in n.input) for n in window) == sorted(
        [(True,) * 3, (True,) * 4, (True, True, True, False, True), (True,) * 5])
    assert {n.op_type for n in nodes} == set(PLUGINS)
    for node in nodes:
        _check_node_fits_plugin(node)
    prepared = prepare_onnx(every_arity)
    assert every_arity.functions, "prepare_onnx must not touch its argument"
    assert not prepared.functions and all(not n.overload for n in custom_nodes(prepared))
    register_schemas()
    onnx.checker.check_model(prepared)
    inferred = onnx.shape_inference.infer_shapes(prepared)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    originals = {n.name: list(n.input) for n in window}
    for node in custom_nodes(prepared):
        assert len(node.input) == len(PLUGINS[node.op_type].inputs) and all(node.input)
        if node.op_type == "WindowAttention":
            for before, after in zip(originals[node.name] + [""] * 5, node.input, strict=False):
                if before:
                    assert after == before
                else:
                    assert after.startswith("attnserve_absent") and ranks[after] == shapes.ABSENT_RANK
    kept = prepare_onnx(every_arity, keep_functions=True)
    assert len(kept.functions) == len(every_arity.functions)


def test_prepare_onnx_lists_every_node_it_cannot_take(every_arity):
    model = onnx.ModelProto()
    model.CopyFrom(every_arity)
    nodes = custom_nodes(model)
    for a in nodes[0].attribute:
        if a.name == "plugin_namespace":
            a.s = b"other"
    scale = next(a for n in nodes for a in n.attribute if a.name == "scale")
    scale.type, scale.i = onnx.AttributeProto.INT, 1
    nodes[-1].op_type = "GridSample"
    with pytest.raises(AttnserveError) as e:
        prepare_onnx(model)
    message = str(e.value)
    assert "plugin_namespace='attnserve'" in message and "attribute scale is INT, the plugin takes FLOAT" in message
    assert "(GridSample): no plugin of that name" in message and message.count(";") == 2


# --- PTX for the four targets (subprocess without TRITON_INTERPRET) ------------------------------------

_PTX_SCRIPT = textwrap.dedent("""
    import json, sys
    from triton.backends import backends
    if "nvidia" not in backends:
        print(json.dumps({"skip": "this triton has no NVIDIA backend"}))
        sys.exit()
    from triton.backends.nvidia.compiler import get_ptxas  # triton 3.9: the bundled ptxas per arch
    from attnserve.plugins import aot
    index = aot.write_ptx(sys.argv[1], targets=[int(t) for t in sys.argv[2].split(",")])
    # what an aot_impl on a Blackwell GPU compiles: the default PTX version for the target
    c = aot.CONFIGS[-1]
    p = c.plan()
    newer = {cc: aot.compile_ptx(c.op, cc, dtype=c.dtype, num_warps=p.num_warps, **p.constexprs)
             for cc in (100, 120)}
    newer = {cc: dict(ptx=k.ptx, entry=k.name, ptx_version=k.ptx_version, params=[t for t, _ in k.params()],
                      want=aot.kernel_params(c.op).ptx_types()) for cc, k in newer.items()}
    print(json.dumps({"index": index, "ptxas": {cc: get_ptxas(cc).path for cc in (80, 90)}, "newer": newer}))
""")


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("compiling PTX needs the triton package")
    out = tmp_path_factory.mktemp("ptx")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(out / "cache")}
    done = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(out), ",".join(map(str, TARGETS))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return out, result


def _configs():
    # the names of attnserve.plugins.aot.CONFIGS, without importing it here (see the docstring)
    return ["swin_shifted_fp16", "grid3d_reflection", "stn_affine2d"]


def test_ptx_files_cover_every_op_and_target(ptx_dir):
    _, result = ptx_dir
    index = result["index"]
    assert sorted({(e["config"], e["cc"]) for e in index}) == sorted((c, t) for c in _configs() for t in TARGETS)
    assert {e["op"] for e in index} == set(PLUGINS)


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("config", _configs())
def test_ptx_for_each_target_takes_what_tensorrt_passes(ptx_dir, config, cc, tmp_path):
    out, result = ptx_dir
    entry = next(e for e in result["index"] if e["config"] == config and e["cc"] == cc)
    ptx = (out / entry["file"]).read_text()
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"  # Triton compiles Hopper for sm_90a
    lines = ptx.splitlines()
    assert f".target {arch}" in lines and ".version 8.0" in lines
    wrapper = {"WindowAttention": "window_attention_trt", "GridSampler": "grid_sample_trt",
               "AffineGridSampler": "affine_grid_sample_trt"}[entry["op"]]
    assert entry["entry"] == wrapper and f".visible .entry {wrapper}(" in ptx
    # the parameter list, read from the file: TensorRT passes the input pointers, the
    # aot_impl's extra int32 scalars, then the output pointer, and nothing else
    kp = entry["kernel_params"]
    assert len(kp["inputs"]) == len(PLUGINS[entry["op"]].inputs) and len(kp["outputs"]) == 1
    assert kp["scalars"] == entry["plan_scalars"]  # the plan's extra args, by kernel parameter name
    params = _ptx_param_types(ptx, wrapper)
    want = ["u64"] * len(kp["inputs"]) + ["u32"] * len(entry["plan_scalars"]) + ["u64"]
    assert params == want == entry["params"]
    reqntid = [ln for ln in lines if ln.startswith(".reqntid")]
    assert reqntid in ([], [f".reqntid {entry['block_x']}"]) and entry["block_x"] == 32 * entry["num_warps"]
    # ptxas (the one that ships with Triton) assembles exactly the PTX TensorRT gets
    ptxas = result["ptxas"][str(80 if cc < 90 else 90)]
    done = subprocess.run([ptxas, f"-arch={arch}", str(out / entry["file"]), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("cc,version", [(100, "8.6"), (120, "8.7")])
def test_ptx_for_blackwell_uses_an_isa_the_target_takes(ptx_dir, cc, version):
    # With PTX 8.0 Triton's LLVM aborts the process for these targets (no exception), so
    # the aot_impl on such a GPU would take the engine build down with it.
    _, result = ptx_dir
    k = result["newer"][str(cc)]
    lines = k["ptx"].splitlines()
    assert f".target sm_{cc}a" in lines and f".version {version}" in lines
    assert k["ptx_version"] == int(version.replace(".", ""))
    assert _ptx_param_types(k["ptx"], k["entry"]) == k["params"] == k["want"]


def test_compile_ptx_refuses_an_isa_too_old_for_the_target():
    assert [plugin_aot.ptx_version_for(cc) for cc in (80, 87, 89, 90)] == [80] * 4
    p = plugin_aot.CONFIGS[-1].plan()
    with pytest.raises(AttnserveError, match=r"sm_120 needs PTX ISA 8.7 or newer, got 8.0"):
        plugin_aot.compile_ptx("AffineGridSampler", 120, ptx_version=80, num_warps=p.num_warps, **p.constexprs)


def _ptx_param_types(ptx: str, entry: str) -> list[str]:
    head = ptx.split(f".visible .entry {entry}(", 1)[1].split(")", 1)[0]
    return [d.split()[1].lstrip(".") for d in head.split(",") if d.strip()]


# --- numbers: each kernel launched as its plan says (TRITON_INTERPRET=1 subprocess) -------------------

NUMBER_CASES = {
    # name: (op, input shapes (absent optional inputs: None), attrs, dtype)
    "swin-shifted-bias-mask": ("WindowAttention", [(2, 3, 8, 8, 32)] * 3 + [(3, 16, 16), (4, 16, 16)],
                               _window_attrs([4, 4], shift=[2, 2], scale=32 ** -0.5), "fp32"),
    "swin-bias-fp16": ("WindowAttention", [(1, 2, 4, 6, 8)] * 3 + [(2, 6, 6), None],
                       _window_attrs([2, 3], scale=0.35), "fp16"),
    "mask-only-shift-beyond-size": ("WindowAttention", [(1, 2, 6, 8, 4)] * 3 + [None, (6, 8, 8)],
                                    _window_attrs([2, 4], shift=[7, 9]), "fp32"),
    "pdan-dilated-two-tiles": ("WindowAttention", [(1, 2, 80, 4)] * 3 + [None, None],
                               _window_attrs([3], "sliding", dilation=[2], scale=1.0), "fp32"),
    "sasa-query-bias": ("WindowAttention", [(2, 2, 5, 6, 4)] * 3 + [(2, 2, 5, 6, 9), None],
                        _window_attrs([3, 3], "sliding", scale=1.0), "fp32"),
    "memory-causal": ("WindowAttention", [(1, 2, 12, 8)] * 3 + [(2, 4, 10), None],
                      _window_attrs([4], before=[4], after=[2], causal=1), "fp32"),
    "grid2d-many-channels-positions": ("GridSampler", [(2, 20, 6, 5), (2, 12, 13, 2)], _sample_attrs(), "fp32"),
    "grid3d-reflection": ("GridSampler", [(2, 3, 4, 6, 8), (2, 3, 5, 7, 3)],
                          _sample_attrs(padding_mode="reflection", align_corners=1), "fp32"),
    "grid3d-nearest-fp16": ("GridSampler", [(1, 2, 3, 4, 5), (1, 2, 3, 4, 3)],
                            _sample_attrs("nearest", "border"), "fp16"),
    "stn-affine2d": ("AffineGridSampler", [(2, 1, 28, 28), (2, 2, 3)], _sample_attrs(out_size=[20, 20]), "fp32"),
    "affine3d-nearest": ("AffineGridSampler", [(2, 2, 3, 4, 5), (2, 3, 4)],
                         _sample_attrs("nearest", "zeros", 1, out_size=[2, 3, 4]), "fp32"),
}

_NUMBERS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from attnserve.ops import reference
    from attnserve.ops.kernels import grid_sample_triton
    from attnserve.plugins import aot, shapes

    cases = json.loads(sys.argv[1])
    results = {"padding_codes_match": shapes.PADDING_CODES == grid_sample_triton.PADDING_CODES}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    for name, (op, in_shapes, attrs, dtype) in cases.items():
        g = torch.Generator().manual_seed(len(name))
        dt = dtypes[dtype]
        tensors = []
        for i, s in enumerate(in_shapes):
            if s is None:  # absent optional input: prepare_onnx's placeholder, q cut to one element
                tensors.append(tensors[0].reshape(-1)[:1])
            elif op == "AffineGridSampler" and i == 1:
                r = s[1]
                tensors.append((torch.eye(r, r + 1) + 0.4 * torch.randn(s, generator=g)).to(dt))
            elif op == "GridSampler" and i == 1:
                tensors.append((torch.rand(s, generator=g) * 4.4 - 2.2).to(dt))
            else:
                tensors.append(torch.randn(s, generator=g).to(dt))
        a = shapes.normalize_attrs(op, attrs)
        shape_list = [tuple(t.shape) for t in tensors]
        plan = shapes.plan(op, shape_list, a)
        out = torch.full(shapes.output_shape(op, shape_list, a), float("nan"), dtype=dt)  # unwritten: NaN
        # TensorRT's order: input pointers, the plan's int32 scalars, output pointer
        aot.KERNELS[op][plan.grid](*tensors, *plan.scalar_values, out, **plan.constexprs)
        x = [t.double().numpy() for t in tensors]
        if op == "WindowAttention":
            bias = None if in_shapes[3] is None else x[3]
            mask = None if in_shapes[4] is None else x[4]
            want = reference.window_attention(
                x[0], x[1], x[2], window=a["window"], mode=a["mode"], shift=a["shift"],
                memory_before=a["memory_before"], memory_after=a["memory_after"], dilation=a["dilation"],
                causal=bool(a["causal"]), rel_pos_bias=bias, mask=mask, scale=a["scale"])
        else:
            kw = dict(mode=a["mode"], padding_mode=a["padding_mode"], align_corners=bool(a["align_corners"]))
            grid = x[1] if op == "GridSampler" else reference.affine_grid(x[1], tuple(a["out_size"]),
                                                                           bool(a["align_corners"]))
            want = reference.grid_sample(x[0], grid, **kw)
        got = out.double().numpy()
        results[name] = {"shape_ok": got.shape == want.shape, "max_abs": float(np.abs(got - want).max()),
                         "grid": [int(v) for v in plan.grid], "constexprs": plan.constexprs}
    print(json.dumps(results))
""")

TOL = {"fp32": 1e-5, "fp16": 1e-2}


@pytest.fixture(scope="module")
def numbers():
    if not HAS_TRITON:
        pytest.skip("the kernels need the triton package")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _NUMBERS_SCRIPT, json.dumps(NUMBER_CASES)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_kernels_launched_as_planned_match_the_reference(numbers, case):
    result = numbers[case]
    tol = TOL[NUMBER_CASES[case][3]]
    assert result["shape_ok"] and result["max_abs"] <= tol * 2, result


def test_several_tiles_are_exercised(numbers):
    # the plans split these into more than one program along the tiled axis
    assert numbers["pdan-dilated-two-tiles"]["grid"][1] == 2
    assert numbers["grid2d-many-channels-positions"]["grid"][0] == 2
    assert numbers["grid2d-many-channels-positions"]["constexprs"]["BLOCK_C"] == 16  # 20 channels: two chunks
    assert numbers["padding_codes_match"]
