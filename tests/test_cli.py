"""The command line as a user meets it: real processes, exit codes, one-sentence errors."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnserve.export import save_state_dict
from attnserve.models import create_model, list_models
from attnserve.text import SPECIALS, Vocabulary

CLI = [str(Path(sys.executable).with_name("attnserve"))]


def run(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env)


def assert_user_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    err = " ".join(result.stderr.split())
    assert err.startswith("error:"), result.stderr
    for f in fragments:
        assert f in err, err


def test_models_json_lists_the_registry():
    result = run("models", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list_models()
    assert all("tiny" in r["configs"] for r in rows)


def test_models_table():
    result = run("models")
    assert result.returncode == 0 and "se_resnet" in result.stdout and "timm seresnet50" in result.stdout


def test_export_verify_bench(tmp_path):
    out = tmp_path / "cbam"
    result = run("export", "cbam_resnet", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "parity passed" in result.stdout and (out / "model.onnx").is_file()
    result = run("verify", out, "--batch", "2,4")
    assert result.returncode == 0 and "batch 4: ok" in result.stdout
    result = run("bench", out, "--batch", "1,2", "--iterations", "2", "--warmup", "1", "--windows", "3",
                 "--backends", "torch,ort,openvino", "--json", tmp_path / "b.json", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {
        (b, n) for b in ("torch", "ort", "openvino") for n in (1, 2)
    }
    assert all(r["correct"] and r["windows"] <= 3 for r in rows)
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"result.json", "report.md", "latency_vs_batch.png"}
    again = run("bench", "--compare", tmp_path / "b.json", "--compare", tmp_path / "report" / "result.json")
    assert again.returncode == 0 and "| openvino | fp32 | 2 |" in again.stdout
    assert all(r["correct"] and r["p50_ms"] > 0 for r in rows)
    assert "p99 ms" in result.stdout


def test_export_with_a_checkpoint_and_default_output_dir(tmp_path):
    save_state_dict(create_model("deit", seed=9), tmp_path / "w.safetensors")
    result = run("export", "deit", "--checkpoint", tmp_path / "w.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "deit-tiny" / "attnserve.json").read_text())
    assert manifest["checkpoint"] == str(tmp_path / "w.safetensors") and manifest["seed"] is None


def test_verify_catches_the_wrong_model(tmp_path):
    out = tmp_path / "v"
    assert run("export", "vit", "-o", out).returncode == 0
    (out / "attnserve.json").unlink()  # a bare .onnx: the user names the model
    assert run("verify", out / "model.onnx", "--model", "vit").returncode == 0
    save_state_dict(create_model("vit", seed=3), tmp_path / "other.pt")
    result = run("verify", out / "model.onnx", "--model", "vit", "--checkpoint", tmp_path / "other.pt")
    assert_user_error(result, "does not match the eager model", "max abs error")
    assert_user_error(run("verify", out / "model.onnx"), "no manifest", "--model")


def _bad_checkpoints(tmp_path):
    sd = create_model("vit").state_dict()
    del sd["head.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "notdict.pt")
    good = save_state_dict(create_model("vit"), tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[:100])
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    return {
        "missing.pt": "1 missing: head.bias",
        "notdict.pt": "not a state dict",
        "trunc.safetensors": "not a readable safetensors file",
        "evil.pt": "weights_only loading refuses",
    }


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_checkpoints_fail_cleanly_and_write_nothing(tmp_path):
    for file, fragment in _bad_checkpoints(tmp_path).items():
        out = tmp_path / f"out-{file}"
        result = run("export", "vit", "--checkpoint", tmp_path / file, "-o", out)
        assert_user_error(result, fragment)
        assert "pwned" not in result.stdout
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("export", "nope"), ["unknown model 'nope'"]),
        (("export", "vit", "-c", "huge"), ["no config 'huge'", "ti16"]),
        (("export", "vit", "--opset", "13"), ["opset 13 is too old"]),
        (("verify", "/nonexistent/model.onnx"), ["does not exist"]),
        (("bench", "vit", "--backends", "torch,tvm"), ["unknown backend 'tvm'"]),
        (("bench", "vit", "--batch", "1,x"), ["--batch must be comma-separated"]),
        (("bench", "vit", "--batch", "0"), ["positive"]),
        (("export", "transformer", "--vocab", "missing.json"), ["missing.json is not an attnserve vocabulary"]),
        (("export", "transformer", "--vocab", "target=small.json"), ["the target vocabulary has 6 tokens"]),
        (("export", "transformer", "--vocab", "small.json"), ["the source vocabulary has 6 tokens"]),
        (("export", "vit", "--vocab", "small.json"), ["vit has no 'source' vocabulary"]),
    ],
)
def test_user_errors_are_one_sentence(args, fragments, tmp_path):
    Vocabulary(SPECIALS + ("a", "b")).save(tmp_path / "small.json")
    assert_user_error(run(*args, cwd=tmp_path), *fragments)
    assert not (tmp_path / "out").exists()


def test_repo_build(tmp_path, exported_tiny):
    result = run("repo", "build", exported_tiny("vit").out_dir, "-o", tmp_path / "repo", "--preferred", "2,4",
                 "--max-batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert "vit-tiny" in result.stdout and (tmp_path / "repo" / "vit-tiny" / "config.pbtxt").is_file()
    assert_user_error(run("repo", "build", exported_tiny("vit").out_dir, "-o", tmp_path / "r2", "--preferred", "8",
                          "--max-batch-size", "4"), "must lie in 1..max_batch_size")
    assert not (tmp_path / "r2").exists()


def test_serve_prints_the_docker_command_and_refuses_a_missing_repository(tmp_path):
    docker = run("serve", tmp_path, "--docker")
    assert docker.returncode == 0 and "docker run" in docker.stdout and f"-v {tmp_path}:/models" in docker.stdout
    assert_user_error(run("serve", tmp_path / "nope"), "is not a directory")
