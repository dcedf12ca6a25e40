"""Backends that run exported models: `load(path, backend, device)` returns a Runner.

Imports no torch (the "torch" backend imports it only when chosen), so an edge box with
numpy and one runtime can use this package.
"""

from __future__ import annotations

from pathlib import Path

from attnserve.artifact import read_artifact
from attnserve.errors import AttnserveError, BackendUnavailableError
from attnserve.runtime.base import Runner

BACKENDS = ("ort", "torch")


def load(path: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0) -> Runner:
    """Open an exported model (directory or .onnx file) on a backend.

    Args:
        path: an export directory (as written by `attnserve export`) or an .onnx file.
        backend: "ort" (ONNX Runtime) or "torch" (the eager model the export came from,
            rebuilt from the manifest: same model, config, checkpoint and seed).
        device: "cpu", or "cuda" / "tensorrt" for ONNX Runtime's GPU providers.
        threads: intra-op threads (0: the backend's default).
    """
    artifact = read_artifact(path)
    if backend == "ort":
        from attnserve.runtime.ort import OrtRunner

        return OrtRunner(artifact.onnx_path, device=device, threads=threads)
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
        m = artifact.manifest
        return TorchRunner.from_registry(
            m["model"], m["config"], m.get("checkpoint"), m.get("seed", 0),
            m.get("overrides") or {}, threads=threads,
        )
    raise BackendUnavailableError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Runner", "load"]
