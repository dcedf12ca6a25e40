"""Triton through the client: a python-flavor repository of the export, a real server,
batch-1..N requests from C client threads for a fixed time, with dynamic batching on
("triton") and off ("triton-nobatch"). Outputs are checked against the reference before
any timing, as for in-process backends."""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from attnserve.bench.latency import LatencyStats
from attnserve.compare import compare_outputs
from attnserve.spec import ModelSpec


def triton_rows(export_dir: Path, spec: ModelSpec, batch_sizes: Sequence[int], concurrency: Sequence[int],
                reference: Callable[[Mapping[str, np.ndarray]], dict], *, precision: str = "fp32",
                seconds: float = 5.0, python: str | None = None,
                on_progress: Callable[[str], None] | None = None) -> list[LatencyStats]:
    from attnserve.client import Client
    from attnserve.serving import ServingPolicy, TritonServer, build_repository

    rows = []
    biggest = max(max(batch_sizes), 1)
    with tempfile.TemporaryDirectory(prefix="attnserve-bench-triton-") as tmp:
        for batching in (True, False):
            backend = "triton" if batching else "triton-nobatch"
            policy = ServingPolicy(max_batch_size=max(16, biggest), preferred_batch_sizes=(4, 8, 16),
                                   max_queue_delay_us=2000, dynamic_batching=batching)
            repo = build_repository([export_dir], Path(tmp) / backend, flavor="python", policy=policy,
                                    names=["model"])
            log = Path(tmp) / f"{backend}.log"
            with TritonServer(repo, python=python, log_file=log, strict=True) as server:
                for batch in batch_sizes:
                    feed = spec.example_inputs(batch, seed=batch)
                    with Client(server.grpc_url, timeout_s=300) as client:
                        got = client.infer("model", feed)
                    report = compare_outputs(reference(feed), got, spec.tolerance(precision))
                    err = max((o.max_abs_error for o in report.outputs), default=0.0)
                    for c in concurrency:
                        if on_progress:
                            on_progress(f"{backend}: batch {batch}, concurrency {c}")
                        samples, done, elapsed = drive_clients(server.grpc_url, "model", feed, c, seconds)
                        row = LatencyStats.from_samples(backend, batch, samples, report.passed, err,
                                                        precision=precision, concurrency=c, windows=1,
                                                        stable=True, note="through gRPC, python flavor")
                        rows.append(dataclasses.replace(row, throughput=done * batch / elapsed))
    return rows


def drive_clients(url: str, model: str, feed: Mapping[str, np.ndarray], concurrency: int, seconds: float):
    """`concurrency` threads send `feed` to `model` back to back for `seconds`:
    (latencies in s, requests answered, wall seconds)."""
    from attnserve.client import Client

    stop = time.perf_counter() + seconds
    samples: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []

    def worker(i: int) -> None:
        with Client(url, timeout_s=300) as client:
            client.infer(model, feed)  # connection and first-call costs stay out of the figures
            try:
                while (t0 := time.perf_counter()) < stop:
                    client.infer(model, feed)
                    samples[i].append(time.perf_counter() - t0)
            except Exception as e:
                errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    flat = [s for per in samples for s in per]
    return flat, len(flat), elapsed
