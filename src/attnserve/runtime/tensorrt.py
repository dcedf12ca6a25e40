"""TensorRT: engines built from exported models, checked against an engine cache, and run.

    build_engine(onnx, out, ...)   ONNX -> <name>.engine + <name>.engine.json (sidecar)
    load_engine(engine, onnx, ...) the engine's bytes, after the sidecar matched this
                                   machine (else rebuilt from the ONNX, or refused)
    TrtRunner                      runs an engine: `attnserve.runtime.load(path, "trt")`

TensorRT and cuda-python are imported inside the functions that need them, never at
module level: this module imports on any machine, and the parts that need no GPU
(profiles, the TensorRT 10 / 11 precision decision, parser-error formatting, workspace
and shape checks, dtype mapping, buffer views) are plain functions tested everywhere.

APIs relied on (TensorRT Python API, github.com/NVIDIA/TensorRT python/docstrings and
python/src at v10.2 ... v11.1; cuda-python's runtime module):
- Builder / network: `trt.Builder(logger)`, `create_network(flags)`,
  `NetworkDefinitionCreationFlag.STRONGLY_TYPED` (10.x; deprecated and ignored in 11, where
  every network is strongly typed), `trt.OnnxParser(network, logger)`,
  `parse_from_file` (finds external data beside the file), `num_errors`,
  `get_error(i)` -> ParserError with `node()`, `node_name()`, `node_operator()`,
  `desc()`, `local_function_stack()` (all 10.x and 11).
- Config: `BuilderFlag.FP16` / `INT8` (10.x only; gone in 11), `BuilderFlag.TF32` (both),
  `set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`, `builder_optimization_level`,
  `create_timing_cache(bytes)`, `set_timing_cache(cache, ignore_mismatch)`,
  `get_timing_cache().serialize()`, `create_optimization_profile().set_shape(name, min,
  opt, max)`, `add_optimization_profile`, `build_serialized_network`.
- Plugins: `get_plugin_registry()`, `.load_library(path)` (None when it fails),
  `.all_creators` (10.0+) with `name`, `plugin_version`, `plugin_namespace`;
  `init_libnvinfer_plugins(logger, "")` for TensorRT's own plugins (the ONNX parser
  imports some ops, RoiAlign among them, as those; the parser does not register them).
- Runtime (the tensor API of 10.x and 11): `Runtime.deserialize_cuda_engine` (None on
  failure), `num_io_tensors`, `get_tensor_name`, `get_tensor_mode`, `get_tensor_dtype`,
  `get_tensor_shape`, `get_tensor_profile_shape(name, profile_index)`,
  `is_shape_inference_io`, `num_optimization_profiles`, `create_execution_context`,
  `set_input_shape`, `set_tensor_address`, `execute_async_v3(stream_handle)`, and
  `set_optimization_profile_async(index, stream_handle)`, which raises RuntimeError
  rather than returning False (python/src/infer/pyCore.cpp, 10.x and 11).
- cuda-python (`cuda.bindings.runtime` from 12.6; `cuda.cudart` before, removed in 13.0):
  every call returns (error, *results); `cudaSetDevice`, `cudaGetDeviceProperties`
  (`name` bytes, `major`, `minor`), `cudaMemGetInfo` -> (free, total), `cudaMalloc`,
  `cudaMallocHost` (int pointers), `cudaMemcpyAsync(dst, src, count, kind, stream)`,
  `cudaStreamCreate`, `cudaStreamSynchronize`, `cudaStreamBeginCapture(stream, mode)`,
  `cudaStreamEndCapture`, `cudaGraphInstantiateWithFlags(graph, flags)` (the same in
  cuda-bindings 12.9 and 13.x; `cudaGraphInstantiate` took other arguments before CUDA
  12), `cudaGraphLaunch(exec, stream)`, `cudaGetLastError`.
None of this has run on a GPU yet (docs/tensorrt.md).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnserve.artifact import MANIFEST_NAME, ONNX_NAME, read_artifact
from attnserve.errors import AttnserveError, BackendUnavailableError, InputError, InternalError
from attnserve.runtime import engine_cache as cache
from attnserve.runtime.base import Runner
from attnserve.runtime.engine_cache import EngineMismatchError, Environment, Profile, Shape, load_engine
from attnserve.spec import CACHE_AXIS, ModelSpec, TensorSpec

PRECISIONS = ("fp32", "fp16", "int8", "onnx")
PLUGIN_NAMESPACE = "attnserve"
# The op types of attnserve's custom ops (attnserve.ops.onnx_ops.SCHEMAS; a test keeps
# the two equal): a parser error on one of them gets a hint about plugins.
ATTNSERVE_OPS = ("WindowAttention", "GridSampler", "AffineGridSampler")
MAX_OPT_LEVEL = 5  # IBuilderConfig.builder_optimization_level: 0..5, default 3
_MAX_GRAPHS = 8  # CUDA graphs kept per runner (one per input-shape set)
_log = logging.getLogger(__name__)

__all__ = [
    "EngineMismatchError", "ProfilePolicy", "TrtRunner", "build_engine", "derive_profiles",
    "load_engine", "precision_plan",
]


class TensorRTError(AttnserveError):
    """Something TensorRT or CUDA refused; the message says what and what to do."""


class ProfileError(TensorRTError, ValueError):
    """Optimisation profiles that do not fit the model or each other."""


class PrecisionError(TensorRTError, ValueError):
    """A precision this TensorRT cannot build at."""


class PluginError(TensorRTError):
    """A plugin that cannot be registered."""


class GpuMemoryError(TensorRTError):
    """Not enough free GPU memory for what was asked."""


@dataclass(frozen=True)
class NodeError:
    """One failing node as TensorRT's ONNX parser reports it."""

    node: str  # name, or "#index" for an unnamed node; "" for a model-level error
    op: str
    message: str

    def line(self) -> str:
        where = f"node {self.node} ({self.op or 'unknown op'})" if self.node else "the model"
        hint = ""
        if self.op in ATTNSERVE_OPS:
            hint = (" (an attnserve custom op: its TensorRT plugin from attnserve.plugins did not take "
                    "it; or export the model with --no-custom-ops)")
        return f"{where}: {self.message}{hint}"


class ParserError(TensorRTError):
    """TensorRT's ONNX parser refused the model; `nodes` lists the failing nodes."""

    def __init__(self, onnx_path: str | Path, nodes: Sequence[NodeError]):
        self.nodes = list(nodes)
        lines = "\n".join("  " + n.line() for n in self.nodes) or "  (the parser gave no reason)"
        super().__init__(f"TensorRT's ONNX parser cannot read {onnx_path} "
                         f"({len(self.nodes)} failing node(s)):\n{lines}")


class EngineBuildError(TensorRTError):
    """The builder produced no engine."""


# ---- optimisation profiles (plain Python) ----------------------------------------------------

@dataclass(frozen=True)
class ProfilePolicy:
    """How profiles are derived from a spec's dynamic axes.

    Attributes:
        max_batch: largest batch; the default is ServingPolicy's max_batch_size.
        opt_batch: the batch TensorRT tunes its kernels for (None: max_batch, the size
            a busy dynamic batcher forms).
        scale: another named axis with default size d ranges d // scale .. d * scale,
            tuned for d (the key/value cache axis from 0).
        axes: explicit (min, opt, max) per axis name; these win.
    """

    max_batch: int = 8
    opt_batch: int | None = None
    scale: int = 2
    axes: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)


def axis_ranges(spec: ModelSpec, policy: ProfilePolicy) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per named dynamic axis that a size is known for."""
    ranges = {"batch": (1, policy.opt_batch or policy.max_batch, policy.max_batch)}
    for name, d in spec.default_dims.items():
        low = 0 if name == CACHE_AXIS else max(1, d // max(policy.scale, 1))
        ranges[name] = (low, d, d * max(policy.scale, 1))
    ranges.update({k: tuple(v) for k, v in policy.axes.items()})
    return ranges


def derive_profiles(spec: ModelSpec, policy: ProfilePolicy | None = None,
                    overrides: Mapping[str, Sequence[Sequence[int]]] | None = None) -> dict[str, Profile]:
    """One (min, opt, max) shape triple per input of `spec`.

    Args:
        spec: the model's (or part's) spec.
        policy: how named axes are sized (ProfilePolicy()).
        overrides: input name -> (min, opt, max) shapes; these replace the derived ones.

    Raises:
        ProfileError: listing every problem (an unknown input, a dynamic axis nothing
            says the size of, min > opt or opt > max, fixed sizes contradicted, one axis
            given different ranges in two inputs).
    """
    policy = policy or ProfilePolicy()
    overrides = dict(overrides or {})
    problems = []
    if policy.max_batch < 1 or not 1 <= (policy.opt_batch or policy.max_batch) <= policy.max_batch:
        problems.append(f"the batch range needs 1 <= opt ({policy.opt_batch}) <= max ({policy.max_batch})")
    unknown = [n for n in overrides if n not in spec.input_names]
    if unknown:
        problems.append(f"{', '.join(unknown)}: not an input of {spec.name} (its inputs: "
                        f"{', '.join(spec.input_names)})")
    ranges = axis_ranges(spec, policy)
    profiles: dict[str, Profile] = {}
    for t in spec.inputs:
        if t.name in overrides:
            try:
                profiles[t.name] = as_profile(overrides[t.name])
            except (TypeError, ValueError):
                problems.append(f"the profile of {t.name} must be three shapes (min, opt, max), "
                                f"got {overrides[t.name]!r}")
            continue
        unsized = [(i, d) for i, d in t.dynamic_axes.items() if d not in ranges]
        for i, d in unsized:
            problems.append(f"input {t.name} has dynamic axis {d!r} (axis {i}) and nothing says its size; "
                            f"give the input's shapes (--shape {t.name}:MIN:OPT:MAX)")
        if not unsized:
            profiles[t.name] = tuple(
                tuple(ranges[d][k] if isinstance(d, str) else d for d in t.shape) for k in range(3)
            )
    problems += profile_problems_for_spec(spec, profiles)
    if problems:
        raise ProfileError(f"bad optimisation profiles for {spec.name}: " + "; ".join(problems))
    return profiles


def as_profile(value) -> Profile:
    shapes = tuple(tuple(int(d) for d in s) for s in value)
    if len(shapes) != 3:
        raise ValueError("need min, opt and max")
    return shapes


def profile_problems_for_spec(spec: ModelSpec, profiles: Mapping[str, Profile]) -> list[str]:
    """What is wrong with complete profiles for `spec` (inputs without one are skipped:
    derive_profiles has said why)."""
    problems = []
    seen: dict[str, tuple[tuple[int, int, int], str]] = {}
    for t in spec.inputs:
        p = profiles.get(t.name)
        if p is None:
            continue
        ranks = {len(s) for s in p}
        if ranks != {len(t.shape)}:
            problems.append(f"the profile of {t.name} has shapes of rank {sorted(ranks)}, "
                            f"{t.name} has rank {len(t.shape)} {t.describe_shape()}")
            continue
        for i, want in enumerate(t.shape):
            lo, opt, hi = p[0][i], p[1][i], p[2][i]
            if min(lo, opt, hi) < 0:
                problems.append(f"{t.name} axis {i}: negative size in {lo}/{opt}/{hi}")
            elif isinstance(want, int):
                if not lo == opt == hi == want:
                    problems.append(f"{t.name} axis {i} is fixed at {want} in the model, the profile "
                                    f"gives min {lo} opt {opt} max {hi}")
            elif lo > opt or opt > hi:
                worse = f"min {lo} > opt {opt}" if lo > opt else f"opt {opt} > max {hi}"
                problems.append(f"{t.name} axis {i} ({want!r}): {worse}")
            elif lo == 0 and want != CACHE_AXIS:
                problems.append(f"{t.name} axis {i} ({want!r}) may not be empty (min 0)")
            else:
                earlier = seen.setdefault(want, ((lo, opt, hi), t.name))
                if earlier[0] != (lo, opt, hi):
                    problems.append(f"axis {want!r} ranges {'/'.join(map(str, (lo, opt, hi)))} in {t.name} "
                                    f"but {'/'.join(map(str, earlier[0]))} in {earlier[1]}; give both the "
                                    "same min/opt/max")
    return problems


def parse_shape(text: str) -> Shape:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    dims = text.strip().lower().split("x")
    if not all(d.isdigit() for d in dims):
        raise ProfileError(f"a shape is sizes joined by 'x' (like 1x3x224x224), got {text!r}")
    return tuple(int(d) for d in dims)


def parse_shape_option(text: str) -> tuple[str, Profile]:
    """`--shape NAME:MIN:OPT:MAX` (or NAME:SHAPE, a fixed shape) -> (name, profile)."""
    name, *shapes = text.split(":")
    if not name or len(shapes) not in (1, 3):
        raise ProfileError(f"--shape takes NAME:MIN:OPT:MAX (or NAME:SHAPE) with shapes like 1x3x224x224, "
                           f"got {text!r}")
    parsed = [parse_shape(s) for s in shapes]
    return name, tuple(parsed * 3 if len(parsed) == 1 else parsed)


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4G', '512MiB', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise TensorRTError(f"a size is a number with an optional unit K, M, G or T (like 4G), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


# ---- TensorRT 10 vs 11: how a precision is built (plain Python) -------------------------------

def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise TensorRTError(f"cannot read TensorRT's version {version!r}") from None


@dataclass(frozen=True)
class BuildPlan:
    """Names of the TensorRT flags a build sets (resolved on trt's enums when building)."""

    tensorrt_major: int
    strongly_typed: bool
    network_flags: tuple[str, ...] = ()  # NetworkDefinitionCreationFlag
    set_flags: tuple[str, ...] = ()  # BuilderFlag
    clear_flags: tuple[str, ...] = ()  # BuilderFlag


def precision_plan(tensorrt_version: str, precision: str) -> BuildPlan:
    """How to build at `precision` with this TensorRT.

    precision: "fp32" (fp32 math, TF32 off so fp32 tolerances hold), "fp16" / "int8"
    (TensorRT 10: builder flags letting the builder pick fp16 / int8 kernels; int8 needs
    Q/DQ nodes in the graph, calibrators are deprecated since 10.1), or "onnx" (strongly
    typed: every tensor keeps the type the ONNX graph gives it; TF32 off).

    TensorRT 11 has no FP16/INT8 flags: networks are always strongly typed and precision
    is decided in the ONNX graph, so "fp16" and "int8" are refused with what to do.
    """
    major = tensorrt_major(tensorrt_version)
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {tensorrt_version} is too old: attnserve needs TensorRT 10 or newer (the tensor "
            "API: set_input_shape, set_tensor_address, execute_async_v3)"
        )
    if major >= 11:
        if precision in ("fp16", "int8"):
            raise PrecisionError(
                f"TensorRT {tensorrt_version} builds strongly typed networks only: every layer runs at the "
                f"type the ONNX graph gives it, and there is no {precision} builder flag. Export the model "
                f"at that precision (`attnserve export --precision {precision}`) and build it with the "
                "default precision"
            )
        return BuildPlan(major, strongly_typed=True, clear_flags=("TF32",))
    if precision == "onnx":
        return BuildPlan(major, strongly_typed=True, network_flags=("STRONGLY_TYPED",), clear_flags=("TF32",))
    if precision == "fp32":
        return BuildPlan(major, strongly_typed=False, clear_flags=("TF32",))
    return BuildPlan(major, strongly_typed=False, set_flags=(precision.upper(),))


# ---- parser errors, workspace, network inputs (plain Python over duck-typed objects) ----------

def _call(obj, method: str, default):
    f = getattr(obj, method, None)
    try:
        return f() if callable(f) else default
    except Exception:
        return default


def parser_errors(parser) -> list[NodeError]:
    """The parser's errors, one per failing node (duplicates dropped), messages on one line."""
    out: list[NodeError] = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        index = _call(e, "node", -1)
        name = str(_call(e, "node_name", "") or "")
        message = " ".join(str(_call(e, "desc", "") or e).split())
        if len(message) > 400:
            message = message[:397] + "..."
        stack = list(_call(e, "local_function_stack", []) or [])
        if stack:
            message += f" (inside local function {' > '.join(stack)})"
        node = name or (f"#{index}" if isinstance(index, int) and index >= 0 else "")
        err = NodeError(node, str(_call(e, "node_operator", "") or ""), message)
        if err not in out:
            out.append(err)
    return out


def check_workspace(workspace: int | None, free: int, total: int, gpu: str, device: int = 0) -> None:
    if workspace is None:
        return
    if workspace <= 0:
        raise TensorRTError(f"the workspace must be a positive size, got {workspace}")
    if workspace > free:
        raise GpuMemoryError(
            f"a workspace of {format_size(workspace)} is more than the {format_size(free)} free on GPU "
            f"{device} ({gpu}, {format_size(total)} in all); pass a smaller --workspace"
        )


def network_problems(network_inputs: Mapping[str, Shape], profiles: Mapping[str, Profile]) -> list[str]:
    """The parsed network's inputs (-1: dynamic) against the profiles about to be set."""
    problems = []
    for name, shape in network_inputs.items():
        p = profiles.get(name)
        if p is None:
            if any(d < 0 for d in shape):
                problems.append(f"the ONNX graph has dynamic input {name} {tuple(shape)} with no profile")
            continue
        if len(p[0]) != len(shape):
            problems.append(f"input {name} has rank {len(shape)} in the ONNX graph, its profile "
                            f"rank {len(p[0])}")
            continue
        for i, d in enumerate(shape):
            if d >= 0 and not p[0][i] == p[1][i] == p[2][i] == d:
                problems.append(f"input {name} axis {i} is fixed at {d} in the ONNX graph, the profile gives "
                                f"{p[0][i]}/{p[1][i]}/{p[2][i]}")
    extra = sorted(set(profiles) - set(network_inputs))
    if extra:
        problems.append(f"profiles name {', '.join(extra)}, which the ONNX graph has no input of "
                        f"(its inputs: {', '.join(network_inputs)})")
    return problems


# ---- lazy imports and the machine -------------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise BackendUnavailableError(
            f"TensorRT is not installed here (import tensorrt failed: {e}); build and run engines on a "
            "machine with an NVIDIA GPU and TensorRT 10 or newer (attnserve's `gpu` extra)"
        ) from None
    return tensorrt


def import_cudart():
    try:  # cuda-python >= 12.6 (the cuda-bindings package)
        from cuda.bindings import runtime
    except ImportError:
        try:  # older cuda-python; the trampoline module was removed in 13.0
            from cuda import cudart as runtime
        except (ImportError, OSError) as e:
            raise BackendUnavailableError(
                f"cuda-python is not installed here ({e}); the TensorRT backend needs it "
                "(attnserve's `gpu` extra)"
            ) from None
    return runtime


def cuda_check(result, what: str):
    """cuda-python calls return (error, *results): raise on an error, else the result(s)."""
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    code = int(getattr(err, "value", err))
    if code != 0:
        raise TensorRTError(f"CUDA call {what} failed: {getattr(err, 'name', 'error')} ({code})")
    return values[0] if len(values) == 1 else (values or None)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str
    free: int
    total: int


def gpu_info(cudart, device: int) -> GpuInfo:
    try:
        cuda_check(cudart.cudaSetDevice(device), "cudaSetDevice")
        prop = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        free, total = cuda_check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    except TensorRTError as e:
        raise BackendUnavailableError(f"no usable NVIDIA GPU {device} here: {e}") from None
    name = prop.name.decode("utf-8", "replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(name.split("\x00")[0].strip(), f"{prop.major}.{prop.minor}", int(free), int(total))


def _make_logger(trt):
    class _Logger(trt.ILogger):  # subclassing as the ILogger docstring shows
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
            elif severity == trt.ILogger.Severity.WARNING:
                _log.warning("TensorRT: %s", msg)

        def last(self) -> str:
            return self.errors[-1] if self.errors else "TensorRT gave no reason"

    return _Logger()


def register_plugins(trt, plugins: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Register plugin sets before parsing or deserialising.

    Each item is "attnserve" (attnserve.plugins.register_plugins(): its AOT quickly
    deployable plugins in namespace "attnserve") or the path of a plugin library.
    Returns (versions, sources): versions maps "namespace::name" (attnserve's creators)
    or "library:<file>" (a library's sha256) to a version string for the sidecar.
    """
    versions: dict[str, str] = {}
    for item in plugins:
        if item == "attnserve":
            _register_attnserve_plugins()
            versions.update(plugin_versions(trt.get_plugin_registry(), {PLUGIN_NAMESPACE}))
            continue
        path = Path(item)
        if not path.is_file():
            raise PluginError(f"plugin {item!r} is neither 'attnserve' nor a plugin library file")
        # load_library returns None when it fails, which it documents for a library whose
        # plugins are registered already: expected after our own first load of it.
        key = str(path.resolve())
        if trt.get_plugin_registry().load_library(str(path)) is not None:
            _loaded_libraries.add(key)
        elif key not in _loaded_libraries:
            warnings.warn(f"TensorRT did not load plugin library {path} (not a plugin library, missing "
                          "dependencies, or its plugins are registered already)", stacklevel=3)
        versions[f"library:{path.name}"] = cache.file_sha256(path)[:16]
    return versions, list(plugins)


_registered_attnserve = False
_loaded_libraries: set[str] = set()
_builtin_plugins_logger = None


def init_builtin_plugins(trt) -> None:
    """TensorRT's own plugin library (libnvinfer_plugin), registered once per process
    before parsing or deserialising: `trt.init_libnvinfer_plugins(logger, "")`. The
    logger is kept for the life of the process, as the plugins log through it."""
    global _builtin_plugins_logger
    if _builtin_plugins_logger is not None:
        return
    logger = _make_logger(trt)
    if not trt.init_libnvinfer_plugins(logger, ""):
        warnings.warn(f"TensorRT's plugin library did not register ({logger.last()}); models that "
                      "need its plugins will not parse or load", stacklevel=3)
    _builtin_plugins_logger = logger


def plugins_to_register(plugins: Sequence[str], custom_ops: bool) -> list[str]:
    """The plugin sets a build registers: those asked for, and attnserve's when the graph
    has its custom ops. Without the plugins such a graph is refused rather than parsed
    through its ONNX function bodies: the parser keys local functions by name only, so
    two overloads of one op would both run the first body."""
    wanted = list(dict.fromkeys(plugins))
    if custom_ops and "attnserve" not in wanted:
        wanted.append("attnserve")
    return wanted


def _attnserve_plugins():
    try:
        return importlib.import_module("attnserve.plugins")
    except ImportError as e:
        if getattr(e, "name", None) == "attnserve.plugins":
            raise PluginError("attnserve's TensorRT plugins (attnserve.plugins) are not in this "
                              "installation; install a version that has them, or export the model with "
                              "--no-custom-ops (standard ops only)") from None
        raise PluginError(f"attnserve.plugins cannot be imported here ({e})") from None


def _register_attnserve_plugins() -> None:
    """attnserve.plugins.register_plugins(), once per process."""
    global _registered_attnserve
    if _registered_attnserve:
        return
    register = getattr(_attnserve_plugins(), "register_plugins", None)
    if not callable(register):
        raise PluginError("attnserve.plugins has no register_plugins(); the installation is incomplete")
    try:
        register()
    except BackendUnavailableError as e:  # e.g. a TensorRT without AOT Python plugins (< 10.9)
        raise PluginError(f"{e}; or export the model with --no-custom-ops (standard ops only)") from None
    _registered_attnserve = True


def _prepared_for_plugins(onnx_path: Path) -> bytes | None:
    """The graph as attnserve.plugins.prepare_onnx gives it to the parser (optional
    inputs filled, the ONNX Runtime function bodies dropped), or None without it."""
    prepare = getattr(_attnserve_plugins(), "prepare_onnx", None)
    if prepare is None:
        return None
    import onnx

    return prepare(onnx.load(str(onnx_path), load_external_data=False)).SerializeToString()


def plugin_versions(registry, namespaces: set[str]) -> dict[str, str]:
    creators = getattr(registry, "all_creators", None)
    if creators is None:  # before 10.0
        creators = getattr(registry, "plugin_creator_list", [])
    return {f"{c.plugin_namespace}::{c.name}": str(c.plugin_version)
            for c in creators if getattr(c, "plugin_namespace", None) in namespaces}


def _has_attnserve_nodes(onnx_path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # no onnx package, or not ONNX: the parser says what is wrong
        return False
    return any(n.domain == PLUGIN_NAMESPACE for n in model.graph.node)


# ---- which spec an ONNX file has ---------------------------------------------------------------

def resolve_onnx(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_NAME
    if not path.is_file():
        raise AttnserveError(f"{path} does not exist; pass an export directory or an .onnx file")
    return path


def engine_path_for(onnx_path: str | Path, out: str | Path | None = None) -> Path:
    """Where the engine of `onnx_path` goes: `out` (a file, or a directory for
    <stem>.engine), else beside the ONNX file."""
    onnx_path = Path(onnx_path)
    stem = onnx_path.stem
    if out is None:
        return onnx_path.with_name(stem + ".engine")
    out = Path(out)
    return out / (stem + ".engine") if out.is_dir() or out.suffix == "" else out


def model_spec_for(onnx_path: Path) -> tuple[ModelSpec, Mapping | None]:
    """The spec of an exported graph and, for a generative part, its generation config:
    from attnserve.json beside it, or its parent's (a part in <dir>/<part>/model.onnx),
    else read from the ONNX graph itself."""
    artifact = read_artifact(onnx_path)
    if artifact.manifest and artifact.manifest.get("spec"):
        return artifact.spec, None
    parent = onnx_path.parent.parent / MANIFEST_NAME
    if parent.is_file():
        try:
            manifest = json.loads(parent.read_text())
        except json.JSONDecodeError as e:
            raise AttnserveError(f"{parent} is not valid JSON ({e.msg})") from None
        for entry in (manifest.get("parts") or {}).values():
            if (parent.parent / entry["onnx"]).resolve() == onnx_path.resolve():
                return ModelSpec.from_dict(entry["spec"]), manifest.get("generation")
    return _spec_from_onnx(onnx_path), None


def _spec_from_onnx(onnx_path: Path) -> ModelSpec:
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        raise TensorRTError(f"{onnx_path} has no attnserve.json beside it, and the onnx package is not "
                            "here to read its inputs") from None
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as e:
        raise TensorRTError(f"{onnx_path} is not an ONNX model ({type(e).__name__})") from None
    initializers = {i.name for i in graph.initializer}

    def tensor(v) -> TensorSpec:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{v.name}_dim{i}")
                     for i, d in enumerate(tt.shape.dim))
        return TensorSpec(v.name, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)).name, dims)

    return ModelSpec(name=onnx_path.stem, config="custom", task="unknown",
                     inputs=tuple(tensor(v) for v in graph.input if v.name not in initializers),
                     outputs=tuple(tensor(v) for v in graph.output))


def policy_for(policy: ProfilePolicy | None, spec: ModelSpec, generation: Mapping | None) -> ProfilePolicy:
    """A decoder step's cache axis runs up to the generation limit, not 2x its example."""
    policy = policy or ProfilePolicy()
    limit = (generation or {}).get("length_limit") or (generation or {}).get("max_length")
    if limit and CACHE_AXIS not in policy.axes and CACHE_AXIS in spec.default_dims:
        opt = min(spec.default_dims[CACHE_AXIS], limit)
        policy = ProfilePolicy(policy.max_batch, policy.opt_batch, policy.scale,
                               {**policy.axes, CACHE_AXIS: (0, opt, int(limit))})
    return policy


# ---- building ------------------------------------------------------------------------------------

def build_engine(
    onnx_path: str | Path,
    out: str | Path | None = None,
    profiles: Mapping[str, Sequence[Sequence[int]]] | None = None,
    precision: str = "fp32",
    workspace: int | None = None,
    timing_cache: str | Path | None = None,
    plugins: Sequence[str] = (),
    builder_optimization_level: int | None = None,
    *,
    policy: ProfilePolicy | None = None,
    device: int = 0,
    spec: ModelSpec | None = None,
) -> Path:
    """Build a TensorRT engine from an exported model and write its sidecar.

    Args:
        onnx_path: an export directory or .onnx file (a part: <dir>/<part>/model.onnx).
        out: the engine file, or a directory (default: <stem>.engine beside the ONNX).
        profiles: input name -> (min, opt, max) shapes, replacing the ones derived from
            the spec's dynamic axes with `policy`.
        precision: "fp32", "fp16", "int8" or "onnx" (see `precision_plan`).
        workspace: the builder's workspace limit in bytes (None: TensorRT's default);
            more than the GPU has free is refused.
        timing_cache: a timing cache file, loaded if present and saved after the build.
        plugins: "attnserve" and/or plugin library paths, registered before parsing;
            "attnserve" is added when the graph holds attnserve custom-op nodes, and the
            parser then reads `attnserve.plugins.prepare_onnx`'s copy of the graph.
        builder_optimization_level: 0..5 (TensorRT's default 3).
        policy, device, spec: profile sizing, the CUDA device, and the spec when the
            ONNX file has no attnserve.json.

    Returns:
        The engine's path; the sidecar is `<engine>.json`.
    """
    onnx_path = resolve_onnx(onnx_path)
    engine = engine_path_for(onnx_path, out)
    generation = None
    if spec is None:
        spec, generation = model_spec_for(onnx_path)
    full = derive_profiles(spec, policy_for(policy, spec, generation), profiles)
    if builder_optimization_level is not None and not 0 <= builder_optimization_level <= MAX_OPT_LEVEL:
        raise TensorRTError(f"the builder optimisation level is 0..{MAX_OPT_LEVEL}, got "
                            f"{builder_optimization_level}")
    trt = import_tensorrt()
    plan = precision_plan(trt.__version__, precision)
    gpu = gpu_info(import_cudart(), device)
    check_workspace(workspace, gpu.free, gpu.total, gpu.name, device)

    custom_ops = _has_attnserve_nodes(onnx_path)
    wanted = plugins_to_register(plugins, custom_ops)
    versions, sources = register_plugins(trt, wanted)  # before parsing: the parser looks creators up
    init_builtin_plugins(trt)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    prepared = _prepared_for_plugins(onnx_path) if custom_ops else None
    # parse(bytes, path) finds external data relative to `path`, as parse_from_file does.
    parsed = (parser.parse(prepared, str(onnx_path)) if prepared is not None
              else parser.parse_from_file(str(onnx_path)))
    if not parsed:
        raise ParserError(onnx_path, parser_errors(parser))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    problems = network_problems(inputs, full)
    if problems:
        raise ProfileError(f"the profiles do not fit {onnx_path}: " + "; ".join(problems))

    config = builder.create_builder_config()
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if builder_optimization_level is not None:
        config.builder_optimization_level = builder_optimization_level
    dynamic = [n for n, shape in inputs.items() if any(d < 0 for d in shape)]
    if dynamic:  # static inputs take no profile
        profile = builder.create_optimization_profile()
        for name in dynamic:
            profile.set_shape(name, *full[name])
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        _attach_timing_cache(config, Path(timing_cache))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}: {logger.last()}")
    if timing_cache is not None:
        _write_atomically(Path(timing_cache), memoryview(config.get_timing_cache().serialize()))

    _write_atomically(engine, memoryview(serialized))
    env = Environment(trt.__version__, gpu.name, gpu.compute_capability, versions)
    cache.write_sidecar(engine, cache.make_sidecar(
        engine=engine, onnx_path=onnx_path, env=env, precision=precision, profiles=full,
        plugins=versions, plugin_sources=sources,
        io={"inputs": [asdict(t) for t in spec.inputs], "outputs": [asdict(t) for t in spec.outputs]},
        build={"strongly_typed": plan.strongly_typed, "set_flags": list(plan.set_flags),
               "cleared_flags": list(plan.clear_flags), "workspace": workspace,
               "builder_optimization_level": builder_optimization_level,
               "timing_cache": str(timing_cache) if timing_cache else None},
    ))
    return engine


def _attach_timing_cache(config, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    timing = config.create_timing_cache(data)  # b"": a new cache (documented)
    if timing is None or not config.set_timing_cache(timing, False):
        # Recorded on another GPU or TensorRT (its header is checked): start afresh; the
        # file is overwritten after the build.
        warnings.warn(f"{path} was recorded on another GPU or TensorRT; starting a new timing cache",
                      stacklevel=3)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _write_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---- the runner: plain parts --------------------------------------------------------------------

# TensorRT DataType name -> numpy dtype name (the types numpy has).
TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def numpy_dtype(trt_dtype: str, tensor: str) -> str:
    try:
        return TRT_TO_NUMPY[trt_dtype]
    except KeyError:
        raise TensorRTError(f"tensor {tensor} is {trt_dtype}, which numpy has no type for; export the "
                            "model with float32, float16 or integer inputs and outputs") from None


def nbytes(shape: Sequence[int], dtype: str) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def profile_problems(profile: Mapping[str, Profile], shapes: Mapping[str, Shape]) -> list[str]:
    problems = []
    for name, (lo, _, hi) in profile.items():
        shape = shapes.get(name)
        if shape is None:
            continue
        if len(shape) != len(lo):
            problems.append(f"{name} has rank {len(shape)}, the profile rank {len(lo)}")
            continue
        for i, (v, a, b) in enumerate(zip(shape, lo, hi, strict=True)):
            if not a <= v <= b:
                problems.append(f"{name} axis {i} is {v}, the profile allows {a}..{b}")
    return problems


def select_profile(profiles: Sequence[Mapping[str, Profile]], shapes: Mapping[str, Shape]) -> int:
    """The first profile every input shape lies in; InputError naming what lies outside."""
    if not profiles:  # an engine without dynamic inputs
        return 0
    reasons = []
    for i, p in enumerate(profiles):
        problems = profile_problems(p, shapes)
        if not problems:
            return i
        reasons.append(problems)
    if len(reasons) == 1:
        detail = "; ".join(reasons[0])
    else:
        detail = " | ".join(f"profile {i}: {'; '.join(r)}" for i, r in enumerate(reasons))
    raise InputError(f"input shapes outside the engine's optimisation profile ({detail}); rebuild the "
                     "engine with a wider profile (attnserve build-engine --shape NAME:MIN:OPT:MAX)")


def io_specs(names: Sequence[str], dtypes: Mapping[str, str], shapes: Mapping[str, Shape],
             recorded: Sequence[Mapping]) -> list[TensorSpec]:
    """TensorSpecs for an engine's tensors: names and dtypes from the engine, named
    dynamic axes from the sidecar's spec where the ranks agree, else `<name>_dim<i>`."""
    by_name = {t["name"]: t for t in recorded}
    out = []
    for name in names:
        engine_shape = tuple(shapes[name])
        rec = by_name.get(name)
        if rec is not None and len(rec["shape"]) == len(engine_shape):
            shape = tuple(rec["shape"])
        else:
            shape = tuple(d if d >= 0 else f"{name}_dim{i}" for i, d in enumerate(engine_shape))
        vr = rec.get("value_range") if rec else None
        out.append(TensorSpec(name, dtypes[name], shape, tuple(vr) if vr else None))
    return out


def host_bytes(address: int, size: int) -> np.ndarray:
    """A writable uint8 view of `size` bytes of host memory at `address` (pinned memory
    from cudaMallocHost; any ctypes buffer in tests)."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(address))


def host_view(raw: np.ndarray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    n = nbytes(shape, dtype)
    if n > raw.size:
        raise InternalError(f"a {format_shape(shape)} {dtype} tensor needs {n} bytes, "
                            f"the buffer has {raw.size}")
    return raw[:n].view(dtype).reshape(tuple(shape))


def parse_device(device: str | int) -> int:
    if isinstance(device, int):
        return device
    text = str(device).lower()
    if text in ("cuda", "gpu", "tensorrt"):
        return 0
    m = re.fullmatch(r"(?:cuda|gpu):(\d+)", text)
    if m:
        return int(m.group(1))
    raise BackendUnavailableError(f"the trt backend runs on an NVIDIA GPU: pass device 'cuda' or 'cuda:N', "
                                  f"not {device!r}")


# ---- the runner -----------------------------------------------------------------------------------

class _Buffer:
    """A device allocation and a pinned host allocation of the same capacity."""

    def __init__(self, cudart, size: int):
        self._cudart = cudart
        self.size = max(int(size), 1)  # TensorRT wants a non-null address for an empty tensor too
        self.device = cuda_check(cudart.cudaMalloc(self.size), f"cudaMalloc({self.size})")
        try:
            self.host = cuda_check(cudart.cudaMallocHost(self.size), f"cudaMallocHost({self.size})")
        except TensorRTError:
            cudart.cudaFree(self.device)
            raise
        self.raw = host_bytes(int(self.host), self.size)

    def view(self, dtype: str, shape: Sequence[int]) -> np.ndarray:
        return host_view(self.raw, dtype, shape)

    def free(self) -> None:
        self.raw = None
        self._cudart.cudaFreeHost(self.host)
        self._cudart.cudaFree(self.device)


def _stream_handle(stream) -> int:
    try:  # cuda-python >= 12.9.1 deprecates int(obj) for this
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(stream))
    except ImportError:
        return int(stream)


class TrtRunner(Runner):
    """Runs a TensorRT engine: named numpy arrays in and out, one CUDA stream, pinned
    host buffers reused across calls, shapes anywhere within the engine's profiles.

    Args:
        engine_path: the .engine file (its sidecar beside it).
        onnx_path: the ONNX model it was built from, to rebuild from on a mismatch
            (default: the path the sidecar records).
        device: "cuda", "cuda:N" or a device index.
        cuda_graph: replay the enqueued work as a CUDA graph captured once per input-shape
            set (fewer launches for small batches); a capture that fails falls back to
            plain execution for that shape set, with a warning.
        rebuild: rebuild a mismatching or missing engine from the ONNX model.
        **build_options: for a rebuild (precision, profiles, workspace, ...).
    """

    backend = "trt"

    @classmethod
    def from_path(cls, path: str | Path, device: str | int = "cuda", **kwargs) -> TrtRunner:
        """An .engine file, or an export directory / .onnx file whose engine is
        <stem>.engine beside it (built there when missing); a directory holding only
        model.engine (a deployment without the ONNX model) will do."""
        path = Path(path)
        deployed = path / ONNX_NAME.replace(".onnx", ".engine")
        if path.is_dir() and deployed.is_file() and not (path / ONNX_NAME).is_file():
            path = deployed
        if path.suffix == ".engine":
            return cls(path, device=device, **kwargs)
        onnx = resolve_onnx(path)
        return cls(engine_path_for(onnx), onnx, device=device, **kwargs)

    def __init__(self, engine_path: str | Path, onnx_path: str | Path | None = None, *,
                 device: str | int = "cuda", cuda_graph: bool = False, rebuild: bool = True,
                 **build_options):
        self._trt = trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self.device = parse_device(device)
        self._buffers: dict[str, _Buffer] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._no_graph: set[tuple] = set()
        self._last_key: tuple | None = None  # the profile and shapes of the last enqueueV3
        self._stream = None
        loaded = load_engine(engine_path, onnx_path, rebuild=rebuild, device=self.device, **build_options)
        self.engine_path, self.sidecar, self.rebuilt = loaded.path, loaded.sidecar, loaded.rebuilt
        self.cuda_graph = cuda_graph
        self._logger = _make_logger(trt)
        init_builtin_plugins(trt)  # an engine holding TensorRT's own plugins needs their creators
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(loaded.data)
        if self._engine is None:
            raise TensorRTError(f"TensorRT could not deserialize {self.engine_path}: {self._logger.last()}")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        host_io = [n for n in names if engine.is_shape_inference_io(n)]
        if host_io:
            raise TensorRTError(f"{self.engine_path} has shape-tensor I/O ({', '.join(host_io)}), which "
                                "the trt runner does not feed; run it with ONNX Runtime's TensorRT provider")
        self._dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n).name, n) for n in names}
        shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names}
        io = self.sidecar.get("io") or {}
        super().__init__(io_specs(inputs, self._dtypes, shapes, io.get("inputs") or []),
                         io_specs(outputs, self._dtypes, shapes, io.get("outputs") or []))
        # Ranges of the dynamic inputs only: a static input's size is checked by validate(),
        # and tuple() of the Dims{-1} that getProfileShape returns for a name it does not
        # take would raise.
        dynamic = [n for n in inputs if any(d < 0 for d in shapes[n])]
        self._profiles = [{n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, p)) for n in dynamic}
                          for p in range(engine.num_optimization_profiles)] if dynamic else []
        try:
            self._context = engine.create_execution_context()
            if self._context is None:
                raise TensorRTError(f"TensorRT could not create an execution context for {self.engine_path} "
                                    f"(GPU memory?): {self._logger.last()}")
            self._stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._handle = _stream_handle(self._stream)
            self._profile = 0
            self._shapes: dict[str, Shape] = {}
            self._allocate(inputs, outputs)
        except BaseException:
            self._close()
            raise

    def _allocate(self, inputs: list[str], outputs: list[str]) -> None:
        """Inputs at their largest profile shape; outputs at the shape TensorRT infers
        for those (grown later if a call needs more)."""
        need = dict.fromkeys(inputs + outputs, 0)
        for index, profile in enumerate(self._profiles or [{}]):
            self._set_profile(index)
            for name in inputs:
                biggest = profile[name][2] if name in profile else tuple(self._engine.get_tensor_shape(name))
                need[name] = max(need[name], nbytes(biggest, self._dtypes[name]))
                self._set_shape(name, biggest)
            for name in outputs:
                need[name] = max(need[name], nbytes(self._output_shape(name), self._dtypes[name]))
        for name, size in need.items():
            self._replace_buffer(name, size)

    def _replace_buffer(self, name: str, size: int) -> None:
        old = self._buffers.pop(name, None)
        if old is not None:
            old.free()
        buf = self._buffers[name] = _Buffer(self._cudart, size)
        if not self._context.set_tensor_address(name, int(buf.device)):
            raise TensorRTError(f"TensorRT refused the address of {name}: {self._logger.last()}")
        self._drop_graphs()  # captured graphs hold the old addresses

    def _set_profile(self, index: int) -> None:
        if index != self._profile:  # a new context starts on profile 0
            try:  # the binding raises RuntimeError where the C++ API returns false
                switched = self._context.set_optimization_profile_async(index, self._handle)
            except RuntimeError:
                switched = False
            if not switched:
                raise TensorRTError(f"TensorRT cannot switch to profile {index}: {self._logger.last()}")
            cuda_check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            self._profile, self._shapes = index, {}

    def _set_shape(self, name: str, shape: Shape) -> None:
        if self._shapes.get(name) != tuple(shape):
            if not self._context.set_input_shape(name, tuple(shape)):
                raise InputError(f"TensorRT refused shape {format_shape(shape)} for {name}: "
                                 f"{self._logger.last()}")
            self._shapes[name] = tuple(shape)

    def _output_shape(self, name: str) -> Shape:
        shape = tuple(self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise TensorRTError(f"output {name} has a data-dependent shape {shape}, which the trt runner "
                                "does not size; run the model with ONNX Runtime's TensorRT provider")
        return shape

    def validate(self, inputs):
        feed = super().validate(inputs)
        select_profile(self._profiles, {n: a.shape for n, a in feed.items()})  # before any CUDA work
        return feed

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, kinds = self._cudart, self._cudart.cudaMemcpyKind
        # The current device is per host thread; a caller's thread may not be the one
        # that built this runner.
        cuda_check(cudart.cudaSetDevice(self.device), "cudaSetDevice")
        self._set_profile(select_profile(self._profiles, {n: a.shape for n, a in feed.items()}))
        for name, value in feed.items():
            self._set_shape(name, value.shape)
            buf = self._buffers[name]
            np.copyto(buf.view(self._dtypes[name], value.shape), value)
            if value.nbytes:
                h2d = kinds.cudaMemcpyHostToDevice
                cuda_check(cudart.cudaMemcpyAsync(buf.device, buf.host, value.nbytes, h2d, self._stream),
                           "cudaMemcpyAsync")
        out_shapes = {n: self._output_shape(n) for n in self.output_names}
        for name, shape in out_shapes.items():
            if nbytes(shape, self._dtypes[name]) > self._buffers[name].size:
                self._replace_buffer(name, nbytes(shape, self._dtypes[name]))
        self._execute((self._profile, tuple(sorted(self._shapes.items()))))
        for name, shape in out_shapes.items():
            size = nbytes(shape, self._dtypes[name])
            if size:
                buf = self._buffers[name]
                cuda_check(cudart.cudaMemcpyAsync(buf.host, buf.device, size, kinds.cudaMemcpyDeviceToHost,
                                                  self._stream), "cudaMemcpyAsync")
        cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        # Copies: the pinned buffers are overwritten by the next call.
        return {n: self._buffers[n].view(self._dtypes[n], s).copy() for n, s in out_shapes.items()}

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._handle):
            raise TensorRTError(f"TensorRT failed to run {self.engine_path}: {self._logger.last()}")

    def _execute(self, key: tuple) -> None:
        graph = self._graphs.get(key) if self.cuda_graph else None
        if graph is not None and key == self._last_key:
            cuda_check(self._cudart.cudaGraphLaunch(graph[1], self._stream), "cudaGraphLaunch")
            return
        # TensorRT defers work that depends on the input shapes and profile to the first
        # enqueueV3 after they change, and its guide has that enqueue run before a capture;
        # a graph replay would skip it. So every change of shapes or profile runs plainly
        # (this call's results), and only an unchanged one replays a graph.
        self._enqueue()
        self._last_key = key
        if not self.cuda_graph or graph is not None or key in self._no_graph:
            return
        try:
            self._graphs[key] = self._capture()
        except TensorRTError as e:
            self._no_graph.add(key)
            self._cudart.cudaGetLastError()  # clear the capture's error, as trtexec does
            warnings.warn(f"CUDA graph capture failed ({e}); running these shapes without a graph",
                          stacklevel=3)
            return
        while len(self._graphs) > _MAX_GRAPHS:
            self._destroy_graph(self._graphs.pop(next(iter(self._graphs))))

    def _capture(self) -> tuple:
        cudart = self._cudart
        # Thread-local, as trtexec captures: global mode would prohibit other threads'
        # unsafe CUDA calls (another runner's cudaMalloc) while this one captures.
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        ok = False
        try:
            ok = self._context.execute_async_v3(self._handle)
        finally:  # always leave capture mode, or the stream stays unusable
            graph = cuda_check(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        if not ok:
            cudart.cudaGraphDestroy(graph)
            raise TensorRTError(f"execute_async_v3 failed while capturing: {self._logger.last()}")
        try:
            executable = cuda_check(cudart.cudaGraphInstantiateWithFlags(graph, 0), "cudaGraphInstantiate")
        except TensorRTError:
            cudart.cudaGraphDestroy(graph)
            raise
        return graph, executable

    def _destroy_graph(self, graph: tuple) -> None:
        self._cudart.cudaGraphExecDestroy(graph[1])
        self._cudart.cudaGraphDestroy(graph[0])

    def _drop_graphs(self) -> None:
        for graph in self._graphs.values():
            self._destroy_graph(graph)
        self._graphs.clear()
        self._no_graph.clear()
        self._last_key = None  # new addresses: enqueue plainly before the next capture

    def _close(self) -> None:
        if self._stream is not None:
            self._cudart.cudaSetDevice(self.device)
            self._cudart.cudaStreamSynchronize(self._stream)
        self._drop_graphs()
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        # Context before engine before runtime, as TensorRT's objects depend on each other.
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
