"""An exported model on disk, as export writes it and every backend reads it.

    <dir>/model.onnx          the graph
    <dir>/model.onnx.data     its weights (external data; the name is recorded in the
                              graph, so the two files move together)
    <dir>/attnserve.json      the manifest: model name, config, checkpoint, spec,
                              precision, versions
    <dir>/parity.json         the parity report against the eager model
    <dir>/vocab-<role>.json   text models: the vocabularies (attnserve.text), when given

No torch here: an edge box reads artifacts with numpy and a runtime only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from attnserve.errors import AttnserveError
from attnserve.spec import ModelSpec

ONNX_NAME = "model.onnx"
MANIFEST_NAME = "attnserve.json"
PARITY_NAME = "parity.json"


def vocabulary_file(role: str) -> str:
    return f"vocab-{role}.json"


@dataclass(frozen=True)
class Artifact:
    onnx_path: Path
    manifest: dict | None

    @property
    def spec(self) -> ModelSpec | None:
        return ModelSpec.from_dict(self.manifest["spec"]) if self.manifest else None


def read_artifact(path: str | Path) -> Artifact:
    """Accept an export directory or an .onnx file; read the manifest if present."""
    path = Path(path)
    if path.is_dir():
        onnx_path = path / ONNX_NAME
        if not onnx_path.is_file():
            raise AttnserveError(f"{path} is a directory without {ONNX_NAME}; is it an export directory?")
    elif path.is_file():
        onnx_path = path
    else:
        raise AttnserveError(f"{path} does not exist")
    manifest_path = onnx_path.parent / MANIFEST_NAME
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise AttnserveError(f"{manifest_path} is not valid JSON ({e.msg})") from None
    return Artifact(onnx_path, manifest)


def load_vocabularies(path: str | Path) -> dict:
    """The vocabularies saved beside an exported text model: role -> Vocabulary."""
    from attnserve.text import Vocabulary

    artifact = read_artifact(path)
    root = artifact.onnx_path.parent
    files = (artifact.manifest or {}).get("vocabularies") or {}
    missing = [f for f in files.values() if not (root / f).is_file()]
    if missing:
        raise AttnserveError(f"{root} lacks {', '.join(missing)}, named in its manifest")
    return {role: Vocabulary.load(root / f) for role, f in files.items()}
