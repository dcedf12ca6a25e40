"""The actions task (attnserve.train.actions): the synthetic clips show the action their
label names, are seeded, reach the models exactly as the client preprocesses them, the
demo's video file survives OpenCV's round trip, and training is reproducible, learns and
writes checkpoints the export path loads.

The full training run is not here (the demo measures it).
"""

import json

import numpy as np
import pytest
import torch

from attnserve.errors import InputError
from attnserve.export.checkpoint import load_checkpoint
from attnserve.models import create_model, get_spec
from attnserve.train import actions
from attnserve.train.actions import CANVAS, LABELS, MODELS, NUM_FRAMES
from attnserve.train.common import new_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shape_masks(clip: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) RGB -> (T, H, W) bool: the shape, which is >= 70 levels darker in luma
    than the background; clutter is within 30 levels of it and the noise sigma <= 6."""
    luma = clip.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    background = np.median(luma.reshape(len(clip), -1), axis=1)[:, None, None]
    return luma < background - 45


def _track(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the shape's centroid (x, y) and area in pixels."""
    masks = _shape_masks(clip)
    ys, xs = np.mgrid[:clip.shape[1], :clip.shape[2]]
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    centre = np.stack([(masks * xs).sum(axis=(1, 2)), (masks * ys).sum(axis=(1, 2))], axis=1) / area[:, None]
    return centre, area


def test_clips_have_the_shapes_and_balanced_labels():
    clips, labels = actions.make_clips(21, seed=0, split="held_out")
    assert clips.shape == (21, NUM_FRAMES, CANVAS, CANVAS, 3) and clips.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=len(LABELS)).tolist() == [3] * 7
    assert len(LABELS) >= 6 and len(set(LABELS)) == len(LABELS)


def test_labels_match_what_was_drawn():
    clips, labels = actions.make_clips(70, seed=5, split="train")
    min_travel = actions.SPEED[0] * (NUM_FRAMES - 1) * 0.8  # anti-aliasing and noise at the edges
    for clip, label in zip(clips, labels, strict=True):
        action = LABELS[label]
        centre, area = _track(clip)
        assert area.min() > 40, action  # the shape is visible in every frame
        dx, dy = centre[-1] - centre[0]
        moved = {"move left": -dx, "move right": dx, "move up": -dy, "move down": dy}
        if action in moved:
            assert moved[action] > min_travel, (action, dx, dy)
            sideways = dy if action in ("move left", "move right") else dx
            assert abs(sideways) < 1.0 and area.max() / area.min() < 1.25, (action, dx, dy, area)
            continue
        assert np.abs(centre - centre[0]).max() < 1.5, (action, centre)  # stays in place
        ratio = area[-1] / area[0]
        if action == "grow":
            assert ratio > 1.3 and (np.diff(area) > -8).all(), (action, area)
        elif action == "shrink":
            assert ratio < 1 / 1.3 and (np.diff(area) < 8).all(), (action, area)
        else:  # rotates: the same area, a different silhouette every frame
            assert area.max() / area.min() < 1.25, (action, area)
            masks = _shape_masks(clip)
            assert all((masks[t] != masks[t + 1]).sum() > 4 for t in range(NUM_FRAMES - 1)), action


def test_rotation_is_clockwise_on_screen():
    # The right-most vertex of a square turned 45 degrees (image y points down) goes
    # down: 3 o'clock -> 6 o'clock is clockwise.
    before = actions._polygon("square", 32, 32, 10, -45) / 16.0  # vertices at 0, 90, 180, 270 deg
    after = actions._polygon("square", 32, 32, 10, 0) / 16.0
    right = before[np.argmax(before[:, 0])]
    assert np.allclose(right, (42, 32), atol=0.1)
    moved = after[np.argmin(np.linalg.norm(after - right, axis=1))]
    assert moved[0] < right[0] and moved[1] > right[1]


def test_clips_are_seeded_and_the_splits_differ():
    a, la = actions.make_clips(7, seed=0, split="train")
    b, lb = actions.make_clips(7, seed=0, split="train")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    held, _ = actions.make_clips(7, seed=0, split="held_out")
    other, _ = actions.make_clips(7, seed=1, split="train")
    assert not np.array_equal(a, held) and not np.array_equal(a, other)
    with pytest.raises(InputError, match="unknown split"):
        actions.make_clips(1, split="test")


@pytest.mark.parametrize(("name", "config"), MODELS)
def test_model_input_is_the_clients_preprocessing(name, config):
    from attnserve.client._core import pixels

    spec = get_spec(name, config)
    assert spec.outputs[0].shape[-1] == len(LABELS)
    assert spec.preprocessing["num_frames"] == NUM_FRAMES and spec.preprocessing["frame_stride"] == 1
    clips, _ = actions.make_clips(2, seed=3)
    x = actions.model_input(clips, spec.preprocessing)
    assert spec.inputs[0].matches(x.shape) and x.dtype == np.float32
    for clip, got in zip(clips, x, strict=True):  # bit for bit what the client sends
        assert np.array_equal(got, pixels(spec, list(clip)))


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_video_file_round_trips_through_opencv(tmp_path, suffix):
    from attnserve.client.media import iter_frames, sliding_clips

    path, segments = actions.write_video(tmp_path / f"demo{suffix}", seed=0, actions=["grow", "move left", "rotate clockwise"])
    assert [s[2] for s in segments] == ["grow", "move left", "rotate clockwise"]
    assert [s[:2] for s in segments] == [(0, 16), (16, 32), (32, 48)]
    frames = list(iter_frames(path))
    assert len(frames) == 48 and frames[0].shape == (CANVAS, CANVAS, 3) and frames[0].dtype == np.uint8
    # What was written: the same scenes, drawn again from the video's seed.
    rng = np.random.default_rng([0, actions._VIDEO_SEED])
    drawn = np.concatenate([actions.draw_clip(rng, LABELS.index(s[2]), 16) for s in segments])
    assert np.abs(np.stack(frames).astype(np.float64) - drawn).mean() < 8  # lossy, but close
    starts = [start for start, _ in sliding_clips(iter(frames), NUM_FRAMES, NUM_FRAMES)]
    assert [actions.label_of(segments, s, s + NUM_FRAMES) for s in starts] == [
        "grow", "grow", "move left", "move left", "rotate clockwise", "rotate clockwise"]
    assert actions.label_of(segments, 12, 20) == "grow" and actions.label_of(segments, 14, 22) == "move left"
    with pytest.raises(InputError, match="mp4"):
        actions.write_video(tmp_path / "demo.mkv")
    with pytest.raises(InputError, match="shorter"):
        actions.write_video(tmp_path / "long.mp4", segment_frames=40)


def _small_run(name: str, config: str, seed: int, clips, labels, epochs: int = 1, lr: float = 1e-3):
    model = new_model(name, config, seed)
    losses = actions.train_model(model, clips, labels, seed, epochs, lr=lr, batch_size=8)
    return model, losses


@pytest.fixture(scope="module")
def small_data():
    clips, labels = actions.make_clips(8, seed=0, split="train")
    return {name: (actions.model_input(clips, get_spec(name, config).preprocessing), labels)
            for name, config in MODELS}


@pytest.mark.parametrize(("name", "config"), MODELS)
def test_short_training_is_reproducible(name, config, small_data):
    x, y = small_data[name]
    a, la = _small_run(name, config, 0, x, y, epochs=2)
    b, lb = _small_run(name, config, 0, x, y, epochs=2)
    assert la == lb
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    init = new_model(name, config, 0).state_dict()
    assert not all(torch.equal(sa[k], init[k]) for k in sa)  # and it did train


@pytest.mark.parametrize(("name", "config"), MODELS)
def test_short_training_lowers_the_loss(name, config, small_data):
    x, y = small_data[name]
    batch = (torch.from_numpy(x), torch.from_numpy(y))

    def loss(model) -> float:
        model.eval()
        with torch.no_grad():
            return float(actions._loss(model, batch))

    before = loss(new_model(name, config, 0))
    model, losses = _small_run(name, config, 0, x, y, epochs=12)
    assert losses[-1] < losses[0] - 0.2 and loss(model) < before - 0.2, (before, losses)


def test_train_writes_checkpoints_the_export_path_loads(tmp_path, monkeypatch):
    from attnserve.train import train_task

    monkeypatch.setattr(actions, "TRAIN_CLIPS", 14)
    monkeypatch.setattr(actions, "HELD_OUT_CLIPS", 7)
    monkeypatch.setitem(actions.EPOCHS, "vivit", 1)
    monkeypatch.setitem(actions.EPOCHS, "nonlocal_i3d", 1)
    monkeypatch.setattr(actions, "VIDEO_REPEATS", 1)
    lines = []
    results = train_task("actions", tmp_path, seed=0, reuse=False, on_progress=lines.append)
    assert [(r.model, r.config) for r in results] == list(MODELS)
    assert any("vivit shapes epoch 1/1" in line for line in lines)
    held, labels = actions.held_out(seed=0, n=7)
    for r in results:
        meta = json.loads(r.metadata_path.read_text())
        assert meta["extra"]["labels"] == list(LABELS) and meta["seed"] == 0
        assert 0 <= meta["metrics"]["accuracy"] <= 1 and 0 <= meta["metrics"]["video_accuracy"] <= 1
        model = create_model(r.model, config=r.config)
        load_checkpoint(model, r.checkpoint)
        model.eval()
        x = torch.from_numpy(actions.model_input(held, get_spec(r.model, r.config).preprocessing))
        with torch.no_grad():
            right = int((model(x).argmax(-1).numpy() == labels).sum())
        assert right / len(labels) == pytest.approx(r.metrics["accuracy"])
    # A second call with the same seed reuses what is there.
    again = train_task("actions", tmp_path, seed=0)
    assert [r.checkpoint for r in again] == [r.checkpoint for r in results]
