"""Every registered model exports in half precision within the spec's fp16 tolerance.

Apart from tests/test_export.py so that pytest-xdist (`--dist loadfile`) can run the fp16
exports on one worker while the other runs the fp32 ones."""

import json

import onnx
import pytest

from attnserve.export import export_onnx, verify_onnx
from attnserve.models import create_model, get_spec, list_models

# The captioners' fp16 paths are their blocks' (ResNet trunk, LSTM cell, ViT, the Transformer
# decoder), each exported in fp16 here by another model; exporting their three graphs again
# in fp16 would add a minute to the suite.
FP16_MODELS = [n for n in list_models()
               if n not in ("show_attend_tell", "semantic_attention_caption", "vit_captioner")]


@pytest.mark.parametrize("name", FP16_MODELS)
def test_fp16_export_within_fp16_tolerance(name, tmp_path):
    result = export_onnx(name, tmp_path / name, fp16=True)
    assert result.passed and result.precision == "fp16"
    model = onnx.load(str(result.onnx_path))
    spec = get_spec(name)
    for t, graph_input in zip(spec.inputs, model.graph.input, strict=True):
        want = onnx.TensorProto.FLOAT16 if t.dtype == "float32" else onnx.TensorProto.INT64
        assert graph_input.type.tensor_type.elem_type == want
    fp16 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    weights = set(create_model(name).state_dict())
    fp32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.name in weights}
    assert fp16 and weights & {i.name for i in fp16}, "initializers keep the parameter names"
    # fp32 weights only for the fp32 islands: recurrent layers (ops/recurrent.py), whose
    # weights are cast, reordered and stacked for ONNX's GRU/LSTM. (Constants folded from
    # fp32 arithmetic, like the sinusoidal positions' frequencies, are not weights.)
    recurrent_prep = {"GRU", "LSTM", "Slice", "Concat", "Unsqueeze"}
    for node in model.graph.node:
        if fp32 & set(node.input):
            assert node.op_type in recurrent_prep, f"fp32 weight feeds {node.op_type}"
    # Half precision really changes the numbers, so the fp32 tolerance would not hold.
    assert result.parity[0].outputs[0].max_abs_error > 1e-6
    assert json.loads((result.out_dir / "attnserve.json").read_text())["precision"] == "fp16"
    assert all(r.passed for r in verify_onnx(result.out_dir))
