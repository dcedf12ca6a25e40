"""The Runner protocol: named numpy arrays in, named numpy arrays out.

Public methods validate and keep state; subclasses do the work in `_run` and `_close`
(as Polygraphy's runners do). Every runner is a context manager and times its own
calls, so the benchmark and the CLI measure backends the same way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from attnserve.errors import InputError
from attnserve.spec import CACHE_AXIS, TensorSpec


class Runner:
    """Base class of every backend.

    Subclasses set `backend`, fill `self.inputs` / `self.outputs` (TensorSpecs in graph
    order) in `__init__`, and implement `_run(feed) -> dict`.
    """

    backend = "base"

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.last_latency_s: float | None = None
        self._closed = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises InputError (listing every problem) on a bad feed."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed")
        feed = self.validate(inputs)
        start = time.perf_counter()
        out = self._run(feed)
        self.last_latency_s = time.perf_counter() - start
        return out

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes, ranks, fixed sizes, and that a named dynamic axis has
        one size across all inputs; return the feed as contiguous arrays."""
        problems = []
        missing = [n for n in self.input_names if n not in inputs]
        unexpected = [n for n in inputs if n not in self.input_names]
        if missing:
            problems.append(f"missing input(s) {', '.join(missing)}")
        if unexpected:
            problems.append(
                f"unexpected input(s) {', '.join(unexpected)} (the model takes "
                f"{', '.join(self.input_names)})"
            )
        axis_sizes: dict[str, tuple[int, str]] = {}
        feed = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                continue
            value = inputs[spec.name]
            if not isinstance(value, np.ndarray):
                problems.append(f"{spec.name} is a {type(value).__name__}, expected a numpy array")
                continue
            if value.dtype != np.dtype(spec.dtype):
                problems.append(f"{spec.name} has dtype {value.dtype}, expected {spec.dtype}")
            if not spec.matches(value.shape):
                problems.append(
                    f"{spec.name} has shape {tuple(value.shape)}, expected {spec.describe_shape()}"
                )
            else:
                for axis, dim_name in spec.dynamic_axes.items():
                    size = value.shape[axis]
                    seen = axis_sizes.setdefault(dim_name, (size, spec.name))
                    if seen[0] != size:
                        problems.append(
                            f"axis {dim_name!r} is {size} in {spec.name} but {seen[0]} in {seen[1]}"
                        )
                    elif size == 0 and dim_name != CACHE_AXIS:
                        problems.append(f"{spec.name} has an empty axis {dim_name!r}")
            feed[spec.name] = np.ascontiguousarray(value)
        if problems:
            raise InputError(f"bad input to the {self.backend} runner: " + "; ".join(problems))
        return feed

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        pass
