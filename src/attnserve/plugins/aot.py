"""Ahead-of-time compilation of the attnserve kernels to PTX for TensorRT plugins.

TensorRT launches an AOT plugin's kernel with the input pointers, then the plugin's
extra int32 scalars, then the output pointers (`tensorrt.plugin.aot_impl`, TensorRT
>= 10.9: "extra_args: Symbolic expressions for scalar inputs to the kernel, located
after the tensor inputs and before the tensor outputs"; NVIDIA/TensorRT
samples/python/quickly_deployable_plugins/oait_kernels.py puts the scalars between X
and Y for that reason). The kernels in `attnserve.ops.kernels` take the output right
after the inputs and a float `scale`, which TensorRT cannot pass (its extra args are
SymInt32 only). So each op has a thin wrapper kernel here with TensorRT's parameter
order and the scale as a constexpr; it calls the unchanged kernel, which Triton inlines.

`compile_ptx` needs no GPU: with an explicit `GPUTarget("cuda", cc, 32)` and
`ptx_version`, `triton.compile` (the `triton.compiler.ASTSource` API of OpenAI Triton
3.x, checked with 3.9) runs on the CPU; it also assembles the PTX with the `ptxas` that
ships with Triton, so a kernel that ptxas rejects for a target fails here.

Triton (3.9 here) appends two pointer parameters to every kernel, for global and
profile scratch memory. TensorRT passes neither. When the kernel uses no scratch memory
(sizes 0 in the metadata) and its body never reads those parameters, `compile_ptx`
drops their declarations, so the PTX's parameter list is exactly what TensorRT passes;
otherwise it refuses.

Import this module only where triton is installed; set TRITON_INTERPRET=1 before
importing it to run the wrappers in Triton's CPU interpreter instead.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import triton
import triton.language as tl

from attnserve.errors import AttnserveError, InternalError
from attnserve.ops.kernels import grid_sample_triton as _gs
from attnserve.ops.kernels import window_attention_triton as _wa
from attnserve.plugins import shapes

# Jetson Orin is sm_87; sm_90 compiles to sm_90a, Triton's target for Hopper.
TARGETS = (80, 87, 89, 90)
# PTX ISA 8.0 (CUDA 12.0) is the oldest that has sm_90a; a driver JIT-compiles PTX only
# up to the ISA version of its CUDA release, so older is more portable (JetPack 6 has
# CUDA 12.2, TensorRT 10.9+ needs CUDA 12).
DEFAULT_PTX_VERSION = 80
# The oldest ISA newer targets take, from the LLVM in Triton 3.9, which aborts the whole
# process (no exception) on a lower one: "PTX version 8.0 does not support target
# 'sm_120a'. Minimum required PTX version is 8.7". sm_101 is sm_110 from CUDA 13 on.
MIN_PTX_VERSION = {100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}
# Triton's default on the JIT path in 3.9 (the launchers' kernels were tested so);
# passed explicitly so the PTX does not depend on TRITON_DEFAULT_FP_FUSION.
FP_FUSION = True
DTYPES = ("fp32", "fp16")


def ptx_version_for(cc: int) -> int | None:
    """The PTX ISA to write for compute capability cc: DEFAULT_PTX_VERSION, or the oldest
    the target takes; None (Triton's default, its ptxas's ISA) for a target newer than
    MIN_PTX_VERSION knows."""
    if cc > max(MIN_PTX_VERSION):
        return None
    return max(DEFAULT_PTX_VERSION, MIN_PTX_VERSION.get(cc, 0))


# ------------------------------------------------------------------- wrapper kernels
# Parameter order: inputs, the plan's scalars (names as in shapes.LaunchPlan), output,
# then constexprs. Absent optional inputs arrive as rank-1 placeholders (never read).


@triton.jit
def window_attention_trt(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr,
    H, S0, S1, D, K1, K, W0, W1, START0, START1, STEP0, STEP1, SHIFT0, SHIFT1,
    out_ptr,
    SCALE: tl.constexpr, BLOCK_MODE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_PER_QUERY: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _wa._window_attention_kernel(
        q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, out_ptr,
        H, S0, S1, D, K1, K, W0, W1, START0, START1, STEP0, STEP1, SHIFT0, SHIFT1,
        SCALE, BLOCK_MODE, CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, BLOCK_Q, BLOCK_D,
    )


@triton.jit
def grid_sample_trt(
    x_ptr, grid_ptr,
    C, D, H, W, P,
    out_ptr,
    IS_3D: tl.constexpr, NEAREST: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _gs._grid_sample_kernel(x_ptr, grid_ptr, out_ptr, C, D, H, W, P,
                            IS_3D, NEAREST, PADDING, ALIGN_CORNERS, BLOCK_P, BLOCK_C)


@triton.jit
def affine_grid_sample_trt(
    x_ptr, theta_ptr,
    C, D, H, W, Do, Ho, Wo,
    out_ptr,
    IS_3D: tl.constexpr, NEAREST: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _gs._affine_grid_sample_kernel(x_ptr, theta_ptr, out_ptr, C, D, H, W, Do, Ho, Wo,
                                   IS_3D, NEAREST, PADDING, ALIGN_CORNERS, BLOCK_P, BLOCK_C)


KERNELS = {
    "WindowAttention": window_attention_trt,
    "GridSampler": grid_sample_trt,
    "AffineGridSampler": affine_grid_sample_trt,
}


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """A wrapper kernel's parameters, split as TensorRT passes them."""

    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[str, ...]
    constexprs: tuple[str, ...]

    def ptx_types(self) -> list[str]:
        """The PTX parameter types TensorRT's call fills: pointers are .u64, int32 .u32."""
        return ["u64"] * len(self.inputs) + ["u32"] * len(self.scalars) + ["u64"] * len(self.outputs)


def kernel_params(op: str) -> KernelParams:
    """op's wrapper parameters, read from its signature (JIT or interpreted kernel alike)."""
    fn = KERNELS[shapes.spec(op).name]
    params = inspect.signature(fn.fn).parameters.values()  # .fn: the decorated Python function
    const = tuple(p.name for p in params if "constexpr" in str(p.annotation))
    runtime = [p.name for p in params if p.name not in const]
    n_in = len(shapes.spec(op).inputs)
    return KernelParams(tuple(runtime[:n_in]), tuple(runtime[n_in:-1]), (runtime[-1],), const)


def _check_kernel_params(op: str, params: KernelParams) -> None:
    names = list(inspect.signature(KERNELS[op].fn).parameters)
    if names[len(names) - len(params.constexprs):] != list(params.constexprs):
        raise InternalError(f"{op}: wrapper constexprs {params.constexprs} are not its trailing parameters")
    if not all(n.endswith("_ptr") for n in params.inputs + params.outputs):
        raise InternalError(f"{op}: wrapper pointer parameters are {params.inputs + params.outputs}")


# ------------------------------------------------------------------- compilation


@dataclasses.dataclass(frozen=True)
class CompiledPtx:
    """One kernel compiled for one target, as an AOT plugin hands it to TensorRT."""

    op: str
    cc: int
    dtype: str
    name: str  # the PTX .entry
    ptx: str
    num_warps: int
    shared: int  # bytes of dynamic shared memory per program
    constexprs: dict[str, Any]
    ptx_version: int  # as Triton writes it, 80 = 8.0; read from the PTX's .version

    @property
    def block_x(self) -> int:
        return 32 * self.num_warps

    def params(self) -> list[tuple[str, str]]:
        return ptx_params(self.ptx, self.name)


def signature(op: str, dtype: str) -> dict[str, str]:
    """`ASTSource` signature of op's wrapper: pointers to dtype, int32 scalars."""
    if dtype not in DTYPES:
        raise AttnserveError(f"the plugins' kernels take {DTYPES} tensors, got {dtype!r}")
    p = kernel_params(op)
    return {**{n: f"*{dtype}" for n in p.inputs}, **{n: "i32" for n in p.scalars},
            **{n: f"*{dtype}" for n in p.outputs}}


def compile_ptx(op: str, cc: int, *, dtype: str = "fp32", ptx_version: int | None = None,
                num_warps: int = 4, **constexprs: Any) -> CompiledPtx:
    """Compile op's wrapper kernel to PTX for compute capability `cc` (80 for sm_80, ...),
    on any machine. Results are cached per process.

    Args:
        op: plugin name ("WindowAttention", "GridSampler", "AffineGridSampler").
        cc: compute capability as an int.
        dtype: element type of every tensor, "fp32" or "fp16".
        ptx_version: PTX ISA version as Triton writes it (80 = 8.0); default
            `ptx_version_for(cc)`.
        num_warps: warps per program (the launchers' default is 4).
        **constexprs: every constexpr of the wrapper (a `LaunchPlan.constexprs`).

    Raises:
        AttnserveError: on an unknown op, dtype or constexpr, a PTX version too old for
            the target, when TRITON_INTERPRET is set, or when the kernel needs scratch
            memory TensorRT cannot provide.
    """
    s = shapes.spec(op)
    cc = int(cc)
    if ptx_version is None:
        ptx_version = ptx_version_for(cc)
    if ptx_version is not None and ptx_version < MIN_PTX_VERSION.get(cc, 0):
        raise AttnserveError(f"sm_{cc} needs PTX ISA {MIN_PTX_VERSION[cc] / 10:.1f} or newer, "
                             f"got {ptx_version / 10:.1f}")
    p = kernel_params(s.name)
    _check_kernel_params(s.name, p)
    if sorted(constexprs) != sorted(p.constexprs):
        raise AttnserveError(
            f"{op}: constexprs {sorted(constexprs)} do not match the kernel's {sorted(p.constexprs)}"
        )
    if not isinstance(KERNELS[s.name], triton.runtime.JITFunction):
        raise AttnserveError("TRITON_INTERPRET is set, so the kernels were made for the interpreter; "
                             "compile PTX in a process without it")
    return _compile(s.name, cc, dtype, None if ptx_version is None else int(ptx_version), int(num_warps),
                    tuple((k, constexprs[k]) for k in p.constexprs))


_VERSION = re.compile(r"^\.version (\d+)\.(\d+)$", re.M)


@functools.cache
def _compile(op: str, cc: int, dtype: str, ptx_version: int | None, num_warps: int,
             constexprs: tuple) -> CompiledPtx:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(KERNELS[op], signature(op, dtype), constexprs=dict(constexprs))
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options={"ptx_version": ptx_version, "num_warps": num_warps,
                                     "enable_fp_fusion": FP_FUSION})
    meta = kernel.metadata
    expected = kernel_params(op).ptx_types()
    ptx = _drop_unused_trailing_params(op, kernel.asm["ptx"], meta.name, len(expected),
                                       scratch=(getattr(meta, "global_scratch_size", 0),
                                                getattr(meta, "profile_scratch_size", 0)))
    found = [t for t, _ in ptx_params(ptx, meta.name)]
    if found != expected:
        raise InternalError(f"{op}: PTX parameters {found} differ from what TensorRT passes {expected}")
    major, minor = map(int, _VERSION.search(ptx).groups())
    return CompiledPtx(op, cc, dtype, meta.name, ptx, meta.num_warps, meta.shared, dict(constexprs),
                       10 * major + minor)


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)


def ptx_params(ptx: str, entry: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of the kernel `entry` in PTX text, in order."""
    for m in _ENTRY.finditer(ptx):
        if m.group(1) == entry:
            out = []
            for decl in (d.split() for d in m.group(2).split(",")):
                if not decl:
                    continue
                # ".param .u64 .ptr .global .align 1 NAME" or ".param .u32 NAME"
                if decl[0] != ".param" or not decl[1].startswith("."):
                    raise InternalError(f"unreadable PTX parameter {' '.join(decl)!r} in {entry}")
                out.append((decl[1][1:], decl[-1]))
            return out
    raise InternalError(f"no .entry {entry} in the PTX")


def _drop_unused_trailing_params(op: str, ptx: str, entry: str, keep: int, scratch: tuple[int, int]) -> str:
    params = ptx_params(ptx, entry)
    extra = params[keep:]
    if not extra:
        return ptx
    used = [n for _, n in extra if len(re.findall(rf"\b{n}\b", ptx)) > 1]
    if any(scratch) or used:
        raise AttnserveError(
            f"{op}: the compiled kernel needs Triton's scratch memory (sizes {scratch}, parameters read: "
            f"{used}); TensorRT passes no such argument, so this kernel cannot be an AOT plugin"
        )
    m = next(m for m in _ENTRY.finditer(ptx) if m.group(1) == entry)
    decls = [d for d in m.group(2).split(",")]
    kept = ",".join(decls[:keep]).rstrip() + "\n"
    return ptx[:m.start(2)] + kept + ptx[m.end(2):]


def current_cc() -> int:
    """Compute capability of the active CUDA device, from Triton's driver (needs a GPU)."""
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception as e:  # no driver, no device: Triton raises various errors
        message = f"building AOT plugin kernels needs a CUDA device visible to Triton: {e}"
        raise AttnserveError(message) from None
    if target.backend != "cuda":
        raise AttnserveError(
            f"the plugins' kernels are for NVIDIA GPUs; Triton's active target is {target.backend}"
        )
    return int(target.arch)


# ------------------------------------------------------------------- PTX files


@dataclasses.dataclass(frozen=True)
class PtxConfig:
    """A named example: op, input shapes, attributes and dtype; its constexprs come from
    `shapes.plan`, the same function the plugins' aot_impl calls."""

    name: str
    op: str
    shapes: tuple[tuple[int, ...], ...]
    attrs: Mapping[str, Any]
    dtype: str = "fp32"

    def plan(self) -> shapes.LaunchPlan:
        return shapes.plan(self.op, self.shapes, shapes.normalize_attrs(self.op, self.attrs))


def window_attrs(window, mode="block", shift=None, before=None, after=None, dilation=None, causal=0,
                 scale=0.125) -> dict:
    """A WindowAttention node's attributes, defaults filled per spatial axis."""
    r = len(window)
    return dict(window=list(window), mode=mode, shift=list(shift or [0] * r),
                memory_before=list(before or [0] * r), memory_after=list(after or [0] * r),
                dilation=list(dilation or [1] * r), causal=causal, scale=scale)


def sample_attrs(mode="bilinear", padding_mode="zeros", align_corners=0, **extra) -> dict:
    """A sampler node's attributes (GridSampler; AffineGridSampler with out_size=...)."""
    return dict(extra, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


# One configuration per op: the models' uses (Swin's shifted windows with bias and mask in
# fp16, a 3-D sampler with reflection, STN's affine sampler).
CONFIGS = (
    PtxConfig("swin_shifted_fp16", "WindowAttention", ((2, 3, 8, 8, 32),) * 3 + ((3, 16, 16), (4, 16, 16)),
              window_attrs([4, 4], shift=[2, 2]), "fp16"),
    PtxConfig("grid3d_reflection", "GridSampler", ((2, 3, 4, 6, 8), (2, 3, 5, 7, 3)),
              sample_attrs(padding_mode="reflection", align_corners=1)),
    PtxConfig("stn_affine2d", "AffineGridSampler", ((2, 1, 28, 28), (2, 2, 3)),
              sample_attrs(out_size=[20, 20])),
)


def write_ptx(out_dir: str | Path, targets: Iterable[int] = TARGETS, configs: Sequence[PtxConfig] = CONFIGS,
              *, ptx_version: int | None = None) -> list[dict]:
    """Compile every config for every target into out_dir: `<config>.sm_<cc>.ptx` files and
    `index.json` (one entry per file: op, config, cc, entry name, launch facts, the
    parameter list TensorRT fills). ptx_version: as for `compile_ptx`. Returns the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for config in configs:
        p = config.plan()
        for cc in targets:
            k = compile_ptx(config.op, cc, dtype=config.dtype, ptx_version=ptx_version, num_warps=p.num_warps,
                            **p.constexprs)
            path = out / f"{config.name}.sm_{cc}.ptx"
            path.write_text(k.ptx)
            index.append(dict(file=path.name, config=config.name, op=config.op, cc=cc, dtype=config.dtype,
                              entry=k.name, num_warps=k.num_warps, block_x=k.block_x, shared=k.shared,
                              ptx_version=k.ptx_version, constexprs=k.constexprs,
                              params=[t for t, _ in k.params()],
                              kernel_params=dataclasses.asdict(kernel_params(config.op)),
                              plan_scalars=list(p.scalar_names), grid=[int(g) for g in p.grid]))
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index
