"""What the task methods return."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    score: float  # softmax probability


@dataclass(frozen=True)
class Generated:
    """A caption or a translation: text, token ids, score (log p, length-normalised for
    beam search) and one row of attention weights per token (None if the model has none)."""

    text: str
    tokens: list[int]
    score: float
    attention: np.ndarray | None = None


@dataclass(frozen=True)
class ActionWindow:
    """The top actions of the clip of frames [start, end)."""

    start: int
    end: int
    predictions: list[Prediction] = field(default_factory=list)


@dataclass(frozen=True)
class Detection:
    """One object: its class, score and box (x0, y0, x1, y1) in pixels of the image sent."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]
