"""The Hugging Face transformers side of the reference environment (.venv-ref): build
transformers models with random weights and write, per entry, the state dict, an input
batch and transformers' output. Called by timm_reference.py for entries that start with
"transformers:".

    transformers:<case>[@hub]

<case> names a config below; the weights are saved as transformers 5 writes them
(`model.state_dict()`), or with @hub in the layout of the checkpoints on the Hub (written
by transformers 4). The @hub file is first loaded back by transformers' own
`from_pretrained`, whose key conversion must give the same weights: so the layout we
test our filter against is the one transformers itself reads as the Hub's.
"""

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# case -> (model class, config class, config arguments). The sizes mirror attnserve's
# configs: vivit_tiny is vivit `tiny`; vivit_base_4f is `base` (VivitConfig's defaults,
# google/vivit-b-16x2-kinetics400) on 4 frames instead of 32, to keep the run short.
CASES = {
    "vivit_tiny": ("VivitForVideoClassification", "VivitConfig", dict(
        image_size=32, num_frames=8, tubelet_size=[2, 8, 8], hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, num_labels=10)),
    "vivit_base_4f": ("VivitForVideoClassification", "VivitConfig", dict(num_frames=4, num_labels=400)),
}

# transformers 5 names -> the Hub's (transformers 4) names: the inverse of the "ViTModel"
# renames in transformers/conversion_mapping.py, which VivitModel uses.
_TO_HUB = [
    (r"\.layers\.(\d+)\.", r".encoder.layer.\1."),
    (r"\.attention\.([qkv])_proj\.", lambda m: ".attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)] + "."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def to_hub_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _TO_HUB:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def write(entry: str, out_dir: Path, seed: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights and local files only
    import transformers

    case, _, layout = entry.removeprefix("transformers:").partition("@")
    model_cls, config_cls, kwargs = CASES[case]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # transformers zero-initialises the class token, position embeddings and biases;
    # perturb every tensor so that each one affects the output.
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hub":
        sd = to_hub_layout(sd)
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            save_file(sd, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            again, info = getattr(transformers, model_cls).from_pretrained(tmp, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"transformers does not read our Hub layout cleanly: {problems}"
        theirs = again.state_dict()
        assert theirs.keys() == model.state_dict().keys()
        assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    elif layout:
        raise SystemExit(f"unknown layout {layout!r} in {entry!r}; known: hub")
    video = torch.randn(2, config.num_frames, config.num_channels, config.image_size, config.image_size,
                        generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        logits = model(pixel_values=video).logits
    save_file(sd, str(out_dir / f"{entry}.safetensors"))
    np.savez(out_dir / f"{entry}.npz", video=video.numpy(), logits=logits.numpy())
    print(entry, tuple(video.shape), tuple(logits.shape), flush=True)
