"""The numpy side of the Recurrent Attention Model (models/ram.py; no torch).

RAM outputs the centres of its N glimpses in the paper's coordinates ((-1, -1) the image's
top-left corner, (1, 1) its bottom-right one, x first). `glimpse_boxes` turns them into
the pixel boxes of the sensor's patches, for drawing the scan path. A RAM built with
`sample_locations=True` looks at mean + sigma * noise; `sample_location_noise` draws that
noise from a seed, so a seed names a scan path on every backend.
"""

from __future__ import annotations

import numbers

import numpy as np

from attnserve.errors import InputError


def sample_location_noise(batch: int, num_glimpses: int, seed: int) -> np.ndarray:
    """Standard normal noise (batch, num_glimpses, 2), float32, the same for the same
    arguments: the `location_noise` input of a RAM that samples its locations."""
    for name, value in (("batch", batch), ("num_glimpses", num_glimpses)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed)).standard_normal((batch, num_glimpses, 2)).astype(np.float32)


def glimpse_boxes(locations: np.ndarray, image_size, patch_size: int, num_scales: int) -> np.ndarray:
    """Pixel boxes of every patch of every glimpse.

    Args:
        locations: the model's `locations` output, (B, N, 2) or (N, 2), (x, y) in [-1, 1].
        image_size: (height, width) of the model input (its spec's
            `preprocessing["image_size"]` both ways).
        patch_size, num_scales: the sensor's, from the spec's preprocessing.

    Returns:
        float32 (..., N, num_scales, 4): (x0, y0, x1, y1) in pixel edge coordinates (0 is
        the left/top edge of the first pixel, width/height the right/bottom edge of the
        last), finest patch first; boxes may extend beyond the image, where the sensor
        reads zeros.
    """
    locations = np.asarray(locations, dtype=np.float64)
    if locations.ndim not in (2, 3) or locations.shape[-1] != 2:
        raise InputError(f"expected locations of shape (batch, glimpses, 2) or (glimpses, 2), got "
                         f"{locations.shape}")
    try:
        height, width = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise InputError(f"image_size must be (height, width), got {image_size!r}") from None
    if height < 1 or width < 1 or patch_size < 1 or num_scales < 1:
        raise InputError(f"image_size, patch_size and num_scales must be positive, got {image_size!r}, "
                         f"{patch_size}, {num_scales}")
    # align_corners=False: -1 is the outer edge of the first pixel, 1 of the last.
    cx = (locations[..., 0] + 1) * width / 2
    cy = (locations[..., 1] + 1) * height / 2
    half = patch_size * 2.0 ** np.arange(num_scales) / 2  # (k,)
    cx, cy = cx[..., None], cy[..., None]
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=-1).astype(np.float32)
