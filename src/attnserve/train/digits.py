"""Cluttered digits for `stn` and `ram` (config `digits` of both).

The digits are scikit-learn's bundled 8 x 8 handwritten digits (1,797 images, 0-16 grey
levels; `sklearn.datasets.load_digits`, shipped inside the package: no download),
upscaled to `DIGIT` x `DIGIT` and placed at a random position on a `CANVAS` x `CANVAS`
canvas with `CLUTTER` random 4 x 4 .. 6 x 6 crops of other digits scattered over it, the
cluttered-MNIST recipe of Mnih et al. 2014 (sec. 4.1) and Jaderberg et al. 2015 (sec. 4.1)
at a smaller scale. Pixels are combined with max and stored as 8-bit levels, so a canvas
is exactly the PNG that `write_samples` writes: model input is that PNG in [0, 1], one
channel, NCHW float32 (mean 0, std 1, as both specs say).

The split is by source image: each digit image belongs to the training or the held-out
split (stratified by class), and a canvas's clutter comes from other images of its own
split, so no pixel of a held-out image is seen in training.

- `stn` (affine, identity-initialised, sec. 4.1; its output keeps the canvas size) is
  trained on the class cross-entropy, its localisation net at LOCALISATION_LR times the
  rate; the same convolutional classifier without the transformer (`NoTransformer`: the
  STN's own trunk and head, fed the canvas directly) is trained on the same canvases,
  epochs, optimiser, schedule and seed, and both held-out accuracies are reported (the
  issue: the transformer must beat it).
- `ram` is trained with the paper's hybrid loss (sec. 3.2 and 4.1): cross-entropy for the
  classifier, core and glimpse networks, and REINFORCE for the location network alone,
  with the locations sampled as mean + location_std * noise (the model's
  `sample_locations` semantics, its config's sigma), reward 1 for a right answer at the
  end, and a learnt baseline b_t of the core state subtracted. It starts from He
  initialisation (`relu_init`). Held-out accuracy is at the policy's mean
  (`sample_locations=False`, the exported demo config).

The `attnserve::affine_grid_sample` op the models sample with has no autograd formula
(it is written for export); training runs under `trainable_sampling()`, which routes the
models' calls to torch's affine_grid + grid_sample, the op's own body. Evaluation runs on
the op itself.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnserve.models import create_model
from attnserve.models.registry import get_entry
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
    seed_everything,
)

TASK = "digits"
MODELS = (("stn", "digits"), ("ram", "digits"))
LABELS = tuple(str(d) for d in range(10))
CANVAS = 40  # both `digits` configs take 40 x 40 images
DIGIT = 16  # the 8 x 8 digits, upscaled twice
MARGIN = 3  # pixels between the digit's box and the canvas's edge (clutter may go anywhere)
CLUTTER = 6  # pieces of other digits per canvas
CLUTTER_SIZE = (4, 6)  # their side, inclusive, in canvas pixels
HELD_OUT_FRACTION = 0.2  # of the source images of each class
TRAIN_COPIES, HELD_OUT_COPIES = 8, 2  # canvases per source image
SPLITS = {"train": 0, "held_out": 1}  # the second word of each split's seed

# Training recipes, the same optimiser (common.fit: AdamW, one-cycle) for all three.
BATCH = 64
CLASSIFIER_EPOCHS, CLASSIFIER_LR = 8, 3e-3  # stn and its no-transformer baseline alike
# The localisation net learns at 0.3 x the rate: at the full rate Adam's steps on its
# early, noisy gradients drove its units dead and the transform went constant. That still
# happened at 0.3 in two of four seeded runs while its units were ReLUs; the digits
# config's leaky units (models/stn.py) keep it alive (seeds 0-3: 92.8-96.5% held out).
LOCALISATION_LR = 0.3
RAM_EPOCHS, RAM_LR = 16, 3e-3


@dataclass
class Canvases:
    """Cluttered canvases and what was drawn on them.

    Attributes:
        images: float32 (N, 1, CANVAS, CANVAS) in [0, 1], multiples of 1 / 255.
        labels: int64 (N,), the digit's class (LABELS[label] is its name).
        sources: int64 (N,), the index of the digit's image in `load_digits()`.
        positions: int64 (N, 2), (top, left) of the digit's DIGIT x DIGIT box.
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> Canvases:
        return Canvases(self.images[:n], self.labels[:n], self.sources[:n], self.positions[:n])


@functools.cache
def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits, upscaled: (float32 (n, DIGIT, DIGIT) in [0, 1],
    int64 labels (n,)). Read-only arrays."""
    import cv2

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits task needs scikit-learn (its bundled load_digits data): "
                          "pip install scikit-learn") from None
    data = load_digits()
    small = data.images.astype(np.float32) / 16.0  # 0-16 grey levels
    images = np.stack([cv2.resize(im, (DIGIT, DIGIT), interpolation=cv2.INTER_LINEAR) for im in small])
    images = np.clip(images, 0.0, 1.0)
    labels = data.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def split_sources(seed: int = 0) -> dict[str, np.ndarray]:
    """The source images of each split (sorted indices into `source_digits()`):
    HELD_OUT_FRACTION of every class held out, drawn from `seed`."""
    _, labels = source_digits()
    rng = np.random.default_rng([seed, 7])
    held = []
    for c in range(len(LABELS)):
        ids = np.flatnonzero(labels == c)
        held.append(rng.choice(ids, size=int(round(len(ids) * HELD_OUT_FRACTION)), replace=False))
    held_out = np.sort(np.concatenate(held))
    return {"train": np.setdiff1d(np.arange(len(labels)), held_out), "held_out": held_out}


@functools.cache
def _ink() -> tuple[np.ndarray, np.ndarray]:
    """The (y, x) of every inked pixel (> 0.5) of every source digit, all in one array, and
    where each digit's run starts in it (n + 1 offsets)."""
    digits, _ = source_digits()
    coords = [np.argwhere(d > 0.5) for d in digits]
    if min(len(c) for c in coords) == 0:
        raise AssertionError("a source digit has no pixel above 0.5")
    offsets = np.cumsum([0] + [len(c) for c in coords])
    return np.concatenate(coords), offsets


def make_canvases(split: str = "held_out", seed: int = 0, copies: int | None = None) -> Canvases:
    """`copies` canvases (TRAIN_COPIES / HELD_OUT_COPIES by default) of every source image
    of `split`, in random order. The same (split, seed, copies) gives the same canvases.

    Each canvas: CLUTTER square crops (sides CLUTTER_SIZE) of other images of the split,
    each centred on an inked pixel of its image (clamped to the image) so none is blank,
    at uniform places, then the digit at a uniform place MARGIN clear of the edges; pixels
    combined with max, rounded to 8-bit levels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    copies = copies if copies is not None else (TRAIN_COPIES if split == "train" else HELD_OUT_COPIES)
    digits, labels = source_digits()
    pool = split_sources(seed)[split]
    rng = np.random.default_rng([seed, SPLITS[split]])
    sources = rng.permutation(np.repeat(pool, copies))
    n, k = len(sources), CLUTTER
    # Clutter: other images of the split (uniform over all but the canvas's own) ...
    other = rng.integers(0, len(pool) - 1, (n, k))
    other += other >= np.searchsorted(pool, sources)[:, None]
    others = pool[other]  # (n, k)
    # ... cropped around one of their inked pixels ...
    sides = rng.integers(CLUTTER_SIZE[0], CLUTTER_SIZE[1] + 1, (n, k))
    ink, offsets = _ink()
    pick = offsets[others] + (rng.random((n, k)) * (offsets[others + 1] - offsets[others])).astype(np.int64)
    crop = np.clip(ink[pick] - sides[..., None] // 2, 0, DIGIT - sides[..., None])  # (n, k, 2) top, left
    # ... and placed anywhere on the canvas.
    place = (rng.random((n, k, 2)) * (CANVAS - sides[..., None] + 1)).astype(np.int64)  # (n, k, 2)
    positions = rng.integers(MARGIN, CANVAS - DIGIT - MARGIN + 1, (n, 2))  # the digit's (top, left)
    canvases = np.zeros((n, CANVAS, CANVAS), np.float32)
    for i in range(n):
        canvas = canvases[i]
        for j in range(k):
            w, (cy, cx), (py, px) = sides[i, j], crop[i, j], place[i, j]
            region = canvas[py:py + w, px:px + w]
            np.maximum(region, digits[others[i, j], cy:cy + w, cx:cx + w], out=region)
        top, left = positions[i]
        region = canvas[top:top + DIGIT, left:left + DIGIT]
        np.maximum(region, digits[sources[i]], out=region)
    images = (np.rint(canvases * 255) / np.float32(255)).astype(np.float32)[:, None]  # (n, 1, S, S)
    return Canvases(images, labels[sources], sources.astype(np.int64), positions.astype(np.int64))


def held_out(seed: int = 0) -> Canvases:
    """The held-out canvases train() evaluates on: for tests and the demo."""
    return make_canvases("held_out", seed)


def write_samples(out_dir: str | Path, n: int = 8, seed: int = 0) -> list[tuple[Path, str]]:
    """Write the first `n` held-out canvases as 8-bit grey PNGs (exactly the model input
    times 255) to `out_dir`; returns (path, true label) pairs."""
    import cv2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = held_out(seed)
    written = []
    for i in range(min(n, len(data))):
        label = LABELS[data.labels[i]]
        path = out_dir / f"digit-{i:02d}-{label}.png"
        if not cv2.imwrite(str(path), np.rint(data.images[i, 0] * 255).astype(np.uint8)):
            raise RuntimeError(f"OpenCV could not write {path}")
        written.append((path, label))
    return written


# -- training ---------------------------------------------------------------------------


def _affine_grid_sample(x: torch.Tensor, theta: torch.Tensor, out_size, *, mode: str = "bilinear",
                        padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """attnserve.ops.affine_grid_sample's computation in differentiable torch ops."""
    grid = F.affine_grid(theta.float(), [x.shape[0], x.shape[1], *out_size], align_corners=align_corners)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode,
                         align_corners=align_corners)


@contextmanager
def trainable_sampling() -> Iterator[None]:
    """Within: stn and ram sample through torch's differentiable affine_grid + grid_sample
    instead of the `attnserve::affine_grid_sample` custom op, which registers no autograd
    formula (backward through it raises)."""
    from attnserve.models import ram, stn

    saved = [(m, m.affine_grid_sample) for m in (stn, ram)]
    try:
        for m, _ in saved:
            m.affine_grid_sample = _affine_grid_sample
        yield
    finally:
        for m, fn in saved:
            m.affine_grid_sample = fn


def _epoch_batches(data: Canvases, seed: int):
    """common.fit's epoch_batches: epoch e shuffled from (seed, e), whatever the call order."""
    def epoch(e: int):
        return batches((data.images, data.labels), BATCH, np.random.default_rng([seed, 100 + e]))
    return epoch


class NoTransformer(nn.Module):
    """The STN's classifier without its transformer: its own conv trunk and head on the
    canvas itself, no sampling. The STN must keep the canvas size (out_size = img_size),
    so that the head's input is as wide as the canvas's feature map."""

    def __init__(self, stn: nn.Module):
        super().__init__()
        if stn.cfg.out_size != stn.cfg.img_size:
            raise ValueError(f"the baseline's classifier sees the whole {stn.cfg.img_size} x "
                             f"{stn.cfg.img_size} canvas: build its STN with out_size={stn.cfg.img_size}")
        self.features = stn.features
        self.classifier = stn.classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


def new_baseline(seed: int, config: str = "digits") -> NoTransformer:
    """The no-transformer baseline of stn at `config`, initialised from `seed`."""
    img_size = get_entry("stn").config(config)[1].img_size
    return NoTransformer(create_model("stn", config, seed=seed, out_size=img_size))


def relu_init(model: nn.Module) -> nn.Module:
    """He initialisation (fan-in, ReLU gain, zero bias) of every linear and conv layer.
    Torch's default shrinks the signal ~2.4 times a layer; on canvases that are ~95% black
    RAM's glimpse and core networks then start from near-constant logits and learn slowly
    (measured here: about 50% against 66% training accuracy after 1,500 steps). With zero
    biases the first glimpse is at the centre, l_0 = f_l(0) = 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def new_ram(seed: int, config: str = "digits") -> nn.Module:
    """ram at `config`, He-initialised (`relu_init`) from `seed`."""
    model = new_model("ram", config, seed)
    torch.manual_seed(seed)
    return relu_init(model)


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


class _Scaled(nn.Module):
    """A parametrization w = factor * v: Adam's steps on v (scale-free) move w `factor`
    times as far, i.e. `factor` times the learning rate, without a parameter group."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.factor

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.factor


@contextmanager
def learning_rate_scaled(modules: list[nn.Module], factor: float) -> Iterator[None]:
    """Within: the weights and biases of `modules` learn at `factor` times the optimiser's
    rate; after, they are plain parameters again (the same state dict keys)."""
    from torch.nn.utils import parametrize

    layers = [m for module in modules for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if factor == 1:
        yield
        return
    for m in layers:
        for name in ("weight", "bias"):
            parametrize.register_parametrization(m, name, _Scaled(factor))
    try:
        yield
    finally:
        for m in layers:
            for name in ("weight", "bias"):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)


def train_classifier(model: nn.Module, data: Canvases, seed: int, epochs: int = CLASSIFIER_EPOCHS,
                     lr: float = CLASSIFIER_LR, on_epoch=None, loc_lr: float = LOCALISATION_LR
                     ) -> list[float]:
    """Cross-entropy training of an STN or its NoTransformer baseline; the epochs' losses."""
    seed_everything(seed)
    loc = [model.localization, model.fc_loc] if hasattr(model, "fc_loc") else []
    with trainable_sampling(), learning_rate_scaled(loc, loc_lr):
        return fit(model, _cross_entropy, _epoch_batches(data, seed), epochs, lr=lr, on_epoch=on_epoch)


@dataclass
class Rollout:
    logits: torch.Tensor  # (B, classes)
    means: torch.Tensor  # (B, N, 2): the policy's mean of each l_t
    locations: torch.Tensor  # (B, N, 2): where it looked (sampled: detached)
    baselines: torch.Tensor  # (B, N): b_t, the expected reward from the state l_t is chosen in


class RAMTrainer(nn.Module):
    """RAM plus the learnt reward baseline b_t = Linear(h_t) that only training needs (the
    checkpoint is `ram`'s alone)."""

    def __init__(self, ram: nn.Module):
        super().__init__()
        self.ram = ram
        self.baseline = nn.Linear(ram.cfg.hidden_size, 1)

    def rollout(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> Rollout:
        """RAM's forward pass (models/ram.py), keeping what REINFORCE needs. With `noise`
        (B, N, 2) it looks at mean + location_std * noise, detached: the location network
        learns from the reward alone (sec. 3.2), not by backpropagating through the
        sensor, and its gradient stops at f_l ("the location network is always trained with
        REINFORCE", the rest by backpropagating the cross-entropy); without it, at the
        mean, as the model does with sample_locations=False."""
        ram, cfg = self.ram, self.ram.cfg
        h = images.new_zeros(images.shape[0], cfg.hidden_size)  # h_0
        c = torch.zeros_like(h) if cfg.core == "lstm" else None
        means, locations, baselines = [], [], []
        for t in range(cfg.num_glimpses):
            if noise is None:
                mean = loc = ram.locator(h)
            else:  # REINFORCE trains f_l alone (sec. 3.2): no policy gradient into the core
                mean = ram.locator(h.detach())
                loc = (mean + cfg.location_std * noise[:, t]).detach()
            baselines.append(self.baseline(h.detach()).squeeze(-1))
            means.append(mean)
            locations.append(loc)
            h, c = ram.core_step(ram.glimpse_features(images, loc), h, c)
        return Rollout(ram.classifier(h), torch.stack(means, 1), torch.stack(locations, 1),
                       torch.stack(baselines, 1))

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> Rollout:
        return self.rollout(images, noise)


def hybrid_loss(out: Rollout, labels: torch.Tensor, location_std: float) -> torch.Tensor:
    """Sec. 3.2: cross-entropy + REINFORCE on the locations with the baseline subtracted +
    the baseline's squared error. The reward is 1 for a right classification at the end
    (R = sum_t r_t with r_t = 0 before it), so every step's return is R."""
    reward = (out.logits.argmax(-1) == labels).float()  # (B,)
    # log pi(l_t | mean_t) of the Gaussian with fixed sigma, up to a constant (sum over x, y)
    log_pi = -((out.locations - out.means) ** 2).sum(-1) / (2 * location_std**2)  # (B, N)
    advantage = (reward[:, None] - out.baselines).detach()
    reinforce = -(log_pi * advantage).sum(1).mean()
    baseline = F.mse_loss(out.baselines, reward[:, None].expand_as(out.baselines))
    return F.cross_entropy(out.logits, labels) + reinforce + baseline


def train_ram(ram: nn.Module, data: Canvases, seed: int, epochs: int = RAM_EPOCHS, lr: float = RAM_LR,
              on_epoch=None) -> list[float]:
    """Hybrid-loss training of `ram` (its config's location_std, sampled locations);
    the epochs' mean losses."""
    seed_everything(seed)
    trainer = RAMTrainer(ram)
    noise = torch.Generator().manual_seed(seed)
    std = ram.cfg.location_std

    def loss_fn(model: RAMTrainer, batch) -> torch.Tensor:
        images, labels = batch
        eps = torch.randn(images.shape[0], ram.cfg.num_glimpses, 2, generator=noise)
        return hybrid_loss(model(images, eps), labels, std)

    with trainable_sampling():
        losses = fit(trainer, loss_fn, _epoch_batches(data, seed), epochs, lr=lr, on_epoch=on_epoch)
    ram.eval()
    return losses


@torch.no_grad()
def glimpses_on_digit(ram: nn.Module, data: Canvases, batch_size: int = 256) -> float:
    """The fraction of glimpses (at the policy's mean) whose centre lies on the digit's box."""
    ram.eval()
    hits, total = 0, 0
    for images, positions in batches((data.images, data.positions), batch_size):
        _, locations = ram(images)  # (B, N, 2), (x, y) in [-1, 1]
        pixels = (locations + 1) * CANVAS / 2  # pixel edge coordinates
        top, left = positions[:, None, 0], positions[:, None, 1]
        inside = ((pixels[..., 0] >= left) & (pixels[..., 0] <= left + DIGIT)
                  & (pixels[..., 1] >= top) & (pixels[..., 1] <= top + DIGIT))
        hits, total = hits + int(inside.sum()), total + inside.numel()
    return hits / max(total, 1)


def train(out_dir: Path, seed: int = 0, on_progress: Progress | None = None) -> list[TrainResult]:
    """Train stn (and its no-transformer baseline) and ram on cluttered digits; write
    `stn-digits` and `ram-digits` checkpoints with their held-out accuracies."""
    out_dir = Path(out_dir)
    train_set, test_set = make_canvases("train", seed), make_canvases("held_out", seed)
    sizes = {"train_canvases": len(train_set), "held_out_canvases": len(test_set),
             "train_sources": len(np.unique(train_set.sources)),
             "held_out_sources": len(np.unique(test_set.sources)),
             "canvas": CANVAS, "digit": DIGIT, "clutter": CLUTTER}
    results = []

    with Timer() as base_time:
        baseline = new_baseline(seed)
        train_classifier(baseline, train_set, seed, CLASSIFIER_EPOCHS, on_epoch=epoch_progress(
            on_progress, "stn baseline (no transformer)", CLASSIFIER_EPOCHS))
    baseline_acc = accuracy(baseline, test_set.images, test_set.labels)
    with Timer() as stn_time:
        stn = new_model("stn", "digits", seed)
        losses = train_classifier(stn, train_set, seed, CLASSIFIER_EPOCHS,
                                  on_epoch=epoch_progress(on_progress, "stn digits", CLASSIFIER_EPOCHS))
    stn_acc = accuracy(stn, test_set.images, test_set.labels)
    if on_progress:
        on_progress(f"stn digits: held-out accuracy {stn_acc:.4f} "
                    f"(without the transformer {baseline_acc:.4f})")
    results.append(save_result(stn, out_dir, TrainResult(
        TASK, "stn", "digits", checkpoint_path(out_dir, "stn", "digits"),
        {"accuracy": stn_acc, "baseline_accuracy": baseline_acc, "final_loss": losses[-1]},
        stn_time.seconds, seed,
        {"labels": list(LABELS), **sizes, "epochs": CLASSIFIER_EPOCHS,
         "baseline": "the same conv classifier on the canvas without the transformer, trained alike",
         "baseline_seconds": base_time.seconds})))

    with Timer() as ram_time:
        ram = new_ram(seed)
        losses = train_ram(ram, train_set, seed, RAM_EPOCHS,
                           on_epoch=epoch_progress(on_progress, "ram digits", RAM_EPOCHS))
    ram_acc = accuracy(ram, test_set.images, test_set.labels, logits_of=lambda out: out[0])
    on_digit = glimpses_on_digit(ram, test_set)
    if on_progress:
        on_progress(f"ram digits: held-out accuracy {ram_acc:.4f} at the policy's mean "
                    f"({on_digit:.0%} of glimpses on the digit)")
    results.append(save_result(ram, out_dir, TrainResult(
        TASK, "ram", "digits", checkpoint_path(out_dir, "ram", "digits"),
        {"accuracy": ram_acc, "glimpses_on_digit": on_digit, "final_loss": losses[-1]},
        ram_time.seconds, seed,
        {"labels": list(LABELS), **sizes, "epochs": RAM_EPOCHS, "location_policy": "mean",
         "location_std": ram.cfg.location_std})))
    return results


__all__ = ["CANVAS", "LABELS", "MODELS", "Canvases", "held_out", "make_canvases", "train", "write_samples"]
