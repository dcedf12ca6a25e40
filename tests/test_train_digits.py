"""The digits training task (attnserve.train.digits): the cluttered canvases hold the digit
they are labelled with, the split is by source image, everything is seeded; the
no-transformer baseline never samples; RAM's training rollout is the model's own
forward pass with sampled locations, and REINFORCE trains the location network alone;
short runs learn, repeat bit for bit and write checkpoints that load into the
registered models. The full training (and STN beating its baseline) is the demo's."""

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnserve.export.checkpoint import load_checkpoint
from attnserve.imaging import decode_image, preprocess
from attnserve.models import create_model, get_spec
from attnserve.train import digits as D
from attnserve.train.common import load_result

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small():
    """200 training and 100 held-out canvases (one per source image)."""
    return D.make_canvases("train", 0, copies=1).subset(200), D.make_canvases("held_out", 0, copies=1).subset(100)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_is_by_source_image_and_stratified():
    digits, labels = D.source_digits()
    split = D.split_sources(0)
    train, held = split["train"], split["held_out"]
    assert not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(len(labels)))
    for c in range(10):  # ~20% of each class held out
        share = np.isin(np.flatnonzero(labels == c), held).mean()
        assert abs(share - D.HELD_OUT_FRACTION) < 0.01
    a, b = D.make_canvases("train", 0, copies=1), D.make_canvases("held_out", 0, copies=1)
    assert set(a.sources) == set(train) and set(b.sources) == set(held)
    assert not np.array_equal(D.split_sources(1)["held_out"], held)


def test_canvases_hold_the_digit_they_are_labelled_with(small):
    _, data = small
    digits, labels = D.source_digits()
    assert data.images.shape == (100, 1, D.CANVAS, D.CANVAS) and data.images.dtype == np.float32
    assert data.images.min() >= 0 and data.images.max() <= 1
    levels = data.images * 255
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)  # 8-bit levels: PNGs round-trip
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, labels[data.sources])
    assert (data.positions >= D.MARGIN).all() and (data.positions <= D.CANVAS - D.DIGIT - D.MARGIN).all()
    for i in range(len(data)):
        top, left = data.positions[i]
        box = data.images[i, 0, top:top + D.DIGIT, left:left + D.DIGIT]
        assert (box >= digits[data.sources[i]] - 0.5 / 255).all()  # the digit, under max-combined clutter
        # ... and not some other image of its class that happens to be there
        others = digits[labels == data.labels[i]]
        assert np.argmin(np.abs(others - box).sum((1, 2))) == np.flatnonzero(
            np.flatnonzero(labels == data.labels[i]) == data.sources[i])[0]
    # clutter: ink outside the digit's box on (nearly) every canvas
    outside = [data.images[i, 0][~_box(data.positions[i])].max() for i in range(len(data))]
    assert np.mean(np.array(outside) > 0.5) > 0.9


def _box(position) -> np.ndarray:
    m = np.zeros((D.CANVAS, D.CANVAS), bool)
    m[position[0]:position[0] + D.DIGIT, position[1]:position[1] + D.DIGIT] = True
    return m


def test_canvases_are_seeded():
    a, b = D.make_canvases("held_out", 3, copies=1), D.make_canvases("held_out", 3, copies=1)
    for field in ("images", "labels", "sources", "positions"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    c = D.make_canvases("held_out", 4, copies=1)
    assert not np.array_equal(a.images, c.images[:len(a)])


def test_write_samples_writes_the_held_out_canvases(tmp_path):
    written = D.write_samples(tmp_path, n=3, seed=0)
    data = D.held_out(0)
    assert [label for _, label in written] == [D.LABELS[y] for y in data.labels[:3]]
    for i, (path, _) in enumerate(written):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (D.CANVAS, D.CANVAS)
        np.testing.assert_array_equal(image, np.rint(data.images[i, 0] * 255).astype(np.uint8))
        for model, _ in D.MODELS:  # what a client sends is what the models were trained on
            sent = preprocess(decode_image(path.read_bytes()), get_spec(model, "digits").preprocessing)
            np.testing.assert_array_equal(sent, data.images[i])


def test_baseline_is_the_same_classifier_and_bypasses_sampling(small, monkeypatch):
    train, _ = small
    calls = []
    sampler = D._affine_grid_sample

    def counting(*args, **kwargs):
        calls.append(1)
        return sampler(*args, **kwargs)

    monkeypatch.setattr(D, "_affine_grid_sample", counting)
    baseline = D.new_baseline(0)
    stn = create_model("stn", "digits")
    # Identical layers: the STN's trunk and head (its output keeps the canvas size), nothing else.
    assert stn.cfg.out_size == stn.cfg.img_size == D.CANVAS
    assert {k: v.shape for k, v in baseline.state_dict().items()} == {
        k: v.shape for k, v in stn.state_dict().items() if k.startswith(("features.", "classifier."))}
    subset = train.subset(64)
    D.train_classifier(baseline, subset, 0, epochs=1)
    assert not calls  # trained without sampling once
    D.train_classifier(stn, subset, 0, epochs=1)
    assert calls  # the counter does see the transformer's sampler


def test_stn_short_training_learns_and_repeats(small):
    train, _ = small
    subset = train.subset(32)  # one batch: an epoch is one step
    x, y = torch.from_numpy(subset.images), torch.from_numpy(subset.labels)

    def run(epochs: int):
        model = D.new_model("stn", "digits", 0)
        with torch.no_grad():
            before = float(F.cross_entropy(model(x), y))
        losses = D.train_classifier(model, subset, 0, epochs=epochs, lr=1e-2)
        with torch.no_grad():
            after = float(F.cross_entropy(model(x), y))
        return _state(model), before, after, losses

    assert _same(run(3)[0], run(3)[0])
    _, before, after, losses = run(12)
    assert after < before - 0.5 and losses[-1] < losses[0]


def test_stn_localisation_net_keeps_its_units():
    """Three epochs on 4,000 canvases (seed 0, one thread): the localisation net's units
    still respond. With the paper's plain ReLUs (loc_negative_slope=0) this same run ends
    with every hidden unit dead, and a dead localisation net leaves the identity transform
    for good; the full training then scored no better than the baseline."""
    model = D.new_model("stn", "digits", 0)
    assert model.cfg.loc_negative_slope > 0
    D.train_classifier(model, D.make_canvases("train", 0).subset(4000), 0, epochs=3)
    with torch.no_grad():
        features = model.localization(torch.from_numpy(D.held_out(0).images[:300])).flatten(1)
        hidden = model.fc_loc[:2](features)
    assert (features > 0).any(0).float().mean() > 0.5
    assert (hidden > 0).any(0).float().mean() > 0.5


def test_rollout_is_the_model_forward_pass(small):
    """RAMTrainer.rollout at the mean is the model's forward pass, and with noise the
    forward pass of a sample_locations=True model (the config's location_std)."""
    _, data = small
    images = torch.from_numpy(data.images[:4])
    ram = D.new_ram(0)
    trainer = D.RAMTrainer(ram).eval()
    with torch.no_grad():
        logits, locations = ram(images)
        out = trainer.rollout(images)
        torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(out.locations, locations, rtol=0, atol=0)
        sampling = create_model("ram", "digits", sample_locations=True)
        sampling.load_state_dict(ram.state_dict())
        noise = torch.randn(4, ram.cfg.num_glimpses, 2, generator=torch.Generator().manual_seed(0))
        logits, locations = sampling(images, noise)
        out = trainer.rollout(images, noise)
    assert sampling.cfg.location_std == ram.cfg.location_std
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.locations, locations)
    torch.testing.assert_close(out.locations - out.means, ram.cfg.location_std * noise)


def test_reinforce_trains_the_location_network_alone(small):
    _, data = small
    images, labels = torch.from_numpy(data.images[:32]), torch.from_numpy(data.labels[:32])
    trainer = D.RAMTrainer(D.new_ram(0)).train()
    noise = torch.randn(32, trainer.ram.cfg.num_glimpses, 2, generator=torch.Generator().manual_seed(1))
    with D.trainable_sampling():
        out = trainer(images, noise)
        ce = F.cross_entropy(out.logits, labels)
        policy = D.hybrid_loss(out, labels, trainer.ram.cfg.location_std) - ce
        policy_grads = torch.autograd.grad(policy, list(trainer.parameters()), allow_unused=True,
                                           retain_graph=True)
        ce_grads = torch.autograd.grad(ce, list(trainer.parameters()), allow_unused=True)
    names = [n for n, _ in trainer.named_parameters()]
    moved = {n for n, g in zip(names, policy_grads, strict=True) if g is not None and g.abs().sum() > 0}
    assert moved == {"ram.locator.weight", "ram.locator.bias", "baseline.weight", "baseline.bias"}
    reached = {n for n, g in zip(names, ce_grads, strict=True) if g is not None and g.abs().sum() > 0}
    assert "ram.classifier.weight" in reached and "ram.glimpse_fc.weight" in reached
    assert not reached & {"ram.locator.weight", "ram.locator.bias", "baseline.weight"}


def test_ram_short_training_learns_and_repeats(small):
    train, _ = small
    subset = train.subset(64)  # one batch: an epoch is one step
    x, y = torch.from_numpy(subset.images), torch.from_numpy(subset.labels)

    def run():
        ram = D.new_ram(0)
        with torch.no_grad():
            before = float(F.cross_entropy(ram(x)[0], y))
        D.train_ram(ram, subset, 0, epochs=8, lr=1e-2)
        with torch.no_grad():
            after = float(F.cross_entropy(ram(x)[0], y))
        return _state(ram), before, after

    a, before, after = run()
    b, *_ = run()
    assert _same(a, b)
    assert after < before - 0.15


def test_train_writes_checkpoints_that_load(tmp_path, small, monkeypatch):
    train, held = small
    monkeypatch.setattr(D, "make_canvases", lambda split, seed=0: train if split == "train" else held)
    monkeypatch.setattr(D, "CLASSIFIER_EPOCHS", 1)
    monkeypatch.setattr(D, "RAM_EPOCHS", 1)
    lines = []
    results = D.train(tmp_path, seed=0, on_progress=lines.append)
    assert [(r.model, r.config) for r in results] == list(D.MODELS)
    assert any(line.startswith("stn baseline") for line in lines) and any("ram digits" in line for line in lines)
    for r in results:
        meta = json.loads(r.metadata_path.read_text())
        assert meta["extra"]["labels"] == [str(d) for d in range(10)]
        assert 0 <= meta["metrics"]["accuracy"] <= 1
        assert load_result(tmp_path, r.model, r.config).metrics == r.metrics
        model = create_model(r.model, config=r.config)
        load_checkpoint(model, r.checkpoint)
        logits = model(torch.from_numpy(held.images[:8]))
        logits = logits[0] if isinstance(logits, tuple) else logits
        assert logits.shape == (8, 10)
    assert "baseline_accuracy" in results[0].metrics
