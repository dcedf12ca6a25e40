"""Run in the timm reference environment (.venv-ref): build timm models with random
weights, and write, per model, the state dict, an input batch and timm's output.

    python timm_reference.py OUT_DIR timm_name[@img_size] | torchvision:name | transformers:case[@hub] ...

writes OUT_DIR/<entry>.safetensors (the weights) and OUT_DIR/<entry>.npz (`images`,
`logits`; transformers' video models: `video`, `logits`, see transformers_reference.py). With @img_size, the weights are those of the model at its default size and
the output is timm's model built at img_size with timm's own checkpoint filter (which
resamples the position embedding): the test checks our interpolation against it.
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
    for i, entry in enumerate(sys.argv[2:]):
        if entry.startswith("transformers:"):
            import transformers_reference  # beside this file

            transformers_reference.write(entry, out_dir, seed=1234 + i)
            continue
        name, _, size = entry.partition("@")
        torch.manual_seed(1234 + i)
        if name.startswith("torchvision:"):
            import torchvision

            model = getattr(torchvision.models, name.split(":")[1])(weights=None).eval()
            model.pretrained_cfg = {"input_size": (3, 224, 224)}
        else:
            model = timm.create_model(name, pretrained=False).eval()
        # Random init leaves some parameters at constants (zero-init BN gammas, LayerScale
        # 1e-5); perturb every saved float tensor so that each one affects the output.
        # Only what the state dict holds: non-persistent buffers (Swin's attention masks)
        # are rebuilt by the loading side, so changing them here would fake a mismatch.
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t) * 0.02)
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.abs_().add_(0.5)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if size:
            model = timm.create_model(name, pretrained=False, img_size=int(size)).eval()
            module = sys.modules[type(model).__module__]
            model.load_state_dict(module.checkpoint_filter_fn(dict(sd), model))
        input_size = model.pretrained_cfg["input_size"][:1] + ((int(size),) * 2 if size else ())
        input_size = input_size if size else model.pretrained_cfg["input_size"]
        images = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(i))
        with torch.inference_mode():
            logits = model(images)
        save_file(sd, str(out_dir / f"{entry}.safetensors"))
        np.savez(out_dir / f"{entry}.npz", images=images.numpy(), logits=logits.numpy())
        print(entry, tuple(images.shape), tuple(logits.shape), flush=True)


if __name__ == "__main__":
    main()
