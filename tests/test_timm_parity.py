"""Checkpoints of the libraries users train with load into our models and give the same
outputs (fp32, max abs error <= 1e-5).

timm needs torchvision, which does not load beside the CPU build of torch 2.13, so the
library side runs in the reference environment `.venv-ref` (made by `make test`; see the
Makefile): it builds each model with random weights and writes the weights, an input
batch and its output; here we load those weights into our model and compare. The same
environment holds transformers, for the Hugging Face checkpoints (ViViT).
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve.models import create_model, get_entry, get_spec, list_models

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"

# reference entry -> (our model, config, config overrides)
CASES = {
    "vit_tiny_patch16_224": ("vit", "ti16", {}),
    "vit_small_patch32_224": ("vit", "s32", {}),
    "vit_tiny_patch16_224@384": ("vit", "ti16", {"img_size": 384}),  # pos-embed resampling
    "torchvision:vit_b_16": ("vit", "b16", {}),
    "deit_tiny_patch16_224": ("deit", "ti", {}),
    "deit_tiny_distilled_patch16_224": ("deit", "ti_distilled", {}),
    "cait_xxs24_224": ("cait", "xxs24", {}),
    "seresnet50": ("se_resnet", "resnet50", {}),
    "swin_tiny_patch4_window7_224": ("swin", "t", {}),
    # Hugging Face ViViT (model 1): transformers 5's key layout, and the Hub's (the
    # google/vivit-b-16x2-kinetics400 layout) at ViViT-B size on 4 frames instead of 32.
    "transformers:vivit_tiny": ("vivit", "tiny", {}),
    "transformers:vivit_base_4f@hub": ("vivit", "base", {"num_frames": 4}),
    # Hugging Face DETR (DetrForObjectDetection; logits and boxes): `tiny` with transformers'
    # ResNet backbone in transformers 5's layout; DETR-R50 in the Hub's layouts of
    # facebook/detr-resnet-50 (timm backbone) and of its "no_timm" revision (transformers'
    # ResNet), and with the timm backbone as transformers 5 saves it.
    "transformers:detr_tiny": ("detr", "tiny", {}),
    "transformers:detr_r50@hub": ("detr", "resnet50", {}),
    "transformers:detr_r50_timm@hub": ("detr", "resnet50", {}),
    "transformers:detr_r50_timm": ("detr", "resnet50", {}),
    # Hugging Face PVT v1 (PvtForImageClassification): our `tiny`, and PVT-Tiny in the
    # Hub's layout (Xrenya/pvt-tiny-224; transformers 4 and 5 write PVT alike).
    "transformers:pvt_tiny64": ("pvt", "tiny", {}),
    "transformers:pvt_tiny@hub": ("pvt", "pvt_tiny", {}),
}

pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(not REF_PYTHON.exists(), reason="no .venv-ref: run `make reference-env`"),
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("timm")
    subprocess.run([str(REF_PYTHON), str(ROOT / "tests/reference/timm_reference.py"), str(out), *CASES],
                   check=True, capture_output=True, text=True)
    return out


@pytest.mark.parametrize("entry", list(CASES))
def test_foreign_checkpoint_gives_the_same_outputs(entry, reference_dir):
    name, config, overrides = CASES[entry]
    model = create_model(name, config, checkpoint=str(reference_dir / f"{entry}.safetensors"), **overrides)
    data = np.load(reference_dir / f"{entry}.npz")
    spec = get_spec(name, config, **overrides)
    inputs = data[spec.input_names[0]]  # images, or video
    with torch.inference_mode():
        outputs = model(torch.from_numpy(inputs))
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    for output, got in zip(spec.output_names, outputs, strict=True):  # logits; DETR also boxes
        want = data[output]
        assert np.abs(got.numpy() - want).max() <= 1e-5, output
        assert np.abs(want).max() > 0.1, f"a degenerate reference {output} proves nothing"


def test_every_model_with_a_foreign_format_has_a_case():
    covered = {name for name, _, _ in CASES.values()}
    foreign = {n for n in list_models() if get_entry(n).checkpoint_formats}
    assert foreign <= covered, f"no reference case for {sorted(foreign - covered)}"


def test_original_swin_layout_is_mapped(reference_dir, tmp_path):
    """The authors' checkpoints keep patch merging at the end of the previous stage and
    the head unwrapped; rewrite timm's weights that way and load them."""
    import re

    from safetensors.torch import load_file, save_file

    sd = load_file(str(reference_dir / "swin_tiny_patch4_window7_224.safetensors"))
    original = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        original[k.replace("head.fc.", "head.")] = v.contiguous()
    assert "layers.0.downsample.reduction.weight" in original and "head.weight" in original
    save_file(original, str(tmp_path / "original.safetensors"))
    model = create_model("swin", "t", checkpoint=str(tmp_path / "original.safetensors"))
    data = np.load(reference_dir / "swin_tiny_patch4_window7_224.npz")
    with torch.inference_mode():
        logits = model(torch.from_numpy(data["images"])).numpy()
    assert np.abs(logits - data["logits"]).max() <= 1e-5
