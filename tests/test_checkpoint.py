"""Checkpoints: native round trips, foreign wrappers, and every way a file can fail."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from attnserve.errors import CheckpointError
from attnserve.export import read_state_dict, save_state_dict
from attnserve.models import create_model, get_spec, list_models


def _outputs(model, name) -> torch.Tensor:
    """All of the model's outputs, flattened into one tensor to compare."""
    feed = get_spec(name).example_inputs(2, seed=7)
    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    out = (out,) if isinstance(out, torch.Tensor) else out
    return torch.cat([o.flatten() for o in out])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", list_models())
def test_round_trip(name, suffix, tmp_path):
    trained = create_model(name, seed=123)
    path = save_state_dict(trained, tmp_path / f"w{suffix}")
    loaded = create_model(name, checkpoint=str(path))  # seed 0 init, then the file
    assert torch.equal(_outputs(trained, name), _outputs(loaded, name))
    assert not torch.equal(_outputs(create_model(name), name), _outputs(trained, name))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tied_weights_round_trip(suffix, tmp_path):
    """The paper's Transformer shares one matrix three ways; safetensors stores shared
    tensors only as copies, and loading must tie them again."""
    tied = {"share_embeddings": True, "tie_output": True}
    trained = create_model("transformer", seed=123, **tied)
    loaded = create_model("transformer", checkpoint=str(save_state_dict(trained, tmp_path / f"w{suffix}")), **tied)
    assert loaded.decoder.out_proj.weight is loaded.decoder.embed.weight is loaded.src_embed.weight
    assert torch.equal(_outputs(trained, "transformer"), _outputs(loaded, "transformer"))


def test_wrapped_and_data_parallel_checkpoints_load(tmp_path):
    trained = create_model("vit", seed=5)
    sd = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = create_model("vit", checkpoint=str(tmp_path / "ckpt.pth"))
    assert torch.equal(_outputs(trained, "vit"), _outputs(loaded, "vit"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = create_model("vit").state_dict()
    del sd["head.weight"], sd["blocks.1.attn.qkv.bias"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        create_model("vit", checkpoint=str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "2 missing: blocks.1.attn.qkv.bias, head.weight" in msg
    assert "1 unexpected: extra.weight" in msg


def test_shape_mismatch_names_both_shapes(tmp_path):
    save_state_dict(create_model("se_resnet"), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 512\), model \(7, 512\)"):
        create_model("se_resnet", checkpoint=str(tmp_path / "w.safetensors"), num_classes=7)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    save_state_dict(create_model("se_resnet"), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not fit CbamResNet"):
        create_model("cbam_resnet", checkpoint=str(tmp_path / "w.pt"))


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="not tensors"):
        read_state_dict(tmp_path / "mixed.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only loading refuses"):
        read_state_dict(tmp_path / "evil.pt")
    assert "this would have run" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    path = save_state_dict(create_model("vit"), tmp_path / f"w{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")


def test_safetensors_with_unknown_keys(tmp_path):
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*1 unexpected: foo"):
        create_model("deit", checkpoint=str(tmp_path / "w.safetensors"))
