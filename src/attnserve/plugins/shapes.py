"""The plugins' contract in plain Python: names, attributes, output shapes, launch plans.

Nothing here imports TensorRT, OpenAI Triton or torch, so everything is tested on any
machine. `trt_plugins` wraps these functions in `tensorrt.plugin` decorators; `aot`
compiles the kernels a plan names.

Dimensions are either Python ints or TensorRT's symbolic expressions (`ShapeExpr`,
`SymInt32`). The functions below only index shapes, and do arithmetic through an
`Arith` object with the symbolic operand on the left (TensorRT's expressions have no
reflected operators: `2 * expr` fails, `expr * 2` works) and no `%`, comparisons or
`bool()` on symbolic values. Launch decisions that need a number (block sizes) use
`Arith.static`, which is None for a dimension that is only known at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from attnserve.errors import AttnserveError

NAMESPACE = "attnserve"  # == attnserve.ops.onnx_ops.PLUGIN_NAMESPACE (tested)

# The semantics' enumerations, restated here so this module needs no torch; tests hold
# them equal to attnserve.ops.window_attention / grid_sample and the Triton kernels.
WINDOW_MODES = ("block", "sliding")
SAMPLE_MODES = ("bilinear", "nearest")
PADDING_CODES = {"zeros": 0, "border": 1, "reflection": 2}


# ------------------------------------------------------------------- the contract

# Attribute kinds, with the ONNX attribute type the exporter writes and the Python
# annotation `tensorrt.plugin.register` gets (see trt_plugins). TensorRT's ONNX parser
# turns INTS into an int32 field, INT into an int32 field, FLOAT into float32 and STRING
# into a NUL-terminated char field (onnx-tensorrt onnxOpImporters.cpp, loadFields).
ATTR_KINDS = ("ints", "str", "int", "float")


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """One plugin: `namespace::name`, its inputs (all required, in order), its attributes
    (in the order `tensorrt.plugin.register` declares them) and one output."""

    name: str
    inputs: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]  # (name, kind)

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.attributes)


PLUGINS: dict[str, PluginSpec] = {
    s.name: s for s in (
        # rel_pos_bias and mask are optional in ONNX; a TensorRT plugin has a fixed number
        # of inputs, so `prepare_onnx` feeds a rank-1 placeholder where one is absent.
        PluginSpec("WindowAttention", ("q", "k", "v", "rel_pos_bias", "mask"), (
            ("window", "ints"), ("mode", "str"), ("shift", "ints"), ("memory_before", "ints"),
            ("memory_after", "ints"), ("dilation", "ints"), ("causal", "int"), ("scale", "float"),
        )),
        PluginSpec("GridSampler", ("x", "grid"), (
            ("mode", "str"), ("padding_mode", "str"), ("align_corners", "int"),
        )),
        PluginSpec("AffineGridSampler", ("x", "theta"), (
            ("out_size", "ints"), ("mode", "str"), ("padding_mode", "str"), ("align_corners", "int"),
        )),
    )
}

# The rank of the placeholder that stands for an absent optional input. No real bias or
# mask has rank 1 (block bias (h, Nq, Nk), sliding (h, K) or (B, h, *S, K), mask (nW, Nq, Nk)).
ABSENT_RANK = 1


def spec(op: str) -> PluginSpec:
    try:
        return PLUGINS[op]
    except KeyError:
        raise AttnserveError(f"no attnserve plugin named {op!r}; known: {sorted(PLUGINS)}") from None


def normalize_attrs(op: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute values as TensorRT hands them to a plugin (numpy arrays, NUL-terminated
    strings, one-element arrays) or as ONNX holds them -> plain Python values.

    Raises:
        AttnserveError: on a missing or unknown attribute, or a value of the wrong kind.
    """
    s = spec(op)
    missing = [n for n in s.attribute_names if n not in raw]
    unknown = [n for n in raw if n not in s.attribute_names]
    if missing or unknown:
        raise AttnserveError(
            f"{op}: attributes {sorted(raw)} do not match the plugin's {list(s.attribute_names)} "
            f"(missing {missing}, unknown {unknown}); re-export the model with this attnserve"
        )
    out = {}
    for name, kind in s.attributes:
        value = raw[name]
        try:
            out[name] = _convert(value, kind)
        except (TypeError, ValueError) as e:
            raise AttnserveError(f"{op}: attribute {name} should be {kind}, got {value!r} ({e})") from None
    return out


def _convert(value: Any, kind: str) -> Any:
    if kind == "str":
        if isinstance(value, np.ndarray):
            value = value.tobytes()
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise TypeError("not a string")
        # TensorRT's ONNX parser copies a STRING attribute with its terminating NUL.
        return value.rstrip("\x00")
    flat = np.asarray(value).reshape(-1)
    if kind == "ints":
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise TypeError(f"dtype {flat.dtype}")
        return [int(v) for v in flat]
    if flat.size != 1:
        raise ValueError(f"{flat.size} values")
    return int(flat[0]) if kind == "int" else float(flat[0])


# ------------------------------------------------------------------- output shapes


def output_shape(op: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any]) -> tuple:
    """The output's shape from the inputs' shapes (ints or symbolic dims) and the
    normalised attributes; the output's dtype is the first input's.

    Raises:
        AttnserveError: on ranks or attributes the kernels do not take.
    """
    s = spec(op)
    if len(shapes) != len(s.inputs):
        raise AttnserveError(f"{op} takes {len(s.inputs)} inputs {list(s.inputs)}, got {len(shapes)}")
    return _OUTPUT_SHAPES[op](*[tuple(x) for x in shapes], attrs)


def _window_attention_shape(q, k, v, bias, mask, a) -> tuple:
    if len(q) not in (4, 5):
        raise AttnserveError(
            f"WindowAttention takes q of rank 4 or 5 (B, heads, *spatial, head_dim), got rank {len(q)}"
        )
    if len(k) != len(q) or len(v) != len(q):
        raise AttnserveError(f"WindowAttention needs q, k, v of one rank, got {len(q)}, {len(k)}, {len(v)}")
    r = len(q) - 3
    if a["mode"] not in WINDOW_MODES:
        raise AttnserveError(f"WindowAttention mode must be one of {WINDOW_MODES}, got {a['mode']!r}")
    for name in ("window", "shift", "memory_before", "memory_after", "dilation"):
        if len(a[name]) != r:
            raise AttnserveError(f"WindowAttention {name} has {len(a[name])} values for {r} spatial axes")
    if any(w < 1 for w in a["window"]) or any(d < 1 for d in a["dilation"]):
        raise AttnserveError(
            f"WindowAttention needs positive window and dilation, got {a['window']}, {a['dilation']}"
        )
    if any(m < 0 for m in a["memory_before"] + a["memory_after"]):
        raise AttnserveError("WindowAttention memory extents must be >= 0")
    if a["mode"] == "block":
        bias_ranks, mask_ranks = (ABSENT_RANK, 3), (ABSENT_RANK, 3)
    else:
        bias_ranks, mask_ranks = (ABSENT_RANK, 2, r + 3), (ABSENT_RANK,)
    if len(bias) not in bias_ranks:
        raise AttnserveError(f"WindowAttention ({a['mode']}) takes rel_pos_bias of rank {bias_ranks[1:]} "
                             f"(or the rank-1 placeholder for none), got rank {len(bias)}")
    if len(mask) not in mask_ranks:
        allowed = mask_ranks[1:] or "(no mask)"
        raise AttnserveError(f"WindowAttention ({a['mode']}) takes mask of rank {allowed} "
                             f"(or the rank-1 placeholder for none), got rank {len(mask)}")
    return q


def _sampler_rank(op: str, x, a) -> int:
    if len(x) not in (4, 5):
        raise AttnserveError(f"{op} takes x of rank 4 (N, C, H, W) or 5 (N, C, D, H, W), got rank {len(x)}")
    if a["mode"] not in SAMPLE_MODES:
        raise AttnserveError(f"{op} mode must be one of {SAMPLE_MODES}, got {a['mode']!r}")
    if a["padding_mode"] not in PADDING_CODES:
        raise AttnserveError(
            f"{op} padding_mode must be one of {tuple(PADDING_CODES)}, got {a['padding_mode']!r}"
        )
    return len(x) - 2


def _grid_sampler_shape(x, grid, a) -> tuple:
    r = _sampler_rank("GridSampler", x, a)
    if len(grid) != r + 2:
        raise AttnserveError(
            f"GridSampler on a rank-{len(x)} x needs a grid of rank {r + 2}, got rank {len(grid)}"
        )
    return (x[0], x[1], *grid[1:-1])


def _affine_grid_sampler_shape(x, theta, a) -> tuple:
    r = _sampler_rank("AffineGridSampler", x, a)
    if len(theta) != 3:
        raise AttnserveError(
            f"AffineGridSampler needs theta of rank 3 (N, {r}, {r + 1}), got rank {len(theta)}"
        )
    if len(a["out_size"]) != r or any(s < 1 for s in a["out_size"]):
        raise AttnserveError(f"AffineGridSampler needs {r} positive out_size values, got {a['out_size']}")
    return (x[0], x[1], *a["out_size"])


_OUTPUT_SHAPES = {
    "WindowAttention": _window_attention_shape,
    "GridSampler": _grid_sampler_shape,
    "AffineGridSampler": _affine_grid_sampler_shape,
}


# ------------------------------------------------------------------- launch plans


class Arith(Protocol):
    """Arithmetic on dimensions: ints here, TensorRT expressions in `trt_plugins`."""

    def lift(self, value: int) -> Any:
        """An int as a dimension value that symbolic operators accept on either side."""

    def cdiv(self, a: Any, b: Any) -> Any:
        """Ceiling division."""

    def static(self, dim: Any) -> int | None:
        """The value of an input dimension if it is known before run time."""


class IntArith:
    """Concrete shapes: plain ints."""

    def lift(self, value: int) -> int:
        return int(value)

    def cdiv(self, a: int, b: int) -> int:
        return -(-a // b)

    def static(self, dim: int) -> int:
        return int(dim)


INT = IntArith()


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How to launch an op's kernel (the wrapper in `attnserve.plugins.aot`).

    TensorRT calls the kernel with the input pointers, then `scalars` (int32, in this
    order), then the output pointer (`tensorrt.plugin.aot_impl`: "extra_args ... located
    after the tensor inputs and before the tensor outputs"). `grid` is (x, y, z) in
    programs; each program has `num_warps` warps.
    """

    op: str
    scalars: tuple[tuple[str, Any], ...]
    constexprs: dict[str, Any]
    grid: tuple[Any, Any, Any]
    num_warps: int = 4

    @property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.scalars)

    @property
    def scalar_values(self) -> tuple[Any, ...]:
        return tuple(v for _, v in self.scalars)


def plan(op: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any],
         arith: Arith = INT) -> LaunchPlan:
    """The launch of `op`'s kernel for inputs of these shapes (ints or symbolic dims):
    the choices the Triton launchers in `attnserve.ops.kernels` make, with dims that are
    only known at run time treated as large."""
    output_shape(op, shapes, attrs)  # validates
    return _PLANS[op](*[tuple(x) for x in shapes], attrs, arith)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _mod(a, b):
    """a mod b for a >= 0 and symbolic b (TensorRT expressions have floor division, no %)."""
    return a - (a // b) * b


def _window_attention_plan(q, k, v, bias, mask, a, arith: Arith) -> LaunchPlan:
    r = len(q) - 3
    B, H, D = q[0], q[1], q[-1]
    head_dim = arith.static(D)
    if head_dim is None:
        raise AttnserveError("WindowAttention's head_dim (the last axis of q) must be fixed when the engine "
                             "is built; make it static in the optimisation profile")
    statics = [arith.static(s) for s in q[2:-1]]
    # A 1-D map runs as a 2-D map of height 1 with a window of height 1, as in the launcher.
    lead = [1] if r == 1 else []
    S0, S1 = (1, q[2]) if r == 1 else (q[2], q[3])
    w0, w1 = lead + a["window"]
    shift0, shift1 = [0] * len(lead) + a["shift"]
    if a["mode"] == "block":
        start0, start1 = [0] * len(lead) + a["memory_before"]
        ma0, ma1 = [0] * len(lead) + a["memory_after"]
        step0 = step1 = 1
        k0, k1 = w0 + start0 + ma0, w1 + start1 + ma1
    else:
        d0, d1 = lead + a["dilation"]
        start0, start1 = d0 * ((w0 - 1) // 2), d1 * ((w1 - 1) // 2)
        step0, step1 = d0, d1
        k0, k1 = w0, w1
    # The kernel needs each shift in [0, S); S may be symbolic, so reduce it there.
    sh0 = 0 if shift0 == 0 else _mod(arith.lift(shift0), S0)
    sh1 = 0 if shift1 == 0 else _mod(arith.lift(shift1), S1)
    S = S1 if r == 1 else S0 * S1
    total = None if None in statics else int(np.prod(statics))
    block_d = _next_pow2(head_dim)
    # the launcher's choice; a map whose size is only known at run time counts as large
    block_q = max(16, min(_next_pow2(total) if total is not None else 64, 64, max(1, 8192 // block_d)))
    has_bias, has_mask = len(bias) != ABSENT_RANK, len(mask) != ABSENT_RANK
    return LaunchPlan(
        "WindowAttention",
        scalars=(("H", H), ("S0", S0), ("S1", S1), ("D", D), ("K1", k1), ("K", k0 * k1),
                 ("W0", w0), ("W1", w1), ("START0", start0), ("START1", start1),
                 ("STEP0", step0), ("STEP1", step1), ("SHIFT0", sh0), ("SHIFT1", sh1)),
        constexprs=dict(SCALE=float(a["scale"]), BLOCK_MODE=a["mode"] == "block", CAUSAL=bool(a["causal"]),
                        HAS_BIAS=has_bias, BIAS_PER_QUERY=has_bias and len(bias) > 2, HAS_MASK=has_mask,
                        BLOCK_Q=block_q, BLOCK_D=block_d),
        grid=(B * H, arith.cdiv(S, block_q), 1),
    )


def _sample_blocks(positions: int | None, channels: int | None) -> tuple[int, int]:
    """The launchers' tile sizes (grid_sample_triton._block_sizes); unknown counts as large."""
    block_c = 16 if channels is None else min(_next_pow2(max(channels, 1)), 16)
    block_p = 128 if positions is None else max(min(_next_pow2(max(positions, 1)), 128), 16)
    return block_p, block_c


def _spatial(x) -> tuple:
    """(D, H, W) of x's spatial axes, D = 1 for a 2-D map."""
    return (1, x[2], x[3]) if len(x) == 4 else (x[2], x[3], x[4])


def _sample_flags(a, r: int) -> dict:
    return dict(IS_3D=r == 3, NEAREST=a["mode"] == "nearest", PADDING=PADDING_CODES[a["padding_mode"]],
                ALIGN_CORNERS=bool(a["align_corners"]))


def _grid_sampler_plan(x, grid, a, arith: Arith) -> LaunchPlan:
    r = len(x) - 2
    N, C = x[0], x[1]
    out = grid[1:-1]
    P = out[0]
    for s in out[1:]:
        P = P * s
    statics = [arith.static(s) for s in out]
    block_p, block_c = _sample_blocks(None if None in statics else int(np.prod(statics)), arith.static(C))
    D, H, W = _spatial(x)
    return LaunchPlan(
        "GridSampler",
        scalars=(("C", C), ("D", D), ("H", H), ("W", W), ("P", P)),
        constexprs=dict(**_sample_flags(a, r), BLOCK_P=block_p, BLOCK_C=block_c),
        grid=(arith.cdiv(P, block_p), N, 1),
    )


def _affine_grid_sampler_plan(x, theta, a, arith: Arith) -> LaunchPlan:
    r = len(x) - 2
    N, C = x[0], x[1]
    Do, Ho, Wo = (1, *a["out_size"]) if r == 2 else a["out_size"]
    P = Do * Ho * Wo
    block_p, block_c = _sample_blocks(P, arith.static(C))
    D, H, W = _spatial(x)
    return LaunchPlan(
        "AffineGridSampler",
        scalars=(("C", C), ("D", D), ("H", H), ("W", W), ("Do", Do), ("Ho", Ho), ("Wo", Wo)),
        constexprs=dict(**_sample_flags(a, r), BLOCK_P=block_p, BLOCK_C=block_c),
        grid=(arith.cdiv(P, block_p), N, 1),
    )


_PLANS = {
    "WindowAttention": _window_attention_plan,
    "GridSampler": _grid_sampler_plan,
    "AffineGridSampler": _affine_grid_sampler_plan,
}
