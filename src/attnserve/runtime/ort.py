"""ONNX Runtime runner (CPU; CUDA and TensorRT execution providers when asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnserve.errors import BackendUnavailableError, ExportError, first_line
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
    """

    backend = "ort"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0,
                 fused_custom_ops: bool = False):
        import onnxruntime as ort

        if device not in _PROVIDERS:
            raise BackendUnavailableError(
                f"unknown device {device!r} for onnxruntime; choose one of {', '.join(_PROVIDERS)}"
            )
        wanted = _PROVIDERS[device]
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
                model, sess_options=options, providers=[p for p in wanted if p in available]
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
