"""Action recognition on synthetic videos for `vivit` and `nonlocal_i3d` (config `shapes`).

A clip shows one shape (triangle, square, rectangle, cross or star, of a random colour,
size and place) doing one of `LABELS`: moving left, right, up or down, rotating
clockwise, growing or shrinking, on a light, slightly tinted background with faint static
clutter and a little per-frame noise. The shape is always darker than the background (by
70 levels of luma or more), which keeps the task within reach of a minute of training.
Frames are drawn by OpenCV at `CANVAS` x `CANVAS` (anti-aliased, sub-pixel positions) and
become model input through the served model's own preprocessing
(`attnserve.imaging.preprocess` with the spec's resize to 37, centre crop to 32 and mean /
std), the function the client applies to the frames it reads from a video file: the
model is trained on what it is sent when served.

The training and held-out clips come from different seeds (`make_clips(n, seed, split)`).
`write_video` writes a longer file (MPEG-4 part 2 `.mp4` or Motion JPEG `.avi`, both read
back by this OpenCV build) of several actions one after another, each a new scene, and
returns its (start_frame, end_frame, label) segments; `train` also scores each model on
the clips of such a file, read back and cut as the client does (`video_accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnserve.errors import InputError
from attnserve.imaging import preprocess
from attnserve.models import get_spec
from attnserve.train.common import (
    Progress,
    Timer,
    TrainResult,
    accuracy,
    batches,
    checkpoint_path,
    epoch_progress,
    fit,
    new_model,
    save_result,
)

TASK = "actions"
MODELS = (("vivit", "shapes"), ("nonlocal_i3d", "shapes"))
LABELS = ("move left", "move right", "move up", "move down", "rotate clockwise", "grow", "shrink")
NUM_FRAMES = 8  # frames per clip: both `shapes` configs take 8 frames of 32 x 32
CANVAS = 64  # frames are drawn (and the demo video written) at this size, then preprocessed
SHAPES = ("triangle", "square", "rectangle", "cross", "star")
MARGIN = 6  # pixels of the canvas the shape keeps clear of (the centre crop cuts ~4)

# Per-frame rates, in canvas pixels (the model sees 37 / 64 of that: resize, then crop).
SPEED = (1.5, 3.0)  # moves: pixels per frame
RADIUS = (7.0, 11.0)  # circumradius of a shape that moves or rotates
SPIN = (8.0, 15.0)  # rotation: degrees per frame, clockwise on screen
GROWTH = (0.7, 1.4)  # grow / shrink: radius change per frame
MIN_RADIUS = 5.0  # the smallest a shape grows from or shrinks to
NOISE = (2.0, 6.0)  # standard deviation of the per-frame noise, in 0-255 levels

TRAIN_CLIPS, HELD_OUT_CLIPS = 2800, 700
SPLITS = {"train": 0, "held_out": 1}  # the second word of each split's seed
# The second word of the other seeds: the demo video's and the training order's.
_VIDEO_SEED, _SHUFFLE_SEED = 2, 3
EPOCHS = {"vivit": 6, "nonlocal_i3d": 6}
LR = {"vivit": 1e-3, "nonlocal_i3d": 1e-3}
BATCH_SIZE = 32
VIDEO_REPEATS = 3  # train() also scores the clips of a video of every action this many times


def _outline(shape: str) -> np.ndarray:
    """Vertices of a shape of circumradius 1 around the origin, as (angle, radius) pairs."""
    if shape == "triangle":
        angles, radii = np.array([-90.0, 30.0, 150.0]), np.ones(3)
    elif shape == "square":
        angles, radii = np.array([45.0, 135.0, 225.0, 315.0]), np.ones(4)
    elif shape == "rectangle":  # 2:1, its corners at +-26.6 degrees of the long axis
        a = math.degrees(math.atan2(1, 2))
        angles, radii = np.array([a, 180 - a, 180 + a, 360 - a]), np.ones(4)
    elif shape == "cross":  # a plus sign with arms a third as wide as it is long
        arm, half = 1.0, 1.0 / 3.0
        pts = [(half, arm), (half, half), (arm, half), (arm, -half), (half, -half), (half, -arm),
               (-half, -arm), (-half, -half), (-arm, -half), (-arm, half), (-half, half), (-half, arm)]
        norm = math.hypot(arm, half)
        angles = np.array([math.degrees(math.atan2(y, x)) for x, y in pts])
        radii = np.array([math.hypot(x, y) / norm for x, y in pts])
    elif shape == "star":  # five points, inner radius 0.45
        angles = -90.0 + 36.0 * np.arange(10)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return np.stack([angles, radii], axis=1)


_OUTLINES = {s: _outline(s) for s in SHAPES}
_SHIFT = 4  # fractional bits of the polygon coordinates: sub-pixel motion stays smooth


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Canvas vertices (int32, 1/16 pixel) of `shape` turned `angle` degrees clockwise
    (image y points down, so a growing angle turns clockwise on screen)."""
    outline = _OUTLINES[shape]
    theta = np.radians(outline[:, 0] + angle)
    r = outline[:, 1] * radius
    pts = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    return np.round(pts * (1 << _SHIFT)).astype(np.int32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, shape) RGB colours: a light, slightly tinted background and a shape
    of any colour at least 70 levels darker in luma."""
    while True:
        background = np.clip(rng.uniform(160, 235) + rng.uniform(-15, 15, 3), 0, 255)
        shape = rng.uniform(0, 255, 3)
        if _luma(background) - _luma(shape) >= 70:
            return background, shape


def _background(rng: np.random.Generator, colour: np.ndarray, canvas: int) -> np.ndarray:
    """A flat background with 3-6 faint static marks (dots and strokes within 30 levels of
    the background), float32 (canvas, canvas, 3) RGB."""
    import cv2

    image = np.empty((canvas, canvas, 3), np.float32)
    image[:] = colour
    for _ in range(rng.integers(3, 7)):
        tint = np.clip(colour + rng.uniform(-30, 30, 3), 0, 255).tolist()
        x, y = (int(v) for v in rng.integers(0, canvas, 2))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(1, 4)), tint, -1, cv2.LINE_AA)
        else:
            x2, y2 = (int(v) for v in rng.integers(0, canvas, 2))
            cv2.line(image, (x, y), (x2, y2), tint, 1, cv2.LINE_AA)
    return image


def _rate(rng: np.random.Generator, bounds: tuple[float, float], cap: float) -> float:
    """Uniform in `bounds`, its top lowered to `cap` (long clips must stay on the canvas)."""
    lo, hi = bounds
    if cap < lo:
        raise InputError(f"a clip this long cannot keep the shape on the canvas at {lo} a frame or more "
                         f"(at most {cap:.2f} would fit); draw shorter clips or segments")
    return rng.uniform(lo, min(hi, cap))


def _motion(rng: np.random.Generator, label: int, num_frames: int, canvas: int):
    """Per-frame centre x, y, radius and angle of a shape doing LABELS[label] for
    `num_frames` frames, its circumcircle inside the canvas less MARGIN all through."""
    steps = np.arange(num_frames, dtype=np.float64)
    span = max(num_frames - 1, 1)
    lo, hi = MARGIN, canvas - MARGIN
    action = LABELS[label]
    angle0 = rng.uniform(0, 360)
    if action.startswith("move"):
        radius = rng.uniform(*RADIUS)
        speed = _rate(rng, SPEED, (hi - lo - 2 * radius) / span)
        travel = speed * span
        start = rng.uniform(lo + radius, hi - radius - travel)  # the left / top end of the path
        across = rng.uniform(lo + radius, hi - radius)
        forward = action in ("move right", "move down")
        path = start + speed * steps if forward else start + travel - speed * steps
        fixed = np.full(num_frames, across)
        xs, ys = (path, fixed) if action in ("move left", "move right") else (fixed, path)
        return xs, ys, np.full(num_frames, radius), np.full(num_frames, angle0)
    if action == "rotate clockwise":
        radius = rng.uniform(*RADIUS)
        cx, cy = rng.uniform(lo + radius, hi - radius, 2)
        angles = angle0 + rng.uniform(*SPIN) * steps
        return np.full(num_frames, cx), np.full(num_frames, cy), np.full(num_frames, radius), angles
    # grow / shrink: the radius changes linearly between a small one and a larger one,
    # anywhere between MIN_RADIUS and the canvas (so that the second half of a long
    # segment, which starts larger, looks like a training clip).
    growth = _rate(rng, GROWTH, ((hi - lo) / 2 - MIN_RADIUS) / span)
    small = rng.uniform(MIN_RADIUS, (hi - lo) / 2 - growth * span)
    large = small + growth * span
    radii = np.linspace(small, large, num_frames)
    if action == "shrink":
        radii = radii[::-1]
    cx, cy = rng.uniform(lo + large, hi - large, 2)
    return np.full(num_frames, cx), np.full(num_frames, cy), radii, np.full(num_frames, angle0)


def draw_clip(rng: np.random.Generator, label: int, num_frames: int = NUM_FRAMES,
              canvas: int = CANVAS) -> np.ndarray:
    """One random scene doing LABELS[label]: RGB uint8 (num_frames, canvas, canvas, 3)."""
    import cv2

    shape = SHAPES[rng.integers(len(SHAPES))]
    background_colour, colour = _colours(rng)
    background = _background(rng, background_colour, canvas)
    noise = rng.uniform(*NOISE)
    xs, ys, radii, angles = _motion(rng, label, num_frames, canvas)
    frames = np.repeat(background[None], num_frames, axis=0)  # (T, H, W, 3) float32
    for t in range(num_frames):
        cv2.fillPoly(frames[t], [_polygon(shape, xs[t], ys[t], radii[t], angles[t])], colour.tolist(),
                     cv2.LINE_AA, _SHIFT)
    # Luminance noise, the same on the three channels (a third of the draws).
    frames += noise * rng.standard_normal((*frames.shape[:3], 1), dtype=np.float32)
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    return frames


def _split_rng(seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split]])


def make_clips(n: int, seed: int = 0, split: str = "held_out", num_frames: int = NUM_FRAMES,
               canvas: int = CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """`n` clips, the classes as balanced as `n` allows, in random order: (RGB uint8
    (n, num_frames, canvas, canvas, 3), int64 labels (n,)). The same (seed, split) gives
    the same clips; the splits draw from different seeds."""
    rng = _split_rng(seed, split)
    labels = rng.permutation(np.arange(n) % len(LABELS)).astype(np.int64)
    clips = np.stack([draw_clip(rng, int(y), num_frames, canvas) for y in labels]) if n else \
        np.zeros((0, num_frames, canvas, canvas, 3), np.uint8)
    return clips, labels


def model_input(clips: np.ndarray, preprocessing: dict) -> np.ndarray:
    """RGB uint8 clips (N, T, H, W, 3) -> float32 (N, T, 3, S, S), every frame through
    `attnserve.imaging.preprocess` with the spec's preprocessing (as the client does)."""
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise InputError(f"expected RGB clips (N, T, H, W, 3), got {tuple(clips.shape)}")
    n, t = clips.shape[:2]
    size = preprocessing["image_size"]
    out = np.empty((n, t, 3, size, size), np.float32)
    for i in range(n):
        for j in range(t):
            out[i, j] = preprocess(clips[i, j], preprocessing)
    return out


def held_out(seed: int = 0, n: int = HELD_OUT_CLIPS) -> tuple[np.ndarray, np.ndarray]:
    """The held-out clips train() evaluates on (RGB uint8, labels): for tests and the demo."""
    return make_clips(n, seed, "held_out")


# -- the demo's video file ------------------------------------------------------------

# Lossy codecs this OpenCV build both writes and reads back, most common first. The
# frames read back differ from those written by a few levels (compression).
VIDEO_FORMATS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


def write_video(path: str | Path, seed: int = 0, actions: Sequence[str] | None = None,
                segment_frames: int = 2 * NUM_FRAMES, fps: float = 8.0, canvas: int = CANVAS
                ) -> tuple[Path, list[tuple[int, int, str]]]:
    """Write a video of several actions one after another, each a new scene of
    `segment_frames` frames (default: every label once, in an order drawn from `seed`).

    The codec follows the suffix of `path`: `.mp4` is MPEG-4 part 2 ('mp4v'), `.avi`
    Motion JPEG. Returns (path, segments), each segment (start_frame, end_frame, label)
    with end_frame exclusive. Segments of a multiple of the clip length keep the
    client's sliding clips (stride = clip length) each inside one action.
    """
    import cv2

    path = Path(path)
    codecs = {ext: fourcc for fourcc, ext in VIDEO_FORMATS}
    if path.suffix not in codecs:
        raise InputError(f"write the video as {' or '.join(codecs)}, not {path.suffix or 'no suffix'!r}")
    rng = np.random.default_rng([seed, _VIDEO_SEED])
    if actions is None:
        actions = [LABELS[i] for i in rng.permutation(len(LABELS))]
    unknown = [a for a in actions if a not in LABELS]
    if unknown:
        raise InputError(f"unknown actions {unknown}; choose from {', '.join(LABELS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codecs[path.suffix]), fps, (canvas, canvas))
    if not writer.isOpened():
        raise InputError(f"OpenCV cannot write {path} with the {codecs[path.suffix]!r} codec; "
                         f"try the other format ({', '.join(codecs)})")
    if path.suffix == ".avi":
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    segments = []
    try:
        for action in actions:
            start = segments[-1][1] if segments else 0
            for frame in draw_clip(rng, LABELS.index(action), segment_frames, canvas):
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            segments.append((start, start + segment_frames, action))
    finally:
        writer.release()
    return path, segments


def label_of(segments: Sequence[tuple[int, int, str]], start: int, end: int) -> str | None:
    """The action of the segment that covers most of frames [start, end), or None."""
    best, label = 0, None
    for s, e, name in segments:
        overlap = min(e, end) - max(s, start)
        if overlap > best:
            best, label = overlap, name
    return label


# -- training -------------------------------------------------------------------------


def _loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    video, labels = batch
    return nn.functional.cross_entropy(model(video), labels)


def train_model(model: nn.Module, videos: np.ndarray, labels: np.ndarray, seed: int, epochs: int,
                lr: float = 1e-3, batch_size: int = BATCH_SIZE, on_epoch=None) -> list[float]:
    """Fit `model` to preprocessed clips (N, T, 3, S, S) and their labels; the order of
    the batches comes from `seed`. Returns each epoch's mean loss; the model ends in eval
    mode."""
    rng = np.random.default_rng([seed, _SHUFFLE_SEED])
    return fit(model, _loss, lambda epoch: batches((videos, labels), batch_size, rng), epochs, lr=lr,
               on_epoch=on_epoch)


@torch.no_grad()
def video_accuracy(model: nn.Module, preprocessing: dict, path: str | Path,
                   segments: Sequence[tuple[int, int, str]], clip_len: int = NUM_FRAMES,
                   stride: int | None = None, batch_size: int = 32) -> float:
    """Top-1 accuracy on the clips of a video file as the client cuts and preprocesses
    them (attnserve.client.media: frames read back by OpenCV, sliding clips), each clip
    labelled with the segment that covers most of it."""
    from attnserve.client.media import iter_frames, sliding_clips

    clips, truth = [], []
    for start, frames in sliding_clips(iter_frames(path), clip_len, stride or clip_len):
        clips.append(np.stack([preprocess(frame, preprocessing) for frame in frames]))  # (T, 3, S, S)
        truth.append(LABELS.index(label_of(segments, start, start + clip_len)))
    if not clips:
        raise InputError(f"{path} has fewer than {clip_len} frames")
    return accuracy(model, np.stack(clips), np.array(truth), batch_size=batch_size)


def train(out_dir: Path, seed: int = 0, on_progress: Progress | None = None) -> list[TrainResult]:
    """Train vivit and nonlocal_i3d (config `shapes`) on the same synthetic clips; write
    their checkpoints with the held-out accuracy and the accuracy on the clips of a video
    file written and read back by OpenCV (the demo's path)."""
    import tempfile

    out_dir = Path(out_dir)
    with Timer() as data_time:
        train_clips, train_labels = make_clips(TRAIN_CLIPS, seed, "train")
        test_clips, test_labels = make_clips(HELD_OUT_CLIPS, seed, "held_out")
    if on_progress:
        on_progress(f"actions: {len(train_labels)} training and {len(test_labels)} held-out clips "
                    f"drawn in {data_time.seconds:.1f} s")
    sizes = {"train_clips": len(train_labels), "held_out_clips": len(test_labels), "num_frames": NUM_FRAMES,
             "canvas": CANVAS, "data_seconds": data_time.seconds}
    results = []
    with tempfile.TemporaryDirectory(prefix="attnserve-actions-") as tmp:
        video, segments = write_video(Path(tmp) / "actions.mp4", seed, actions=LABELS * VIDEO_REPEATS)
        for name, config in MODELS:
            spec = get_spec(name, config)
            epochs = EPOCHS[name]
            with Timer() as model_time:
                model = new_model(name, config, seed)
                inputs = model_input(train_clips, spec.preprocessing)
                losses = train_model(model, inputs, train_labels, seed, epochs, LR[name],
                                     on_epoch=epoch_progress(on_progress, f"{name} {config}", epochs))
                del inputs
            acc = accuracy(model, model_input(test_clips, spec.preprocessing), test_labels, batch_size=100)
            on_video = video_accuracy(model, spec.preprocessing, video, segments)
            if on_progress:
                on_progress(f"{name} {config}: held-out accuracy {acc:.4f}, on the clips of an mp4 "
                            f"file {on_video:.4f} ({model_time.seconds:.0f} s)")
            results.append(save_result(model, out_dir, TrainResult(
                TASK, name, config, checkpoint_path(out_dir, name, config),
                {"accuracy": acc, "video_accuracy": on_video, "final_loss": losses[-1]},
                model_time.seconds, seed,
                {"labels": list(LABELS), **sizes, "epochs": epochs,
                 "video": f"{len(segments)} segments of {segments[0][1]} frames, mp4v, read back by "
                          "OpenCV"})))
    return results


__all__ = ["CANVAS", "LABELS", "MODELS", "NUM_FRAMES", "draw_clip", "held_out", "label_of", "make_clips",
           "model_input", "train", "train_model", "video_accuracy", "write_video"]
