"""Helpers shared by the Python-backend models (importable without Triton)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def version_dir(args: dict) -> Path:
    """The folder `model.py` was loaded from: <repository>/<model>/<version>."""
    return Path(args["model_repository"]) / args["model_version"]


def parameters(model_config: dict) -> dict[str, str]:
    """config.pbtxt `parameters` as plain strings."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def device(args: dict) -> str:
    return "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"


def group_by_shape(feeds: Sequence[dict[str, np.ndarray]]) -> list[list[int]]:
    """Indices of requests whose inputs agree in every non-batch dimension and dtype:
    each group runs as one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feed.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())
