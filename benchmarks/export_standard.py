"""Export time and ONNX size of standard (paper) configs, and ONNX Runtime vs eager at batch 1.

    python benchmarks/export_standard.py --exports detr:resnet50 pdan:charades --latency detr:resnet50

For every MODEL:CONFIG in --exports (MODEL alone: all its configs but tiny): export with the parity
check (two batch sizes, as `attnserve export` does), wall time of the whole export,
parameter count, and the size of model.onnx plus its external data. `--latency M:C`
then times eager and ONNX Runtime side by side at batch 1 for those exports with the
benchmark (`attnserve.bench.benchmark_model`, interleaved windows, outputs checked).
Results go to benchmarks/results/export-standard.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from attnserve.bench import benchmark_model
from attnserve.bench.latency import machine_info
from attnserve.export import export_onnx
from attnserve.models import create_model, get_entry

ROOT = Path(__file__).resolve().parents[1]


def export_figures(name: str, config: str, out: Path) -> dict:
    params = sum(p.numel() for p in create_model(name, config).parameters())
    start = time.perf_counter()
    result = export_onnx(name, out, config=config)
    seconds = time.perf_counter() - start
    files = [p for p in out.iterdir() if p.suffix in (".onnx", ".data")]
    return {"model": name, "config": config, "params_m": params / 1e6, "export_s": seconds,
            "onnx_mb": sum(p.stat().st_size for p in files) / 2**20, "parity": result.passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", nargs="+", required=True, metavar="MODEL[:CONFIG]")
    parser.add_argument("--latency", nargs="*", default=[], metavar="MODEL:CONFIG")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export-standard")
    args = parser.parse_args()

    rows, latency = [], []
    with tempfile.TemporaryDirectory(prefix="attnserve-export-") as tmp:
        for item in args.exports:
            name, _, only = item.partition(":")
            configs = [only] if only else [c for c in get_entry(name).configs if not c.startswith("tiny")]
            for config in configs:
                out = Path(tmp) / f"{name}-{config}"
                rows.append(export_figures(name, config, out))
                print(json.dumps(rows[-1]), flush=True)
        for item in args.latency:
            name, config = item.split(":")
            exported = Path(tmp) / f"{name}-{config}"  # reuse this run's export when there is one
            source = str(exported) if exported.exists() else name
            result = benchmark_model(source, ("torch", "ort"), (1,), config=config, iterations=10)
            torch_row, ort_row = result.row("torch", 1), result.row("ort", 1)
            latency.append({"model": name, "config": config, "eager_p50_ms": torch_row.p50_ms,
                            "ort_p50_ms": ort_row.p50_ms, "ratio": ort_row.p50_ms / torch_row.p50_ms,
                            "stable": torch_row.stable and ort_row.stable, "ort_correct": ort_row.correct,
                            "gflop": result.settings.get("gflop_per_sample")})
            print(json.dumps(latency[-1]), flush=True)

    doc = {"machine": machine_info(2), "exports": rows, "latency": latency}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Standard configs: export and ONNX Runtime vs eager", "",
             f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, 2 threads; "
             f"`python benchmarks/export_standard.py` (export time includes the parity check at two "
             f"batch sizes).", "",
             "| model | config | params (M) | export s | ONNX MB | parity |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['config']} | {r['params_m']:.2f} | {r['export_s']:.1f} | "
              f"{r['onnx_mb']:.1f} | {'ok' if r['parity'] else 'FAILED'} |" for r in rows]
    if latency:
        lines += ["", "| model | config | GFLOP | eager p50 ms | ORT p50 ms | ORT / eager | stable "
                  "| ORT outputs |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['config']} | {r['gflop'] or 0:.3g} | {r['eager_p50_ms']:.1f} | "
                  f"{r['ort_p50_ms']:.1f} | {r['ratio']:.2f}x | {'yes' if r['stable'] else 'no'} | "
                  f"{'ok' if r['ort_correct'] else 'WRONG'} |" for r in latency]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
