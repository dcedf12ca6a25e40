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
    # DETR: detr_tiny is detr `tiny` with transformers' own ResNet as backbone
    # (use_timm_backbone=False; random weights, nothing downloaded); detr_r50 is DETR-R50
    # (`resnet50`: 91 labels + no object) with the same backbone, the layout of
    # facebook/detr-resnet-50's "no_timm" revision; detr_r50_timm has timm's resnet50 as
    # backbone, the layout of facebook/detr-resnet-50 itself.
    "detr_tiny": ("DetrForObjectDetection", "DetrConfig", dict(
        use_timm_backbone=False, backbone_config=dict(
            model_type="resnet", embedding_size=16, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
            out_features=["stage4"]),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10, num_labels=10)),
    "detr_r50": ("DetrForObjectDetection", "DetrConfig", dict(use_timm_backbone=False, num_labels=91)),
    "detr_r50_timm": ("DetrForObjectDetection", "DetrConfig", dict(
        use_timm_backbone=True, backbone="resnet50", num_labels=91)),
    # pvt_tiny64 is pvt `tiny`; pvt_tiny is `pvt_tiny` (PvtConfig's defaults, Xrenya/pvt-tiny-224).
    "pvt_tiny64": ("PvtForImageClassification", "PvtConfig", dict(
        image_size=64, hidden_sizes=[16, 32, 40, 64], depths=[1, 1, 1, 1], num_labels=10)),
    "pvt_tiny": ("PvtForImageClassification", "PvtConfig", dict(num_labels=1000)),
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


# DETR: the inverse of the "DetrModel" renames in transformers/conversion_mapping.py.
_DETR_TO_HUB = [
    (r"^model\.backbone\.", "model.backbone.conv_encoder."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.layers\.(\d+)\.mlp\.(fc[12])\.", r".layers.\1.\2."),
]
HUB_RENAMES = {"DetrForObjectDetection": _DETR_TO_HUB}  # model class -> renames; else _TO_HUB

# Detection cases: the (height, width) of their input images, not square so that rows
# and columns cannot be confused.
DETECTION_IMAGE_SIZES = {"detr_tiny": (96, 128), "detr_r50": (160, 224), "detr_r50_timm": (160, 224)}


def to_hub_layout(sd: dict[str, torch.Tensor], renames=None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames or _TO_HUB:
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
        if case in DETECTION_IMAGE_SIZES:
            # DETR's frozen BatchNorm starts at the identity (mean 0, variance 1); give its
            # statistics values a mix-up of the four tensors would show. The heads' weights
            # (std 0.02) leave every box at about (0.5, 0.5, 0.5, 0.5): scale them up so
            # that boxes and logits spread.
            for name, t in model.state_dict().items():
                if name.endswith("running_var"):
                    t.uniform_(0.5, 2.0)
                elif name.endswith("running_mean"):
                    t.normal_(0.0, 0.2)
                elif name.startswith(("bbox_predictor.", "class_labels_classifier.")) and t.dim() == 2:
                    t.normal_(0.0, 2 * t.shape[1] ** -0.5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hub":
        sd = to_hub_layout(sd, HUB_RENAMES.get(model_cls))
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
    if case in DETECTION_IMAGE_SIZES:  # images in; class logits and normalised boxes out
        images = torch.randn(2, config.num_channels, *DETECTION_IMAGE_SIZES[case],
                             generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            out = model(pixel_values=images)
        save_file(sd, str(out_dir / f"{entry}.safetensors"))
        np.savez(out_dir / f"{entry}.npz", images=images.numpy(), logits=out.logits.numpy(),
                 boxes=out.pred_boxes.numpy())
        print(entry, tuple(images.shape), tuple(out.logits.shape), tuple(out.pred_boxes.shape), flush=True)
        return
    # Video models take (B, T, C, H, W) as `video`, image models (B, C, H, W) as `images`:
    # the names of attnserve's inputs.
    input_name = "video" if hasattr(config, "num_frames") else "images"
    frames = (config.num_frames,) if input_name == "video" else ()
    pixels = torch.randn(2, *frames, config.num_channels, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        logits = model(pixel_values=pixels).logits
    save_file(sd, str(out_dir / f"{entry}.safetensors"))
    np.savez(out_dir / f"{entry}.npz", **{input_name: pixels.numpy()}, logits=logits.numpy())
    print(entry, tuple(pixels.shape), tuple(logits.shape), flush=True)
