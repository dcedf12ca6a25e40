"""From checkpoints to checked ONNX files: loading, export, parity."""

from __future__ import annotations

from pathlib import Path

from attnserve.export.checkpoint import load_checkpoint, read_state_dict, save_state_dict
from attnserve.export.onnx_export import ExportResult, check_parity, export_onnx
from attnserve.export.precision import PRECISIONS, KeptNode, PrecisionReport, node_module, node_modules


def verify_onnx(path: str | Path, name: str | None = None, config: str = "tiny",
                checkpoint: str | None = None, precision: str | None = None,
                batch_sizes: tuple[int, ...] = (1, 3)):
    """Check an ONNX file (or export directory) against the eager model.

    The model, config, checkpoint, seed and precision come from the export's manifest
    when there is one; `name`/`config`/`checkpoint` name them for a bare .onnx file.
    Returns the list of per-batch ComparisonReports.
    """
    from attnserve.artifact import read_artifact
    from attnserve.errors import AttnserveError
    from attnserve.runtime.torch_runner import eager_model

    artifact = read_artifact(path)
    m = artifact.manifest or {}
    if name is not None and m and name != m["model"]:
        raise AttnserveError(f"{path} was exported from {m['model']!r}, not {name!r}")
    name = name or m.get("model")
    if name is None:
        raise AttnserveError(f"{path} has no manifest; say which model it is with --model")
    source = m or {"model": name, "config": config, "checkpoint": checkpoint}
    model, spec = eager_model(source)
    precision = precision or m.get("precision", "fp32")
    return check_parity(model, spec, artifact.onnx_path, precision, batch_sizes)


__all__ = [
    "PRECISIONS", "ExportResult", "KeptNode", "PrecisionReport", "check_parity", "export_onnx",
    "load_checkpoint", "node_module", "node_modules", "read_state_dict", "save_state_dict", "verify_onnx",
]
