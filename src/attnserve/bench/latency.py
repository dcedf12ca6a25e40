"""Latency measurement across backends, side by side in one run.

Fairness rules: every backend gets the same inputs and thread count; its outputs are
checked against the eager reference before any timing (a fast wrong answer is reported
as wrong, not fast); and timing is interleaved in rounds, so drift on a noisy machine
hits every backend alike. No torch here: runners come from `attnserve.runtime`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from attnserve.compare import compare_outputs
from attnserve.runtime.base import Runner
from attnserve.spec import ModelSpec


@dataclass(frozen=True)
class LatencyStats:
    """Per-call wall-clock latency in milliseconds, and throughput in samples/s."""

    backend: str
    batch_size: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    throughput: float  # samples per second at the median latency
    correct: bool
    max_abs_error: float

    @classmethod
    def from_samples(cls, backend: str, batch: int, samples_s: Sequence[float],
                     correct: bool, max_abs_error: float) -> LatencyStats:
        ms = np.asarray(samples_s) * 1e3
        p50 = float(np.percentile(ms, 50))
        return cls(
            backend=backend, batch_size=batch, iterations=len(ms), mean_ms=float(ms.mean()),
            p50_ms=p50, p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
            min_ms=float(ms.min()), throughput=batch / (p50 / 1e3), correct=correct,
            max_abs_error=max_abs_error,
        )


@dataclass
class BenchmarkResult:
    model: str
    config: str
    threads: int
    rows: list[LatencyStats] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def ratio(self, backend: str, baseline: str, batch: int) -> float | None:
        """How many times faster `backend` is than `baseline` at `batch` (median)."""
        by = {(r.backend, r.batch_size): r for r in self.rows}
        if (backend, batch) not in by or (baseline, batch) not in by:
            return None
        return by[(baseline, batch)].p50_ms / by[(backend, batch)].p50_ms

    def to_dict(self) -> dict:
        return {
            "model": self.model, "config": self.config, "threads": self.threads,
            "machine": self.machine, "rows": [asdict(r) for r in self.rows],
        }


def machine_info(threads: int) -> dict:
    import os

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def benchmark_runners(
    runners: Mapping[str, Runner],
    spec: ModelSpec,
    batch_sizes: Sequence[int],
    *,
    reference: str | None = "torch",
    warmup: int = 5,
    iterations: int = 50,
    rounds: int = 5,
    threads: int = 0,
    precision: str = "fp32",
    on_progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Time each runner at each batch size.

    Args:
        runners: backend name -> Runner, all for the same model.
        spec: the model's spec (inputs and tolerance).
        reference: the backend whose outputs the others must match before timing;
            None skips the check (every row is then marked correct).
        warmup: untimed calls per backend per batch size.
        iterations: timed calls per backend per batch size, split over `rounds`
            interleaved rounds.
    """
    result = BenchmarkResult(spec.name, spec.config, threads, machine=machine_info(threads))
    per_round = max(1, iterations // rounds)
    for batch in batch_sizes:
        feed = spec.example_inputs(batch, seed=batch)
        feeds = {b: _cast_feed(feed, r) for b, r in runners.items()}
        outputs = {}
        for backend, runner in runners.items():
            if on_progress:
                on_progress(f"batch {batch}: warming up {backend}")
            for _ in range(warmup):
                outputs[backend] = runner.run(feeds[backend])
        checks = {}
        for backend, out in outputs.items():
            if reference is None or reference not in outputs or backend == reference:
                checks[backend] = (True, 0.0)
                continue
            report = compare_outputs(outputs[reference], out, spec.tolerance(precision))
            checks[backend] = (report.passed, max(o.max_abs_error for o in report.outputs))
        samples: dict[str, list[float]] = {b: [] for b in runners}
        for r in range(rounds):
            if on_progress:
                on_progress(f"batch {batch}: timing round {r + 1}/{rounds}")
            for backend, runner in runners.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    runner.run(feeds[backend])
                    samples[backend].append(time.perf_counter() - start)
        for backend in runners:
            ok, err = checks[backend]
            result.rows.append(LatencyStats.from_samples(backend, batch, samples[backend], ok, err))
    return result


def _cast_feed(feed: Mapping[str, np.ndarray], runner: Runner) -> dict[str, np.ndarray]:
    """The same values in the dtypes `runner` takes (an fp16 graph beside the fp32
    eager model), cast once, outside the timed calls."""
    dtypes = {t.name: np.dtype(t.dtype) for t in runner.inputs}
    return {k: v.astype(dtypes.get(k, v.dtype), copy=False) for k, v in feed.items()}
