"""Precision decided in the ONNX graph, checked on ONNX Runtime (CPU): fp16 with fp32
islands found by bisection (and the PyTorch module each kept node came from), int8 as
Q/DQ, and the bad inputs of both."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from attnserve.compare import compare_outputs
from attnserve.errors import ExportError
from attnserve.export import export_onnx, node_module, node_modules, verify_onnx
from attnserve.export import precision as P
from attnserve.export.onnx_export import _save_checked, _torch_export, check_parity
from attnserve.models import create_model
from attnserve.spec import ModelSpec, TensorSpec, Tolerance

CLI = [str(Path(sys.executable).with_name("attnserve"))]


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env)


def initializer_types(path) -> set[int]:
    return {i.data_type for i in onnx.load(str(path)).graph.initializer if i.dims and np.prod(i.dims) > 1}


def io_types(path) -> set[int]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.type.tensor_type.elem_type for v in [*g.input, *g.output]}


# ---------------------------------------------------------------- the bisection alone


def test_bisection_keeps_exactly_the_nodes_that_fail():
    names = [f"n{i}" for i in range(40)]
    bad = {"n3", "n17", "n18", "n39"}
    seen = []

    def passes(converted):
        seen.append(converted)
        hit = sorted(converted & bad)
        return not hit, f"{hit} overflow"

    kept, attempts = P.bisect_fp32_nodes(names, passes)
    assert set(kept) == bad and attempts == len(seen)
    assert all(why.endswith("overflow") for why in kept.values())
    assert attempts < 4 * len(bad) * 6  # about 2 log2(40) per failing node, far below 2 ** 40


def test_bisection_keeps_one_node_of_a_pair_that_fails_only_together():
    names = [f"n{i}" for i in range(16)]

    def passes(converted):
        return not {"n2", "n11"} <= converted, "together they overflow"

    kept, _ = P.bisect_fp32_nodes(names, passes)
    assert len(kept) == 1 and set(kept) <= {"n2", "n11"}


def test_bisection_tries_everything_first():
    kept, attempts = P.bisect_fp32_nodes(["a", "b", "c"], lambda converted: (True, ""))
    assert kept == {} and attempts == 1


# ---------------------------------------------------------------- mixed precision


class Sharpen(nn.Module):
    """softmax(x * scale): with scale 1e4 its input leaves fp16's range (65504)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return torch.softmax(x * self.scale, dim=-1)


class Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        with torch.no_grad():
            self.proj.weight.mul_(20.0)  # projections of O(10): times 1e4 overflows fp16
        self.attn = Sharpen(1e4)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attn(self.proj(x)))


OVERFLOW_SPEC = ModelSpec("overflowing", "test", "image-classification", (TensorSpec("x", "float32", ("batch", 16)),),
                          (TensorSpec("logits", "float32", ("batch", 4)),))


def test_mixed_keeps_an_overflowing_softmax_in_fp32(tmp_path):
    model = Overflowing().eval()
    path = tmp_path / "model.onnx"
    _torch_export(model, OVERFLOW_SPEC, path, 20)
    fp32 = onnx.load(str(path))
    with torch.no_grad():
        logits_in = model.proj(torch.from_numpy(OVERFLOW_SPEC.example_inputs(3, seed=3)["x"])) * 1e4
    assert logits_in.abs().max() > 65504, "the test needs a softmax input beyond fp16's range"

    mixed, report = P.convert_mixed(fp32, model, OVERFLOW_SPEC, (1, 3))
    kept = {k.op_type: k for k in report.fp32_nodes}
    assert "Softmax" in kept, report.lines()
    assert {k.module for k in report.fp32_nodes} == {"attn"}
    assert kept["Softmax"].module_type.endswith("Sharpen")
    assert "non-finite" in kept["Softmax"].reason
    # Only what is needed: the projections and the head stay fp16.
    assert {"Gemm"}.isdisjoint(kept) and report.attempts > 1

    _save_checked(mixed, path, OVERFLOW_SPEC)
    assert all(r.passed for r in check_parity(model, OVERFLOW_SPEC, path, "mixed")), "parity of the kept model"
    assert io_types(path) == {TensorProto.FLOAT}, "keep_io_types"
    assert TensorProto.FLOAT16 in initializer_types(path)
    # The islands were needed: everything in fp16 fails, with fp16 tensors stored as the graph says.
    everything = P._Fp16Converter(P._inferred(fp32, OVERFLOW_SPEC.example_inputs(1)))
    check = P._OrtCheck([("batch 3", OVERFLOW_SPEC.example_inputs(3, seed=3))],
                        [{"logits": model(torch.from_numpy(OVERFLOW_SPEC.example_inputs(3, seed=3)["x"]))
                          .detach().numpy()}], OVERFLOW_SPEC.tolerance("fp16"), True)
    ok, why = check(everything.convert(set()))
    assert not ok and "non-finite" in why


def test_fp16_storage_makes_onnxruntime_round_between_fp32_kernels(tmp_path):
    """ONNX Runtime's CPU provider computes Mul and Softmax in fp32 and drops the casts
    between them: as run, an fp16 graph hides this overflow; stored, it shows."""
    model = Overflowing().eval()
    path = tmp_path / "model.onnx"
    _torch_export(model, OVERFLOW_SPEC, path, 20)
    fp32 = onnx.load(str(path))
    half = P._Fp16Converter(P._inferred(fp32, OVERFLOW_SPEC.example_inputs(1))).convert(set())
    import onnxruntime as ort

    feed = OVERFLOW_SPEC.example_inputs(3, seed=3)
    plain = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    stored = ort.InferenceSession(P.with_fp16_storage(half).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(plain.run(["logits"], feed)[0]).all()
    assert np.isnan(stored.run(["logits"], feed)[0]).any()


def test_converter_keeps_graphs_loadable_where_the_library_alone_does_not():
    """onnxconverter-common 1.16 on its own writes graphs ONNX Runtime refuses here: an
    int -> float Cast read by a Range (kept fp32 by its default block list), a float
    initializer shared by an fp32 and an fp16 node, and a graph output a node also reads."""
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    nodes = [
        oh.make_node("Shape", ["x"], ["shape"], name="shape"),
        oh.make_node("Gather", ["shape", "last"], ["n"], name="n", axis=0),
        oh.make_node("Cast", ["n"], ["n_float"], name="n_float", to=TensorProto.FLOAT),
        oh.make_node("Range", ["zero", "n_float", "one"], ["positions"], name="positions"),
        oh.make_node("Mul", ["x", "positions"], ["scaled"], name="scaled"),
        oh.make_node("Add", ["scaled", "one"], ["y"], name="add_one"),
        oh.make_node("Mul", ["y", "one"], ["z"], name="times_one"),
    ]
    inits = [nh.from_array(np.array(1, np.int64), "last"), nh.from_array(np.array(0.0, np.float32), "zero"),
             nh.from_array(np.array(1.0, np.float32), "one")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
                           oh.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)])
    model.ir_version = 10
    feed = {"x": np.arange(10, dtype=np.float32).reshape(2, 5)}
    want = feed["x"] * np.arange(5) + 1
    converter = P._Fp16Converter(P._inferred(model, feed))
    import onnxruntime as ort
    from onnxconverter_common import float16

    with pytest.raises(Exception, match="Type"):  # the library alone
        alone = float16.convert_float_to_float16(P._inferred(model, feed), keep_io_types=True,
                                                 node_block_list=["add_one"])
        ort.InferenceSession(alone.SerializeToString(), providers=["CPUExecutionProvider"])
    for fp32_nodes in (set(), {"add_one"}, {"scaled", "times_one"}):
        converted = converter.convert(fp32_nodes)
        session = ort.InferenceSession(P.with_fp16_storage(converted).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        y, z = session.run(["y", "z"], feed)
        assert y.dtype == z.dtype == np.float32, "keep_io_types"
        np.testing.assert_allclose(y, want, rtol=1e-3)
        np.testing.assert_allclose(z, want, rtol=1e-3)


@pytest.fixture(scope="module")
def mixed_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return {name: export_onnx(name, root / name, precision="mixed") for name in ("vit", "swin")}


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_mixed_tiny_passes_parity_and_keeps_fp32_only_if_needed(mixed_exports, name):
    result = mixed_exports[name]
    assert result.passed and result.precision == "mixed"
    report = result.precision_report
    assert report.precision == "mixed" and report.candidates > 0
    bisected = [k for k in report.fp32_nodes if not k.reason.startswith("onnxconverter-common")]
    # An fp32 node only when everything-in-fp16 failed (attempts > 1); each one's module named.
    assert (report.attempts == 1) == (not bisected)
    assert all(k.module is not None and k.reason.startswith("in fp16:") for k in bisected)
    assert io_types(result.onnx_path) == {TensorProto.FLOAT}
    assert TensorProto.FLOAT16 in initializer_types(result.onnx_path)
    manifest = json.loads((result.out_dir / "attnserve.json").read_text())
    assert manifest["precision"] == "mixed"
    assert manifest["precision_report"]["fp32_nodes"] == [k.to_dict() for k in report.fp32_nodes]
    assert json.loads((result.out_dir / "parity.json").read_text())["precision_report"]["precision"] == "mixed"
    assert all(r.passed for r in verify_onnx(result.out_dir, batch_sizes=(2,)))


def test_mixed_swin_keeps_its_custom_op_nodes(mixed_exports):
    graph = onnx.load(str(mixed_exports["swin"].onnx_path), load_external_data=False)
    assert [n for n in graph.graph.node if n.domain == "attnserve" and n.op_type == "WindowAttention"]


def test_mixed_keeps_hot_attention_of_a_checkpoint_and_the_cli_prints_it(tmp_path):
    """A vit whose block-0 attention logits leave fp16's range (q and k scaled by 3000):
    `attnserve export --precision mixed` keeps that block's q k^T and softmax in fp32
    and prints them with their module."""
    model = create_model("vit", "tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["blocks.0.attn.qkv.weight"].shape[1]
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"):
        state[key][: 2 * dim] *= 3000.0
    checkpoint = tmp_path / "hot.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "vit-mixed"
    result = run_cli("export", "vit", "--precision", "mixed", "--checkpoint", checkpoint, "-o", out)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "node(s) kept in fp32" in text and "parity passed" in text
    assert "(Softmax) from blocks.0.attn (Attention): in fp16:" in text
    kept = json.loads((out / "attnserve.json").read_text())["precision_report"]["fp32_nodes"]
    assert {k["module"] for k in kept} == {"blocks.0.attn"}
    assert {"MatMul", "Softmax"} <= {k["op_type"] for k in kept}


# ---------------------------------------------------------------- node -> module


def test_node_module_on_real_exports(exported_tiny):
    vit = onnx.load(str(exported_tiny("vit").onnx_path), load_external_data=False)
    modules = node_modules(vit)
    assert len(modules) == len(vit.graph.node), "every exported node records its module"
    by_op = {}
    for n in vit.graph.node:
        by_op.setdefault(n.op_type, []).append(modules[n.name])
    assert [m.path for m in by_op["Softmax"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(m.type == "attnserve.models.layers.attention.Attention" for m in by_op["Softmax"])
    assert {m.path for m in by_op["Conv"]} == {"patch_embed.proj"}
    assert "blocks.0.norm1" in {m.path for m in by_op["LayerNormalization"]}
    assert by_op["Conv"][0].describe() == "patch_embed.proj (Conv2d)"

    swin = onnx.load(str(exported_tiny("swin").onnx_path), load_external_data=False)
    windows = [node_module(n) for n in swin.graph.node if n.op_type == "WindowAttention"]
    assert windows[0].path == "layers.0.blocks.0.attn" and windows[0].type.endswith("WindowAttentionBlock")


def test_node_module_falls_back_to_namespace_and_to_none():
    node = onnx.helper.make_node("Softmax", ["x"], ["y"])
    assert node_module(node) is None
    entry = node.metadata_props.add()
    entry.key, entry.value = "namespace", ": m.Model/blocks: Seq/blocks.0.attn: m.Attention/softmax"
    assert node_module(node) == P.ModuleRef("blocks.0.attn", "m.Attention")


# ---------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def int8_vit(tmp_path_factory):
    return export_onnx("vit", tmp_path_factory.mktemp("int8") / "vit", precision="int8")


def test_int8_vit_has_qdq_as_tensorrt_takes_it_and_passes_the_int8_criterion(int8_vit):
    result = int8_vit
    assert result.passed and result.precision == "int8"
    model = onnx.load(str(result.onnx_path))
    graph = model.graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits.get(n.input[2]) if len(n.input) > 2 else None
            assert zero_point is None or not zero_point.any(), "symmetric: zero points 0 (TensorRT)"
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                assert inits[n.input[0]].dtype == np.int8, "no int32 bias DequantizeLinear (TensorRT)"
    # Per-channel weights: a MatMul weight's scale has one value per output channel.
    per_channel = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in inits and inits[n.input[1]].size > 1]
    assert per_channel
    # Softmax and LayerNormalization read float, never a DequantizeLinear.
    for n in graph.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert all(producer.get(x) is None or producer[x].op_type != "DequantizeLinear" for x in n.input)
    report = result.precision_report
    assert report.quantization["op_types"] == ["Conv", "Gemm", "MatMul"] and report.candidates > 0
    assert {k.module for k in report.float_nodes} == {"blocks.0.attn", "blocks.1.attn"}
    # The criterion, not a tolerance; with the batch it adds.
    assert [r.label for r in result.parity] == ["batch 1", "batch 3", f"batch {P.INT8_CHECK_BATCH}"]
    assert all(isinstance(r, P.Int8Report) for r in result.parity)
    for r in result.parity:
        for o in r.outputs:
            assert o.cosine_similarity >= P.INT8_CRITERION.min_cosine
    saved = json.loads((result.out_dir / "parity.json").read_text())["reports"][0]
    assert saved["tolerance"] is None and saved["criterion"] == {"min_cosine": 0.99, "min_top1": 0.9}
    assert json.loads((result.out_dir / "attnserve.json").read_text())["precision"] == "int8"
    assert all(r.passed for r in verify_onnx(result.out_dir, batch_sizes=(2,)))


class OutlierChannel(nn.Module):
    """A projection whose output has one channel 1000x the others (the "massive
    activation" of large models) that the next layer ignores: int8's per-tensor scale of
    that input is set by the outlier, so the channels the next layer does read round to 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.proj.weight[0].mul_(1000.0)
            self.mix.weight[:, 0] = 0.0

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.proj(x))))


OUTLIER_SPEC = ModelSpec("outlier", "test", "image-classification", (TensorSpec("x", "float32", ("batch", 16)),),
                         (TensorSpec("logits", "float32", ("batch", 4)),))


def test_int8_bisection_keeps_float_only_the_node_that_needs_it(tmp_path):
    model = OutlierChannel().eval()
    path = tmp_path / "model.onnx"
    _torch_export(model, OUTLIER_SPEC, path, 20)
    feeds, source = P.calibration_feeds(OUTLIER_SPEC)
    check = P.Int8Check(model, OUTLIER_SPEC, (1, 3))

    everything, _ = P.quantize_int8(path, feeds, source)
    ok, why = check(everything)
    assert not ok and "cosine" in why, "the test needs a model that int8 breaks"

    lines = []
    model_q, report = P.quantize_int8(path, feeds, source, check, lines.append)
    kept = [k for k in report.float_nodes if k.reason.startswith("in int8")]
    assert [k.module for k in kept] == ["mix"] and kept[0].module_type.endswith("Linear"), report.lines()
    assert report.candidates == 2 and report.attempts > 1 and lines
    quantized = {n.name for n in model_q.graph.node if n.op_type in P.INT8_OP_TYPES
                 and any(x.endswith("DequantizeLinear_Output") for x in n.input)}
    assert kept[0].name not in quantized and len(quantized) == 2
    assert check(model_q)[0]
    onnx.checker.check_model(model_q)
    # Nothing left over: every Q/DQ node and initializer is read.
    read = {x for n in model_q.graph.node for x in n.input} | {o.name for o in model_q.graph.output}
    assert all(any(o in read for o in n.output) for n in model_q.graph.node)
    assert all(i.name in read for i in model_q.graph.initializer)

    _save_checked(model_q, path, OUTLIER_SPEC)
    assert all(r.passed for r in check_parity(model, OUTLIER_SPEC, path, "int8"))


def test_int8_criterion_pools_top1_over_batches():
    rng = np.random.default_rng(0)
    want = {3: rng.standard_normal((3, 10)), 8: rng.standard_normal((8, 10))}
    got = {b: w.copy() for b, w in want.items()}
    got[3][0] = want[3][0][::-1]  # one row of 11 disagrees: 91% agreement, still >= 90%
    reports = [compare_outputs({"logits": want[b]}, {"logits": got[b]}, Tolerance(0, 0), classes_last_axis=True,
                               label=f"batch {b}") for b in (3, 8)]
    judged = P.judge_int8(reports, P.Int8Criterion(min_cosine=0.5, min_top1=0.9))
    assert all(r.passed for r in judged)
    got[8][:2] = -want[8][:2]  # three of eleven rows now disagree
    reports = [compare_outputs({"logits": want[b]}, {"logits": got[b]}, Tolerance(0, 0), classes_last_axis=True,
                               label=f"batch {b}") for b in (3, 8)]
    judged = P.judge_int8(reports, P.Int8Criterion(min_cosine=0.5, min_top1=0.9))
    assert not any(r.passed for r in judged)
    assert "top-1 agreement 73% over 11 rows" in judged[0].failures()[0]


def test_int8_calibration_from_a_folder_of_images(tmp_path):
    import cv2

    from attnserve.models import get_spec

    spec = get_spec("vit", "tiny")
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    feeds, source = P.calibration_feeds(spec, tmp_path)
    assert len(feeds) == 3 and source == f"3 image(s) from {tmp_path}, 1 unreadable skipped"
    assert feeds[0]["images"].shape == (1, 3, 32, 32) and feeds[0]["images"].dtype == np.float32
    result = export_onnx("vit", tmp_path / "out", precision="int8", calibration=tmp_path)
    assert result.passed
    assert result.precision_report.quantization["calibration"] == source


# ---------------------------------------------------------------- bad input


def test_unknown_precision_and_contradictions(tmp_path):
    with pytest.raises(ExportError, match=r"unknown precision 'int4'; choose one of fp32, fp16, mixed, int8"):
        export_onnx("vit", tmp_path / "x", precision="int4")
    with pytest.raises(ExportError, match="contradict"):
        export_onnx("vit", tmp_path / "x", precision="int8", fp16=True)
    with pytest.raises(ExportError, match="a calibration folder is for int8; this export is mixed"):
        export_onnx("vit", tmp_path / "x", precision="mixed", calibration=tmp_path)
    assert P.resolve_precision(None, fp16=True) == "fp16" and P.resolve_precision(None) == "fp32"
    assert not (tmp_path / "x").exists()


def test_int8_refuses_a_model_without_float_inputs(tmp_path):
    with pytest.raises(ExportError, match=r"transformer takes only src \(int64\).*--precision fp16 or mixed"):
        export_onnx("transformer", tmp_path / "t", precision="int8")


def test_int8_refuses_calibration_folders_it_cannot_use(tmp_path):
    from attnserve.models import get_spec

    spec = get_spec("vit", "tiny")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="has no image files"):
        P.calibration_feeds(spec, empty)
    (empty / "a.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ExportError, match=r"has 1 image file\(s\), none readable"):
        P.calibration_feeds(spec, empty)
    with pytest.raises(ExportError, match="does not exist or is not a folder"):
        P.calibration_feeds(spec, tmp_path / "missing")
    with pytest.raises(ExportError, match="first input is an NCHW image; vivit's first input video"):
        P.calibration_feeds(get_spec("vivit", "tiny"), empty)


def test_cli_bad_precision_inputs_are_one_sentence(tmp_path):
    for args, fragment in [
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--precision", "int8", "--calibration", tmp_path / "missing"], "does not exist or is not a folder"),
        (["--precision", "mixed", "--fp16"], "contradict"),
    ]:
        result = run_cli("export", "vit", "-o", tmp_path / "out", *args)
        assert result.returncode == 1, result.stdout + result.stderr
        err = " ".join(result.stderr.split())
        assert err.startswith("error:") and fragment in err and "Traceback" not in result.stderr
