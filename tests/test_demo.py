"""`attnserve demo` end to end except the training: checkpoints of the demo configs
(seeded, untrained: each task's training has its own tests) are written where the demo
looks for them, so it reuses them and runs every other step for real: export with
parity, the repository, a tritonserver on localhost, the client on written inputs, the
latency table, the pictures, the summary, and the server stopped at the end."""

import json
import socket

import pytest

from attnserve import demo
from attnserve.train import TASKS, TrainResult, task_module
from attnserve.train.common import checkpoint_path, new_model, save_result
from conftest import SERVE_PYTHON

pytestmark = pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no .venv-serve: run `make serve-env`")


def _untrained_checkpoints(folder, seed=0):
    for task in TASKS:
        module = task_module(task)
        for model, config in module.MODELS:
            extra = {}
            if hasattr(module, "LABELS"):
                extra["labels"] = list(module.LABELS)
            if hasattr(module, "VOCABULARY"):
                module.VOCABULARY.save(folder / module.VOCABULARY_FILE)
                extra["vocabulary"] = module.VOCABULARY_FILE
            result = TrainResult(task, model, config, checkpoint_path(folder, model, config),
                                 {"accuracy": 0.0}, 0.0, seed, extra)
            save_result(new_model(model, config, seed), folder, result)


def test_demo_runs_every_step_and_stops_its_server(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "LATENCY_CALLS", 3)
    monkeypatch.setattr(demo, "LATENCY_WARMUP", 1)
    root = tmp_path / "demo"
    _untrained_checkpoints(root / "checkpoints")
    lines, sections = [], []
    summary = demo.run_demo(root, say=lines.append, section=sections.append, python=SERVE_PYTHON)

    assert [s.split(".")[0] for s in sections] == ["1", "2", "3", "4", "5", "6"]
    models = {m["model"]: m for m in summary["models"]}
    assert set(models) == {"stn", "ram", "show_attend_tell", "vit_captioner", "vivit", "nonlocal_i3d"}
    for m in models.values():
        assert set(m["latency_ms"]) == {"torch", "ort", "triton"}, m
        assert all(v > 0 for v in m["latency_ms"].values())
        assert m["served"] and all(0 <= v <= 1 for v in m["served"].values()), m
        assert json.loads((root / "exports" / m["served_as"] / "parity.json").read_text())["passed"]
    assert "accuracy" in models["stn"]["served"] and "exact_match" in models["vit_captioner"]["served"]
    assert "clip_accuracy" in models["vivit"]["served"]
    assert any("checkpoint" in line or "reused" in line for line in lines)
    pictures = {p.name for p in (root / "pictures").iterdir()}
    assert "ram-digits-glimpses.png" in pictures and "vivit-shapes-timeline.png" in pictures
    assert any(p.endswith("-attention.png") and p.startswith("show_attend_tell") for p in pictures)
    assert json.loads((root / "summary.json").read_text())["models"] == summary["models"]
    assert any(line.startswith("demo took") for line in lines)
    table = "\n".join(lines)
    for m in models.values():
        assert m["served_as"] in table
    # The server is gone: its gRPC port no longer answers.
    url = next(line for line in lines if line.startswith("tritonserver on")).split()[2]
    host, port = url.rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass

    # A second run reuses each export while its checkpoint is unchanged.
    checkpoint = root / "checkpoints" / "stn-digits.safetensors"
    assert demo._export_is_current(root / "exports" / "stn-digits", checkpoint)
    checkpoint.touch()
    assert not demo._export_is_current(root / "exports" / "stn-digits", checkpoint)
