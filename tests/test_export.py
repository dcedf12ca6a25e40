"""Every registered model exports, passes parity on ONNX Runtime at two batch sizes,
and leaves a complete, self-describing export directory."""

import dataclasses
import json

import numpy as np
import onnx
import pytest

from attnserve import runtime
from attnserve.artifact import read_artifact
from attnserve.compare import compare_outputs
from attnserve.errors import ExportError, ParityError
from attnserve.export import export_onnx, verify_onnx
from attnserve.models import get_spec, list_models, registry
from attnserve.spec import Tolerance


@pytest.mark.parametrize("name", list_models())
def test_tiny_exports_with_parity_at_batch_1_and_3(name, exported_tiny):
    result = exported_tiny(name)
    assert result.passed
    assert [r.label for r in result.parity] == ["batch 1", "batch 3"]
    for report in result.parity:
        out = report.outputs[0]
        assert out.max_abs_error < 1e-4 and out.cosine_similarity > 0.99999
        assert out.top1_agreement in (1.0, None)  # None: no class axis (handwriting's mixture)
    files = sorted(p.name for p in result.out_dir.iterdir())
    parts = sorted(result.parts)  # generative models add one directory per part
    vocabs = [f"vocab-{role}.json" for role in result.spec.vocab_sizes]  # text models (conftest)
    assert files == sorted(["attnserve.json", "model.onnx", "model.onnx.data", "parity.json", *parts, *vocabs])
    parity = json.loads((result.out_dir / "parity.json").read_text())
    assert parity["passed"] is True and len(parity["reports"]) == 2
    for r in parity["reports"]:
        assert {"max_abs_error", "max_rel_error", "cosine_similarity", "top1_agreement"} <= set(
            r["outputs"][0]
        )


@pytest.mark.parametrize("name", list_models())
def test_graph_is_valid_with_a_dynamic_batch_axis(name, exported_tiny):
    result = exported_tiny(name)
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert model.ir_version <= 10, "ONNX Runtime 1.31 refuses newer IR versions"
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    # A batch size the parity check did not use.
    spec = get_spec(name)
    feed = spec.example_inputs(5, seed=11)
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
    assert report.passed, report.failures()


CUSTOM_OP_MODELS = [n for n in list_models() if registry.get_entry(n).custom_ops]


@pytest.mark.parametrize("name", CUSTOM_OP_MODELS)
def test_custom_op_models_carry_their_ops_and_functions(name, exported_tiny):
    model = onnx.load(str(exported_tiny(name).onnx_path), load_external_data=False)
    declared = set(registry.get_entry(name).custom_ops)
    used = {n.op_type for n in model.graph.node if n.domain == "attnserve"}
    assert used and used <= declared
    overloads = {(f.name, f.overload) for f in model.functions}
    assert all((n.op_type, n.overload) in overloads for n in model.graph.node if n.domain == "attnserve")


@pytest.mark.parametrize(("name", "config"), [(n, "tiny") for n in CUSTOM_OP_MODELS] + [("stn", "tiny_tps")])
def test_custom_op_models_also_export_with_standard_ops_only(name, config, tmp_path):
    result = export_onnx(name, tmp_path / name, config=config, custom_ops=False)
    assert result.passed
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert not model.functions and all(n.domain != "attnserve" for n in model.graph.node)
    assert json.loads((tmp_path / name / "attnserve.json").read_text())["custom_ops"] is False


@pytest.mark.parametrize("custom_ops", [True, False])
def test_swin_pads_maps_the_window_does_not_divide(custom_ops, tmp_path):
    # 36 px / patch 2 = 18 x 18, not a multiple of the window 4: padded to 20, then 10 x 10.
    result = export_onnx("swin", tmp_path / "swin", img_size=36, custom_ops=custom_ops)
    assert result.passed and result.spec.inputs[0].shape == ("batch", 3, 36, 36)


def test_stn_tps_exports_its_sampler(tmp_path):
    result = export_onnx("stn", tmp_path / "tps", config="tiny_tps")
    assert result.passed
    model = onnx.load(str(result.onnx_path), load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.domain == "attnserve"] == ["GridSampler"]


def test_convolutional_models_take_other_image_sizes(exported_tiny):
    result = exported_tiny("se_resnet")
    spec = get_spec("se_resnet")
    assert spec.inputs[0].shape == ("batch", 3, "height", "width")
    feed = spec.example_inputs(2, seed=5, height=96, width=80)
    with runtime.load(result.out_dir, "ort") as ort, runtime.load(result.out_dir, "torch") as ref:
        report = compare_outputs(ref.run(feed), ort.run(feed), spec.tolerance("fp32"))
    assert report.passed, report.failures()


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    # Zero tolerance: the float32 round-off between torch and ONNX Runtime must fail it.
    entry = registry.get_entry("vit")

    def exacting_spec(*args):
        strict = {"fp32": Tolerance(0.0, 0.0), "fp16": Tolerance(0.0, 0.0)}
        return dataclasses.replace(entry.spec_fn(*args), tolerances=strict)

    monkeypatch.setitem(registry._REGISTRY, "vit", dataclasses.replace(entry, spec_fn=exacting_spec))
    out = tmp_path / "vit"
    with pytest.raises(ParityError, match="beyond tolerance.*nothing was written"):
        export_onnx("vit", out)
    assert not out.exists() or not any(out.iterdir())

    result = export_onnx("vit", out, allow_mismatch=True)
    assert not result.passed
    assert json.loads((out / "parity.json").read_text())["passed"] is False
    assert json.loads((out / "attnserve.json").read_text())["parity_passed"] is False


def test_reexport_replaces_files_and_keeps_others(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_onnx("vit", out)
    first = (out / "model.onnx.data").read_bytes()
    export_onnx("vit", out, seed=1)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.onnx.data").read_bytes() != first
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    assert all(r.passed for r in verify_onnx(out)), "the manifest records seed 1"


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ExportError, match="opset 17 is too old"):
        export_onnx("vit", tmp_path / "x", opset=17)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_vit_s16_paper_config_exports_with_parity(tmp_path):
    result = export_onnx("vit", tmp_path / "s16", config="s16")
    assert result.passed
    assert result.parity[1].outputs[0].max_abs_error < 1e-4
    assert (tmp_path / "s16" / "model.onnx.data").stat().st_size > 80e6  # 22M fp32 weights


def test_export_outputs_are_deterministic(exported_tiny, tmp_path):
    again = export_onnx("deit", tmp_path / "deit")
    feed = get_spec("deit").example_inputs(2)
    with runtime.load(exported_tiny("deit").out_dir) as a, runtime.load(again.out_dir) as b:
        np.testing.assert_array_equal(a.run(feed)["logits"], b.run(feed)["logits"])


def test_class_names_travel_in_the_manifest_and_bad_ones_are_refused(tmp_path):
    names = tmp_path / "digits.txt"
    names.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n\n")
    result = export_onnx("stn", tmp_path / "stn", labels=names)
    manifest = json.loads((result.out_dir / "attnserve.json").read_text())
    assert manifest["spec"]["labels"] == [f"digit {i}" for i in range(10)]
    assert read_artifact(result.out_dir).spec.labels[3] == "digit 3"
    with pytest.raises(ExportError, match=r"^3 class names given, but stn \(tiny\) has 10 classes$"):
        export_onnx("stn", tmp_path / "bad", labels=["a", "b", "c"])
    with pytest.raises(ExportError, match="repeat a name"):
        export_onnx("stn", tmp_path / "bad", labels=["a"] * 10)
    with pytest.raises(ExportError, match="class names are for classifiers; transformer is a translation"):
        export_onnx("transformer", tmp_path / "bad", labels=["a"])
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx("stn", tmp_path / "bad", labels=tmp_path / "missing.txt")
    assert not (tmp_path / "bad").exists()
