"""Semantic segmentation outputs -> label maps of the image's size, with numpy only (no
torch), for clients and servers that run the exported model.

A segmentation model (attention_to_scale) gives class scores on a coarse grid (output
stride 8) whose corner cells sit on the image's corner pixels (the grid of DeepLab's
8k + 1-pixel inputs; Caffe's Interp layer resizes with aligned corners). The default,
`method="bilinear"`, resizes the scores bilinearly with aligned corners and takes the
argmax per pixel, as DeepLab does before its CRF: class boundaries fall between grid
cells where the scores cross. `method="nearest"` takes the argmax on the grid and copies
each cell's label to the pixels nearest to it: cheaper (no per-pixel scores), blockier.
"""

from __future__ import annotations

import numpy as np

from attnserve.errors import InputError

METHODS = ("bilinear", "nearest")


def check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"size must be positive, got {height} x {width}")
    return height, width


def _source_coords(out_size: int, in_size: int) -> np.ndarray:
    """Where output pixel i samples the input with aligned corners: i (n_in - 1) / (n_out - 1)."""
    if out_size == 1:
        return np.zeros(1)
    return np.arange(out_size) * ((in_size - 1) / (out_size - 1))


def resize_bilinear(maps: np.ndarray, size) -> np.ndarray:
    """(..., h, w) -> (..., H, W): bilinear with aligned corners, what
    `torch.nn.functional.interpolate(mode="bilinear", align_corners=True)` computes;
    float32 out."""
    maps = np.asarray(maps)
    if maps.ndim < 2 or 0 in maps.shape[-2:]:
        raise InputError(f"expected maps of shape (..., height, width), got {maps.shape}")
    out_h, out_w = check_size(size)
    x = maps.astype(np.float64)
    for axis, n_out in ((-2, out_h), (-1, out_w)):
        n_in = x.shape[axis]
        src = _source_coords(n_out, n_in)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
    return x.astype(np.float32)


def resize_nearest(labels: np.ndarray, size) -> np.ndarray:
    """(..., h, w) -> (..., H, W): each output pixel takes the value of the grid cell
    nearest to it on the aligned-corners grid (half-way: the later cell)."""
    labels = np.asarray(labels)
    if labels.ndim < 2 or 0 in labels.shape[-2:]:
        raise InputError(f"expected maps of shape (..., height, width), got {labels.shape}")
    out_h, out_w = check_size(size)
    rows = np.floor(_source_coords(out_h, labels.shape[-2]) + 0.5).astype(np.int64)
    cols = np.floor(_source_coords(out_w, labels.shape[-1]) + 0.5).astype(np.int64)
    return np.take(np.take(labels, rows, axis=-2), cols, axis=-1)


def segmentation_map(scores: np.ndarray, size=None, method: str = "bilinear") -> np.ndarray:
    """Class scores (B, classes, h, w) or (classes, h, w) -> label ids (B, H, W) or (H, W),
    int64, at `size` = (H, W) (None: the scores' own grid).

    Args:
        scores: the model's `scores` output.
        size: the image size the labels are for: the model input's (its spec's
            `preprocessing["image_size"]`), or the original image's to label that.
        method: "bilinear" (resize the scores, then argmax; the default) or "nearest"
            (argmax, then nearest-neighbour upsampling of the labels).
    """
    scores = np.asarray(scores)
    if scores.ndim not in (3, 4) or 0 in scores.shape:
        raise InputError(f"expected scores of shape (batch, classes, height, width) or "
                         f"(classes, height, width), got {scores.shape}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if size is None:
        return scores.argmax(axis=-3).astype(np.int64)
    if method == "bilinear":
        return resize_bilinear(scores, size).argmax(axis=-3).astype(np.int64)
    return resize_nearest(scores.argmax(axis=-3), size).astype(np.int64)
