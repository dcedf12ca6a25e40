"""What the client costs before the server sees a request, and what shared memory saves.

    python benchmarks/client.py

1. Client-side overhead per request: decoding (JPEG), preprocessing as the spec says and
   serialising into a gRPC request, for one 640x480 JPEG image (ViT-B/16's 224 input)
   and one 16-frame 320x240 clip (16 x 3 x 224 x 224), medians of --repeats runs.
2. Shared memory vs plain transfer for a 32 x 3 x 224 x 224 float32 clip (19.3 MB) on a
   real server: a ViViT factorised encoder of that input size but one narrow layer, so
   the model's own time is small next to moving the tensor; the difference of the
   medians is the transfer saved (same host: shared memory needs it).
Results go to benchmarks/results/client.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from attnserve.bench.latency import machine_info, median_ms
from attnserve.client import Client
from attnserve.client._core import pixels
from attnserve.client.media import load_image
from attnserve.export import export_onnx
from attnserve.imaging import encode_jpeg
from attnserve.models import get_spec
from attnserve.serving import ServingPolicy, TritonServer, build_repository

ROOT = Path(__file__).resolve().parents[1]


def scene(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / (13 + 5 * c) + y / (17 + c)) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def serialise(array: np.ndarray) -> None:
    t = grpcclient.InferInput("x", list(array.shape), "FP32")
    t.set_data_from_numpy(array)


def overhead(repeats: int) -> dict:
    image_spec = get_spec("vit", "b16")
    jpeg = encode_jpeg(scene(480, 640, 0), 90)
    frames = [scene(240, 320, t) for t in range(16)]

    def image_request():
        serialise(pixels(image_spec, [load_image(jpeg)]))

    def clip_request():
        serialise(pixels(image_spec, frames)[None])

    return {
        "image_decode_ms": median_ms(lambda: load_image(jpeg), repeats),
        "image_preprocess_ms": median_ms(lambda: pixels(image_spec, [load_image(jpeg)]), repeats),
        "image_total_ms": median_ms(image_request, repeats),
        "clip16_preprocess_ms": median_ms(lambda: pixels(image_spec, frames), repeats),
        "clip16_total_ms": median_ms(clip_request, repeats),
    }


def shared_memory(repeats: int, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = export_onnx("vivit", tmp / "export", config="tiny_fe", img_size=224, num_frames=32,
                             tubelet=(2, 16, 16), embed_dim=32, depth=1, temporal_depth=1, num_heads=2,
                             parity_batch_sizes=(1,))
        repo = build_repository([export.out_dir], tmp / "repo", flavor="python",
                                policy=ServingPolicy(dynamic_batching=False), names=["clip"])
        clip = export.spec.example_inputs(batch_size=1, seed=0)
        with TritonServer(repo, python=python, log_file=tmp / "server.log", strict=True) as server, \
                Client(server.grpc_url, timeout_s=120) as client:
            plain = client.infer("clip", clip)["logits"]
            shared = client.infer("clip", clip, shared_memory=True)["logits"]
            assert np.array_equal(plain, shared), "shared memory changed the answer"
            rounds = {"plain": [], "shared": []}
            for _ in range(repeats):  # interleaved: drift hits both
                for mode in rounds:
                    start = time.perf_counter()
                    client.infer("clip", clip, shared_memory=mode == "shared")
                    rounds[mode].append(time.perf_counter() - start)
    p50 = {m: float(np.median(v) * 1e3) for m, v in rounds.items()}
    return {"clip_mb": clip["video"].nbytes / 1e6, "plain_p50_ms": p50["plain"],
            "shared_p50_ms": p50["shared"], "saved_ms": p50["plain"] - p50["shared"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    args = parser.parse_args()
    results = {"machine": machine_info(0), "overhead": overhead(args.repeats),
               "shared_memory": shared_memory(args.repeats, args.python)}
    out = ROOT / "benchmarks" / "results" / "client"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    o, s = results["overhead"], results["shared_memory"]
    machine = results["machine"]
    md = ["# Client-side costs", "",
          f"Machine: {machine['cpu']}, {machine['cores']} cores. Command: `python benchmarks/client.py`", "",
          "| per request (medians, ms) | decode | preprocess (incl. decode) | + serialise (total) |",
          "|---|---|---|---|",
          f"| one 640x480 JPEG -> 3x224x224 | {o['image_decode_ms']:.2f} | "
          f"{o['image_preprocess_ms']:.2f} | {o['image_total_ms']:.2f} |",
          f"| 16 frames 320x240 -> 16x3x224x224 | - | {o['clip16_preprocess_ms']:.2f} | "
          f"{o['clip16_total_ms']:.2f} |", "",
          f"Shared memory vs plain gRPC for a 32x3x224x224 float32 clip ({s['clip_mb']:.1f} MB), end to "
          f"end on a one-layer ViViT: plain {s['plain_p50_ms']:.1f} ms, shared memory "
          f"{s['shared_p50_ms']:.1f} ms (p50), {s['saved_ms']:.1f} ms saved per request."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
