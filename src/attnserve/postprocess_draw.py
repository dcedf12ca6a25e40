"""Noise in, pictures and attention rectangles out: the numpy side of DRAW (no torch).

DRAW's generation graph (models/draw.py) is a deterministic function of its `noise`
input, z_1..z_T ~ N(0, I) as one (batch, T, z_dim) tensor: `sample_noise` draws it from a
seed, so a seed names an image. The graph's `image` is already sigmoid(c_T), the means
of the Bernoulli pixels (eq. 9, 14), in [0, 1]; `to_uint8_images` makes pictures of it.
`attention_boxes` turns the write windows the graph also returns into the rectangles
of the paper's figure 1.
"""

from __future__ import annotations

import numbers

import numpy as np

from attnserve.errors import InputError
from attnserve.postprocess_gan import sample_latents
from attnserve.postprocess_gan import to_uint8_images as _gan_uint8_images


def sample_noise(batch: int, steps: int, z_dim: int, seed: int) -> np.ndarray:
    """The prior's samples z_t ~ N(0, I), t = 1..T (eq. 12), the same for the same arguments.

    Args:
        batch: number of images (>= 1).
        steps: T, the model's `steps` (its spec's `noise` input is (batch, T, z_dim)).
        z_dim: the length of each z_t.
        seed: a non-negative integer; numpy's PCG64 via `default_rng(seed)`.

    Returns:
        float32 array (batch, steps, z_dim).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(z_dim, bool) or not isinstance(z_dim, numbers.Integral) or z_dim < 1:
        raise InputError(f"z_dim must be an integer >= 1, got {z_dim!r}")
    return sample_latents(batch, int(steps) * int(z_dim), seed).reshape(batch, int(steps), int(z_dim))


def to_uint8_images(image: np.ndarray) -> np.ndarray:
    """DRAW's output in [0, 1], NCHW float -> NHWC uint8 pictures: 0 -> 0, 1 -> 255,
    rounded to nearest (values just outside [0, 1], as float16 can give, are clipped).

    Args:
        image: float array (batch, channels, height, width), channels 1 or 3 (RGB), as
            the `image` output of generation or the `reconstruction` of the reconstruct
            part.

    Returns:
        uint8 array (batch, height, width, channels).
    """
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[1] not in (1, 3):
        raise InputError(f"expected images of shape (batch, 1 or 3, height, width), got {image.shape}; "
                         "pass the model's `image` output, which is NCHW")
    if image.dtype.kind != "f":
        raise InputError(f"expected floating-point images in [0, 1], got dtype {image.dtype}")
    # The GAN helper maps [-1, 1]: 2 x - 1 puts [0, 1] there (pixel = rint(255 x)).
    return _gan_uint8_images(image.astype(np.float32) * 2 - 1)


def attention_boxes(centre: np.ndarray, stride: np.ndarray, size: int) -> np.ndarray:
    """The rectangle an N x N filter grid covers, in the (x0, y0, x1, y1) pixel boxes
    `attnserve.client.visualize.detection_boxes` draws.

    The grid's filters are delta apart around the centre (eq. 19-20), so it spans
    g +- N delta / 2 (half a stride beyond the outer filters). The model counts pixels
    from 1 at their centres; the boxes count from 0 at pixel edges (pixel k spans
    [k, k + 1]), so a grid of N = A filters 1 apart centred at (A + 1)/2 gives [0, A].

    Args:
        centre: (..., 2) (g_X, g_Y), e.g. the `write_centre` output (batch, T, 2).
        stride: (...) delta, e.g. `write_stride` (batch, T).
        size: N, the grid's filters per side (the spec's preprocessing["write_size"]).

    Returns:
        float32 array (..., 4).
    """
    centre, stride = np.asarray(centre, dtype=np.float32), np.asarray(stride, dtype=np.float32)
    if centre.shape[-1:] != (2,) or centre.shape[:-1] != stride.shape:
        raise InputError(f"expected centres (..., 2) and strides (...) of the same steps, got "
                         f"{centre.shape} and {stride.shape}")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise InputError(f"size must be the grid's N, an integer >= 1, got {size!r}")
    half = (size * stride / 2)[..., None]
    corner = centre - 0.5  # to 0-based edge coordinates
    return np.concatenate([corner - half, corner + half], axis=-1).astype(np.float32)
