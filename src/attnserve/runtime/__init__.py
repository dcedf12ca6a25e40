"""Backends that run exported models: `load(path, backend, device)` returns a Runner.

Imports no torch (the "torch" backend imports it only when chosen), so an edge box with
numpy and one runtime can use this package.
"""

from __future__ import annotations

from pathlib import Path

from attnserve.artifact import load_vocabularies, read_artifact
from attnserve.errors import AttnserveError, BackendUnavailableError
from attnserve.runtime.base import Runner
from attnserve.runtime.engine_cache import load_engine
from attnserve.runtime.tensorrt import build_engine  # imports TensorRT only when called

BACKENDS = ("ort", "openvino", "torch", "trt")


def load(path: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0) -> Runner:
    """Open an exported model (directory or .onnx file) on a backend.

    Args:
        path: an export directory (as written by `attnserve export`) or an .onnx file.
        backend: "ort" (ONNX Runtime), "openvino" (OpenVINO, CPU), "torch" (the eager
            model the export came from, rebuilt from the manifest: same model, config,
            checkpoint and seed), or "trt" (a TensorRT engine: an .engine file, or the
            model.engine beside an export's ONNX, built there when missing or stale).
        device: "cpu", or "cuda" / "tensorrt" for ONNX Runtime's GPU providers; "cuda" or
            "cuda:N" for "trt" ("cpu", the default, means the first GPU there).
        threads: intra-op threads (0: the backend's default; "trt" ignores it).
    """
    if backend == "trt":  # before read_artifact: an engine may be deployed without its ONNX
        from attnserve.runtime.tensorrt import TrtRunner

        return TrtRunner.from_path(path, device="cuda" if device == "cpu" else device)
    artifact = read_artifact(path)
    if backend == "ort":
        from attnserve.runtime.ort import OrtRunner

        return OrtRunner(artifact.onnx_path, device=device, threads=threads)
    if backend == "openvino":
        from attnserve.runtime.openvino import OpenVinoRunner

        return OpenVinoRunner(artifact.onnx_path, device=device, threads=threads)
    if backend == "torch":
        if artifact.manifest is None:
            raise AttnserveError(
                f"{path} has no attnserve.json manifest, so the eager model it came from is unknown"
            )
        if device != "cpu":
            raise BackendUnavailableError("the torch reference runner runs on the CPU only")
        try:
            from attnserve.runtime.torch_runner import TorchRunner
        except ImportError:
            raise BackendUnavailableError("the torch backend needs PyTorch installed") from None
        return TorchRunner.from_manifest(artifact.manifest, threads=threads)
    raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def load_parts(path: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0):
    """Open every part of an export in parts: -> (manifest, {part name: Runner}).

    `backend="torch"` rebuilds the eager model from the manifest (same weights), the
    reference the exported parts are compared with.
    """
    artifact = read_artifact(path)
    m = artifact.manifest or {}
    if not m.get("parts"):
        raise AttnserveError(f"{path} is not exported in parts (no encoder and decoder-step graphs)")
    if backend == "ort":
        from attnserve.runtime.ort import OrtRunner

        root = artifact.onnx_path.parent
        return m, {part: OrtRunner(root / entry["onnx"], device=device, threads=threads)
                   for part, entry in m["parts"].items()}
    if backend == "trt":  # an engine per part, beside its ONNX (spec and cache limit from the manifest)
        from attnserve.runtime.tensorrt import TrtRunner

        root, gpu = artifact.onnx_path.parent, "cuda" if device == "cpu" else device
        return m, {part: TrtRunner.from_path(root / entry["onnx"], device=gpu)
                   for part, entry in m["parts"].items()}
    if backend == "torch":
        if device != "cpu":
            raise BackendUnavailableError("the torch reference runner runs on the CPU only")
        try:
            from attnserve.runtime.torch_runner import TorchRunner, eager_model
        except ImportError:
            raise BackendUnavailableError("the torch backend needs PyTorch installed") from None
        model, _ = eager_model(m)
        return m, {part: TorchRunner(module, spec, threads=threads)
                   for part, (module, spec) in model.export_parts().items()}
    raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def load_generator(path: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0):
    """Open a generative model's two parts: returns (encoder, decoder_step, config) for
    `attnserve.runtime.generate.greedy_search` / `beam_search`.

    `backend="torch"` rebuilds the eager model from the manifest (same weights), the
    reference the exported parts are compared with token for token.
    """
    from attnserve.runtime.generate import GenerationConfig

    m = read_artifact(path).manifest or {}
    if not m.get("parts") or not m.get("generation"):
        raise AttnserveError(f"{path} is not a generative model export (no encoder and decoder-step parts)")
    g = m["generation"]
    config = GenerationConfig(**{**g, "static": tuple(g["static"]), "state": tuple(g["state"])})
    _, parts = load_parts(path, backend, device, threads)
    return parts["encoder"], parts["decoder_step"], config


__all__ = ["BACKENDS", "Runner", "build_engine", "load", "load_engine", "load_generator", "load_parts",
           "load_vocabularies"]
