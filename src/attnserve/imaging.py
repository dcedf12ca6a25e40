"""Image decoding and preprocessing with OpenCV and numpy (no torch): the same code runs
in the client, in the server's preprocessing model and in the tests' references.

`preprocess` follows a spec's `preprocessing` entry (spec.image_preprocessing): resize the
short side to `resize` (bilinear, half-pixel centres, no antialiasing, in float32 so
nothing is rounded to uint8 on the way), centre-crop `image_size`, scale to [0, 1],
normalise per channel, HWC to CHW. That is `torch.nn.functional.interpolate(...,
mode="bilinear", align_corners=False)` to float precision; the tests hold it to that.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from attnserve.errors import InputError


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB uint8 array (H, W, 3)."""
    import cv2

    if not data:
        raise InputError("the image is empty (0 bytes)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"the {len(data)} bytes given are not an image OpenCV can decode (JPEG, PNG, ...)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes."""
    import cv2

    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError("OpenCV could not encode the image as JPEG")
    return buf.tobytes()


def preprocess(image: np.ndarray, preprocessing: Mapping) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, S, S), normalised as the model was trained;
    with `"crop": False` (detectors) -> (3, h, w), the whole image resized so its short
    side is `resize` and its long side at most `max_size`, aspect ratio kept. With
    `"color": "gray"` the image is turned grey first (ITU-R BT.601 luma, OpenCV's) and
    the result has one channel."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(
            f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[:2]
    if min(height, width) < 1:
        raise InputError(f"the image is empty ({height}x{width})")
    if str(preprocessing.get("color", "RGB")).lower() in ("gray", "grey"):
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    if preprocessing.get("crop", True):
        short = preprocessing["resize"]
        scale = short / min(height, width)
        size = (max(short, round(width * scale)), max(short, round(height * scale)))  # cv2 takes (w, h)
    else:
        size = _keep_aspect(height, width, preprocessing["resize"], preprocessing.get("max_size"))[::-1]
    resized = cv2.resize(image.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    if resized.ndim == 2:  # OpenCV drops a single channel's axis
        resized = resized[..., None]
    if preprocessing.get("crop", True):
        crop = preprocessing["image_size"]
        top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
        resized = resized[top:top + crop, left:left + crop]
    patch = resized / 255.0
    mean = np.asarray(preprocessing["mean"], dtype=np.float32)
    std = np.asarray(preprocessing["std"], dtype=np.float32)
    return np.ascontiguousarray(((patch - mean) / std).transpose(2, 0, 1))


def _keep_aspect(height: int, width: int, short: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the short side `short`, shrunk so the long side stays <= max_size."""
    if max_size is not None and max(height, width) / min(height, width) * short > max_size:
        short = int(round(max_size * min(height, width) / max(height, width)))
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and class ids of the k most likely classes, per row,
    most likely first (ties: the lower id first)."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(probs, ids, axis=-1).astype(np.float32), ids.astype(np.int64)
