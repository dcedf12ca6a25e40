"""Handwriting synthesis sampling that drives any pair of Runners: no torch.

Graves, "Generating Sequences With Recurrent Neural Networks", 2013, sec. 5.3-5.4.
https://arxiv.org/abs/1308.0850

A handwriting synthesis model (`attnserve.models.handwriting`) is exported in two parts:

- the encoder, run once per batch of texts: `text` (B, U) int64 and `text_lengths` (B,)
  in; out the static tensors every step reads unchanged (`characters`, the one-hot text,
  and `text_mask`) and the zero initial value of each state tensor (`hidden`, `cell`,
  `window`, `kappa`);
- the step, run once per pen point: the previous point `stroke` (B, 3), the static and
  state tensors and the sampling `bias` (B,) in; out the mixture density for the next
  point (`mixture_weights`, `means`, `stddevs`, `correlations`, `end_of_stroke`),
  `next_<name>` for each state tensor, the window weights `attention` = phi(t, u) and
  `attention_past_end` = phi(t, U + 1).

`sample_strokes` feeds the null point first (sec. 2: "x_1 is always a null vector"),
then draws each next point from the step's mixture: a component from the weights, an
offset from that component's bivariate Gaussian, the pen lift from the end-of-stroke
Bernoulli. A sequence ends by the heuristic of sec. 5.3: as soon as
phi(t, U + 1) > phi(t, u) for every u <= U, the current input x_t is its last point.
The same functions run the eager parts (TorchRunner) and the exported ones (OrtRunner),
so their strokes can be compared draw for draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnserve.artifact import read_artifact
from attnserve.errors import AttnserveError
from attnserve.runtime.base import Runner
from attnserve.text import SPECIALS, Vocabulary

TASK = "handwriting-synthesis"
# The characters of the default vocabulary, in id order after the reserved four: a
# vocabulary of size n holds the first n - 4 (57: space and all letters, as the
# paper's 57 classes; 31: space and the lower-case letters).
HANDWRITING_ALPHABET = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'\"!?-:;()&/#+*"
STATIC_NAMES = ("characters", "text_mask")
STATE_NAMES = ("hidden", "cell", "window", "kappa")
MIXTURE_NAMES = ("mixture_weights", "means", "stddevs", "correlations", "end_of_stroke")
STEP_INPUTS = ("stroke", *STATIC_NAMES, "bias", *STATE_NAMES)
STEP_OUTPUTS = (*MIXTURE_NAMES, *(f"next_{n}" for n in STATE_NAMES), "attention", "attention_past_end")


def handwriting_vocabulary(vocab_size: int) -> Vocabulary:
    """The character vocabulary of a model whose config says `vocab_size`: the reserved
    ids, then the first `vocab_size - 4` characters of HANDWRITING_ALPHABET."""
    characters = vocab_size - len(SPECIALS)
    if not 1 <= characters <= len(HANDWRITING_ALPHABET):
        raise AttnserveError(
            f"no default handwriting vocabulary of {vocab_size} ids; sizes "
            f"{len(SPECIALS) + 1} to {len(SPECIALS) + len(HANDWRITING_ALPHABET)} exist"
        )
    return Vocabulary(SPECIALS + tuple(HANDWRITING_ALPHABET[:characters]), level="char")


def encode_texts(vocabulary: Vocabulary, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts -> the encoder's inputs: ids (B, longest text) padded with <pad>, and
    the lengths. Characters outside the vocabulary become <unk>; no <bos> or <eos>,
    since the window runs over the characters to write."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise AttnserveError("no texts to encode")
    ids = [vocabulary.encode(t, add_eos=False) for t in texts]  # raises on empty text
    text = np.full((len(ids), max(map(len, ids))), vocabulary.pad_id, dtype=np.int64)
    for b, row in enumerate(ids):
        text[b, :len(row)] = row
    return {"text": text, "text_lengths": np.array([len(row) for row in ids], dtype=np.int64)}


@dataclass
class StrokeSample:
    """One written sequence.

    Attributes:
        strokes: (n, 3) float32 sampled points x_2 .. x_{n+1}: pen offsets dx, dy and
            the pen-lifted bit (0 or 1). The null first input is not included.
        components: (n,) int64, the mixture component each offset was drawn from.
        attention: (n, U) float32, phi(t, u) over this text's U characters at the step
            that produced each point.
        kappa: (n, K) float32, the window positions at those steps.
        finished: the window passed the end of the text (sec. 5.3) before the step
            limit; False when sampling stopped at `steps` points.
    """

    strokes: np.ndarray
    components: np.ndarray
    attention: np.ndarray
    kappa: np.ndarray
    finished: bool


def sample_strokes(encoder: Runner, step: Runner, text_inputs: Mapping[str, np.ndarray], *, steps: int,
                   bias: float | Sequence[float] = 0.0, seed: int | Sequence[int] = 0) -> list[StrokeSample]:
    """Write each text of the batch: at most `steps` step runs per sequence.

    Args:
        encoder, step: the two parts (see `load_stroke_sampler`).
        text_inputs: {"text": (B, U) int64, "text_lengths": (B,) int64}, e.g. from
            `encode_texts`.
        steps: the most step runs per sequence (each writes at most one point).
        bias: the probability bias b >= 0 of sec. 5.4, one for all or one per sequence;
            larger is neater and less varied.
        seed: each sequence draws from its own numpy.random.default_rng(seed) stream, so
            its strokes do not depend on the batch around it; one seed for all, or one
            per sequence. Every step draws, in order: the component's uniform, two
            standard normals, the pen lift's uniform.
    """
    lengths = _check(encoder, step, text_inputs, steps)
    batch = len(lengths)
    biases = _per_sequence(bias, batch, "bias", float)
    if not all(np.isfinite(b) and b >= 0 for b in biases):
        raise AttnserveError(f"the sampling bias must be a finite number >= 0 (sec. 5.4), got {bias!r}")
    rngs = [np.random.default_rng(s) for s in _per_sequence(seed, batch, "seed", int)]

    enc = encoder.run(text_inputs)
    static = {n: enc[n] for n in STATIC_NAMES}
    state = {n: enc[n] for n in STATE_NAMES}
    rows = np.arange(batch)  # the sequences still writing, as indices into the batch
    stroke = np.zeros((batch, 3), dtype=np.float32)  # x_1, the null vector
    bias_feed = np.asarray(biases, dtype=np.float32)
    written: list[list[tuple]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, dtype=bool)
    for _ in range(steps):
        out = step.run({"stroke": stroke, **static, "bias": bias_feed, **state})
        keep = np.ones(len(rows), dtype=bool)
        for i, b in enumerate(rows):
            n = lengths[b]
            phi = out["attention"][i, :n]
            if window_passed_end(phi, out["attention_past_end"][i], out["next_kappa"][i], n):
                finished[b], keep[i] = True, False
                continue
            point, component = _draw(rngs[b], *(out[name][i] for name in MIXTURE_NAMES))
            stroke[i] = point
            written[b].append((point, component, phi, out["next_kappa"][i]))
        if not keep.any():
            break
        # Finished sequences leave the batch: later steps cost only what is still writing.
        rows, stroke, bias_feed = rows[keep], stroke[keep], bias_feed[keep]
        static = {n: v[keep] for n, v in static.items()}
        state = {n: out[f"next_{n}"][keep] for n in STATE_NAMES}
    gaussians = enc["kappa"].shape[-1]
    return [_result(written[b], lengths[b], gaussians, bool(finished[b])) for b in range(batch)]


def window_passed_end(phi: np.ndarray, phi_past_end: float, kappa: np.ndarray, text_length: int) -> bool:
    """Sec. 5.3: phi(t, U + 1) > phi(t, u) for all u <= U. Also true once every window
    centre kappa_k is past U + 1, which implies the paper's inequality but still holds
    when every phi has underflowed to zero (0 > 0 would keep the sequence writing)."""
    return bool(phi_past_end > phi.max() or kappa.min() > text_length + 1)


def _draw(rng: np.random.Generator, weights, means, stddevs, correlations, end_of_stroke):
    """One point from the mixture (eq. 23): -> (dx, dy, pen_lifted) float32, component."""
    u_component, (z1, z2), u_pen = rng.random(), rng.standard_normal(2), rng.random()
    cumulative = np.cumsum(weights, dtype=np.float64)
    # Scaled by the total: float32 weights sum to 1 only up to rounding.
    component = min(int(np.searchsorted(cumulative, u_component * cumulative[-1], side="right")),
                    len(weights) - 1)
    (mu1, mu2), (s1, s2), rho = means[component], stddevs[component], float(correlations[component])
    dx = mu1 + s1 * z1
    dy = mu2 + s2 * (rho * z1 + np.sqrt(max(1.0 - rho * rho, 0.0)) * z2)
    pen_lifted = 1.0 if u_pen < end_of_stroke else 0.0
    return np.array([dx, dy, pen_lifted], dtype=np.float32), component


def _result(written: list[tuple], text_length: int, gaussians: int, finished: bool) -> StrokeSample:
    if not written:
        return StrokeSample(np.zeros((0, 3), np.float32), np.zeros(0, np.int64),
                            np.zeros((0, text_length), np.float32), np.zeros((0, gaussians), np.float32),
                            finished)
    points, components, attention, kappa = zip(*written, strict=True)
    return StrokeSample(np.stack(points), np.array(components, dtype=np.int64),
                        np.stack(attention).astype(np.float32), np.stack(kappa).astype(np.float32), finished)


def _per_sequence(value, batch: int, what: str, kind: type) -> list:
    if np.ndim(value) == 0:
        return [kind(value)] * batch
    values = list(value)
    if len(values) != batch:
        raise AttnserveError(f"got {len(values)} values of {what} for a batch of {batch} texts")
    return [kind(v) for v in values]


def _check(encoder: Runner, step: Runner, text_inputs: Mapping[str, np.ndarray], steps) -> list[int]:
    """The parts fit a handwriting synthesis model, `steps` is at least 1, and every
    text has 1 to U characters; -> the text lengths."""
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise AttnserveError(f"steps must be an integer of at least 1, got {steps!r}")
    missing = [n for n in STATIC_NAMES + STATE_NAMES if n not in encoder.output_names]
    missing += [n for n in STEP_INPUTS if n not in step.input_names]
    missing += [n for n in STEP_OUTPUTS if n not in step.output_names]
    if missing:
        raise AttnserveError(
            "these parts are not a handwriting synthesis model's encoder and step "
            f"(they lack {', '.join(missing)})"
        )
    absent = [n for n in ("text", "text_lengths") if n not in text_inputs]
    if absent:
        raise AttnserveError(f"the text inputs lack {', '.join(absent)} (see encode_texts)")
    text, lengths = np.asarray(text_inputs["text"]), np.asarray(text_inputs["text_lengths"])
    if text.ndim != 2 or lengths.shape != text.shape[:1]:
        raise AttnserveError(
            f"text must be (batch, text_len) and text_lengths (batch,); got {text.shape} and {lengths.shape}"
        )
    empty = [b for b, n in enumerate(lengths) if n < 1]
    if empty:
        raise AttnserveError(
            f"text {', '.join(map(str, empty))} of the batch is empty (length 0): there is nothing to write"
        )
    too_long = [b for b, n in enumerate(lengths) if n > text.shape[1]]
    if too_long:
        raise AttnserveError(
            f"text_lengths of text {', '.join(map(str, too_long))} exceed the text's {text.shape[1]} columns"
        )
    return [int(n) for n in lengths]


def load_stroke_sampler(path: str | Path, backend: str = "ort", device: str = "cpu",
                        threads: int = 0) -> tuple[Runner, Runner]:
    """Open a handwriting synthesis export's two parts: -> (encoder, step) for
    `sample_strokes`.

    `backend="torch"` rebuilds the eager model from the manifest (same weights), the
    reference the exported parts are compared with draw for draw.
    """
    from attnserve.runtime import load_parts

    manifest = read_artifact(path).manifest or {}
    if (manifest.get("spec") or {}).get("task") != TASK or not manifest.get("parts"):
        raise AttnserveError(
            f"{path} is not a handwriting synthesis export (no stroke encoder and step parts)"
        )
    _, parts = load_parts(path, backend, device, threads)
    return parts["encoder"], parts["decoder_step"]
