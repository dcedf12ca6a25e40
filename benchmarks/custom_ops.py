"""ONNX Runtime CPU timings of the custom ops' ONNX forms, side by side.

    python benchmarks/custom_ops.py [--iterations 30] [--out benchmarks/results]

1. Swin-T (224): the custom-op model run on its function bodies, the same model with
   the functions inlined (standard ops only), and the custom-op model with ONNX
   Runtime's fused MultiHeadAttention path (`OrtRunner(fused_custom_ops=True)`), with
   eager torch as the reference every output is checked against.
2. STN (affine, 60 x 60 cluttered-digits size): the fused AffineGridSampler node vs the
   grid generator as separate ops (torch's affine_grid, exported as plain ops) followed
   by a GridSampler node.

Prints a Markdown table of medians and ratios and writes it with the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from attnserve.bench import benchmark_runners
from attnserve.export import export_onnx
from attnserve.models import create_model, get_spec
from attnserve.models.stn import SpatialTransformerClassifier
from attnserve.ops import grid_sample
from attnserve.runtime.ort import OrtRunner
from attnserve.runtime.torch_runner import TorchRunner


class SeparateSamplerSTN(SpatialTransformerClassifier):
    """The same network with the grid generator and the sampler as two steps."""

    def transform(self, images):
        params = self.fc_loc(self.localization(images).flatten(1))
        size = (images.shape[0], images.shape[1], self.cfg.out_size, self.cfg.out_size)
        grid = F.affine_grid(params.reshape(-1, 2, 3), size, align_corners=False)
        return grid_sample(images, grid)


def _export_module(module, spec, path: Path, custom_ops: bool) -> Path:
    from attnserve.export.onnx_export import _torch_export

    path.parent.mkdir(parents=True, exist_ok=True)
    _torch_export(module, spec, path, 20, custom_ops)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. Swin-T: custom-op functions vs inlined standard ops.
        spec = get_spec("swin", "t")
        model = create_model("swin", "t")
        export_onnx("swin", tmp / "swin-custom", config="t", custom_ops=True)
        export_onnx("swin", tmp / "swin-plain", config="t", custom_ops=False)
        runners = {
            "torch": TorchRunner(model, spec, threads=args.threads),
            "ort functions": OrtRunner(tmp / "swin-custom" / "model.onnx", threads=args.threads),
            "ort inlined": OrtRunner(tmp / "swin-plain" / "model.onnx", threads=args.threads),
            "ort fused MHA": OrtRunner(tmp / "swin-custom" / "model.onnx", threads=args.threads,
                                       fused_custom_ops=True),
        }
        result = benchmark_runners(runners, spec, (1, 8), iterations=args.iterations, warmup=3,
                                   threads=args.threads)
        rows.append(("Swin-T 224", result, "ort inlined"))
        # 2. STN: fused affine grid sampler vs separate grid generator + sampler.
        spec = get_spec("stn", "affine")
        fused = create_model("stn", "affine", identity_init=False)
        separate = SeparateSamplerSTN(fused.cfg)
        separate.load_state_dict(fused.state_dict())
        separate.eval()
        runners = {
            "torch": TorchRunner(fused, spec, threads=args.threads),
            "ort fused": OrtRunner(_export_module(fused, spec, tmp / "stn-fused.onnx", True),
                                   threads=args.threads),
            "ort separate": OrtRunner(_export_module(separate, spec, tmp / "stn-sep.onnx", True),
                                      threads=args.threads),
        }
        result = benchmark_runners(runners, spec, (1, 8), iterations=args.iterations * 5, warmup=10,
                                   threads=args.threads)
        rows.append(("STN affine 60x60", result, "ort separate"))
    lines = ["| model | batch | backend | p50 ms | p90 ms | vs baseline | outputs |",
             "|---|---|---|---|---|---|---|"]
    for label, result, baseline in rows:
        for r in result.rows:
            ratio = result.ratio(r.backend, baseline, r.batch_size)
            lines.append(f"| {label} | {r.batch_size} | {r.backend} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | "
                         f"{ratio:.2f}x vs {baseline} | {'ok' if r.correct else 'WRONG'} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "custom_ops.md").write_text(table + "\n")
    (args.out / "custom_ops.json").write_text(json.dumps([r.to_dict() for _, r, _ in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
