"""TensorRT plugins for the attnserve custom ops (docs/tensorrt-plugins.md).

`WindowAttention`, `GridSampler` (2-D and 3-D) and `AffineGridSampler` become
`attnserve::<op>` quickly deployable plugins (`tensorrt.plugin`) with an ahead-of-time
implementation: the OpenAI Triton kernels of `attnserve.ops.kernels`, compiled to PTX
and baked into the engine, which then runs without Python (trtexec, Triton Inference
Server's tensorrt backend).

- `register_plugins()`: register them with TensorRT (>= 10.9) before parsing a model.
- `prepare_onnx(model)`: the copy of an export that TensorRT's parser should read.
- `attnserve.plugins.shapes`: the plugins' contract in plain Python (attributes,
  output shapes, launch plans); `attnserve.plugins.aot`: `compile_ptx`, `write_ptx`
  (needs triton, no GPU).

Nothing here imports TensorRT or Triton until it is used.
"""

from __future__ import annotations

from attnserve.errors import BackendUnavailableError
from attnserve.plugins.shapes import NAMESPACE, PLUGINS

__all__ = ["NAMESPACE", "PLUGINS", "check_plugin_nodes", "prepare_onnx", "register_plugins"]


def __getattr__(name: str):
    # PEP 562: prepare_onnx and check_plugin_nodes need the onnx package, which a Jetson
    # that only runs prebuilt engines (numpy + tensorrt + cuda-python) may not have.
    if name in ("check_plugin_nodes", "prepare_onnx"):
        from attnserve.plugins import onnx_graph

        return getattr(onnx_graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# tensorrt.plugin.aot_impl and trt.QuickPluginCreationRequest appeared in TensorRT 10.9.
MIN_TENSORRT = "10.9"


def register_plugins() -> list[str]:
    """Register the attnserve plugins with TensorRT's plugin registry (once per process).

    Returns:
        The plugin ids, "attnserve::WindowAttention" etc.

    Raises:
        BackendUnavailableError: when TensorRT is not importable or older than 10.9.
    """
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise BackendUnavailableError(
            f"the attnserve TensorRT plugins need the tensorrt package (>= {MIN_TENSORRT}) and a CUDA GPU; "
            f"importing it failed here ({e}); install TensorRT from NVIDIA, or use the ONNX Runtime backend"
        ) from None
    if not hasattr(trtp, "aot_impl") or not hasattr(trt, "QuickPluginCreationRequest"):
        raise BackendUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no ahead-of-time Python plugins "
            f"(tensorrt.plugin.aot_impl); the attnserve plugins need TensorRT >= {MIN_TENSORRT}"
        )
    from attnserve.plugins import trt_plugins

    return trt_plugins.register_all(trt, trtp)
