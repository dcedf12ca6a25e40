"""Latency measurement across backends, side by side in one run.

Fairness: every backend gets the same inputs, thread count, batch size and precision;
its outputs are checked against the eager reference before any timing (a fast wrong
answer is reported as wrong, not fast); timing is interleaved, so drift on a noisy
machine hits every backend alike.

Stability (as perf_analyzer does it): timing runs in windows of `iterations` calls per
backend, interleaved, until the medians of the last three windows of every backend agree
within `stability` (10%: max/min - 1), or `max_windows` / `seconds` run out; the
statistics come from those last three windows, and a row says whether it was stable and
how far apart its windows were. No torch here: runners come from `attnserve.runtime`.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from attnserve.compare import compare_outputs
from attnserve.runtime.base import Runner
from attnserve.spec import ModelSpec

SCHEMA = "attnserve.bench/2"
STABLE_WINDOWS = 3


@dataclass(frozen=True)
class LatencyStats:
    """Per-call wall-clock latency in milliseconds, and throughput in samples/s.

    `stable` is False when the last three windows' medians were more than the stability
    threshold apart (`spread` = max/min - 1 of those medians); `rss_mb` is the host
    memory the backend added when it loaded and first ran (None when not measured)."""

    backend: str
    batch_size: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    throughput: float  # samples per second: batch / median latency, times concurrency
    correct: bool
    max_abs_error: float
    precision: str = "fp32"
    stable: bool = True
    spread: float = 0.0
    windows: int = 1
    rss_mb: float | None = None
    concurrency: int = 1
    note: str = ""

    @classmethod
    def from_samples(cls, backend: str, batch: int, samples_s: Sequence[float], correct: bool,
                     max_abs_error: float, **extra) -> LatencyStats:
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no timings")
        p50 = float(np.percentile(ms, 50))
        concurrency = extra.get("concurrency", 1)
        return cls(
            backend=backend, batch_size=batch, iterations=int(ms.size), mean_ms=float(ms.mean()),
            p50_ms=p50, p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)),
            min_ms=float(ms.min()), throughput=batch * concurrency / (p50 / 1e3), correct=correct,
            max_abs_error=max_abs_error, **extra,
        )


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `call` in ms over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e3)


def window_spread(medians: Sequence[float]) -> float:
    """max/min - 1 of the last three window medians (inf with fewer than three)."""
    last = list(medians)[-STABLE_WINDOWS:]
    if len(last) < STABLE_WINDOWS:
        return float("inf")
    return max(last) / min(last) - 1.0


@dataclass
class BenchmarkResult:
    model: str
    config: str
    threads: int
    rows: list[LatencyStats] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def row(self, backend: str, batch: int, precision: str = "fp32",
            concurrency: int = 1) -> LatencyStats | None:
        key = (backend, batch, precision, concurrency)
        matches = (r for r in self.rows if (r.backend, r.batch_size, r.precision, r.concurrency) == key)
        return next(matches, None)

    def ratio(self, backend: str, baseline: str, batch: int, precision: str = "fp32") -> float | None:
        """How many times faster `backend` is than `baseline` at `batch` (median)."""
        a, b = self.row(backend, batch, precision), self.row(baseline, batch, "fp32")
        return None if a is None or b is None else b.p50_ms / a.p50_ms

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "config": self.config, "threads": self.threads,
                "machine": self.machine, "settings": self.settings, "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping) -> BenchmarkResult:
        known = {f.name for f in fields(LatencyStats)}
        rows = [LatencyStats(**{k: v for k, v in r.items() if k in known}) for r in d.get("rows", [])]
        return cls(d["model"], d["config"], d.get("threads", 0), rows, d.get("machine", {}),
                   d.get("settings", {}))


def rss_mb() -> float:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def machine_info(threads: int) -> dict:
    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": _gpu_name(),
        "power_mode": _jetson_power_mode(),
    }
    for module in ("onnxruntime", "openvino", "torch", "tensorrt", "tritonclient", "numpy"):
        version = _version(module)
        if version:
            info[module] = version
    return info


def _version(module: str) -> str | None:
    import importlib.metadata as md

    names = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "tritonclient": ("tritonclient",),
             "tensorrt": ("tensorrt",), "openvino": ("openvino",), "torch": ("torch",), "numpy": ("numpy",)}
    for name in names[module]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def _gpu_name() -> str | None:
    """GPU and driver from nvidia-smi, or the Jetson model, when there is one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    try:
        with open("/proc/device-tree/model") as f:  # Jetson boards name themselves here
            return f.read().strip("\x00\n ")
    except OSError:
        return None


def _jetson_power_mode() -> str | None:
    """`nvpmodel -q` on a Jetson (latency depends on it); None elsewhere."""
    import shutil
    import subprocess

    if not shutil.which("nvpmodel"):
        return None
    out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True)
    return " ".join(out.stdout.split()) or None


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
    iterations: int = 20,
    max_windows: int = 10,
    stability: float = 0.10,
    seconds: float | None = None,
    threads: int = 0,
    precision: str = "fp32",
    memory: Mapping[str, float] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Time each runner at each batch size.

    Args:
        runners: backend name -> Runner, all for the same model.
        spec: the model's spec (inputs and tolerance).
        reference: the backend whose outputs the others must match before timing;
            None skips the check (every row is then marked correct).
        warmup: untimed calls per backend per batch size.
        iterations: timed calls per backend per window.
        max_windows, stability, seconds: stop when the last three windows of every
            backend agree within `stability`, after `max_windows`, or once `seconds`
            have passed at this batch size (then rows are marked unstable).
        memory: host MB each backend added when it loaded (added to its first run's).
    """
    result = BenchmarkResult(spec.name, spec.config, threads, machine=machine_info(threads),
                             settings={"warmup": warmup, "iterations": iterations, "max_windows": max_windows,
                                       "stability": stability, "seconds": seconds})
    grown = dict(memory or {})
    for batch in batch_sizes:
        feed = spec.example_inputs(batch, seed=batch)
        feeds = {b: _cast_feed(feed, r) for b, r in runners.items()}
        outputs = {}
        for backend, runner in runners.items():
            if on_progress:
                on_progress(f"batch {batch}: warming up {backend}")
            before = rss_mb()
            for _ in range(max(1, warmup)):
                outputs[backend] = runner.run(feeds[backend])
            if batch == batch_sizes[0]:
                grown[backend] = grown.get(backend, 0.0) + max(0.0, rss_mb() - before)
        checks = {}
        for backend, out in outputs.items():
            if reference is None or reference not in outputs or backend == reference:
                checks[backend] = (True, 0.0)
                continue
            report = compare_outputs(outputs[reference], out, spec.tolerance(precision))
            checks[backend] = (report.passed, max((o.max_abs_error for o in report.outputs), default=0.0))
        windows: dict[str, list[list[float]]] = {b: [] for b in runners}
        start = time.perf_counter()
        for w in range(max_windows):
            if on_progress:
                on_progress(f"batch {batch}: window {w + 1}")
            for backend, runner in runners.items():
                samples = []
                for _ in range(iterations):
                    t0 = time.perf_counter()
                    runner.run(feeds[backend])
                    samples.append(time.perf_counter() - t0)
                windows[backend].append(samples)
            spreads = {b: window_spread([np.median(s) for s in ws]) for b, ws in windows.items()}
            if all(s <= stability for s in spreads.values()):
                break
            if seconds is not None and time.perf_counter() - start > seconds:
                break
        for backend in runners:
            ok, err = checks[backend]
            ws = windows[backend]
            spread = float(window_spread([np.median(s) for s in ws]))
            last = [t for s in ws[-STABLE_WINDOWS:] for t in s]
            result.rows.append(LatencyStats.from_samples(
                backend, batch, last, bool(ok), float(err), precision=precision, stable=spread <= stability,
                spread=spread if np.isfinite(spread) else -1.0, windows=len(ws), rss_mb=grown.get(backend)))
    return result


def _cast_feed(feed: Mapping[str, np.ndarray], runner: Runner) -> dict[str, np.ndarray]:
    """The same values in the dtypes `runner` takes (an fp16 graph beside the fp32
    eager model), cast once, outside the timed calls."""
    dtypes = {t.name: np.dtype(t.dtype) for t in runner.inputs}
    return {k: v.astype(dtypes.get(k, v.dtype), copy=False) for k, v in feed.items()}
