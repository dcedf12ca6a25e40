"""NumPy reference implementations of the attnserve custom ops.

Written as plain loops over the definitions in docs/custom_ops.md, for small shapes
only: they are the one reference that the torch ops, the ONNX function bodies, ONNX
Runtime and the GPU kernels are all tested against (as Polygraphy's plugin references).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def window_key_positions(
    p: tuple[int, ...], spatial: tuple[int, ...], window, mode: str, shift, memory_before,
    memory_after, dilation,
) -> tuple[list[tuple[int, ...] | None], int]:
    """The keys query `p` attends to, in window order (None where the key falls outside
    the map), and the query's index inside its window (block mode; 0 for sliding)."""
    r = len(spatial)
    if mode == "block":
        block = [p[i] // window[i] for i in range(r)]
        extents = [window[i] + memory_before[i] + memory_after[i] for i in range(r)]
        keys = []
        for j in itertools.product(*[range(e) for e in extents]):
            pos = tuple(block[i] * window[i] - memory_before[i] + j[i] for i in range(r))
            keys.append(pos if all(0 <= pos[i] < spatial[i] for i in range(r)) else None)
        q_index = int(np.ravel_multi_index(tuple(p[i] % window[i] for i in range(r)), window))
        return keys, q_index
    keys = []
    for j in itertools.product(*[range(w) for w in window]):
        pos = tuple(p[i] + dilation[i] * (j[i] - (window[i] - 1) // 2) for i in range(r))
        keys.append(pos if all(0 <= pos[i] < spatial[i] for i in range(r)) else None)
    return keys, 0


def window_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, window, mode: str = "block", shift=None,
    memory_before=None, memory_after=None, dilation=None, causal: bool = False,
    rel_pos_bias: np.ndarray | None = None, mask: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Reference window attention; q, k, v: (B, heads, *spatial, head_dim)."""
    B, H = q.shape[:2]
    spatial = q.shape[2:-1]
    r = len(spatial)
    zeros = (0,) * r
    shift = tuple(shift or zeros)
    memory_before, memory_after = tuple(memory_before or zeros), tuple(memory_after or zeros)
    dilation = tuple(dilation or (1,) * r)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spatial_axes = tuple(range(2, 2 + r))
    if any(shift):  # cyclic shift: attend in rolled coordinates, roll the result back
        q, k, v = (np.roll(t, [-s for s in shift], axis=spatial_axes) for t in (q, k, v))
    blocks_per_axis = [spatial[i] // window[i] for i in range(r)]
    out = np.zeros(q.shape, dtype=np.float64)
    for p in itertools.product(*[range(s) for s in spatial]):
        keys, q_index = window_key_positions(
            p, spatial, window, mode, shift, memory_before, memory_after, dilation
        )
        raster_p = np.ravel_multi_index(p, spatial)
        window_index = (
            int(np.ravel_multi_index(tuple(p[i] // window[i] for i in range(r)), blocks_per_axis))
            if mode == "block" else 0
        )
        for b in range(B):
            for h in range(H):
                logits = np.full(len(keys), -np.inf)
                for j, pos in enumerate(keys):
                    if pos is None or (causal and np.ravel_multi_index(pos, spatial) > raster_p):
                        continue
                    logit = float(np.dot(q[(b, h) + p], k[(b, h) + pos])) * scale
                    if rel_pos_bias is not None:
                        if mode == "block":
                            logit += rel_pos_bias[h, q_index, j]
                        elif rel_pos_bias.ndim == 2:
                            logit += rel_pos_bias[h, j]
                        else:
                            logit += rel_pos_bias[(b, h) + p + (j,)]
                    if mask is not None:
                        logit += mask[window_index, q_index, j]
                    logits[j] = logit
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                acc = np.zeros(q.shape[-1])
                for j, pos in enumerate(keys):
                    if weights[j] > 0:
                        acc += weights[j] * v[(b, h) + pos]
                out[(b, h) + p] = acc
    if any(shift):
        out = np.roll(out, list(shift), axis=spatial_axes)
    return out.astype(q.dtype)


def _unnormalize(coord: float, size: int, align_corners: bool) -> float:
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _reflect(x: float, low: float, high: float) -> float:
    """Reflect x into [low, high] (the bounds themselves are mirrors)."""
    if high <= low:
        return low
    span = high - low
    x = abs(x - low)
    flips, extra = divmod(x, span)
    return low + extra if int(flips) % 2 == 0 else high - extra


def _source_coord(coord: float, size: int, padding_mode: str, align_corners: bool) -> float:
    x = _unnormalize(coord, size, align_corners)
    if padding_mode == "border":
        x = min(max(x, 0.0), size - 1.0)
    elif padding_mode == "reflection":
        x = _reflect(x, 0.0, size - 1.0) if align_corners else _reflect(x, -0.5, size - 0.5)
        x = min(max(x, 0.0), size - 1.0)
    return x


def grid_sample(x: np.ndarray, grid: np.ndarray, *, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> np.ndarray:
    """Reference sampler, the semantics of torch.nn.functional.grid_sample.

    x: (N, C, *in_spatial) with 2 or 3 spatial axes; grid: (N, *out_spatial, r) holding
    normalised coordinates in [-1, 1], x (width) first.
    """
    N, C = x.shape[:2]
    in_spatial = x.shape[2:]
    r = len(in_spatial)
    out_spatial = grid.shape[1:-1]
    out = np.zeros((N, C, *out_spatial), dtype=np.float64)
    for n in range(N):
        for o in itertools.product(*[range(s) for s in out_spatial]):
            # grid's last axis is (x, y[, z]): reversed against the array's axis order
            src = [
                _source_coord(float(grid[(n,) + o + (r - 1 - a,)]), in_spatial[a], padding_mode,
                              align_corners)
                for a in range(r)
            ]
            if mode == "nearest":
                corners = [(tuple(int(np.round(c)) for c in src), 1.0)]  # half to even
            else:
                lows = [math.floor(c) for c in src]
                corners = []
                for offs in itertools.product((0, 1), repeat=r):
                    idx = tuple(lows[a] + offs[a] for a in range(r))
                    w = 1.0
                    for a in range(r):
                        frac = src[a] - lows[a]
                        w *= frac if offs[a] else 1 - frac
                    corners.append((idx, w))
            for idx, w in corners:
                if all(0 <= idx[a] < in_spatial[a] for a in range(r)):
                    out[(n, slice(None)) + o] += w * x[(n, slice(None)) + idx]
    return out.astype(x.dtype)


def affine_grid(theta: np.ndarray, out_spatial: tuple[int, ...], align_corners: bool) -> np.ndarray:
    """Reference of torch.nn.functional.affine_grid: (N, *out_spatial, r)."""
    r = len(out_spatial)

    def base(size: int) -> np.ndarray:
        if size == 1:
            return np.zeros(1)
        lin = np.linspace(-1, 1, size)
        return lin if align_corners else lin * (size - 1) / size

    axes = [base(s) for s in out_spatial]  # array axis order (D, H, W) / (H, W)
    mesh = np.meshgrid(*axes, indexing="ij")
    coords = np.stack([m for m in reversed(mesh)] + [np.ones_like(mesh[0])], axis=-1)  # x, y[, z], 1
    return np.einsum("...k,nrk->n...r", coords, theta).astype(theta.dtype).reshape(
        theta.shape[0], *out_spatial, r
    )
