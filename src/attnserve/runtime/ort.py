"""ONNX Runtime runner (CPU; CUDA and TensorRT execution providers when asked for)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from attnserve.errors import AttnserveError, BackendUnavailableError, ExportError, first_line
from attnserve.runtime.base import Runner
from attnserve.spec import TensorSpec

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

# device -> execution providers, most preferred first; CPU is always the fallback.
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# Where the TensorRT provider keeps its engines and timing cache, beside the model.
TRT_CACHE_DIR = "ort-trt-cache"


def provider_options(
    device: str,
    onnx_path: str | Path | None = None,
    *,
    device_id: int = 0,
    engine_cache: str | Path | None = None,
    fp16: bool = False,
    workspace: int | None = None,
    profiles: Mapping[str, tuple] | None = None,
) -> list:
    """The `providers` argument of onnxruntime.InferenceSession for a device.

    "cpu" is the CPU provider with its defaults. "cuda" is the CUDA provider on
    `device_id` with TF32 off (fp32 tolerances hold), then the CPU. "tensorrt" is
    ONNX Runtime's TensorRT provider with its engine and timing caches on in
    `engine_cache` (default: ort-trt-cache/ beside the model), so a session after the
    first loads the engine instead of building it; fp16 kernels when `fp16`; explicit
    optimisation profiles when given (input -> (min, opt, max) shapes; only inputs with
    dynamic axes need one), then CUDA, then CPU.

    Option names and value formats: ONNX Runtime's TensorRT and CUDA execution provider
    documentation (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html,
    CUDA-ExecutionProvider.html) and sources (tensorrt_execution_provider_info.cc,
    cuda_execution_provider_info.cc); every value is a string. The TensorRT provider's
    Python binding takes booleans as "True"/"true"/"False"/"false" only (it refuses
    "1"/"0"); the CUDA provider's use_tf32 parses "0"/"1" too (parse_string.h).
    Profile shapes: "name:1x3x224x224,name2:...", given for every dynamic input.
    """
    if device not in _PROVIDERS:
        raise BackendUnavailableError(
            f"unknown device {device!r} for onnxruntime; choose one of {', '.join(_PROVIDERS)}"
        )
    if device == "cpu":
        return list(_PROVIDERS["cpu"])
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id), "use_tf32": "0"})
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if engine_cache is None:
        base = Path(onnx_path).parent if onnx_path is not None else Path(".")
        engine_cache = base / TRT_CACHE_DIR
    cache = str(Path(engine_cache))
    trt = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": "True" if fp16 else "False",
    }
    if workspace is not None:
        trt["trt_max_workspace_size"] = str(int(workspace))
    if profiles:
        for key, k in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1),
                       ("trt_profile_max_shapes", 2)):
            trt[key] = ",".join(f"{name}:{'x'.join(str(d) for d in p[k])}" for name, p in profiles.items())
    return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


def _spec_profiles(path: Path) -> dict | None:
    """Profiles for the inputs with dynamic axes, derived from the export's spec as
    `attnserve build-engine` does; None (the provider's own, from the first input seen)
    when the spec does not say every size."""
    from attnserve.runtime.tensorrt import derive_profiles, model_spec_for, policy_for

    try:
        spec, generation = model_spec_for(path)
        profiles = derive_profiles(spec, policy_for(None, spec, generation))
    except AttnserveError:  # ProfileError among them
        return None
    dynamic = {t.name for t in spec.inputs if t.dynamic_axes}
    return {name: p for name, p in profiles.items() if name in dynamic} or None


def _tensor_spec(arg, axis_prefix: str) -> TensorSpec:
    shape = tuple(
        d if isinstance(d, int) else (d or f"{axis_prefix}_{i}") for i, d in enumerate(arg.shape)
    )
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


class OrtRunner(Runner):
    """Runs an ONNX file with ONNX Runtime.

    Args:
        path: the .onnx file (its external-data file must sit beside it).
        device: "cpu", "cuda" (CUDA EP) or "tensorrt" (TensorRT EP); a device whose
            provider this onnxruntime build lacks raises BackendUnavailableError.
        threads: intra-op threads (0: ONNX Runtime's default, one per core).
        fused_custom_ops: run the attnserve ops that ONNX Runtime has fused kernels for
            on those kernels (see `ort_lowering`). Off by default: on 2 CPU cores it
            measured no faster than the function bodies for Swin-T (benchmarks/
            custom_ops.py); it is there to measure on other hardware (CUDA EP).
        engine_cache, trt_fp16, trt_workspace: the TensorRT provider's engine/timing cache
            directory (default: ort-trt-cache/ beside the model), fp16 kernels and
            workspace limit in bytes (see `provider_options`); its optimisation profiles
            come from the export's spec as `attnserve build-engine` derives them.
    """

    backend = "ort"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0,
                 fused_custom_ops: bool = False, *, engine_cache: str | Path | None = None,
                 trt_fp16: bool = False, trt_workspace: int | None = None):
        import onnxruntime as ort

        providers = provider_options(
            device, path, engine_cache=engine_cache, fp16=trt_fp16, workspace=trt_workspace,
            profiles=_spec_profiles(Path(path)) if device == "tensorrt" else None,
        )
        wanted = [p if isinstance(p, str) else p[0] for p in providers]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendUnavailableError(
                f"onnxruntime here has no {wanted[0]} (it has {', '.join(available)}); "
                "install the `gpu` extra (onnxruntime-gpu) on a machine with an NVIDIA GPU"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only; warnings go to the parity report
        model: str | bytes = str(path)
        self.lowered_nodes = 0
        if fused_custom_ops:
            model, self.lowered_nodes = _lowered(Path(path))
        try:
            self.session = ort.InferenceSession(
                model, sess_options=options,
                providers=[p for p in providers if (p if isinstance(p, str) else p[0]) in available],
            )
        except Exception as e:  # onnxruntime raises its own unexported exception types
            raise ExportError(f"onnxruntime cannot load {path}: {first_line(e)}") from None
        self.device = device
        self.providers = self.session.get_providers()
        super().__init__(
            [_tensor_spec(a, "dim") for a in self.session.get_inputs()],
            [_tensor_spec(a, "out") for a in self.session.get_outputs()],
        )

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, results, strict=True))

    def _close(self) -> None:
        del self.session


def _lowered(path: Path) -> tuple[str | bytes, int]:
    """The model rewritten for ONNX Runtime's fused kernels, or its path when there is
    nothing to rewrite (the common case costs one graph read without the weights)."""
    import onnx

    from attnserve.ops.onnx_ops import DOMAIN
    from attnserve.runtime.ort_lowering import lower_for_onnxruntime

    try:
        header = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: let onnxruntime say so
        return str(path), 0
    if not any(n.domain == DOMAIN for n in header.graph.node):
        return str(path), 0
    model, moved = lower_for_onnxruntime(onnx.load(str(path)))
    return (model.SerializeToString(), moved) if moved else (str(path), 0)
