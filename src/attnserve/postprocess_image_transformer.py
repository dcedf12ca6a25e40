"""Image Transformer generation and scoring on the numpy side (no torch).

Parmar et al., "Image Transformer", ICML 2018. https://arxiv.org/abs/1802.05751

An image of h x w RGB pixels is h * w * 3 channel intensities (sec. 3.1, the categorical
"cat" representation), generated one at a time (sec. 3.4: log p(x) = sum_t log p(x_t |
x_<t)). With local 1-D attention the order is raster order over the (h, w * 3) map of
channel values; with local 2-D attention the map is cut into query blocks of
(h_q, w_q) channel values, generated block after block in raster order and raster order
within a block (sec. 3.3). `generation_order` is that order, used by the model
(models/image_transformer.py) and here.

A model is exported in two parts that `sample_images` drives (any Runner: ONNX Runtime,
or the eager model as the reference):

- the encoder, run once: `class_id` (B,) in; out the static `class_embedding` (B, d)
  added to every input (sec. 5.2; zeros for an unconditional model, whose only class is
  0) and the initial state: `position` (B,) = 0 and the key/value caches, zeros;
- the step, run once per channel value: the previous value `tokens` (B,) (START_TOKEN
  at position 0, where the paper's shifted input is the zero vector), the static and
  state tensors in; out `logits` (B, 256) for the value at generation step `position`,
  `pixel_index` (B,), that value's raster index in the (h, w, 3) image, and
  `next_<name>` for every state tensor.

The same parts fit `attnserve.runtime.generate.greedy_search` (its `generation_config`
has no end token: every image is h * w * 3 values long).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attnserve.errors import AttnserveError, InputError
from attnserve.runtime.base import Runner
from attnserve.runtime.generate import GenerationConfig

TASK = "autoregressive-image-generation"
CHANNELS = 3  # RGB
INTENSITIES = 256  # a 256-way categorical per channel value (sec. 3.1)
# Fed as the previous value at generation step 0, which has none; the step ignores it
# there. It is not a value the model predicts.
START_TOKEN = INTENSITIES
ATTENTION_TYPES = ("local_1d", "local_2d")


def generation_order(height: int, width: int, attention: str,
                     query_shape: Sequence[int] | None = None) -> np.ndarray:
    """The raster index (in the (height, width, 3) image) of the value generated at each
    step: (height * width * 3,) int64, a permutation.

    Args:
        height, width: the image size in pixels.
        attention: "local_1d" (raster order, sec. 3.3) or "local_2d" (query blocks of
            `query_shape` = (h_q, w_q) channel values in raster order, raster order inside
            each block, sec. 3.3).
    """
    map_width = width * CHANNELS
    n = height * map_width
    if attention == "local_1d":
        return np.arange(n, dtype=np.int64)
    if attention != "local_2d":
        raise InputError(f"attention must be one of {ATTENTION_TYPES}, got {attention!r}")
    if query_shape is None or len(query_shape) != 2:
        raise InputError(f"local_2d attention needs query_shape = (h_q, w_q), got {query_shape!r}")
    hq, wq = (int(s) for s in query_shape)
    if hq < 1 or wq < 1 or height % hq or map_width % wq:
        raise InputError(
            f"a {height} x {width} image is a {height} x {map_width} map of channel values, which "
            f"does not split into query blocks of {hq} x {wq}; choose a query shape that divides it"
        )
    raster = np.arange(n, dtype=np.int64).reshape(height // hq, hq, map_width // wq, wq)
    return raster.transpose(0, 2, 1, 3).reshape(-1)  # (block row, block col, row, col)


def tokens_to_images(tokens: np.ndarray, height: int, width: int, order: np.ndarray) -> np.ndarray:
    """Values in generation order (B, height * width * 3), e.g. greedy_search's tokens,
    -> uint8 images (B, height, width, 3), with `order` from `generation_order`."""
    tokens = np.asarray(tokens)
    n = height * width * CHANNELS
    if tokens.ndim != 2 or tokens.shape[1] != n:
        raise InputError(f"expected values of shape (batch, {n}) for {height} x {width} RGB images, "
                         f"got {tokens.shape}")
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise InputError(f"order must be a permutation of the {n} raster indices (see generation_order)")
    _check_intensities(tokens, "values")
    images = np.empty_like(tokens, dtype=np.uint8)
    images[:, order] = tokens
    return images.reshape(-1, height, width, CHANNELS)


def bits_per_dim(logits: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The paper's metric (sec. 5.1): -log2 p(x) / (h * w * 3) per image, from the whole
    graph's `logits` (B, h, w, 3, 256) for the `pixels` (B, h, w, 3) it was given."""
    logits, pixels = np.asarray(logits, dtype=np.float64), np.asarray(pixels)
    if logits.shape != pixels.shape + (INTENSITIES,):
        raise InputError(f"logits must be pixels' shape plus {INTENSITIES} intensities: got {logits.shape} "
                         f"for pixels {pixels.shape}")
    _check_intensities(pixels, "pixels")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_probs, pixels[..., None].astype(np.int64), axis=-1)[..., 0]
    return -chosen.reshape(len(pixels), -1).mean(axis=1) / np.log(2.0)


def sample_images(encoder: Runner, step: Runner, config: GenerationConfig, image_size: tuple[int, int],
                  class_id: np.ndarray, *, seed: int | Sequence[int] = 0,
                  temperature: float = 1.0) -> np.ndarray:
    """Generate one image per class id: -> uint8 (B, height, width, 3).

    Every value is drawn from softmax(logits / temperature) by inverse transform: the
    image's own numpy.random.default_rng(seed) gives one uniform u per value and the
    value is the first whose cumulative probability (float64) exceeds u times the total.
    So an image depends only on its seed, class and the model, not on the batch around
    it, and two backends whose logits agree draw the same values (up to a u falling
    within their rounding of a boundary). temperature 0 takes the most likely value
    (first on ties, as numpy's argmax) and draws nothing; the paper samples its
    super-resolution outputs at temperatures 0.8 to 1.0 (sec. 5.3).

    Args:
        encoder, step: the two parts (see `load_image_sampler`).
        config: the model's GenerationConfig (names of the static and state tensors).
        image_size: (height, width) in pixels.
        class_id: (B,) int64 class ids; zeros for an unconditional model.
        seed: one for all images or one per image (non-negative integers).
        temperature: >= 0.
    """
    height, width = (int(s) for s in image_size)
    n = height * width * CHANNELS
    if config.max_length != n:
        raise AttnserveError(f"these parts generate {config.max_length} values, not the {n} of a "
                             f"{height} x {width} RGB image")
    _check_parts(encoder, step, config)
    class_id = np.asarray(class_id)
    if class_id.ndim != 1 or class_id.dtype.kind not in "iu" or len(class_id) == 0:
        raise InputError(f"class_id must be a non-empty (batch,) integer array, got {class_id.dtype} "
                         f"{class_id.shape}")
    batch = len(class_id)
    seeds = _per_image(seed, batch)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not np.isfinite(temperature) or temperature < 0):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    rngs = [np.random.default_rng(s) for s in seeds]

    enc = encoder.run({"class_id": class_id.astype(np.int64)})
    static = {name: enc[name] for name in config.static}
    state = {name: enc[name] for name in config.state}
    tokens = np.full(batch, config.bos_id, dtype=np.int64)
    images = np.zeros((batch, n), dtype=np.uint8)
    for _ in range(n):
        out = step.run({config.token_input: tokens, **static, **state})
        logits = out[config.logits_output].astype(np.float64)
        if temperature == 0:
            tokens = logits.argmax(axis=-1).astype(np.int64)
        else:
            tokens = np.array([_draw(rngs[b], logits[b] / temperature) for b in range(batch)], dtype=np.int64)
        images[np.arange(batch), out["pixel_index"]] = tokens
        state = {name: out[f"next_{name}"] for name in config.state}
    return images.reshape(batch, height, width, CHANNELS)


def load_image_sampler(path: str | Path, backend: str = "ort", device: str = "cpu", threads: int = 0):
    """Open an Image Transformer export's two parts: -> (encoder, step, config,
    (height, width)) for `sample_images`.

    `backend="torch"` rebuilds the eager model from the manifest (same weights), the
    reference the exported parts are compared with value for value.
    """
    from attnserve.artifact import read_artifact
    from attnserve.runtime import load_generator

    spec = (read_artifact(path).manifest or {}).get("spec") or {}
    if spec.get("task") != TASK:
        raise AttnserveError(f"{path} is not an Image Transformer export (task {spec.get('task')!r})")
    encoder, step, config = load_generator(path, backend, device, threads)
    size = spec["preprocessing"]
    return encoder, step, config, (int(size["height"]), int(size["width"]))


def _draw(rng: np.random.Generator, scaled_logits: np.ndarray) -> int:
    p = np.exp(scaled_logits - scaled_logits.max())
    cumulative = np.cumsum(p)
    # Scaled by the total: the probabilities are not normalised first.
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(p) - 1)


def _per_image(seed, batch: int) -> list[int]:
    seeds = [seed] * batch if np.ndim(seed) == 0 else list(seed)
    if len(seeds) != batch:
        raise InputError(f"got {len(seeds)} seeds for a batch of {batch} images")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise InputError(f"seeds must be non-negative integers, got {s!r}")
    return [int(s) for s in seeds]


def _check_parts(encoder: Runner, step: Runner, config: GenerationConfig) -> None:
    want = {
        "encoder inputs": (["class_id"], encoder.input_names),
        "encoder outputs": (list(config.static + config.state), encoder.output_names),
        "step inputs": ([config.token_input, *config.static, *config.state], step.input_names),
        "step outputs": ([config.logits_output, "pixel_index", *(f"next_{n}" for n in config.state)],
                         step.output_names),
    }
    missing = [f"{what} lack {', '.join(n for n in names if n not in have)}"
               for what, (names, have) in want.items() if any(n not in have for n in names)]
    if missing:
        raise AttnserveError("these parts are not an Image Transformer's encoder and step: "
                             + "; ".join(missing))


def _check_intensities(values: np.ndarray, what: str) -> None:
    if values.dtype.kind not in "iu":
        raise InputError(f"{what} must be integer intensities 0..255, got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= INTENSITIES):
        raise InputError(f"{what} must be intensities 0..255, got values from {values.min()} "
                         f"to {values.max()}")


__all__ = ["CHANNELS", "INTENSITIES", "START_TOKEN", "TASK", "bits_per_dim", "generation_order",
           "load_image_sampler", "sample_images", "tokens_to_images"]

