"""DETR's outputs to detections, in numpy (no torch): what a client or a server's
post-processing step runs on the `logits` and `boxes` of an exported `detr`.

As the reference implementation's `PostProcess` and Hugging Face's
`post_process_object_detection`: a softmax over all num_classes + 1 logits, then each
query's score and label are those of its most likely real class (the last, "no object",
column is left out of the max but stays in the softmax's normaliser); queries whose
score is above the threshold are kept, in query order; their (cx, cy, w, h) boxes,
normalised to the model's input, become (x0, y0, x1, y1) in pixels of the original image
(the model's input is the image resized without cropping or padding, so the normalised
boxes hold for the original too). Boxes are not clipped to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnserve.errors import InputError


@dataclass(frozen=True)
class Detections:
    """The detections in one image.

    Attributes:
        boxes: (n, 4) float32, (x0, y0, x1, y1) in pixels of the original image.
        scores: (n,) float32, the softmax probability of the label.
        labels: (n,) int64 class ids (for COCO DETR checkpoints, COCO category ids).

    An image with no detection above the threshold has n = 0: arrays of shapes (0, 4),
    (0,) and (0,), not an error.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def box_cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = np.moveaxis(np.asarray(boxes), -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def postprocess(logits: np.ndarray, boxes: np.ndarray,
                image_sizes: Sequence[tuple[int, int]] | np.ndarray,
                threshold: float = 0.5) -> list[Detections]:
    """DETR's outputs for a batch -> one `Detections` per image.

    Args:
        logits: (batch, queries, num_classes + 1), the last class being "no object".
        boxes: (batch, queries, 4), normalised (cx, cy, w, h).
        image_sizes: the original (height, width) of each image, (batch, 2); or one
            (height, width) for every image of the batch.
        threshold: keep queries whose score is strictly above it.

    Raises:
        InputError: shapes that do not fit together, or sizes that are not positive.
    """
    logits = np.asarray(logits)
    boxes = np.asarray(boxes)
    if logits.ndim != 3 or logits.shape[-1] < 2:
        raise InputError(
            f"expected logits of shape (batch, queries, num_classes + 1) with at least one real "
            f"class, got {logits.shape}; pass the model's `logits` output as it is")
    if boxes.shape != (*logits.shape[:2], 4):
        raise InputError(
            f"expected boxes of shape {(*logits.shape[:2], 4)} (batch, queries, 4) to match the "
            f"logits {logits.shape}, got {boxes.shape}")
    sizes = np.asarray(image_sizes, dtype=np.float64)
    if sizes.shape == (2,):
        sizes = np.broadcast_to(sizes, (logits.shape[0], 2))
    if sizes.shape != (logits.shape[0], 2) or not (sizes > 0).all():
        raise InputError(
            f"expected one positive (height, width) per image, shape ({logits.shape[0]}, 2) or "
            f"(2,), got {np.asarray(image_sizes).tolist()}")

    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)  # (B, Q, C + 1)
    real = probs[..., :-1]  # without "no object"
    labels = real.argmax(axis=-1)  # (B, Q): the first of equal maxima, as torch's max
    scores = np.take_along_axis(real, labels[..., None], axis=-1)[..., 0]
    xyxy = box_cxcywh_to_xyxy(boxes.astype(np.float64))  # (B, Q, 4), normalised
    results = []
    for b in range(logits.shape[0]):
        height, width = sizes[b]
        keep = scores[b] > threshold
        scale = np.array([width, height, width, height])
        results.append(Detections(
            boxes=(xyxy[b][keep] * scale).astype(np.float32).reshape(-1, 4),
            scores=scores[b][keep].astype(np.float32),
            labels=labels[b][keep].astype(np.int64),
        ))
    return results
