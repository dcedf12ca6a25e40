"""The registry is the single source of truth: every model has a complete spec, a
tiny config and the tests the rest of the suite parametrizes over it."""

import dataclasses

import numpy as np
import pytest
import torch

from attnserve.errors import UnknownConfigError, UnknownModelError
from attnserve.models import create_model, get_entry, get_spec, list_models

# Paper configurations whose parameter counts the papers (or timm, which reproduces
# them) state; a wrong depth, width or head count shows up here.
PAPER_PARAMS_M = {
    ("vit", "ti16"): 5.72, ("vit", "s16"): 22.05, ("vit", "b16"): 86.57,
    ("deit", "ti_distilled"): 5.91, ("deit", "s_distilled"): 22.44,
    ("cait", "xxs24"): 11.96, ("cait", "s24"): 46.92,
    ("se_resnet", "resnet50"): 28.09,
    ("swin", "t"): 28.29, ("swin", "s"): 49.61, ("swin", "b"): 87.77,
}


def test_registry_lists_the_spine_models():
    assert {"vit", "deit", "cait", "se_resnet", "cbam_resnet", "swin", "stn"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_spec_matches_the_eager_model(name):
    entry = get_entry(name)
    assert "tiny" in entry.configs and len(entry.configs) >= 2, "tiny plus the paper's configs"
    spec = get_spec(name)
    assert spec.inputs and spec.outputs and "fp32" in spec.tolerances and "fp16" in spec.tolerances
    assert all("batch" == t.shape[0] for t in spec.inputs + spec.outputs)
    model = create_model(name)
    for batch in (1, 3):
        feed = spec.example_inputs(batch)
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
        out = (out,) if isinstance(out, torch.Tensor) else out
        assert len(out) == len(spec.outputs)
        for t, o in zip(spec.outputs, out, strict=True):
            assert t.matches(tuple(o.shape)) and o.shape[0] == batch
            assert str(o.dtype).removeprefix("torch.") == t.dtype


@pytest.mark.parametrize("name", list_models())
def test_tiny_is_tiny_and_seeded(name):
    a, b = create_model(name), create_model(name)
    n = sum(p.numel() for p in a.parameters())
    assert 1e4 < n < 5e6, f"tiny {name} has {n} parameters"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), "the same seed must give the same model"
    c = create_model(name, seed=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize(("name", "config"), sorted(PAPER_PARAMS_M))
def test_paper_configs_have_the_papers_sizes(name, config):
    model = create_model(name, config)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PAPER_PARAMS_M[(name, config)], abs=0.01)


def test_unknown_names_say_what_exists():
    with pytest.raises(UnknownModelError, match="unknown model 'nope'.*vit"):
        create_model("nope")
    with pytest.raises(UnknownConfigError, match="no config 'huge'.*tiny"):
        get_spec("vit", "huge")
    with pytest.raises(UnknownConfigError, match="no field 'depthh'"):
        create_model("vit", depthh=3)


def test_overrides_change_the_config_and_the_spec():
    spec = get_spec("vit", "tiny", img_size=48)
    assert spec.inputs[0].shape == ("batch", 3, 48, 48)
    assert spec.config == "tiny+img_size=48"
    model = create_model("vit", "tiny", img_size=48)
    assert model.pos_embed.shape[1] == 1 + (48 // 8) ** 2


def test_spec_round_trips_through_json():
    from attnserve.spec import ModelSpec

    for name in list_models():
        spec = get_spec(name)
        again = ModelSpec.from_dict(spec.to_dict())
        assert again == dataclasses.replace(spec, tolerances=dict(spec.tolerances))
        ours, theirs = spec.example_inputs(2, seed=3), again.example_inputs(2, seed=3)
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])
