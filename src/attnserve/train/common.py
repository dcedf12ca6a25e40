"""What every demo training task shares: seeding, the optimisation loop, held-out
evaluation and checkpoints written as ordinary files.

A task trains registered models at registered configs (e.g. `stn`, config `digits`) and
writes, per model, `<model>-<config>.safetensors` (the state dict, as any user's
checkpoint) and `<model>-<config>.json` (task, seed, held-out metrics, labels or
vocabulary file, training time). `attnserve export MODEL -c CONFIG --checkpoint FILE`
loads it like any other checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnserve.export.checkpoint import save_state_dict
from attnserve.models import create_model

Progress = Callable[[str], None]


@dataclass
class TrainResult:
    """One trained model: where its checkpoint is and how well it does on held-out data."""

    task: str
    model: str
    config: str
    checkpoint: Path
    metrics: dict[str, float]
    seconds: float
    seed: int
    extra: dict = field(default_factory=dict)  # labels, vocabulary file, data set sizes, ...

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = self.checkpoint.name
        return d

    @property
    def metadata_path(self) -> Path:
        return self.checkpoint.with_suffix(".json")


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch, Python and numpy; returns a numpy Generator of the same seed. Training
    is reproducible on one machine and thread count (torch's CPU kernels are
    deterministic for a fixed number of threads)."""
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def batches(arrays: tuple[np.ndarray, ...], batch_size: int, rng: np.random.Generator | None = None
            ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Mini-batches of rows of `arrays` (shuffled when `rng` is given), as tensors."""
    n = len(arrays[0])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield tuple(torch.from_numpy(np.ascontiguousarray(a[idx])) for a in arrays)


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor],
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, ...]]],
    num_epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    clip_norm: float | None = 5.0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with a one-cycle schedule over `num_epochs`; `epoch_batches(e)` gives epoch
    e's batches (each epoch the same number). Returns each epoch's mean training loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    first = list(epoch_batches(0))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=num_epochs * len(first),
                                                   pct_start=0.15)
    losses = []
    model.train()
    for epoch in range(num_epochs):
        total, count = 0.0, 0
        for batch in (first if epoch == 0 else epoch_batches(epoch)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            if clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            if schedule.last_epoch + 1 < schedule.total_steps:
                schedule.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


def epoch_progress(on_progress: Progress | None, name: str, epochs: int
                   ) -> Callable[[int, float], None] | None:
    """fit's on_epoch that reports "NAME epoch e/E: loss L" to `on_progress` (None: none)."""
    if on_progress is None:
        return None
    return lambda e, loss: on_progress(f"{name} epoch {e + 1}/{epochs}: loss {loss:.4f}")


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256,
             logits_of: Callable = lambda out: out) -> float:
    """Top-1 accuracy of `model` (eval mode) on held-out `images`."""
    model.eval()
    right = 0
    for x, y in batches((images, labels), batch_size):
        right += int((logits_of(model(x)).argmax(-1) == y).sum())
    return right / len(labels)


def new_model(name: str, config: str, seed: int) -> nn.Module:
    """The registered model at `config`, initialised from `seed`."""
    return create_model(name, config=config, seed=seed)


def save_result(model: nn.Module, out_dir: Path, result: TrainResult) -> TrainResult:
    """Write the checkpoint and its JSON beside it, each complete or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-", dir=out_dir) as tmp:
        staged = Path(tmp) / result.checkpoint.name
        save_state_dict(model, staged)
        staged.chmod(0o644)  # an ordinary file, readable by a server running as another user
        os.replace(staged, result.checkpoint)
    meta = result.metadata_path.with_suffix(".json.tmp")
    meta.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(meta, result.metadata_path)
    return result


def checkpoint_path(out_dir: Path, model: str, config: str) -> Path:
    return out_dir / f"{model}-{config}.safetensors"


def load_result(out_dir: Path, model: str, config: str) -> TrainResult | None:
    """A checkpoint written earlier by `save_result`, or None when there is none."""
    path = checkpoint_path(out_dir, model, config)
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    d = json.loads(meta.read_text())
    d["checkpoint"] = path
    return TrainResult(**d)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
