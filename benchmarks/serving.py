"""Serving overhead and throughput on a real Triton server.

    python benchmarks/serving.py                     # ViT-S/16, python flavor
    python benchmarks/serving.py --config ti16 --duration 5

Exports the model (random weights; latency does not depend on them), then:
1. latency at batch 1: --requests sequential requests through Triton over gRPC against
   the same number of in-process ONNX Runtime runs, interleaved in rounds so drift in
   the machine's speed hits both; p50 and p99 and the difference of the medians, which
   is what serving costs (gRPC, the server's scheduling, the Python backend's IPC);
2. throughput: C client threads (C = 1, 4, 16) each sending batch-1 requests back to
   back for --duration seconds, against a repository with dynamic batching on and one
   with it off (same model, same server binary).

On a 2-core machine the clients, the server and ONNX Runtime's threads share the cores,
so the absolute throughput is this machine's; the on/off ratio is the figure to read.
Results go to benchmarks/results/serving-<model>-<config>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from attnserve import runtime
from attnserve.bench.latency import machine_info
from attnserve.bench.triton import drive_clients
from attnserve.export import export_onnx
from attnserve.serving import ServingPolicy, TritonServer, build_repository

ROOT = Path(__file__).resolve().parents[1]


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def grpc_request(client, name: str, x: np.ndarray):
    t = grpcclient.InferInput("images", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return client.infer(name, [t]).as_numpy("logits")


def latency(server: TritonServer, name: str, export_dir: Path, x: np.ndarray, requests: int) -> dict:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    triton, ort = [], []
    with runtime.load(export_dir) as runner:
        want = runner.run({"images": x})["logits"]
        got = grpc_request(client, name, x)
        assert np.allclose(got, want, atol=1e-4), "the server's answer differs from in-process ONNX Runtime"
        for _ in range(3):  # warm both paths
            runner.run({"images": x})
            grpc_request(client, name, x)
        for _ in range(requests // 10):
            for _ in range(10):
                start = time.perf_counter()
                grpc_request(client, name, x)
                triton.append(time.perf_counter() - start)
            for _ in range(10):
                start = time.perf_counter()
                runner.run({"images": x})
                ort.append(time.perf_counter() - start)
    t, o = percentiles(triton), percentiles(ort)
    return {"triton_grpc": t, "ort_in_process": o, "overhead_p50_ms": t["p50_ms"] - o["p50_ms"]}


def throughput(server: TritonServer, name: str, x: np.ndarray, concurrency: int, duration_s: float) -> dict:
    samples, count, elapsed = drive_clients(server.grpc_url, name, {"images": x}, concurrency, duration_s)
    return {"concurrency": concurrency, "requests": count, "seconds": elapsed, "infer_per_s": count / elapsed,
            **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit")
    parser.add_argument("--config", default="s16")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = export_onnx(args.model, tmp / "export", config=args.config, parity_batch_sizes=(1,))
        name = f"{args.model}-{args.config}"
        x = export.spec.example_inputs(batch_size=1, seed=0)["images"]
        results = {"model": name, "machine": machine_info(0), "flavor": "python", "latency": None,
                   "throughput": {}}
        for batching in (True, False):
            policy = ServingPolicy(max_batch_size=16, preferred_batch_sizes=(4, 8, 16),
                                   max_queue_delay_us=2000, dynamic_batching=batching)
            repo = build_repository([export.out_dir], tmp / f"repo-{batching}", flavor="python",
                                    policy=policy)
            log = tmp / f"server-{batching}.log"
            with TritonServer(repo, python=args.python, log_file=log, strict=True) as s:
                if batching:
                    results["latency"] = latency(s, name, export.out_dir, x, args.requests)
                    print(json.dumps(results["latency"]))
                key = "dynamic_batching_on" if batching else "dynamic_batching_off"
                results["throughput"][key] = [throughput(s, name, x, c, args.duration) for c in levels]
                print(key, json.dumps(results["throughput"][key]))
    out = ROOT / "benchmarks" / "results" / f"serving-{name}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(report(results, args))
    print(out.with_suffix(".md").read_text())


def report(r: dict, args) -> str:
    lat = r["latency"]
    lines = [f"# Serving {r['model']} on Triton (python flavor, CPU)", "",
             f"Machine: {r['machine'].get('cpu', '?')}, {r['machine'].get('cores', '?')} cores. "
             f"Command: `python benchmarks/serving.py --model {args.model} --config {args.config}`", "",
             "## Batch 1 latency (ms)", "", "| path | p50 | p99 | n |", "|---|---|---|---|"]
    for key, label in (("triton_grpc", "Triton gRPC (python backend, ONNX Runtime inside)"),
                       ("ort_in_process", "ONNX Runtime in process")):
        p = lat[key]
        lines.append(f"| {label} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['n']} |")
    lines += ["", f"Serving overhead (difference of the medians): {lat['overhead_p50_ms']:.2f} ms.", "",
              "## Throughput, batch-1 requests (inferences/s)", "",
              "| concurrency | dynamic batching on | off | on/off | p50 ms on | p50 ms off |",
              "|---|---|---|---|---|---|"]
    on, off = r["throughput"]["dynamic_batching_on"], r["throughput"]["dynamic_batching_off"]
    for a, b in zip(on, off, strict=True):
        lines.append(f"| {a['concurrency']} | {a['infer_per_s']:.1f} | {b['infer_per_s']:.1f} | "
                     f"{a['infer_per_s'] / b['infer_per_s']:.2f} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} |")
    lines += ["", "Dynamic batching waits up to the queue delay (2 ms here) for company, which a lone client "
              "pays; with many clients it runs them as one batch. A batch-1 ViT-S/16 already keeps both "
              "cores of this machine busy, so there is little idle compute for batching to use here; the "
              "ratio is the figure to compare on other hardware."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
