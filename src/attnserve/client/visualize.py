"""Pictures of what a model did, written as PNG with OpenCV: attention over the image for
every word of a caption, detection boxes, and a timeline of recognised actions. Inputs and
outputs are RGB uint8 arrays; `save_png` writes one."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attnserve.client.results import ActionWindow, Generated
from attnserve.errors import InputError

PANEL = 160  # pixels per side of one caption panel


def save_png(image: np.ndarray, path: str | Path) -> Path:
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise InputError(f"OpenCV could not write {path}")
    return path


def attention_grid(weights: np.ndarray) -> np.ndarray:
    """One token's weights over image positions -> a square (side, side) map."""
    weights = np.asarray(weights, dtype=np.float32).reshape(-1)
    side = math.isqrt(weights.size)
    if side * side != weights.size:
        raise InputError(f"{weights.size} attention weights are not a square grid of image positions")
    return weights.reshape(side, side)


def caption_attention(image: np.ndarray, caption: Generated, words: Sequence[str] | None = None,
                      columns: int = 5) -> np.ndarray:
    """One panel per generated token: the image, the token's attention upsampled over it
    (brighter = more weight, each panel scaled to its own maximum), the word beneath."""
    import cv2

    if caption.attention is None or not len(caption.attention):
        raise InputError("this caption carries no attention weights")
    words = list(words) if words is not None else (caption.text.split() or [str(t) for t in caption.tokens])
    # The end token has attention too; label the panels beyond the words with their ids.
    labels = [words[i] if i < len(words) else f"<{caption.tokens[i]}>" for i in range(len(caption.attention))]
    base = cv2.resize(image, (PANEL, PANEL), interpolation=cv2.INTER_AREA).astype(np.float32)
    panels = []
    for label, weights in zip(labels, caption.attention, strict=True):
        grid = attention_grid(weights)
        heat = cv2.resize(grid / max(float(grid.max()), 1e-12), (PANEL, PANEL), interpolation=cv2.INTER_CUBIC)
        heat = np.clip(heat, 0, 1)[..., None]
        panel = (base * (0.25 + 0.75 * heat)).astype(np.uint8)
        panel = np.concatenate([panel, np.full((24, PANEL, 3), 255, np.uint8)])
        _text(panel, label[:18], (4, PANEL + 17), 0.5)
        panels.append(panel)
    return _tile(panels, columns)


def detection_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str], scores: Sequence[float],
                    threshold: float = 0.0) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) in pixels drawn over a copy of the image with label and score."""
    import cv2

    out = image.copy()
    for (x0, y0, x1, y1), label, score in zip(np.asarray(boxes), labels, scores, strict=True):
        if score < threshold:
            continue
        colour = _colour(label)
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), colour, 2)
        _text(out, f"{label} {score:.2f}", (int(x0) + 2, max(12, int(y0) - 4)), 0.45, colour)
    return out


def action_timeline(windows: Sequence[ActionWindow], frames: int | None = None, width: int = 800,
                    row: int = 22) -> np.ndarray:
    """One row per action that was ever top-1; a bar over each window it won, as dark as
    its score."""
    import cv2

    if not windows:
        raise InputError("no action windows to draw")
    frames = frames or max(w.end for w in windows)
    actions = list(dict.fromkeys(w.predictions[0].label for w in windows if w.predictions))
    left = 140
    canvas = np.full((row * len(actions) + 30, left + width + 10, 3), 255, np.uint8)
    for r, action in enumerate(actions):
        y = 10 + r * row
        _text(canvas, action[:18], (4, y + 15), 0.45)
        for w in windows:
            if w.predictions and w.predictions[0].label == action:
                x0, x1 = left + int(width * w.start / frames), left + max(1, int(width * w.end / frames))
                shade = int(230 * (1 - w.predictions[0].score))
                cv2.rectangle(canvas, (x0, y + 2), (x1, y + row - 4), (shade, shade, 255), -1)
    y = canvas.shape[0] - 12
    cv2.line(canvas, (left, y), (left + width, y), (0, 0, 0), 1)
    _text(canvas, f"frame 0 .. {frames}", (left, y + 10), 0.35)
    return canvas


def _tile(panels: list[np.ndarray], columns: int) -> np.ndarray:
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    h, w = panels[0].shape[:2]
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = panel
    return sheet


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float,
          colour: tuple[int, int, int] = (0, 0, 0)) -> None:
    import cv2

    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def _colour(label: str) -> tuple[int, int, int]:
    """A colour per label, the same in every run (str hashes are salted per process)."""
    import colorsys
    import zlib

    r, g, b = colorsys.hsv_to_rgb((zlib.crc32(label.encode()) % 360) / 360, 0.9, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)
