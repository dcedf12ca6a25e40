"""Images and video in, RGB uint8 arrays out (OpenCV and numpy only).

Images: a path, encoded bytes, or an array. Arrays are taken as RGB unless `color="BGR"`
(what `cv2.imread` and `cv2.VideoCapture` give). Video: a path, a `cv2.VideoCapture`, a
camera index, or any iterable of frames; frames are read one at a time, never all at once.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from attnserve.errors import InputError
from attnserve.imaging import decode_image


def load_image(source, color: str = "RGB") -> np.ndarray:
    """-> RGB uint8 (H, W, 3)."""
    import cv2

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{path} is not a file")
        return decode_image(path.read_bytes())
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source))
    if isinstance(source, np.ndarray):
        image = source
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(
                f"an image array must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
        image = image[..., :3]
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color.upper() == "BGR" else image
    raise InputError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes or an array")


def iter_frames(source, color: str | None = None) -> Iterator[np.ndarray]:
    """Frames as RGB uint8 (H, W, 3), read lazily. Capture sources (paths, captures,
    camera indices) are BGR and converted; iterables of arrays are RGB unless
    `color="BGR"`."""
    import cv2

    if isinstance(source, (str, Path, int)) or isinstance(source, cv2.VideoCapture):
        capture = source if isinstance(source, cv2.VideoCapture) else None
        if capture is None:
            if isinstance(source, (str, Path)) and not Path(source).is_file():
                raise InputError(f"{source} is not a file")
            capture = cv2.VideoCapture(str(source) if not isinstance(source, int) else source)
        if not capture.isOpened():
            raise InputError(f"OpenCV cannot open the video {source!r}")
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if (color or "BGR").upper() == "BGR" else frame
        finally:
            if not isinstance(source, cv2.VideoCapture):
                capture.release()
    elif isinstance(source, Iterable):
        for frame in source:
            yield load_image(frame, color or "RGB")
    else:
        raise InputError(f"cannot read video from a {type(source).__name__}; pass a path, a "
                         "cv2.VideoCapture, a camera index or an iterable of frames")


def sliding_clips(frames: Iterable[np.ndarray], length: int, stride: int) -> Iterator[tuple[int, list]]:
    """(index of the clip's first frame, its `length` frames), every `stride` frames;
    holds only the last `length` frames."""
    if length < 1 or stride < 1:
        raise InputError(f"clip length and stride must be at least 1, got {length} and {stride}")
    window: collections.deque = collections.deque(maxlen=length)
    for index, frame in enumerate(frames):
        window.append(frame)
        seen = index + 1
        if seen >= length and (seen - length) % stride == 0:
            yield seen - length, list(window)
