"""Saliency maps -> binary masks and attended regions -> boxes, with numpy only (no
torch), for clients and servers that run an exported salient-object detector
(models/recurrent_saliency.py).

The model gives a saliency map in [0, 1] at its input size. `saliency_mask` resizes it to
the image's own size (bilinearly, as `postprocess_segmentation.resize_bilinear` resizes
score maps) and thresholds it: at a fixed value, or at the image-adaptive threshold of
Achanta et al. (CVPR 2009), twice the mean saliency, with which salient-object benchmarks
binarise maps. `region_boxes` turns the attention's transforms into pixel boxes.
"""

from __future__ import annotations

import numbers

import numpy as np

from attnserve.errors import InputError
from attnserve.postprocess_segmentation import check_size, resize_bilinear


def saliency_mask(saliency: np.ndarray, size=None, threshold: float | str = 0.5) -> np.ndarray:
    """Saliency (B, 1, h, w), (B, h, w) or (h, w) -> boolean masks (B, H, W) or (H, W).

    Args:
        saliency: the model's `saliency` output, values in [0, 1].
        size: (H, W) of the masks; None keeps the map's own size. Give the original
            image's size to mask that image.
        threshold: a pixel is salient where its (resized) saliency is >= threshold; a
            number in [0, 1], or "adaptive": twice each map's mean saliency (Achanta et al.
            2009), computed on the map before resizing.
    """
    maps = np.asarray(saliency)
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise InputError(f"expected one saliency channel, (batch, 1, height, width); got {maps.shape}")
        maps = maps[:, 0]
    if maps.ndim not in (2, 3) or 0 in maps.shape or maps.dtype.kind != "f":
        raise InputError(f"expected a float saliency map of shape (batch, 1, height, width), (batch, height, "
                         f"width) or (height, width); got {maps.dtype} {maps.shape}")
    if isinstance(threshold, str):
        if threshold != "adaptive":
            raise InputError(f"threshold must be a number in [0, 1] or 'adaptive', got {threshold!r}")
        cut = 2 * maps.astype(np.float64).mean(axis=(-2, -1), keepdims=True)
    elif isinstance(threshold, numbers.Real) and 0 <= threshold <= 1:
        cut = float(threshold)
    else:
        raise InputError(f"threshold must be a number in [0, 1] or 'adaptive', got {threshold!r}")
    if size is not None:
        maps = resize_bilinear(maps, size)
    return maps >= cut


def region_boxes(theta: np.ndarray, size) -> np.ndarray:
    """The attended sub-regions, (..., 2, 3) thetas ([[s, 0, x], [0, s, y]]; the model's
    `theta` output) -> float32 (..., 4) boxes (x0, y0, x1, y1) in pixels of an image of
    `size` = (H, W), edge coordinates (0 the outer edge of the first pixel)."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim < 2 or theta.shape[-2:] != (2, 3):
        raise InputError(f"expected thetas of shape (..., 2, 3), got {theta.shape}")
    height, width = check_size(size)
    # The unit square of the output grid maps to [x - sx, x + sx] x [y - sy, y + sy].
    sx, sy = np.abs(theta[..., 0, 0]), np.abs(theta[..., 1, 1])
    x, y = theta[..., 0, 2], theta[..., 1, 2]
    boxes = np.stack([(x - sx + 1) * width / 2, (y - sy + 1) * height / 2,
                      (x + sx + 1) * width / 2, (y + sy + 1) * height / 2], axis=-1)
    return boxes.astype(np.float32)
