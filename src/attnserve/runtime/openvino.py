"""OpenVINO runner (CPU): the fastest CPU runtime measured on our machines.

OpenVINO's ONNX front end does not run ONNX model-local functions, so a graph holding
attnserve's custom-op nodes (WindowAttention, GridSampler) is read with its functions
inlined into standard ops first (the same graph `attnserve export --no-custom-ops`
writes), in a temporary directory that lives as long as the runner.

fp32 graphs run in fp32: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that
have it, which is a different precision from the one the export's parity was checked at.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from attnserve.errors import BackendUnavailableError, ExportError, first_line
from attnserve.runtime.base import Runner
from attnserve.spec import TensorSpec

_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32",
              "i8": "int8", "u8": "uint8", "boolean": "bool"}


def _tensor_spec(port, axis_prefix: str, i: int, graph_names: set[str]) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else f"{axis_prefix}_{i}_{k}"
                  for k, d in enumerate(port.get_partial_shape()))
    dtype = port.get_element_type().get_type_name()
    # A port can carry several tensor names (an input read straight by an inlined custom
    # op also gets the op's internal name); the graph's own I/O name is the one callers use.
    declared = sorted(set(port.get_names()) & graph_names)
    return TensorSpec(declared[0] if declared else port.get_any_name(), _OV_DTYPES.get(dtype, dtype), shape)


def _graph_io(path: Path) -> tuple[bool, set[str]]:
    """Whether the ONNX file has local functions, and its graph's input and output names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return bool(model.functions), {v.name for v in [*model.graph.input, *model.graph.output]}


class OpenVinoRunner(Runner):
    """Runs an ONNX file with OpenVINO.

    Args:
        path: the .onnx file (its external-data file beside it).
        device: "cpu" (OpenVINO's "CPU" plugin); "gpu" for an Intel GPU when present.
        threads: inference threads (0: OpenVINO's default).
    """

    backend = "openvino"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0):
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailableError("the openvino backend needs `pip install 'attnserve[openvino]'`") \
                from None
        core = ov.Core()
        target = {"cpu": "CPU", "gpu": "GPU"}.get(device)
        if target is None or target not in core.available_devices:
            raise BackendUnavailableError(
                f"OpenVINO here has no {device!r} device (it has {', '.join(core.available_devices)})")
        path = Path(path)
        self._scratch: Path | None = None
        has_functions, graph_names = _graph_io(path)
        if has_functions:
            path = self._inlined(path)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), target, config)
        except Exception as e:  # OpenVINO raises plain RuntimeErrors with long C++ traces
            self._cleanup()
            raise ExportError(f"OpenVINO cannot load {path.name}: {first_line(e)}") from None
        self.request = self.compiled.create_infer_request()
        self.device = device
        compiled = self.compiled
        super().__init__([_tensor_spec(p, "dim", i, graph_names) for i, p in enumerate(compiled.inputs)],
                         [_tensor_spec(p, "out", i, graph_names) for i, p in enumerate(compiled.outputs)])

    def _inlined(self, path: Path) -> Path:
        import onnx
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(onnx.load(str(path)))
        self._scratch = Path(tempfile.mkdtemp(prefix="attnserve-openvino-"))
        out = self._scratch / "model.onnx"
        onnx.save(model, str(out), save_as_external_data=True, location="model.onnx.data")
        return out

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer(feed)
        # The request's output buffers are reused by the next call: copy them out.
        return {name: np.array(results[port]) for name, port in zip(self.output_names, self.compiled.outputs,
                                                                      strict=True)}

    def _cleanup(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _close(self) -> None:
        del self.request, self.compiled
        self._cleanup()
