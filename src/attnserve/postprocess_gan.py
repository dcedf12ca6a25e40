"""Latents in, pictures out: the numpy side of the GAN generators (no torch).

A SAGAN generator (models/gan.py) is a deterministic function of its inputs: in eval
mode its batch-norm statistics and spectral-norm vectors are fixed, so the same `z` and
`class_id` give the same image on every backend. All the randomness of sampling is in
`z`, which `sample_latents` draws from a seeded generator, so a seed names an image.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from attnserve.errors import InputError


def sample_latents(batch: int, z_dim: int, seed: int, truncation: float | None = None) -> np.ndarray:
    """Latent vectors z ~ N(0, I) for a generator, the same for the same arguments.

    SAGAN is trained and evaluated with z drawn from the standard normal (the official
    code's `tf.random_normal`), which is what `truncation=None` gives. `truncation` applies the
    truncation trick of Brock et al. (BigGAN, ICLR 2019, sec. 3.1), which SAGAN does not
    use: every value whose magnitude exceeds `truncation` is redrawn until none does,
    trading variety for fidelity. Redrawing uses the same seeded generator, so truncated
    latents are deterministic too.

    Args:
        batch: number of latent vectors (>= 1).
        z_dim: their length (the model's `z_dim`; its spec's `z` input is (batch, z_dim)).
        seed: a non-negative integer; numpy's PCG64 via `default_rng(seed)`.
        truncation: None (no truncation) or a positive threshold, e.g. 0.5 to 2.0.

    Returns:
        float32 array (batch, z_dim).
    """
    for name, value, low in (("batch", batch, 1), ("z_dim", z_dim, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if truncation is not None and (
        isinstance(truncation, bool) or not isinstance(truncation, numbers.Real)
        or not math.isfinite(truncation) or truncation <= 0
    ):
        raise InputError(f"truncation must be None or a positive finite number, got {truncation!r}")
    rng = np.random.default_rng(int(seed))
    z = rng.standard_normal((int(batch), int(z_dim)))
    if truncation is not None:
        outside = np.abs(z) > truncation
        while outside.any():
            z[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(z) > truncation
    return z.astype(np.float32)


def to_uint8_images(image: np.ndarray) -> np.ndarray:
    """Generator output in [-1, 1], NCHW float -> NHWC uint8 pictures.

    Maps -1 to 0 and 1 to 255, rounding to nearest; values outside [-1, 1] (a float16
    tanh can reach just past 1) are clipped.

    Args:
        image: float array (batch, channels, height, width), channels 1 or 3 (RGB), as
            the generator's `image` output.

    Returns:
        uint8 array (batch, height, width, channels).
    """
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise InputError(
            f"expected generated images of shape (batch, 3, height, width) (or 1 channel), got "
            f"{image.shape}; pass the generator's `image` output, which is NCHW")
    if image.dtype.kind != "f":
        raise InputError(f"expected floating-point images in [-1, 1], got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise InputError("the images contain NaN or infinity; the model's output is broken")
    pixels = np.rint((image.astype(np.float32) + 1.0) * 127.5)
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
