"""Triton GPU kernels for the attnserve custom ops, held to `attnserve.ops.reference`.

`grid_sample`, `affine_grid_sample` (in `grid_sample_triton`) and `window_attention`
(in `window_attention_triton`) take the arguments of the torch ops in `attnserve.ops`.
Triton is imported only when a launcher is first used, so importing this package works
without it. Set TRITON_INTERPRET=1 before triton is imported to run the kernels on CPU.
"""

from __future__ import annotations

import importlib

_LAUNCHERS = {
    "grid_sample": "grid_sample_triton",
    "affine_grid_sample": "grid_sample_triton",
    "window_attention": "window_attention_triton",
}

__all__ = sorted(_LAUNCHERS)


def __getattr__(name: str):
    # PEP 562: import the kernel module (and triton) on first access to a launcher.
    if name in _LAUNCHERS:
        module = importlib.import_module(f"{__name__}.{_LAUNCHERS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
