"""The ONNX face of the custom ops: the `attnserve` domain, version 1.

Export emits one node per call (`WindowAttention`, `GridSampler`, `AffineGridSampler`;
never ONNX's own names, which TensorRT's parser would send to its built-in importers)
with typed attributes and `plugin_namespace="attnserve"`, so that TensorRT maps it to
our plugin. Every model also carries a model-local function per distinct attribute set
(an ONNX function *overload*, IR >= 10), whose body is made of standard ops, so any ONNX
runtime runs the model unchanged. With `custom_ops=False` the functions are inlined and
the model holds standard ops only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import onnx
import onnx.helper as oh
import onnx.inliner
from onnx import TensorProto
from onnx.defs import OpSchema

DOMAIN = "attnserve"
VERSION = 1
PLUGIN_NAMESPACE = "attnserve"
# GridSample on 5-D inputs and AffineGrid need opset 20.
MIN_OPSET = 20

_FP = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional
_A = OpSchema.AttrType
_FLOATS = ["tensor(float)", "tensor(float16)"]


def _schema(name: str, doc: str, inputs: list, attributes: list) -> OpSchema:
    return OpSchema(
        name, DOMAIN, VERSION, doc=doc, inputs=inputs, outputs=[_FP("Y", "T")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[OpSchema.Attribute(n, t, d) for n, t, d in attributes]
        + [OpSchema.Attribute("plugin_namespace", _A.STRING, "TensorRT plugin namespace")],
    )


SCHEMAS = [
    _schema(
        "WindowAttention", "Multi-head attention within local windows (docs/custom_ops.md).",
        [_FP("Q", "T"), _FP("K", "T"), _FP("V", "T"), _FP("rel_pos_bias", "T", param_option=_OPTIONAL),
         _FP("mask", "T", param_option=_OPTIONAL)],
        [("window", _A.INTS, "window size per spatial axis"),
         ("mode", _A.STRING, "'block' or 'sliding'"),
         ("shift", _A.INTS, "cyclic shift per axis (block)"),
         ("memory_before", _A.INTS, "memory block extension before the window (block)"),
         ("memory_after", _A.INTS, "memory block extension after the window (block)"),
         ("dilation", _A.INTS, "key spacing per axis (sliding)"),
         ("causal", _A.INT, "1: exclude keys after the query in raster order"),
         ("scale", _A.FLOAT, "logit scale")],
    ),
    _schema(
        "GridSampler", "Sampling a 2-D or 3-D map at normalised coordinates.",
        [_FP("X", "T"), _FP("grid", "T")],
        [("mode", _A.STRING, "'bilinear' or 'nearest'"),
         ("padding_mode", _A.STRING, "'zeros', 'border' or 'reflection'"),
         ("align_corners", _A.INT, "1: -1 and 1 are the centres of the corner pixels")],
    ),
    _schema(
        "AffineGridSampler", "Sampling on the grid an affine transform generates (fused).",
        [_FP("X", "T"), _FP("theta", "T")],
        [("out_size", _A.INTS, "output spatial size"),
         ("mode", _A.STRING, "'bilinear' or 'nearest'"),
         ("padding_mode", _A.STRING, "'zeros', 'border' or 'reflection'"),
         ("align_corners", _A.INT, "1: -1 and 1 are the centres of the corner pixels")],
    ),
]
ATTRIBUTES = {s.name: sorted(s.attributes) for s in SCHEMAS}  # op -> attribute names


def register_schemas() -> None:
    """Make the ops known to onnx (checker, onnxscript); idempotent."""
    for schema in SCHEMAS:
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


# ---------------------------------------------------------------- export translation


def custom_translation_table() -> dict:
    """torch op -> ONNX translation, for torch.onnx.export(custom_translation_table=...)."""
    import onnxscript
    import torch

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def window_attention(q, k, v, rel_pos_bias, mask, window, mode, shift, memory_before,
                         memory_after, dilation, causal, scale):
        return opset.WindowAttention(
            q, k, v, rel_pos_bias, mask, window=list(window), mode=mode, shift=list(shift),
            memory_before=list(memory_before), memory_after=list(memory_after),
            dilation=list(dilation), causal=int(causal), scale=float(scale),
            plugin_namespace=PLUGIN_NAMESPACE,
        )

    def grid_sample(x, grid, mode, padding_mode, align_corners):
        return opset.GridSampler(x, grid, mode=mode, padding_mode=padding_mode,
                                 align_corners=int(align_corners), plugin_namespace=PLUGIN_NAMESPACE)

    def affine_grid_sample(x, theta, out_size, mode, padding_mode, align_corners):
        return opset.AffineGridSampler(
            x, theta, out_size=list(out_size), mode=mode, padding_mode=padding_mode,
            align_corners=int(align_corners), plugin_namespace=PLUGIN_NAMESPACE,
        )

    from onnxscript import opset18

    from attnserve.ops import recurrent

    ops = torch.ops.attnserve
    return {
        ops.window_attention.default: window_attention,
        ops.grid_sample.default: grid_sample,
        ops.affine_grid_sample.default: affine_grid_sample,
        ops.gru_layer.default: recurrent.onnx_translation(opset18),
        ops.lstm_layer.default: recurrent.lstm_onnx_translation(opset18),
    }


# ---------------------------------------------------------------- function bodies


class _Body:
    """A small builder for function bodies: fresh names, constants, node lists."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._count = 0

    def name(self) -> str:
        self._count += 1
        return f"{self._prefix}_{self._count}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.name()
        self.nodes.append(oh.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ints(self, values) -> str:
        out = self.name()
        self.nodes.append(oh.make_node(
            "Constant", [], [out], value=oh.make_tensor(out, TensorProto.INT64, [len(values)], list(values))
        ))
        return out

    def int_scalar(self, value: int) -> str:
        out = self.name()
        self.nodes.append(oh.make_node("Constant", [], [out],
                                       value=oh.make_tensor(out, TensorProto.INT64, [], [int(value)])))
        return out

    def like(self, value: float, ref: str) -> str:
        """A scalar constant cast to `ref`'s element type."""
        c = self.name()
        tensor = oh.make_tensor(c, TensorProto.FLOAT, [], [value])
        self.nodes.append(oh.make_node("Constant", [], [c], value=tensor))
        return self.op("CastLike", c, ref)

    def dim(self, shape: str, axis: int) -> str:
        """shape[axis] as a 1-element int64 tensor."""
        return self.op("Slice", shape, self.ints([axis]), self.ints([axis + 1]))

    def roll(self, x: str, shifts: list[int], axes: list[int]) -> str:
        """numpy.roll(x, shifts, axes) for static shifts."""
        for s, axis in zip(shifts, axes, strict=True):
            if s == 0:
                continue
            big = 2**62
            head = self.op("Slice", x, self.ints([-s]), self.ints([big]), self.ints([axis]))
            tail = self.op("Slice", x, self.ints([0]), self.ints([-s]), self.ints([axis]))
            x = self.op("Concat", head, tail, axis=axis)
        return x


def _window_attention_body(b: _Body, inputs: list[str], attrs: dict, rank: int) -> str:
    q, k, v = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 and inputs[3] else None
    mask = inputs[4] if len(inputs) > 4 and inputs[4] else None
    window, mode = attrs["window"], attrs["mode"]
    axes = list(range(2, 2 + rank))
    scale = b.like(attrs["scale"], q)
    simple_block = (mode == "block" and not any(attrs["memory_before"]) and not any(attrs["memory_after"])
                    and not attrs["causal"])
    if simple_block:
        return _block_body(b, q, k, v, bias, mask, window, attrs["shift"], axes, scale)
    return _gathered_body(b, q, k, v, bias, mask, attrs, rank, scale)


def _block_body(b, q, k, v, bias, mask, window, shift, axes, scale) -> str:
    rank = len(axes)
    shape = b.op("Shape", q)
    if any(shift):
        q, k, v = (b.roll(t, [-s for s in shift], axes) for t in (q, k, v))
    batch_heads = b.op("Slice", shape, b.ints([0]), b.ints([2]))
    head_dim = b.dim(shape, 1 + rank + 1)
    parts = [batch_heads]
    for i, axis in enumerate(axes):
        parts += [b.op("Div", b.dim(shape, axis), b.ints([window[i]])), b.ints([window[i]])]
    split_shape = b.op("Concat", *parts, head_dim, axis=0)  # (B, h, g0, w0[, g1, w1], d)
    n = int(np.prod(window))
    heads = b.dim(shape, 1)
    batch = b.dim(shape, 0)
    windows_shape = b.op("Concat", batch, b.ints([-1]), heads, b.ints([n]), head_dim, axis=0)
    perm = [0, 2, 1, 3, 4] if rank == 1 else [0, 2, 4, 1, 3, 5, 6]

    def partition(t):  # (B, h, *S, d) -> (B, nW, h, N, d)
        t = b.op("Reshape", t, split_shape)
        return b.op("Reshape", b.op("Transpose", t, perm=perm), windows_shape)

    qw, kw, vw = partition(q), partition(k), partition(v)
    logits = b.op("MatMul", b.op("Mul", qw, scale), b.op("Transpose", kw, perm=[0, 1, 2, 4, 3]))
    if bias is not None:  # (h, N, N) broadcasts against (B, nW, h, N, N)
        logits = b.op("Add", logits, bias)
    if mask is not None:  # (nW, N, N) -> (nW, 1, N, N)
        logits = b.op("Add", logits, b.op("Unsqueeze", mask, b.ints([1])))
    out = b.op("MatMul", b.op("Softmax", logits, axis=-1), vw)  # (B, nW, h, N, d)
    if rank == 1:
        grid_shape = b.op("Concat", batch, b.op("Div", b.dim(shape, 2), b.ints([window[0]])), heads,
                          b.ints([window[0]]), head_dim, axis=0)
        back = [0, 2, 1, 3, 4]
    else:
        g0 = b.op("Div", b.dim(shape, 2), b.ints([window[0]]))
        g1 = b.op("Div", b.dim(shape, 3), b.ints([window[1]]))
        grid_shape = b.op("Concat", batch, g0, g1, heads, b.ints([window[0]]), b.ints([window[1]]), head_dim,
                          axis=0)
        back = [0, 3, 1, 4, 2, 5, 6]
    out = b.op("Reshape", b.op("Transpose", b.op("Reshape", out, grid_shape), perm=back), shape)
    return b.roll(out, list(shift), axes) if any(shift) else out


def _gathered_body(b, q, k, v, bias, mask, attrs, rank, scale) -> str:
    window, mode = attrs["window"], attrs["mode"]
    axes = list(range(2, 2 + rank))
    shift = attrs["shift"]
    if any(shift):  # causal shifted windows: attend in rolled coordinates
        q, k, v = (b.roll(t, [-s for s in shift], axes) for t in (q, k, v))
    shape = b.op("Shape", q)
    sizes = [b.dim(shape, 2 + i) for i in range(rank)]  # each (1,)
    positions, valids, extents = [], [], []
    for i in range(rank):
        size = b.op("Squeeze", sizes[i], b.ints([0]))
        p = b.op("Unsqueeze", b.op("Range", b.int_scalar(0), size, b.int_scalar(1)), b.ints([1]))  # (S, 1)
        if mode == "block":
            w = window[i]
            extent = w + attrs["memory_before"][i] + attrs["memory_after"][i]
            j = b.ints(list(range(extent)))
            start = b.op("Sub", b.op("Mul", b.op("Div", p, b.ints([w])), b.ints([w])),
                         b.ints([attrs["memory_before"][i]]))
            pos = b.op("Add", start, j)  # (S, K_i)
        else:
            extent = window[i]
            offsets = [attrs["dilation"][i] * (j - (window[i] - 1) // 2) for j in range(extent)]
            pos = b.op("Add", p, b.ints(offsets))
        extents.append(extent)
        inside = b.op("And", b.op("GreaterOrEqual", pos, b.ints([0])), b.op("Less", pos, sizes[i]))
        valids.append(inside)
        positions.append(b.op("Min", b.op("Max", pos, b.ints([0])), b.op("Sub", sizes[i], b.ints([1]))))
    n_keys = int(np.prod(extents))
    if rank == 1:
        kg, vg = (b.op("Gather", t, positions[0], axis=2) for t in (k, v))  # (B, h, S, K, d)
        valid = valids[0]
        q_rows = b.op("Unsqueeze", b.op("Range", b.int_scalar(0), b.op("Squeeze", sizes[0], b.ints([0])),
                                           b.int_scalar(1)), b.ints([1]))
        key_raster, q_raster = positions[0], q_rows
        spatial_shape = sizes[0]
    else:
        def gather2(t):  # (B, h, S0, S1, d) -> (B, h, S0, S1, K0*K1, d)
            t = b.op("Gather", t, positions[0], axis=2)  # (B, h, S0, K0, S1, d)
            t = b.op("Gather", t, positions[1], axis=4)  # (B, h, S0, K0, S1, K1, d)
            t = b.op("Transpose", t, perm=[0, 1, 2, 4, 3, 5, 6])  # (B, h, S0, S1, K0, K1, d)
            new_shape = b.op("Concat", b.op("Slice", shape, b.ints([0]), b.ints([4])), b.ints([n_keys]),
                             b.dim(shape, 4), axis=0)
            return b.op("Reshape", t, new_shape)

        kg, vg = gather2(k), gather2(v)
        v0 = b.op("Unsqueeze", valids[0], b.ints([1, 3]))  # (S0, 1, K0, 1)
        v1 = b.op("Unsqueeze", valids[1], b.ints([0, 2]))  # (1, S1, 1, K1)
        spatial_shape = b.op("Concat", sizes[0], sizes[1], axis=0)
        flat_keys = b.op("Concat", spatial_shape, b.ints([n_keys]), axis=0)
        valid = b.op("Reshape", b.op("And", v0, v1), flat_keys)  # (S0, S1, K)
        p0 = b.op("Unsqueeze", positions[0], b.ints([1, 3]))
        p1 = b.op("Unsqueeze", positions[1], b.ints([0, 2]))
        key_raster = b.op("Reshape", b.op("Add", b.op("Mul", p0, sizes[1]), p1), flat_keys)
        total = b.op("Squeeze", b.op("Mul", sizes[0], sizes[1]), b.ints([0]))
        q_raster = b.op("Reshape", b.op("Range", b.int_scalar(0), total, b.int_scalar(1)),
                        b.op("Concat", spatial_shape, b.ints([1]), axis=0))
    if attrs["causal"]:
        valid = b.op("And", valid, b.op("LessOrEqual", key_raster, q_raster))
    q1 = b.op("Unsqueeze", b.op("Mul", q, scale), b.ints([-2]))  # (B, h, *S, 1, d)
    k_t = b.op("Transpose", kg, perm=list(range(rank + 2)) + [rank + 3, rank + 2])  # (B, h, *S, d, K)
    logits = b.op("Squeeze", b.op("MatMul", q1, k_t), b.ints([-2]))  # (B, h, *S, K)
    if bias is not None or mask is not None:
        q_index, w_index = _window_indices(b, sizes, window, rank) if mode == "block" else (None, None)
    if bias is not None:
        if mode == "block":  # (h, Nq, Nk)[:, q_index] -> (h, *S, Nk)
            logits = b.op("Add", logits, b.op("Gather", bias, q_index, axis=1))
        elif attrs["_bias_rank"] == 2:  # (h, K) -> (h, 1, .., K)
            logits = b.op("Add", logits, b.op("Unsqueeze", bias, b.ints(list(range(1, 1 + rank)))))
        else:  # (B, h, *S, K)
            logits = b.op("Add", logits, bias)
    if mask is not None:  # (nW, Nq, Nk) -> flat (nW * Nq, Nk)[w * Nq + q] -> (*S, Nk)
        nq = int(np.prod(window))
        flat_mask = b.op("Reshape", mask, b.ints([-1, n_keys]))
        flat_index = b.op("Add", b.op("Mul", w_index, b.int_scalar(nq)), q_index)
        logits = b.op("Add", logits, b.op("Gather", flat_mask, flat_index, axis=0))
    neg_inf = b.like(float("-inf"), logits)
    logits = b.op("Where", valid, logits, neg_inf)
    weights = b.op("Unsqueeze", b.op("Softmax", logits, axis=-1), b.ints([-2]))  # (B, h, *S, 1, K)
    out = b.op("Squeeze", b.op("MatMul", weights, vg), b.ints([-2]))  # (B, h, *S, d)
    return b.roll(out, list(shift), axes) if any(shift) else out


def _window_indices(b: _Body, sizes: list[str], window: list[int], rank: int) -> tuple[str, str]:
    """Row-major index of each position inside its window, and of its window: (*S,)."""
    q_index = w_index = None
    for i in range(rank):
        p = b.op("Range", b.int_scalar(0), b.op("Squeeze", sizes[i], b.ints([0])), b.int_scalar(1))
        if rank == 2:
            p = b.op("Unsqueeze", p, b.ints([1 - i]))  # (S0, 1) or (1, S1)
        inner = b.op("Mod", p, b.int_scalar(window[i]))
        outer = b.op("Div", p, b.int_scalar(window[i]))
        if q_index is None:
            q_index, w_index = inner, outer
        else:
            grid_i = b.op("Div", b.op("Squeeze", sizes[i], b.ints([0])), b.int_scalar(window[i]))
            q_index = b.op("Add", b.op("Mul", q_index, b.int_scalar(window[i])), inner)
            w_index = b.op("Add", b.op("Mul", w_index, grid_i), outer)
    return q_index, w_index


def _grid_sampler_body(b: _Body, inputs: list[str], attrs: dict, rank: int) -> str:
    # Sampling runs in fp32 whatever the model's precision: coordinates in fp16 are off
    # by whole pixels on large maps, and ONNX Runtime has no fp16 CPU kernel for it.
    x, grid = inputs
    f32 = TensorProto.FLOAT
    y = b.op("GridSample", b.op("Cast", x, to=f32), b.op("Cast", grid, to=f32), **_sample_attrs(attrs))
    return b.op("CastLike", y, x)


def _affine_grid_sampler_body(b: _Body, inputs: list[str], attrs: dict, rank: int) -> str:
    x, theta = inputs
    f32 = TensorProto.FLOAT
    size = b.op("Concat", b.op("Slice", b.op("Shape", x), b.ints([0]), b.ints([2])),
                b.ints(attrs["out_size"]), axis=0)
    grid = b.op("AffineGrid", b.op("Cast", theta, to=f32), size, align_corners=attrs["align_corners"])
    y = b.op("GridSample", b.op("Cast", x, to=f32), grid, **_sample_attrs(attrs))
    return b.op("CastLike", y, x)


def _sample_attrs(attrs: dict) -> dict:
    return {"mode": "linear" if attrs["mode"] == "bilinear" else attrs["mode"],
            "padding_mode": attrs["padding_mode"], "align_corners": attrs["align_corners"]}


_BODIES: dict[str, Callable] = {
    "WindowAttention": _window_attention_body,
    "GridSampler": _grid_sampler_body,
    "AffineGridSampler": _affine_grid_sampler_body,
}


# ---------------------------------------------------------------- model finishing


def _node_attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = oh.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list | tuple):
            value = list(value)
        out[a.name] = value
    return out


def _overload_key(node: onnx.NodeProto, attrs: dict, rank: int, dtype: int) -> str:
    present = "".join("1" if i else "0" for i in node.input)
    blob = json.dumps({"attrs": attrs, "inputs": present, "rank": rank, "dtype": dtype}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def finish_custom_ops(model: onnx.ModelProto, custom_ops: bool) -> onnx.ModelProto:
    """Give every attnserve node a model-local function overload with a standard-op body;
    with custom_ops=False, inline them so the model holds standard ops only."""
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    if not nodes:
        return model
    value_ranks = _value_ranks(model)
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if default_opset < MIN_OPSET:
        raise ValueError(f"models with attnserve ops need opset {MIN_OPSET} or newer, got {default_opset}")
    functions: dict[str, onnx.FunctionProto] = {}
    for node in nodes:
        attrs = _node_attrs(node)
        rank, dtype = value_ranks[node.input[0]]
        spatial_rank = rank - 3 if node.op_type == "WindowAttention" else rank - 2
        if node.op_type == "WindowAttention" and len(node.input) > 3 and node.input[3]:
            attrs["_bias_rank"] = value_ranks[node.input[3]][0]
        key = _overload_key(node, attrs, rank, dtype)
        node.overload = key
        if key in functions:
            continue
        # Absent optional inputs are "" in the call; the body of this overload ignores them.
        inputs = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
        b = _Body(f"{node.op_type}_{key}")
        out = _BODIES[node.op_type](b, inputs, attrs, spatial_rank)
        b.nodes.append(oh.make_node("Identity", [out], ["Y"]))
        functions[key] = oh.make_function(
            DOMAIN, node.op_type, [f"in{i}" for i in range(len(node.input))], ["Y"], b.nodes,
            [oh.make_opsetid("", default_opset)],
            attributes=ATTRIBUTES[node.op_type], overload=key,
        )
    for node in nodes:  # trailing absent inputs are dropped, as ONNX writes optional inputs
        names = list(node.input)
        while names and not names[-1]:
            names.pop()
        del node.input[:]
        node.input.extend(names)
    model.functions.extend(functions.values())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid(DOMAIN, VERSION))
    if not custom_ops:
        model = onnx.inliner.inline_local_functions(model)
        del model.functions[:]
        kept_opsets = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept_opsets)
    return model


def _value_ranks(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """value name -> (rank, element type), from graph inputs, initializers and value_info."""
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = (len(t.shape.dim), t.elem_type)
    for init in model.graph.initializer:
        out[init.name] = (len(init.dims), init.data_type)
    return out
