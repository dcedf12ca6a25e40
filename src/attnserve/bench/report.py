"""Benchmark reports a person wants to read: JSON (schema `attnserve.bench/2`), a
Markdown table, PNG plots (latency against batch size per backend; throughput against
concurrency for Triton), and the comparison of two runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from attnserve.bench.latency import SCHEMA, BenchmarkResult
from attnserve.bench.roofline import floor_ms
from attnserve.errors import AttnserveError


def markdown(result: BenchmarkResult, baseline: str = "torch") -> str:
    m = result.machine
    versions = ", ".join(f"{k} {m[k]}" for k in ("onnxruntime", "openvino", "torch", "tensorrt") if k in m)
    lines = [f"# {result.model} ({result.config})", "",
             f"{m.get('cpu')}, {m.get('cores')} cores, {result.threads} threads; "
             f"GPU: {m.get('gpu') or 'none'}; {versions}", ""]
    gflop, peak = result.settings.get("gflop_per_sample"), m.get("matmul_gflops")
    if gflop and peak:
        lines += [f"Compute floor: {gflop:.3g} GFLOP per sample (matmuls and convolutions counted) at the "
                  f"{peak:.0f} GFLOP/s fp32 matmul rate measured here: no fp32 backend can run batch 1 "
                  f"faster than {floor_ms(gflop, peak):.3g} ms.", ""]
    lines += ["| backend | precision | batch | conc. | p50 ms | p90 ms | p99 ms | samples/s | vs eager "
              "| % of matmul rate | host MB | stable | outputs |", "|---" * 13 + "|"]
    for r in result.rows:
        base = result.row(baseline, r.batch_size)
        ratio = f"{r.p50_ms / base.p50_ms:.2f}x" if base and r.concurrency == 1 else "-"
        stable = "yes" if r.stable else f"no ({r.spread:.0%} apart)" if r.spread >= 0 else "no (< 3 windows)"
        memory = f"{r.rss_mb:.0f}" if r.rss_mb is not None else "-"
        outputs = "ok" if r.correct else f"WRONG (max abs err {r.max_abs_error:.2g})"
        rate = f"{gflop * r.throughput / peak:.0%}" if gflop and peak and r.precision == "fp32" else "-"
        lines.append(f"| {r.backend} | {r.precision} | {r.batch_size} | {r.concurrency} | {r.p50_ms:.2f} | "
                     f"{r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.throughput:.1f} | {ratio} | {rate} | {memory} "
                     f"| {stable} | {outputs} |")
    lines += ["", "`vs eager`: median latency relative to the eager model at the same batch (lower is "
              "faster). `% of matmul rate`: the model's counted GFLOP per second over the machine's fp32 "
              "matmul rate (near 100% the backend is at the compute floor). Rows marked WRONG failed the "
              "output check against eager and are not comparable."]
    return "\n".join(lines) + "\n"


def plots(result: BenchmarkResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    local = [r for r in result.rows if r.concurrency == 1 and not r.backend.startswith("triton")]
    if local:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r.backend, r.precision) for r in local}):
            rows = sorted((r for r in local if (r.backend, r.precision) == key), key=lambda r: r.batch_size)
            ax.plot([r.batch_size for r in rows], [r.p50_ms for r in rows], marker="o", label=" ".join(key))
        ax.set(xlabel="batch size", ylabel="p50 latency (ms)", title=f"{result.model} ({result.config})",
               xscale="log", yscale="log")
        ax.legend()
        written.append(_save(fig, out_dir / "latency_vs_batch.png"))
    served = [r for r in result.rows if r.backend.startswith("triton")]
    if served:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r.backend, r.batch_size) for r in served}):
            rows = sorted((r for r in served if (r.backend, r.batch_size) == key),
                          key=lambda r: r.concurrency)
            ax.plot([r.concurrency for r in rows], [r.throughput for r in rows], marker="o",
                    label=f"{key[0]} batch {key[1]}")
        ax.set(xlabel="concurrent clients", ylabel="samples/s", title=f"{result.model}: Triton throughput",
               xscale="log")
        ax.legend()
        written.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(result: BenchmarkResult, out_dir: str | Path) -> list[Path]:
    """result.json, report.md and the plots, in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / "report.md").write_text(markdown(result))
    return [out / "result.json", out / "report.md", *plots(result, out)]


def load_result(path: str | Path) -> BenchmarkResult:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AttnserveError(f"cannot read {path} as a benchmark result ({e})") from None
    if d.get("schema") != SCHEMA:
        raise AttnserveError(f"{path} is not an attnserve benchmark result of schema {SCHEMA} "
                             f"(found {d.get('schema')!r})")
    return BenchmarkResult.from_dict(d)


def compare(before: BenchmarkResult, after: BenchmarkResult, noise: float = 0.05) -> str:
    """Markdown: each row both runs have, its medians, and whether it got faster or
    slower by more than the noise (the larger of `noise` and either row's window spread)."""
    lines = [f"# {before.model} ({before.config}): before -> after", "",
             "| backend | precision | batch | conc. | p50 before | p50 after | change | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for a in before.rows:
        b = after.row(a.backend, a.batch_size, a.precision, a.concurrency)
        if b is None:
            continue
        change = b.p50_ms / a.p50_ms - 1
        margin = max(noise, a.spread, b.spread)
        verdict = "faster" if change < -margin else "slower" if change > margin else "same (within noise)"
        if not (a.correct and b.correct):
            verdict = "not comparable (wrong outputs)"
        lines.append(f"| {a.backend} | {a.precision} | {a.batch_size} | {a.concurrency} | {a.p50_ms:.2f} | "
                     f"{b.p50_ms:.2f} | {change:+.1%} | {verdict} |")
    return "\n".join(lines) + "\n"


def zoo_markdown(results: Sequence[BenchmarkResult], backend: str = "ort", baseline: str = "torch") -> str:
    """One row per model: the baseline's and the backend's medians at the first batch
    size, and the models where the backend is slower (beyond noise) or failed."""
    lines = ["| model | config | GFLOP | eager p50 ms | " + backend + " p50 ms | ratio | outputs |",
             "|---|---|---|---|---|---|---|"]
    slower = []
    for r in results:
        if "error" in r.settings:
            lines.append(f"| {r.model} | {r.config} | - | - | - | - | failed: {r.settings['error']} |")
            continue
        base = next((x for x in r.rows if x.backend == baseline), None)
        row = next((x for x in r.rows if x.backend == backend), None)
        if base is None or row is None:
            continue
        ratio = row.p50_ms / base.p50_ms
        if ratio > 1 + max(0.05, base.spread, row.spread):
            slower.append(r.model)
        gflop = r.settings.get("gflop_per_sample")
        lines.append(f"| {r.model} | {r.config} | {f'{gflop:.3g}' if gflop else '-'} | {base.p50_ms:.2f} | "
                     f"{row.p50_ms:.2f} | {ratio:.2f}x | "
                     f"{'ok' if row.correct else 'WRONG'} |")
    lines += ["", f"{backend} slower than eager beyond noise: {', '.join(slower) if slower else 'none'}."]
    return "\n".join(lines) + "\n"
