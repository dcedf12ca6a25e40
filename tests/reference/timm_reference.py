"""Run in the timm reference environment (.venv-ref): build timm models with random
weights, and write, per model, the state dict, an input batch and timm's output.

    python timm_reference.py OUT_DIR timm_name [timm_name ...]

writes OUT_DIR/<timm_name>.safetensors (the weights) and OUT_DIR/<timm_name>.npz
(`images`, `logits`). The attnserve test loads the weights into our model and compares.
"""

import sys
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save_file


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for i, name in enumerate(sys.argv[2:]):
        torch.manual_seed(1234 + i)
        model = timm.create_model(name, pretrained=False).eval()
        # Random init leaves some parameters at constants (zero-init BN gammas, LayerScale
        # 1e-5); perturb every float tensor so that each one affects the output.
        with torch.no_grad():
            for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
                t.add_(torch.randn_like(t) * 0.02)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.abs_().add_(0.5)
        cfg = model.pretrained_cfg
        size = cfg["input_size"]
        images = torch.randn(2, *size, generator=torch.Generator().manual_seed(i))
        with torch.inference_mode():
            logits = model(images)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(out_dir / f"{name}.safetensors"))
        np.savez(out_dir / f"{name}.npz", images=images.numpy(), logits=logits.numpy())
        print(name, tuple(logits.shape), flush=True)


if __name__ == "__main__":
    main()
