"""ONNX Runtime's faster path for the attnserve ops.

The function bodies in an exported model are standard ONNX, so every runtime runs them.
ONNX Runtime also has fused contrib kernels; this pass rewrites the WindowAttention
overloads it can express with them, at load time, leaving the file on disk unchanged:

- block windows without memory blocks or causality (Swin): the windows are gathered
  into a batch of B * nW sequences of N tokens and run through
  `com.microsoft.MultiHeadAttention`, with the relative position bias and the shift
  mask as its additive `attention_bias` (heads, N, N) / (B * nW, heads, N, N).

Other overloads (memory blocks, causal, sliding windows) and the samplers keep their
bodies: the samplers' bodies are already ONNX Runtime's own GridSample kernel.

Measured on 2 CPU cores (benchmarks/custom_ops.py), Swin-T at batch 1 and 8 ran 0.96x
and 0.97x as fast as the plain bodies: the window gathering and bias expansion around
the fused kernel cost what it saves at N = 49 tokens. So the pass is opt-in
(`OrtRunner(fused_custom_ops=True)`), kept for the CUDA EP, where it is unmeasured.
"""

from __future__ import annotations

import onnx
import onnx.helper as oh

from attnserve.ops.onnx_ops import DOMAIN, _Body, _node_attrs

CONTRIB_DOMAIN = "com.microsoft"


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _lowerable(attrs: dict) -> bool:
    return (attrs["mode"] == "block" and not any(attrs["memory_before"])
            and not any(attrs["memory_after"]) and not attrs["causal"])


def _mha_window_body(b: _Body, inputs: list[str], attrs: dict, heads: int, rank: int) -> str:
    q, k, v = inputs[:3]
    bias = inputs[3] if len(inputs) > 3 and inputs[3] else None
    mask = inputs[4] if len(inputs) > 4 and inputs[4] else None
    window, shift = attrs["window"], attrs["shift"]
    axes = list(range(2, 2 + rank))
    if any(shift):
        q, k, v = (b.roll(t, [-s for s in shift], axes) for t in (q, k, v))
    shape = b.op("Shape", q)
    batch, head_dim = b.dim(shape, 0), b.dim(shape, 2 + rank)
    grids = [b.op("Div", b.dim(shape, a), b.ints([w])) for a, w in zip(axes, window, strict=True)]
    n = 1
    for w in window:
        n *= w
    if rank == 1:
        split = b.op("Concat", batch, b.ints([heads]), grids[0], b.ints([window[0]]), head_dim, axis=0)
        to_tokens = [0, 2, 3, 1, 4]  # (B, g, w, h, d)
        grid_shape = b.op("Concat", batch, grids[0], b.ints([window[0]]), b.ints([heads]), head_dim, axis=0)
        from_tokens = [0, 3, 1, 2, 4]
    else:
        split = b.op("Concat", batch, b.ints([heads]), grids[0], b.ints([window[0]]), grids[1],
                     b.ints([window[1]]), head_dim, axis=0)
        to_tokens = [0, 2, 4, 3, 5, 1, 6]  # (B, g0, g1, w0, w1, h, d)
        grid_shape = b.op("Concat", batch, grids[0], grids[1], b.ints([window[0]]), b.ints([window[1]]),
                          b.ints([heads]), head_dim, axis=0)
        from_tokens = [0, 5, 1, 3, 2, 4, 6]  # back to (B, h, g0, w0, g1, w1, d)
    hidden = b.op("Mul", head_dim, b.ints([heads]))
    tokens_shape = b.op("Concat", b.ints([-1, n]), hidden, axis=0)

    def to_sequences(t):  # (B, h, *S, d) -> (B * nW, N, h * d)
        t = b.op("Transpose", b.op("Reshape", t, split), perm=to_tokens)
        return b.op("Reshape", t, tokens_shape)

    attention_bias = ""
    if bias is not None and mask is None:
        attention_bias = b.op("Unsqueeze", bias, b.ints([0]))  # (1, h, N, N)
    elif mask is not None:
        combined = b.op("Unsqueeze", mask, b.ints([1]))  # (nW, 1, N, N)
        if bias is not None:
            combined = b.op("Add", combined, bias)  # (nW, h, N, N)
        # The contrib op takes (1 or batch, ...): repeat the per-window table per image.
        expanded = b.op("Expand", b.op("Unsqueeze", combined, b.ints([0])),
                        b.op("Concat", batch, b.ints([1, 1, 1, 1]), axis=0))  # (B, nW, h|1, N, N)
        attention_bias = b.op("Reshape", expanded, b.ints([-1, heads if bias else 1, n, n]))
    node_inputs = [to_sequences(q), to_sequences(k), to_sequences(v), "", "", attention_bias]
    while node_inputs and not node_inputs[-1]:
        node_inputs.pop()
    out = b.name()
    b.nodes.append(oh.make_node("MultiHeadAttention", node_inputs, [out], domain=CONTRIB_DOMAIN,
                                num_heads=heads, scale=float(attrs["scale"])))
    out = b.op("Reshape", b.op("Transpose", b.op("Reshape", out, grid_shape), perm=from_tokens), shape)
    return b.roll(out, list(shift), axes) if any(shift) else out


def lower_for_onnxruntime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Point the WindowAttention nodes that ONNX Runtime's fused attention can run at
    new overloads whose bodies use it. Returns the model and how many nodes moved."""
    functions = {(f.name, f.overload): f for f in model.functions if f.domain == DOMAIN}
    if not functions:
        return model, 0
    shapes = _static_shapes(model)
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    new: dict[str, onnx.FunctionProto] = {}
    moved = 0
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != "WindowAttention":
            continue
        attrs = _node_attrs(node)
        q_shape = shapes.get(node.input[0])
        if not _lowerable(attrs) or not q_shape or q_shape[1] is None:
            continue
        heads, rank = q_shape[1], len(q_shape) - 3
        original = functions[(node.op_type, node.overload)]
        key = f"{node.overload}_mha{heads}"
        if key not in new:
            present = [i < len(node.input) and bool(node.input[i]) for i in range(len(original.input))]
            inputs = [name if p else "" for name, p in zip(original.input, present, strict=True)]
            b = _Body(f"mha_{key}")
            out = _mha_window_body(b, inputs, attrs, heads, rank)
            b.nodes.append(oh.make_node("Identity", [out], ["Y"]))
            new[key] = oh.make_function(
                DOMAIN, node.op_type, list(original.input), ["Y"], b.nodes,
                [oh.make_opsetid("", default_opset), oh.make_opsetid(CONTRIB_DOMAIN, 1)],
                attributes=list(original.attribute), overload=key,
            )
        node.overload = key
        moved += 1
    if moved:
        used = {(n.op_type, n.overload) for n in model.graph.node if n.domain == DOMAIN}
        kept = [f for f in model.functions if f.domain != DOMAIN or (f.name, f.overload) in used]
        del model.functions[:]
        model.functions.extend(kept + list(new.values()))
        if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
            model.opset_import.append(oh.make_opsetid(CONTRIB_DOMAIN, 1))
    return model, moved
