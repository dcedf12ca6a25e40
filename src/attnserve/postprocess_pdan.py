"""Per-frame multi-label logits -> scores and action segments, with numpy only (no torch).

A temporal action detector (pdan) gives logits (batch, frames, classes) for every frame
of a video's feature sequence. Classes are not exclusive (several actions happen at
once in Charades, MultiTHUMOS, TSU), so every logit goes through its own sigmoid, as the
model is trained (binary cross-entropy per class), not a softmax over the classes.

A segment of class c is a maximal run of consecutive frames whose score for c is at or
above the threshold: [start, end) in the model's frames (feature steps; multiply by the
feature stride for video frames), scored by the mean of its frames' scores. Runs
shorter than `min_frames` are dropped; nothing is merged across gaps. Per-frame mAP,
the papers' metric, needs only `frame_scores`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from attnserve.errors import InputError


@dataclass(frozen=True)
class Segment:
    """One detected action: frames [start, end) of class `class_id`."""

    start: int
    end: int  # exclusive
    class_id: int
    score: float  # mean sigmoid score over the segment's frames
    label: str | None = None


def frame_scores(logits: np.ndarray) -> np.ndarray:
    """Sigmoid of every logit (multi-label): float32 of the same shape."""
    x = np.asarray(logits, dtype=np.float64)
    # exp of a non-positive number only: no overflow for large |x|.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


def segments(scores: np.ndarray, threshold: float = 0.5, *, min_frames: int = 1,
             labels: tuple[str, ...] | list[str] | None = None) -> list[Segment]:
    """The segments of one video's per-frame scores (frames, classes), sorted by start
    frame, then class.

    Args:
        scores: sigmoid scores in [0, 1] (`frame_scores` of the logits), (frames, classes).
        threshold: a frame belongs to class c when its score for c is >= threshold; in (0, 1].
        min_frames: shortest segment kept (>= 1).
        labels: class names, one per class, copied into the segments.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError(f"segments takes one video's scores of shape (frames, classes), got {scores.shape}; "
                         "call it once per video of a batch (or use detect)")
    if scores.dtype.kind != "f" or (scores.size and not (np.all(scores >= 0) and np.all(scores <= 1))):
        raise InputError("segments takes scores in [0, 1]; pass the logits through frame_scores first")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise InputError(f"threshold must lie in (0, 1], got {threshold!r}")
    if isinstance(min_frames, bool) or not isinstance(min_frames, numbers.Integral) or min_frames < 1:
        raise InputError(f"min_frames must be an integer >= 1, got {min_frames!r}")
    if labels is not None and len(labels) != scores.shape[1]:
        raise InputError(f"{len(labels)} labels for {scores.shape[1]} classes")
    active = scores >= threshold  # (frames, classes)
    # Run boundaries per class: +1 where a run starts, -1 one past where it ends.
    edges = np.diff(np.pad(active.astype(np.int8), ((1, 1), (0, 0))), axis=0)  # (frames + 1, classes)
    found = []
    for c in range(scores.shape[1]):
        starts = np.flatnonzero(edges[:, c] == 1)
        ends = np.flatnonzero(edges[:, c] == -1)
        for s, e in zip(starts, ends, strict=True):
            if e - s >= min_frames:
                found.append(Segment(int(s), int(e), c, float(scores[s:e, c].astype(np.float64).mean()),
                                     None if labels is None else labels[c]))
    return sorted(found, key=lambda seg: (seg.start, seg.class_id))


def detect(logits: np.ndarray, threshold: float = 0.5, *, min_frames: int = 1,
           labels: tuple[str, ...] | list[str] | None = None) -> list[list[Segment]]:
    """A batch of logits (batch, frames, classes) -> each video's segments."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise InputError(f"detect takes logits of shape (batch, frames, classes), got {logits.shape}")
    return [segments(s, threshold, min_frames=min_frames, labels=labels) for s in frame_scores(logits)]
