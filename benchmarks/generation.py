"""Greedy decoding throughput, eager vs ONNX Runtime, and decoder-step cost vs past length.

    python benchmarks/generation.py --model vit_captioner --config base
    python benchmarks/generation.py --model show_attend_tell --config base
    python benchmarks/generation.py --model bahdanau_seq2seq --config rnnsearch

Exports the model once (parity at batch 1), then for batch 1 and 8 runs greedy search
over the eager parts (TorchRunner) and the exported parts (OrtRunner) on the same
inputs (padded sources for translators, images for captioners), checks the tokens are
identical, and reports the encoder's time and generated tokens per second (medians of
--repeats runs; the encoder is timed inside the tokens/s too, as a user sees it).

A seeded ResNet-101 has activations in the hundreds (no trained batch-norm statistics),
where float32 round-off alone fails parity; models with batch norm therefore get their
statistics calibrated on random images first (train-mode passes), which gives them the
activation scale of a trained network. Latency does not depend on the weights.

Then it drives the exported decoder step for --past-steps tokens without stopping at
the end token and times every step: a recurrent step carries a fixed-size state, so its
cost should stay flat; a Transformer step attends over a key/value cache one entry
longer each time, so its cost should grow linearly with the past length.
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
from attnserve.export import export_onnx, save_state_dict
from attnserve.models import create_model
from attnserve.runtime.generate import greedy_search


def encoder_inputs(encoder, spec_inputs, batch: int, src_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Padded token sources (lengths src_len/2 .. src_len) or random normalised images."""
    rng = np.random.default_rng(seed)
    names = [t.name for t in spec_inputs]
    if "src_lengths" in names:
        vocab = spec_inputs[0].value_range[1]
        lengths = np.maximum(1, src_len - rng.integers(0, src_len // 2 + 1, size=batch)).astype(np.int64)
        src = rng.integers(4, vocab, size=(batch, src_len)).astype(np.int64)
        src[np.arange(src_len)[None] >= lengths[:, None]] = 0
        return {"src": src, "src_lengths": lengths}
    return {t.name: rng.standard_normal((batch, *t.shape[1:])).astype(np.float32) for t in encoder.inputs}


def calibrated_checkpoint(model_name: str, config: str, path: Path) -> Path | None:
    """Batch-norm statistics from train-mode passes over random images (None: no BN)."""
    model = create_model(model_name, config)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    encoder, spec = model.export_parts()["encoder"]
    model.train()
    with torch.no_grad():
        for seed in range(4):
            encoder(*(torch.from_numpy(v) for v in spec.example_inputs(8, seed=seed).values()))
    model.eval()
    return save_state_dict(model, path)


def timed(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def step_costs(encoder, step, config, feed, steps: int) -> list[dict]:
    """Per-step latency over `steps` greedy tokens, never stopping at the end token."""
    enc = encoder.run(feed)
    static = {n: enc[n] for n in config.static}
    state = {n: enc[n] for n in config.state}
    tokens = np.full(len(next(iter(enc.values()))), config.bos_id, dtype=np.int64)
    rows = []
    for t in range(steps):
        step_feed = {config.token_input: tokens, **static, **state}
        out = step.run(step_feed)  # a new shape: let the runtime settle its buffers first
        latencies = []
        for _ in range(5):  # the same step five times: its median is the cost at this length
            out = step.run(step_feed)
            latencies.append(step.last_latency_s)
        rows.append({"past_len": t, "step_ms": 1e3 * statistics.median(latencies)})
        tokens = out[config.logits_output].argmax(-1).astype(np.int64)
        state = {n: out[f"next_{n}"] for n in config.state}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_captioner")
    parser.add_argument("--config", default="base")
    parser.add_argument("--src-len", type=int, default=20, help="translators: source length")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--past-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = calibrated_checkpoint(args.model, args.config, Path(tmp) / "calibrated.safetensors")
        result = export_onnx(args.model, Path(tmp) / "m", config=args.config, checkpoint=checkpoint,
                             parity_batch_sizes=(1,))
        backends = {
            b: runtime.load_generator(result.out_dir, b, threads=args.threads) for b in ("torch", "ort")
        }
        for batch in (1, 8):
            feed = encoder_inputs(backends["ort"][0], result.spec.inputs, batch, args.src_len)
            tokens = {}
            for backend, (encoder, step, config) in backends.items():
                encoder_s, _ = timed(args.repeats, encoder.run, feed)
                total_s, out = timed(args.repeats, greedy_search, encoder, step, feed, config,
                                     max_length=args.max_length)
                tokens[backend] = [g.tokens for g in out]
                n = sum(len(t) for t in tokens[backend])
                rows.append({"batch": batch, "backend": backend, "tokens": n, "encoder_ms": 1e3 * encoder_s,
                             "median_s": total_s, "tokens_per_s": n / total_s})
            rows[-1]["same_tokens_as_eager"] = tokens["ort"] == tokens["torch"]
            rows[-1]["speedup"] = rows[-2]["median_s"] / rows[-1]["median_s"]
        encoder, step, config = backends["ort"]
        steps = min(args.past_steps, config.length_limit or args.past_steps)
        feed = encoder_inputs(encoder, result.spec.inputs, 1, args.src_len)
        step_rows = step_costs(encoder, step, config, feed, steps)
    lines = [
        f"{args.model} ({args.config}), greedy, at most {args.max_length} tokens, {args.threads} threads, "
        f"medians of {args.repeats} runs",
        "",
        "| batch | backend | tokens | encoder ms | total s | tokens/s | ORT speed-up | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        same = r.get("same_tokens_as_eager", "-")
        lines.append(
            f"| {r['batch']} | {r['backend']} | {r['tokens']} | {r['encoder_ms']:.1f} | "
            f"{r['median_s']:.3f} | {r['tokens_per_s']:.1f} | {speedup} | {same} |"
        )
    # The first step (an empty cache for the Transformers) is fitted out: a different path.
    fitted = step_rows[1:]
    slope, intercept = np.polyfit([r["past_len"] for r in fitted], [r["step_ms"] for r in fitted], 1)
    lines += ["", f"ORT decoder step at batch 1 against the tokens already generated (least-squares line "
                  f"over past lengths 1..{len(step_rows) - 1}: {intercept:.2f} ms + {1e3 * slope:.1f} us per "
                  "past token)", "",
              "| past length | step median ms |", "|---|---|"]
    shown = sorted({0, 1, 2, 4, 8, 16, len(step_rows) // 2, len(step_rows) - 1})
    lines += [f"| {step_rows[i]['past_len']} | {step_rows[i]['step_ms']:.2f} |" for i in shown]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generation-{args.model}.md").write_text(table + "\n")
    (args.out / f"generation-{args.model}.json").write_text(
        json.dumps({"model": args.model, "config": args.config, "rows": rows, "steps": step_rows}, indent=2)
    )


if __name__ == "__main__":
    main()
