"""Triton model repositories: every config.pbtxt parsed with Triton's own schema
(tritonclient's model_config_pb2), the files a server needs, and clear refusals."""

import dataclasses

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from attnserve import runtime
from attnserve.errors import AttnserveError
from attnserve.models import get_spec
from attnserve.serving import ServingPolicy, build_repository, model_config
from attnserve.spec import image_classification_spec

pb = model_config_pb2.ModelConfig


def parse(text: str):
    return text_format.Parse(text, pb())


def test_an_image_classifier_config(tmp_path, exported_tiny):
    repo = build_repository([exported_tiny("vit").out_dir], tmp_path / "repo",
                            policy=ServingPolicy(max_batch_size=16, preferred_batch_sizes=(4, 16),
                                                 max_queue_delay_us=200, instances=2))
    config = parse((repo / "vit-tiny" / "config.pbtxt").read_text())
    assert (config.name, config.platform, config.max_batch_size) == ("vit-tiny", "onnxruntime_onnx", 16)
    (images,) = config.input
    assert images.name == "images" and images.data_type == model_config_pb2.TYPE_FP32 and list(images.dims) == [3, 32, 32]
    assert list(config.output[0].dims) == [10]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    group = config.instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1 and list(warmup.inputs["images"].dims) == [3, 32, 32]
    # The version folder holds the graph and its weights under the names the graph records.
    version = repo / "vit-tiny" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "model.onnx.data"]
    feed = get_spec("vit").example_inputs(2)
    with runtime.load(version / "model.onnx") as served, runtime.load(exported_tiny("vit").out_dir) as exported:
        assert np.array_equal(served.run(feed)["logits"], exported.run(feed)["logits"])


def test_dynamic_axes_are_minus_one_and_text_models_skip_warmup(tmp_path, exported_tiny):
    repo = build_repository([exported_tiny("han").out_dir, exported_tiny("bahdanau_seq2seq").out_dir],
                            tmp_path / "repo")
    han = parse((repo / "han-tiny" / "config.pbtxt").read_text())
    tokens = {t.name: t for t in han.input}["tokens"]
    assert tokens.data_type == model_config_pb2.TYPE_INT64 and list(tokens.dims) == [-1, -1]
    assert not han.model_warmup  # random token ids and counts would not be valid input
    seq2seq = parse((repo / "bahdanau_seq2seq-tiny" / "config.pbtxt").read_text())
    # src, src_lengths (only the batch axis: sent as [batch, 1], reshaped to [batch]), tgt
    assert [list(t.dims) for t in seq2seq.input] == [[-1], [1], [5]]
    assert seq2seq.input[1].reshape.shape == [] and seq2seq.input[1].HasField("reshape")


def test_labels_become_a_label_file():
    spec = image_classification_spec("x", "tiny", img_size=8, in_chans=3, num_classes=2, dynamic_size=True)
    spec = dataclasses.replace(spec, labels=("cat", "dog"))
    config = parse(model_config("x", spec, labels=True))
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.input[0].dims) == [3, -1, -1]
    assert list(config.model_warmup[0].inputs["images"].dims) == [3, 8, 8]  # the spec's default size


def test_without_dynamic_batching():
    config = parse(model_config("vit", get_spec("vit"), ServingPolicy(dynamic_batching=False, device="gpu")))
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flavor": "onnx"}, "unknown flavor 'onnx'"),
        ({"policy": ServingPolicy(max_batch_size=4, preferred_batch_sizes=(8,))}, "must lie in 1..max_batch_size"),
        ({"policy": ServingPolicy(device="tpu")}, "device must be 'cpu' or 'gpu'"),
        ({"names": ["a", "a"]}, "both be named 'a'"),
    ],
)
def test_bad_requests_are_one_sentence_and_write_nothing(kwargs, message, tmp_path, exported_tiny):
    exports = [exported_tiny("vit").out_dir, exported_tiny("deit").out_dir]
    with pytest.raises(AttnserveError, match=message):
        build_repository(exports, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging directory left behind


def test_a_directory_that_is_not_an_export_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(AttnserveError, match="without model.onnx"):
        build_repository([tmp_path / "junk"], tmp_path / "repo")


@pytest.mark.parametrize("flavor", ["native", "python"])
def test_pipelines_and_generation_models_around_the_graphs(tmp_path, exported_tiny, flavor):
    repo = build_repository([exported_tiny("vit").out_dir, exported_tiny("vit_captioner").out_dir],
                            tmp_path / "repo", flavor=flavor, policy=ServingPolicy(top_k=3))
    configs = {p.parent.name: parse(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted([
        "vit-tiny", "vit-tiny-preprocess-jpeg", "vit-tiny-preprocess-frames", "vit-tiny-topk", "vit-tiny-jpeg",
        "vit-tiny-frames", "vit_captioner-tiny", "vit_captioner-tiny-encoder", "vit_captioner-tiny-decoder_step",
        "vit_captioner-tiny-generate"])
    graph = configs["vit-tiny"]
    assert (graph.backend, graph.platform) == (("python", "") if flavor == "python" else ("", "onnxruntime_onnx"))
    if flavor == "python":
        assert graph.parameters["onnx"].string_value == "model.onnx"
        assert (repo / "vit-tiny" / "1" / "model.py").is_file()
    jpeg = configs["vit-tiny-jpeg"]
    assert jpeg.platform == "ensemble" and jpeg.input[0].data_type == model_config_pb2.TYPE_STRING
    steps = [s.model_name for s in jpeg.ensemble_scheduling.step]
    assert steps == ["vit-tiny-preprocess-jpeg", "vit-tiny", "vit-tiny-topk"]
    # Each step's outputs feed the next step's inputs, under the names the models use.
    assert dict(jpeg.ensemble_scheduling.step[0].output_map) == {"images": "_image"}
    assert dict(jpeg.ensemble_scheduling.step[1].input_map) == {"images": "_image"}
    assert [list(o.dims) for o in jpeg.output] == [[3], [3], [3]]
    assert list(configs["vit-tiny-preprocess-frames"].input[0].dims) == [-1, -1, 3]
    generate = configs["vit_captioner-tiny-generate"]
    assert [i.name for i in generate.input] == ["images", "max_length", "beam_width"]
    assert [i.optional for i in generate.input] == [False, True, True]
    assert [o.name for o in generate.output] == ["tokens", "length", "score", "text", "attention"]
    assert (repo / "vit_captioner-tiny-generate" / "1" / "vocab-target.json").is_file()
    # The step's cache starts empty: its fixed size 0 is served as -1, as is past_len.
    step = configs["vit_captioner-tiny-decoder_step"]
    assert list({i.name: i for i in step.input}["self_keys"].dims) == [2, 4, -1, 8]
    assert list({i.name: i for i in configs["vit_captioner-tiny-encoder"].output}["self_keys"].dims) == [2, 4, -1, 8]


def test_a_video_model_of_any_clip_length_gets_pipelines_and_a_stream(tmp_path, exported_tiny):
    export = exported_tiny("nonlocal_i3d")
    assert isinstance(export.spec.inputs[0].shape[1], str)  # clips of any length
    repo = build_repository([export.out_dir], tmp_path / "repo", flavor="python")
    frames = parse((repo / "nonlocal_i3d-tiny-frames" / "config.pbtxt").read_text())
    assert list(frames.input[0].dims) == [-1, -1, -1, 3]
    stream = parse((repo / "nonlocal_i3d-tiny-stream" / "config.pbtxt").read_text())
    assert stream.parameters["frames"].string_value == str(export.spec.preprocessing["num_frames"])
    assert stream.HasField("sequence_batching")


def test_each_precision_of_a_model_gets_its_own_name():
    from attnserve.serving.repository import _model_name

    names = {p: _model_name({"model": "vit", "config": "s16", "precision": p})
             for p in ("fp32", "fp16", "mixed", "int8")}
    assert names == {"fp32": "vit-s16", "fp16": "vit-s16-fp16", "mixed": "vit-s16-mixed", "int8": "vit-s16-int8"}
    assert _model_name({"model": "vit", "config": "tiny+img_size=64"}) == "vit-tiny-img_size64"
