"""Offline training of the demo models (`attnserve train TASK`): small data sets made
here, without a download, and a few minutes on two CPU cores per task.

- `digits`: scikit-learn's bundled 8 x 8 digits, upscaled and placed at random on a
  cluttered canvas, for `stn` (against the same classifier without the transformer) and
  `ram` (attnserve.train.digits);
- `captions`: images of coloured shapes with generated sentences, for `show_attend_tell`
  and `vit_captioner` (attnserve.train.captions);
- `actions`: videos of moving shapes written by OpenCV, for `vivit` and `nonlocal_i3d`
  (attnserve.train.actions).

Each task module has MODELS ((model, config) pairs it trains) and
`train(out_dir, seed, on_progress) -> list[TrainResult]`; common.py has what they share.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from attnserve.errors import InputError
from attnserve.train.common import Progress, TrainResult, load_result

TASKS = {
    "digits": "attnserve.train.digits",
    "captions": "attnserve.train.captions",
    "actions": "attnserve.train.actions",
}
DEFAULT_OUT = Path("out/checkpoints")


def task_module(task: str):
    if task not in TASKS:
        raise InputError(f"unknown training task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[task])


def train_task(task: str, out_dir: str | Path = DEFAULT_OUT, *, seed: int = 0, reuse: bool = True,
               on_progress: Progress | None = None) -> list[TrainResult]:
    """Train `task`'s models into `out_dir`, or, with `reuse`, return the checkpoints
    already there (trained with the same seed)."""
    module = task_module(task)
    out_dir = Path(out_dir)
    if reuse:
        found = [load_result(out_dir, m, c) for m, c in module.MODELS]
        if all(r is not None and r.seed == seed for r in found):
            return found
    return module.train(out_dir, seed=seed, on_progress=on_progress)


__all__ = ["TASKS", "TrainResult", "task_module", "train_task"]
