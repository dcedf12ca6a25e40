"""Latency benchmarks across backends.

`benchmark_model` takes a registered model name (exported on the fly into a temporary
directory) or an export directory, opens it on each backend, checks every backend's
outputs against the eager model, then times them side by side. Nothing here imports
torch unless the torch backend is asked for or a model must be exported first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from attnserve.bench.latency import BenchmarkResult, LatencyStats, benchmark_runners, machine_info
from attnserve.errors import AttnserveError


def benchmark_model(
    source: str,
    backends: Sequence[str] = ("torch", "ort"),
    batch_sizes: Sequence[int] = (1, 8),
    *,
    config: str = "tiny",
    checkpoint: str | None = None,
    threads: int = 2,
    warmup: int = 5,
    iterations: int = 50,
    rounds: int = 5,
    on_progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Benchmark `source` (a model name or an export directory) on `backends`."""
    from attnserve import runtime
    from attnserve.artifact import read_artifact

    unknown = [b for b in backends if b not in runtime.BACKENDS]
    if unknown:
        raise AttnserveError(
            f"unknown backend {unknown[0]!r}; choose from {', '.join(runtime.BACKENDS)}"
        )
    if any(b < 1 for b in batch_sizes):
        raise AttnserveError(f"batch sizes must be positive, got {list(batch_sizes)}")
    with tempfile.TemporaryDirectory(prefix="attnserve-bench-") as tmp:
        path = Path(source)
        if not path.exists():
            from attnserve.export import export_onnx

            if on_progress:
                on_progress(f"exporting {source} ({config})")
            export_onnx(source, Path(tmp) / source, config=config, checkpoint=checkpoint)
            path = Path(tmp) / source
        artifact = read_artifact(path)
        if artifact.spec is None:
            raise AttnserveError(f"{path} has no attnserve.json; benchmark an export directory")
        runners = {b: runtime.load(path, backend=b, threads=threads) for b in backends}
        try:
            return benchmark_runners(
                runners, artifact.spec, batch_sizes,
                reference="torch" if "torch" in runners else None,
                warmup=warmup, iterations=iterations, rounds=rounds, threads=threads,
                precision=artifact.manifest.get("precision", "fp32"), on_progress=on_progress,
            )
        finally:
            for r in runners.values():
                r.close()


__all__ = ["BenchmarkResult", "LatencyStats", "benchmark_model", "benchmark_runners", "machine_info"]
