"""ViViT: the four models of the paper attend where the paper says they do, export with
parity, and model 1 loads Hugging Face checkpoints.

Parity with transformers' own VivitForVideoClassification (same random weights) is in
test_timm_parity.py, which runs the library in the reference environment.
"""

import re

import pytest
import torch

from attnserve.errors import CheckpointError
from attnserve.export import save_state_dict
from attnserve.models import create_model, get_spec
from attnserve.models.layers import Attention
from attnserve.models.vivit import CONFIGS, ViViT

TINY = ["tiny", "tiny_fe", "tiny_fsa", "tiny_fdpa"]  # models 1, 2, 3, 4
GRID = (4, 16)  # tiny: 8 frames / 2, (32 / 8)^2 -> 4 temporal x 16 spatial indices
DIM = 64


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, S, D) twice -> (T, S): where any batch element or channel differs."""
    return (a != b).any(dim=-1).any(dim=0)


def _cross(t: int | None, s: int | None) -> torch.Tensor:
    """(T, S) mask of temporal index t's row and spatial index s's column."""
    mask = torch.zeros(GRID, dtype=torch.bool)
    if t is not None:
        mask[t] = True
    if s is not None:
        mask[:, s] = True
    return mask


def _perturbed(x: torch.Tensor, t: int = 1, s: int = 5) -> torch.Tensor:
    y = x.clone()
    y[:, t, s] += torch.randn(DIM)
    return y


@pytest.mark.parametrize("config", TINY)
def test_video_in_logits_out(config):
    spec = get_spec("vivit", config)
    assert spec.task == "video-classification"
    assert spec.inputs[0].name == "video" and spec.inputs[0].shape == ("batch", 8, 3, 32, 32)
    assert spec.outputs[0].shape == ("batch", 10)
    assert spec.preprocessing["layout"] == "NTCHW" and spec.preprocessing["num_frames"] == 8
    model = create_model("vivit", config)
    for batch in (1, 3):
        video = torch.from_numpy(spec.example_inputs(batch)["video"])
        with torch.inference_mode():
            assert model(video).shape == (batch, 10)


# Model -> {attention module name pattern: the (batch, tokens) it must see} at batch 2.
SEQUENCES = {
    "tiny": {r"blocks\.\d+\.attn": (2, 1 + 4 * 16)},  # every token and the class token
    "tiny_fe": {r"blocks\.\d+\.attn": (2 * 4, 1 + 16),  # each temporal index + its class token
                r"temporal_blocks\.\d+\.attn": (2, 1 + 4)},  # the frames' class tokens + one
    "tiny_fsa": {r"blocks\.\d+\.attn": (2 * 4, 16),  # tokens of one temporal index
                 r"blocks\.\d+\.temporal_attn": (2 * 16, 4)},  # tokens of one spatial index
}


@pytest.mark.parametrize("config", sorted(SEQUENCES))
def test_each_attention_sees_the_tokens_of_its_model(config):
    model = create_model("vivit", config)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, tuple(args[0].shape))  # returns None: keeps the output
        return hook

    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.register_forward_hook(record(name))
    with torch.inference_mode():
        model(torch.randn(2, 8, 3, 32, 32))
    want = SEQUENCES[config]
    assert seen and all(any(re.fullmatch(p, n) for p in want) for n in seen), sorted(seen)
    for name, shape in seen.items():
        (expected,) = [v for p, v in want.items() if re.fullmatch(p, name)]
        assert shape == (*expected, DIM), name
    assert {p for p in want if not any(re.fullmatch(p, n) for n in seen)} == set(), "every kind ran"


def test_model_3_attends_within_a_frame_then_within_a_location():
    """Eq. 7-9: a change at one token reaches its own temporal index in the spatial step
    and its own spatial index in the temporal step, nothing else."""
    block = create_model("vivit", "tiny_fsa").blocks[0]
    x = torch.randn(2, *GRID, DIM)
    y = _perturbed(x, t=1, s=5)
    with torch.inference_mode():
        assert torch.equal(_changed(block.spatial(x), block.spatial(y)), _cross(1, None))
        assert torch.equal(_changed(block.temporal(x), block.temporal(y)), _cross(None, 5))
        # The block as a whole: spatial, then temporal, so everything has heard of it.
        assert _changed(block(x), block(y)).all()


def test_model_4_splits_its_heads_between_space_and_time():
    """Eq. 10: the first half of the heads attend within the temporal index, the second
    within the spatial index; together a change reaches exactly its row and column."""
    attn = create_model("vivit", "tiny_fdpa").blocks[0].attn
    x = torch.randn(2, *GRID, DIM)
    y = _perturbed(x, t=1, s=5)
    with torch.inference_mode():
        assert torch.equal(_changed(attn(x), attn(y)), _cross(1, 5))
        # Keep only one half of the heads in the output projection (bias off: it is the
        # same for both inputs anyway).
        for kept, reach in (("spatial", _cross(1, None)), ("temporal", _cross(None, 5))):
            half = attn.proj.weight.clone()
            if kept == "spatial":
                half[:, DIM // 2:] = 0
            else:
                half[:, :DIM // 2] = 0
            out_x = torch.nn.functional.linear(_heads(attn, x), half)
            out_y = torch.nn.functional.linear(_heads(attn, y), half)
            assert torch.equal(_changed(out_x, out_y), reach), kept


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    """The attention's concatenated head outputs, before its output projection."""
    captured = {}

    def hook(module, args, out):
        captured["in"] = args[0]

    handle = attn.proj.register_forward_hook(hook)
    try:
        attn(x)
    finally:
        handle.remove()
    return captured["in"]


def test_model_2_encodes_each_frame_apart():
    """The spatial encoder sees one temporal index at a time: changing the frames of one
    tubelet slice changes that index's class token only (and then the logits)."""
    model = create_model("vivit", "tiny_fe")
    video = torch.randn(2, 8, 3, 32, 32)
    other = video.clone()
    other[:, 2:4] += 1.0  # frames 2 and 3 make temporal index 1 (tubelets of 2 frames)
    with torch.inference_mode():
        a, b = model.encode_frames(model.embed(video)), model.encode_frames(model.embed(other))
        assert a.shape == (2, 4, DIM)
        assert (a != b).any(dim=-1).any(dim=0).tolist() == [False, True, False, False]
        assert not torch.equal(model(video), model(other))


def test_model_4_has_the_parameters_of_model_1():
    """Sec. 3.3: the factorised dot-product model has model 1's weights; it drops the
    class token (pooling by average) and so one position."""
    ones = create_model("vivit", "tiny").state_dict()
    fours = create_model("vivit", "tiny_fdpa").state_dict()
    assert set(ones) - set(fours) == {"cls_token"} and set(fours) <= set(ones)
    for key, value in fours.items():
        want = ones[key].shape
        assert value.shape == ((1, want[1] - 1, DIM) if key == "pos_embed" else want), key


def test_uniform_frame_sampling_reads_only_the_sampled_frames():
    """Sec. 3.2, fig. 2: n evenly spaced frames, each embedded alone (1 x h x w)."""
    overrides = {"tubelet": (1, 8, 8), "sample_frames": 4}
    model = create_model("vivit", "tiny", **overrides)
    assert model.frame_index.tolist() == [0, 2, 4, 6]
    assert "frame_index" not in model.state_dict()
    assert get_spec("vivit", "tiny", **overrides).inputs[0].shape[1] == 8  # clients send the clip
    video = torch.randn(1, 8, 3, 32, 32)
    skipped, sampled = video.clone(), video.clone()
    skipped[:, 1] += 1.0
    sampled[:, 2] += 1.0
    with torch.inference_mode():
        assert torch.equal(model(video), model(skipped))
        assert not torch.equal(model(video), model(sampled))


def test_paper_configs_are_vivit_b_16x2_on_kinetics_400():
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        models = {c: ViViT(CONFIGS[c]) for c in ("base", "base_fe", "base_fsa", "base_fdpa")}
    base = models["base"]
    # Hugging Face's docstring for google/vivit-b-16x2-kinetics400: 3137 tokens of 768.
    assert base.pos_embed.shape == (1, 1 + 16 * 14 * 14, 768)
    assert base.patch_embed.proj.kernel_size == (2, 16, 16) and base.head.out_features == 400
    counts = {c: sum(p.numel() for p in m.parameters()) for c, m in models.items()}
    # transformers' VivitForVideoClassification(VivitConfig(num_labels=400)).
    assert counts["base"] == 88_954_000
    assert counts["base_fdpa"] == counts["base"] - 768 - 768  # no class token, one position fewer
    assert len(models["base_fe"].temporal_blocks) == 4 and len(models["base_fe"].blocks) == 12


def _huggingface_state_dict(model: ViViT, hub: bool) -> dict[str, torch.Tensor]:
    """Our model-1 weights under Hugging Face's names: the Hub's (transformers 4) layout,
    or transformers 5's."""
    layer = "vivit.encoder.layer" if hub else "vivit.layers"
    names = {"q": "attention.attention.query", "k": "attention.attention.key",
             "v": "attention.attention.value", "o": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense"} if hub else {
        "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
        "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    sd = {"vivit.embeddings.cls_token": model.cls_token, "vivit.embeddings.position_embeddings": model.pos_embed}
    for p in ("weight", "bias"):
        sd[f"vivit.embeddings.patch_embeddings.projection.{p}"] = getattr(model.patch_embed.proj, p)
        sd[f"vivit.layernorm.{p}"] = getattr(model.norm, p)
        sd[f"classifier.{p}"] = getattr(model.head, p)
        for i, block in enumerate(model.blocks):
            q, k, v = getattr(block.attn.qkv, p).chunk(3)  # rows: q, then k, then v
            sd.update({f"{layer}.{i}.{names[n]}.{p}": t for n, t in (("q", q), ("k", k), ("v", v))})
            sd[f"{layer}.{i}.{names['o']}.{p}"] = getattr(block.attn.proj, p)
            sd[f"{layer}.{i}.{names['fc1']}.{p}"] = getattr(block.mlp.fc1, p)
            sd[f"{layer}.{i}.{names['fc2']}.{p}"] = getattr(block.mlp.fc2, p)
            sd[f"{layer}.{i}.layernorm_before.{p}"] = getattr(block.norm1, p)
            sd[f"{layer}.{i}.layernorm_after.{p}"] = getattr(block.norm2, p)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.mark.parametrize("hub", [True, False], ids=["hub-layout", "transformers5-layout"])
def test_huggingface_layouts_load_through_the_filter(hub, tmp_path):
    trained = create_model("vivit", "tiny", seed=7)
    sd = _huggingface_state_dict(trained, hub)
    assert len(sd) == len(trained.state_dict()) + 2 * 2 * len(trained.blocks)  # q, k, v apart
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "hf.safetensors"))
    loaded = create_model("vivit", "tiny", checkpoint=str(tmp_path / "hf.safetensors"))
    video = torch.randn(2, 8, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(video), trained(video))


def test_huggingface_checkpoint_into_a_factorised_model_says_why(tmp_path):
    path = tmp_path / "hf.pt"
    torch.save(_huggingface_state_dict(create_model("vivit", "tiny"), hub=True), path)
    with pytest.raises(CheckpointError, match="model 1 .*'factorised_encoder'.*`base`"):
        create_model("vivit", "tiny_fe", checkpoint=str(path))
    # Our own layout of a factorised model is not mistaken for Hugging Face's.
    native = save_state_dict(create_model("vivit", "tiny_fe", seed=3), tmp_path / "fe.safetensors")
    create_model("vivit", "tiny_fe", checkpoint=str(native))


# Model 1 (`tiny`) is exported by test_export.py with every registered model.
@pytest.mark.parametrize("config", ["tiny_fe", "tiny_fsa", "tiny_fdpa"])
def test_factorised_models_export_with_parity(config, exported_tiny):
    result = exported_tiny("vivit", config)
    assert result.passed and [r.label for r in result.parity] == ["batch 1", "batch 3"]
    for report in result.parity:
        assert report.outputs[0].max_abs_error < 1e-4 and report.outputs[0].top1_agreement == 1.0
