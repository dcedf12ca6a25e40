"""Latency benchmarks across backends.

`benchmark_model` takes a registered model name (exported on the fly into a temporary
directory, once per precision) or an export directory, opens it on each backend, checks
every backend's outputs against the eager model, then times them side by side
(`latency.benchmark_runners`); "triton" serves it on a real server and drives it through
the client (`triton.triton_rows`). `benchmark_zoo` does that for every registered model.
`report` writes JSON, Markdown and PNG plots, and compares two runs. Nothing here imports
torch unless the torch backend is asked for or a model must be exported first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from attnserve.bench.latency import (
    SCHEMA,
    BenchmarkResult,
    LatencyStats,
    benchmark_runners,
    machine_info,
    peak_rss_mb,
    rss_mb,
)
from attnserve.errors import AttnserveError

BENCH_BACKENDS = ("torch", "ort", "openvino", "trt", "triton")
PRECISIONS = ("fp32", "fp16")


def benchmark_model(
    source: str,
    backends: Sequence[str] = ("torch", "ort"),
    batch_sizes: Sequence[int] = (1, 8),
    *,
    config: str = "tiny",
    checkpoint: str | None = None,
    precisions: Sequence[str] = ("fp32",),
    concurrency: Sequence[int] = (1,),
    threads: int = 2,
    warmup: int = 5,
    iterations: int = 20,
    max_windows: int = 10,
    stability: float = 0.10,
    seconds: float | None = None,
    serve_python: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Benchmark `source` (a model name or an export directory) on `backends`."""
    from attnserve.artifact import read_artifact

    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown:
        raise AttnserveError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BENCH_BACKENDS)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise AttnserveError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if any(b < 1 for b in batch_sizes) or any(c < 1 for c in concurrency):
        raise AttnserveError(f"batch sizes and concurrency must be positive, got {list(batch_sizes)} "
                             f"and {list(concurrency)}")
    result: BenchmarkResult | None = None
    with tempfile.TemporaryDirectory(prefix="attnserve-bench-") as tmp:
        for precision in precisions:
            path = _export_for(source, precision, Path(tmp), config, checkpoint, on_progress)
            artifact = read_artifact(path)
            if artifact.spec is None:
                raise AttnserveError(f"{path} has no attnserve.json; benchmark an export directory")
            part = _measure(path, artifact, backends, batch_sizes, precision, concurrency, threads, warmup,
                            iterations, max_windows, stability, seconds, serve_python, on_progress)
            if result is None:
                result = part
            else:
                result.rows += part.rows
    result.machine["peak_rss_mb"] = peak_rss_mb()
    result.settings.update({"backends": list(backends), "batch_sizes": list(batch_sizes),
                            "precisions": list(precisions), "concurrency": list(concurrency)})
    return result


def _export_for(source: str, precision: str, tmp: Path, config: str, checkpoint: str | None,
                on_progress) -> Path:
    from attnserve.artifact import read_artifact

    path = Path(source)
    if path.exists():
        have = (read_artifact(path).manifest or {}).get("precision", "fp32")
        if have != precision:
            raise AttnserveError(f"{path} is a {have} export; export it with --fp16 to time {precision}")
        return path
    from attnserve.export import export_onnx

    if on_progress:
        on_progress(f"exporting {source} ({config}, {precision})")
    out = tmp / f"{source}-{precision}"
    export_onnx(source, out, config=config, checkpoint=checkpoint, fp16=precision == "fp16")
    return out


def _measure(path, artifact, backends, batch_sizes, precision, concurrency, threads, warmup, iterations,
             max_windows, stability, seconds, serve_python, on_progress) -> BenchmarkResult:
    from attnserve import runtime

    local = [b for b in backends if b != "triton"]
    runners, memory = {}, {}
    try:
        for b in local:
            before = rss_mb()
            runners[b] = runtime.load(path, backend=b, threads=threads)
            memory[b] = max(0.0, rss_mb() - before)
        result = benchmark_runners(
            runners, artifact.spec, batch_sizes, reference="torch" if "torch" in runners else None,
            warmup=warmup, iterations=iterations, max_windows=max_windows, stability=stability,
            seconds=seconds, threads=threads, precision=precision, memory=memory, on_progress=on_progress)
        if "torch" in runners:
            _add_roofline(result, runners["torch"], artifact.spec, threads, on_progress)
        if "triton" in backends:
            from attnserve.bench.triton import triton_rows

            reference = runners.get("torch") or runtime.load(path, backend="ort", threads=threads)
            result.rows += triton_rows(path, artifact.spec, batch_sizes, concurrency, reference.run,
                                       precision=precision, seconds=seconds or 5.0, python=serve_python,
                                       on_progress=on_progress)
            if "torch" not in runners:
                reference.close()
        return result
    finally:
        for r in runners.values():
            r.close()


def _add_roofline(result: BenchmarkResult, eager, spec, threads: int, on_progress) -> None:
    """The model's GFLOP per sample and the machine's fp32 matmul rate, so a report can
    say how far each backend is from the compute floor (see bench.roofline)."""
    from attnserve.bench.roofline import matmul_gflops, model_gflop

    if on_progress:
        on_progress("counting FLOPs and measuring the matmul rate")
    try:
        result.settings["gflop_per_sample"] = model_gflop(eager.model, spec.example_inputs(1, seed=1))
    except Exception as e:  # noqa: BLE001 - a diagnostic column must not cost the user the timings
        result.settings["gflop_error"] = f"{type(e).__name__}: {e}"
        return
    result.machine["matmul_gflops"] = matmul_gflops(threads)


def benchmark_zoo(models: Sequence[str] | None = None, config: str = "tiny", backends=("torch", "ort"),
                  batch: int = 1, on_progress: Callable[[str], None] | None = None,
                  **kwargs) -> list[BenchmarkResult]:
    """Every registered model (or `models`) at `config`, one result each; a model that
    fails to export or load gets a result with no rows and the reason in settings."""
    from attnserve.models import list_models

    results = []
    for name in models or list_models():
        if on_progress:
            on_progress(f"{name} ({config})")
        try:
            results.append(benchmark_model(name, backends, (batch,), config=config, **kwargs))
        except AttnserveError as e:
            threads = kwargs.get("threads", 2)
            results.append(BenchmarkResult(name, config, threads, settings={"error": str(e)}))
    return results


__all__ = ["BENCH_BACKENDS", "SCHEMA", "BenchmarkResult", "LatencyStats", "benchmark_model",
           "benchmark_runners", "benchmark_zoo", "machine_info"]
