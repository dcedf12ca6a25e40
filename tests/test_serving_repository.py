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
    assert [list(t.dims) for t in seq2seq.input] == [[-1], [], [5]]  # src, src_lengths, tgt


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
