"""The eager PyTorch model as a Runner: the reference every backend is held to.

Imported only when asked for, so the rest of `attnserve.runtime` needs no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from attnserve.runtime.base import Runner
from attnserve.spec import ModelSpec


class TorchRunner(Runner):
    """Runs an nn.Module on numpy feeds, under inference mode.

    Args:
        model: the eager model, taking the spec's inputs as keyword arguments.
        spec: its ModelSpec (input and output names, dtypes, shapes).
        threads: torch intra-op threads (0: leave torch's default).
    """

    backend = "torch"

    def __init__(self, model, spec: ModelSpec, threads: int = 0):
        import torch

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.spec = spec
        super().__init__(spec.inputs, spec.outputs)

    @classmethod
    def from_manifest(cls, manifest: Mapping, threads: int = 0) -> TorchRunner:
        return cls(*eager_model(manifest), threads)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, out, strict=True)}


def eager_model(manifest: Mapping):
    """The eager model an export came from, rebuilt from its manifest (model, config,
    overrides, and checkpoint or seed), with its spec: -> (model, ModelSpec)."""
    from attnserve.models import create_model, get_spec

    overrides = manifest.get("overrides") or {}
    model = create_model(manifest["model"], manifest["config"], manifest.get("checkpoint"),
                         seed=manifest.get("seed", 0), **overrides)
    return model, get_spec(manifest["model"], manifest["config"], **overrides)
