"""Greedy decoding throughput, eager vs ONNX Runtime, and decoder-step cost vs length.

    python benchmarks/generation.py [--model luong_seq2seq] [--config global_general]

Exports the model once, then for batch 1 and 8 runs greedy search over the eager parts
(TorchRunner) and the exported parts (OrtRunner) on the same padded sources, checks the
tokens are identical, and reports generated tokens per second (medians of --repeats
runs). Then times one decoder step at growing source lengths: a recurrent decoder step
reads the whole source once per token, so its cost should grow linearly with the
source length and not at all with the number of tokens already generated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnserve import runtime
from attnserve.export import export_onnx
from attnserve.runtime.generate import greedy_search


def sources(batch: int, src_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, src_len - rng.integers(0, src_len // 2 + 1, size=batch)).astype(np.int64)
    src = rng.integers(4, vocab, size=(batch, src_len)).astype(np.int64)
    src[np.arange(src_len)[None] >= lengths[:, None]] = 0
    return {"src": src, "src_lengths": lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="luong_seq2seq")
    parser.add_argument("--config", default="global_general")
    parser.add_argument("--src-len", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, step_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        result = export_onnx(args.model, Path(tmp) / "m", config=args.config, parity_batch_sizes=(1,))
        vocab = result.spec.inputs[0].value_range[1]
        backends = {
            b: runtime.load_generator(result.out_dir, b, threads=args.threads) for b in ("torch", "ort")
        }
        for batch in (1, 8):
            feed = sources(batch, args.src_len, vocab)
            tokens = {}
            for backend, (encoder, step, config) in backends.items():
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    out = greedy_search(encoder, step, feed, config, max_length=args.max_length)
                    times.append(time.perf_counter() - start)
                tokens[backend] = [g.tokens for g in out]
                n = sum(len(t) for t in tokens[backend])
                rows.append(
                    {
                        "batch": batch,
                        "backend": backend,
                        "tokens": n,
                        "median_s": statistics.median(times),
                        "tokens_per_s": n / statistics.median(times),
                    }
                )
            rows[-1]["same_tokens_as_eager"] = tokens["ort"] == tokens["torch"]
        encoder, step, config = backends["ort"]
        for src_len in (10, 20, 40, 80):
            enc = encoder.run(sources(1, src_len, vocab))
            feed = {
                config.token_input: np.array([config.bos_id]),
                **{n: enc[n] for n in config.static + config.state},
            }
            times = []
            for _ in range(20):
                start = time.perf_counter()
                step.run(feed)
                times.append(time.perf_counter() - start)
            step_rows.append({"src_len": src_len, "step_ms": 1e3 * statistics.median(times)})
    lines = [
        f"{args.model} ({args.config}), greedy, {args.max_length} tokens max, source length {args.src_len}",
        "",
        "| batch | backend | tokens | median s | tokens/s | same tokens as eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['backend']} | {r['tokens']} | {r['median_s']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r.get('same_tokens_as_eager', '-')} |"
        )
    lines += ["", "| source length | ORT decoder step, median ms |", "|---|---|"]
    lines += [f"| {r['src_len']} | {r['step_ms']:.2f} |" for r in step_rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generation-{args.model}.md").write_text(table + "\n")
    (args.out / f"generation-{args.model}.json").write_text(
        json.dumps({"rows": rows, "steps": step_rows}, indent=2)
    )


if __name__ == "__main__":
    main()
