"""TensorRT: everything that needs no GPU is tested here on any machine (profiles from the
registry's specs, the TensorRT 10 / 11 precision decision, parser-error formatting, the
engine cache's sidecar and every kind of mismatch, the runner's plain parts, the CLI and
ONNX Runtime's TensorRT provider options); the parity suite runs where TensorRT and a
CUDA GPU are present and skips with that reason elsewhere."""

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from attnserve import runtime
from attnserve.errors import AttnserveError, BackendUnavailableError, InputError, InternalError
from attnserve.models import create_model, get_entry, get_spec, list_models
from attnserve.runtime import engine_cache as ec
from attnserve.runtime import ort as ort_runtime
from attnserve.runtime import tensorrt as trt_rt
from attnserve.runtime.engine_cache import EngineMismatchError, Environment
from attnserve.runtime.tensorrt import (
    GpuMemoryError,
    NodeError,
    ParserError,
    PluginError,
    PrecisionError,
    ProfileError,
    ProfilePolicy,
    TensorRTError,
    derive_profiles,
)
from attnserve.spec import ModelSpec, TensorSpec

CLI = [str(Path(sys.executable).with_name("attnserve"))]


def has_tensorrt_gpu() -> bool:
    """TensorRT, cuda-python and at least one CUDA device."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        cudart = trt_rt.import_cudart()
        count = trt_rt.cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except Exception:
        return False
    return count > 0


NO_GPU = "needs TensorRT 10+, cuda-python and an NVIDIA GPU (none here)"
HAS_GPU = has_tensorrt_gpu()


# ---- profiles from the registry's specs --------------------------------------------------------

def test_profiles_of_an_image_classifier():
    assert derive_profiles(get_spec("vit", "tiny")) == {
        "images": ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))}


def test_profiles_of_a_video_model_follow_the_policy():
    spec = get_spec("vivit", "tiny")
    assert derive_profiles(spec, ProfilePolicy(max_batch=4, opt_batch=2)) == {
        "video": ((1, 8, 3, 32, 32), (2, 8, 3, 32, 32), (4, 8, 3, 32, 32))}


def test_profiles_of_named_spatial_axes_scale_around_the_default_size():
    # detr: height and width are dynamic with default 64
    assert derive_profiles(get_spec("detr", "tiny")) == {
        "images": ((1, 3, 32, 32), (8, 3, 64, 64), (8, 3, 128, 128))}


def test_profiles_of_a_translation_model_share_batch_and_source_length():
    profiles = derive_profiles(get_spec("transformer", "tiny"))
    assert profiles["src"] == ((1, 3), (8, 7), (8, 14))
    assert profiles["src_lengths"] == ((1,), (8,), (8,))
    assert profiles["tgt"] == ((1, 5), (8, 5), (8, 5))


@pytest.fixture(scope="module")
def transformer_parts():
    model = create_model("transformer", "tiny")
    specs = {part: spec for part, (_, spec) in model.export_parts().items()}
    return specs, json.loads(json.dumps(model.generation_config().__dict__, default=list))


def test_profiles_of_the_transformer_encoder_part(transformer_parts):
    specs, _ = transformer_parts
    assert derive_profiles(specs["encoder"]) == {
        "src": ((1, 3), (8, 7), (8, 14)), "src_lengths": ((1,), (8,), (8,))}


def test_decoder_step_cache_runs_from_empty_to_the_generation_limit(transformer_parts):
    specs, generation = transformer_parts
    step = specs["decoder_step"]
    profiles = derive_profiles(step, trt_rt.policy_for(None, step, generation))
    limit = generation.get("length_limit") or generation["max_length"]
    assert profiles["self_keys"] == ((1, 2, 4, 0, 8), (8, 2, 4, 3, 8), (8, 2, 4, limit, 8))
    assert profiles["cross_keys"][2] == (8, 2, 4, 14, 8)
    assert profiles["tokens"] == ((1,), (8,), (8,))
    # without the generation config the cache axis is sized like any other (from 0)
    assert derive_profiles(step)["self_keys"][0][3] == 0


def test_overrides_replace_derived_profiles():
    profiles = derive_profiles(get_spec("vit", "tiny"),
                               overrides={"images": [[2, 3, 32, 32], [4, 3, 32, 32], [16, 3, 32, 32]]})
    assert profiles == {"images": ((2, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))}


def test_policy_axes_win():
    profiles = derive_profiles(get_spec("detr", "tiny"), ProfilePolicy(axes={"height": (64, 64, 64)}))
    assert profiles["images"] == ((1, 3, 64, 32), (8, 3, 64, 64), (8, 3, 64, 128))


VIT = get_spec("vit", "tiny")


@pytest.mark.parametrize(
    ("spec", "policy", "overrides", "fragments"),
    [
        (VIT, None, {"images": ((4, 3, 32, 32), (2, 3, 32, 32), (8, 3, 32, 32))},
         ["images axis 0 ('batch'): min 4 > opt 2"]),
        (VIT, None, {"images": ((1, 3, 32, 32), (9, 3, 32, 32), (8, 3, 32, 32))},
         ["images axis 0 ('batch'): opt 9 > max 8"]),
        (VIT, None, {"images": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 64, 64))},
         ["images axis 3 is fixed at 32 in the model, the profile gives min 32 opt 32 max 64"]),
        (VIT, None, {"images": ((1, 3, 32), (2, 3, 32), (4, 3, 32))}, ["rank [3], images has rank 4"]),
        (VIT, None, {"images": ((0, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))},
         ["images axis 0 ('batch') may not be empty"]),
        (VIT, None, {"pixels": ((1, 3, 32, 32),) * 3}, ["pixels: not an input of vit (its inputs: images)"]),
        (VIT, None, {"images": ((1, 3, 32, 32), (2, 3, 32, 32))}, ["must be three shapes"]),
        (VIT, ProfilePolicy(max_batch=4, opt_batch=8), None, ["1 <= opt (8) <= max (4)"]),
        (get_spec("transformer", "tiny"), None, {"src": ((1, 7), (2, 7), (4, 7))},
         ["axis 'batch' ranges 1/8/8 in src_lengths but 1/2/4 in src", "1/8/8 in tgt but 1/2/4 in src"]),
        (ModelSpec("m", "custom", "x", (TensorSpec("images", "float32", ("batch", 3, "height", "width")),), ()),
         None, None, ["input images has dynamic axis 'height' (axis 2) and nothing says its size",
                      "dynamic axis 'width' (axis 3)", "--shape images:MIN:OPT:MAX"]),
    ],
)
def test_bad_profiles_are_refused_naming_the_input(spec, policy, overrides, fragments):
    with pytest.raises(ProfileError) as e:
        derive_profiles(spec, policy, overrides)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_every_profile_problem_is_reported_at_once():
    spec = get_spec("transformer", "tiny")
    with pytest.raises(ProfileError) as e:
        derive_profiles(spec, overrides={"src": ((4, 7), (2, 7), (1, 7)), "nope": ((1,),) * 3,
                                         "tgt": ((1, 5), (2, 6), (4, 5))})
    msg = str(e.value)
    assert "nope: not an input" in msg and "src axis 0 ('batch'): min 4 > opt 2" in msg
    assert "tgt axis 1 is fixed at 5" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("images:1x3x224x224:8x3x224x224:32x3x224x224",
         ("images", ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)))),
        ("images:2x3x64x64", ("images", ((2, 3, 64, 64),) * 3)),
        ("src_lengths:1:4:8", ("src_lengths", ((1,), (4,), (8,)))),
    ],
)
def test_shape_option(text, expected):
    assert trt_rt.parse_shape_option(text) == expected


@pytest.mark.parametrize("text", ["images", "images:1x3:2x3", ":1x3", "images:1x3:2xa:3x3", "images:1,3:1,3:1,3"])
def test_bad_shape_options(text):
    with pytest.raises(ProfileError, match="NAME:MIN:OPT:MAX|sizes joined by 'x'"):
        trt_rt.parse_shape_option(text)


@pytest.mark.parametrize(("text", "n"), [("1048576", 1 << 20), ("4G", 4 << 30), ("512MiB", 512 << 20),
                                         ("1.5g", 3 << 29), ("64kb", 64 << 10)])
def test_sizes(text, n):
    assert trt_rt.parse_size(text) == n


def test_bad_size():
    with pytest.raises(TensorRTError, match="like 4G"):
        trt_rt.parse_size("four gigs")


# ---- TensorRT 10 vs 11 ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("version", "precision", "strongly_typed", "network", "set_", "clear"),
    [
        ("10.9.0.34", "fp32", False, (), (), ("TF32",)),
        ("10.9.0.34", "fp16", False, (), ("FP16",), ()),
        ("10.13.2", "int8", False, (), ("INT8",), ()),
        ("10.0.1", "onnx", True, ("STRONGLY_TYPED",), (), ("TF32",)),
        ("11.0.0", "fp32", True, (), (), ("TF32",)),
        ("11.1.0.7", "onnx", True, (), (), ("TF32",)),
    ],
)
def test_precision_plan(version, precision, strongly_typed, network, set_, clear):
    plan = trt_rt.precision_plan(version, precision)
    assert (plan.strongly_typed, plan.network_flags, plan.set_flags, plan.clear_flags) == (
        strongly_typed, network, set_, clear)
    assert plan.tensorrt_major == int(version.split(".")[0])


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_11_refuses_precision_flags_and_says_where_precision_comes_from(precision):
    with pytest.raises(PrecisionError) as e:
        trt_rt.precision_plan("11.0.0", precision)
    msg = str(e.value)
    assert "strongly typed" in msg and f"attnserve export --precision {precision}" in msg


def test_old_tensorrt_and_unknown_precisions_are_refused():
    with pytest.raises(BackendUnavailableError, match="TensorRT 8.6.1 is too old.*10 or newer"):
        trt_rt.precision_plan("8.6.1", "fp32")
    with pytest.raises(PrecisionError, match="unknown precision 'bf16'; choose one of fp32, fp16, int8, onnx"):
        trt_rt.precision_plan("10.9.0", "bf16")
    with pytest.raises(TensorRTError, match="cannot read TensorRT's version"):
        trt_rt.precision_plan("ten", "fp32")


# ---- parser errors ------------------------------------------------------------------------------------

class FakeParserError:
    def __init__(self, index, name, op, desc, stack=()):
        self._v = (index, name, op, desc, list(stack))

    def node(self):
        return self._v[0]

    def node_name(self):
        return self._v[1]

    def node_operator(self):
        return self._v[2]

    def desc(self):
        return self._v[3]

    def local_function_stack(self):
        return self._v[4]


class FakeParser:
    def __init__(self, errors):
        self.errors = errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


def test_parser_errors_are_one_line_per_failing_node():
    parser = FakeParser([
        FakeParserError(12, "/blocks.0/attn/WindowAttention", "WindowAttention",
                        "Plugin not found, are the plugin name, version,\n  and namespace correct?"),
        FakeParserError(12, "/blocks.0/attn/WindowAttention", "WindowAttention",
                        "Plugin not found, are the plugin name, version,\n  and namespace correct?"),
        FakeParserError(40, "", "NonMaxSuppression", "No importer registered for op: NonMaxSuppression"),
        FakeParserError(7, "/head/Mod", "Mod", "fmod=0 is unsupported", stack=["Swin_block", "Roll"]),
        FakeParserError(-1, "", "", "Failed to parse ONNX model"),
    ])
    nodes = trt_rt.parser_errors(parser)
    assert nodes == [
        NodeError("/blocks.0/attn/WindowAttention", "WindowAttention",
                  "Plugin not found, are the plugin name, version, and namespace correct?"),
        NodeError("#40", "NonMaxSuppression", "No importer registered for op: NonMaxSuppression"),
        NodeError("/head/Mod", "Mod", "fmod=0 is unsupported (inside local function Swin_block > Roll)"),
        NodeError("", "", "Failed to parse ONNX model"),
    ]
    error = ParserError("out/swin/model.onnx", nodes)
    assert isinstance(error, AttnserveError)
    lines = str(error).splitlines()
    assert lines[0] == "TensorRT's ONNX parser cannot read out/swin/model.onnx (4 failing node(s)):"
    assert lines[1].startswith("  node /blocks.0/attn/WindowAttention (WindowAttention): Plugin not found")
    assert "attnserve custom op" in lines[1] and "--no-custom-ops" in lines[1]
    assert lines[2] == "  node #40 (NonMaxSuppression): No importer registered for op: NonMaxSuppression"
    assert lines[4] == "  the model: Failed to parse ONNX model"
    assert len(lines) == 5


def test_parser_errors_from_objects_with_fewer_methods():
    class Bare:
        def __str__(self):
            return "In node 3 (parse): INVALID_NODE: bad"

    nodes = trt_rt.parser_errors(FakeParser([Bare()]))
    assert nodes == [NodeError("", "", "In node 3 (parse): INVALID_NODE: bad")]
    long = FakeParserError(1, "n", "Op", "x" * 1000)
    assert len(trt_rt.parser_errors(FakeParser([long]))[0].message) == 400
    assert str(ParserError("m.onnx", [])).endswith("(the parser gave no reason)")


# ---- workspace, network inputs ------------------------------------------------------------------------

def test_workspace_larger_than_free_memory_is_refused():
    trt_rt.check_workspace(None, 1, 2, "gpu")
    trt_rt.check_workspace(1 << 30, 2 << 30, 8 << 30, "NVIDIA L4")
    with pytest.raises(GpuMemoryError) as e:
        trt_rt.check_workspace(8 << 30, 3 << 30, 24 << 30, "NVIDIA L4", device=1)
    assert str(e.value) == ("a workspace of 8.0 GiB is more than the 3.0 GiB free on GPU 1 (NVIDIA L4, 24.0 GiB "
                            "in all); pass a smaller --workspace")
    with pytest.raises(TensorRTError, match="positive"):
        trt_rt.check_workspace(0, 1, 1, "gpu")


def test_network_inputs_against_profiles():
    profiles = {"images": ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))}
    assert trt_rt.network_problems({"images": (-1, 3, 32, 32)}, profiles) == []
    problems = trt_rt.network_problems({"images": (-1, 3, 16, 32), "mask": (-1, 4)},
                                       {**profiles, "extra": ((1,),) * 3})
    assert "input images axis 2 is fixed at 16 in the ONNX graph, the profile gives 32/32/32" in problems
    assert "the ONNX graph has dynamic input mask (-1, 4) with no profile" in problems
    assert any(p.startswith("profiles name extra, which the ONNX graph has no input of") for p in problems)
    assert trt_rt.network_problems({"images": (-1, 3)}, profiles) == [
        "input images has rank 2 in the ONNX graph, its profile rank 4"]


# ---- sidecar and engine cache -------------------------------------------------------------------------

def write_tiny_onnx(path: Path, value: float = 1.0, batch="batch") -> Path:
    """y = x + w, with w stored as external data in <name>.data."""
    w = onnx.numpy_helper.from_array(np.full((4,), value, np.float32), "w")
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4])], [w])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


PROFILES = {"x": ((1, 4), (8, 4), (8, 4))}
HERE = Environment("10.9.0.34", "NVIDIA A100-SXM4-40GB", "8.0", {"attnserve::WindowAttention": "1"})


@pytest.fixture
def built(tmp_path):
    """An ONNX model, a fake engine and its sidecar as build_engine writes them."""
    onnx_path = write_tiny_onnx(tmp_path / "export" / "model.onnx")
    engine = tmp_path / "export" / "model.engine"
    engine.write_bytes(b"plan")
    sidecar = ec.make_sidecar(engine=engine, onnx_path=onnx_path, env=HERE, precision="fp16", profiles=PROFILES,
                              plugins=HERE.plugins, plugin_sources=["attnserve"],
                              io={"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}]})
    ec.write_sidecar(engine, sidecar)
    return onnx_path, engine


def test_sidecar_round_trip(built):
    onnx_path, engine = built
    assert ec.sidecar_path(engine).name == "model.engine.json"
    sidecar = ec.read_sidecar(engine)
    assert sidecar["format"] == ec.SIDECAR_FORMAT and sidecar["engine"] == "model.engine"
    assert sidecar["tensorrt"] == "10.9.0.34"
    assert sidecar["gpu"] == {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}
    assert sidecar["precision"] == "fp16"
    assert ec.profiles_from_json(sidecar["profiles"]) == PROFILES
    assert sidecar["plugins"] == {"attnserve::WindowAttention": "1"}
    files = sidecar["onnx"]["files"]
    assert sorted(files) == ["model.onnx", "model.onnx.data"]  # the graph and its external data
    assert files["model.onnx.data"]["sha256"] == ec.file_sha256(onnx_path.with_name("model.onnx.data"))
    assert sidecar["onnx"]["path"] == "model.onnx"  # relative: the directory moves as a whole
    assert ec.recorded_onnx(engine, sidecar) == onnx_path.resolve()
    assert ec.sidecar_problems(sidecar, HERE, onnx=ec.current_fingerprint(onnx_path, files),
                               precision="fp16", profiles=PROFILES) == []


def test_a_moved_export_directory_still_finds_its_onnx(built, tmp_path):
    _, engine = built
    moved = tmp_path / "elsewhere"
    os.rename(engine.parent, moved)
    assert ec.recorded_onnx(moved / "model.engine", ec.read_sidecar(moved / "model.engine")) == \
        (moved / "model.onnx").resolve()


@pytest.mark.parametrize(
    ("env", "asked", "expected"),
    [
        (Environment(tensorrt="10.13.0"), {},
         "it was built with TensorRT 10.9.0.34, this machine has TensorRT 10.13.0"),
        (Environment(gpu_name="NVIDIA L4", compute_capability="8.9"), {},
         "it was built for compute capability 8.0 (NVIDIA A100-SXM4-40GB), this GPU is 8.9 (NVIDIA L4)"),
        (Environment(gpu_name="NVIDIA A100-PCIE-40GB", compute_capability="8.0"), {},
         "it was built on a NVIDIA A100-SXM4-40GB, this GPU is a NVIDIA A100-PCIE-40GB (TensorRT picks kernels "
         "by timing them on the building GPU)"),
        (Environment(), {"precision": "fp32"}, "it was built at precision fp16, fp32 was asked for"),
        (Environment(), {"profiles": {"x": ((1, 4), (4, 4), (16, 4))}},
         "its profile for x is min 1x4 opt 8x4 max 8x4, asked for min 1x4 opt 4x4 max 16x4"),
        (Environment(), {"profiles": {"mask": ((1,),) * 3}}, "it has no profile for input mask"),
        (Environment(plugins={"attnserve::WindowAttention": "2"}), {},
         "it uses plugin attnserve::WindowAttention version 1, this machine has version 2"),
        (Environment(plugins={}), {},
         "it uses plugin attnserve::WindowAttention (version 1), which is not registered here"),
    ],
)
def test_each_kind_of_mismatch_is_named(built, env, asked, expected):
    _, engine = built
    assert ec.sidecar_problems(ec.read_sidecar(engine), env, **asked) == [expected]


def test_changed_missing_and_new_onnx_files_are_named(built):
    onnx_path, engine = built
    sidecar = ec.read_sidecar(engine)
    files = sidecar["onnx"]["files"]
    data = onnx_path.with_name("model.onnx.data")
    data.write_bytes(np.full((4,), 2.0, np.float32).tobytes())  # new weights, same graph
    problems = ec.sidecar_problems(sidecar, Environment(), onnx=ec.current_fingerprint(onnx_path, files))
    assert len(problems) == 1 and problems[0].startswith("model.onnx.data changed since it was built (sha256 ")
    data.unlink()
    problems = ec.sidecar_problems(sidecar, Environment(), onnx=ec.current_fingerprint(onnx_path, files))
    assert "model.onnx.data, which it was built from, is missing" in problems
    other = write_tiny_onnx(onnx_path.with_name("other.onnx"))
    problems = ec.sidecar_problems(sidecar, Environment(), onnx=ec.current_fingerprint(other, files))
    assert "the ONNX model now has other.onnx, which it was not built from" in problems


def test_no_onnx_here_skips_the_hash_and_unprobed_fields_are_not_compared(built):
    _, engine = built
    assert ec.sidecar_problems(ec.read_sidecar(engine), Environment(), onnx=None) == []


def test_all_mismatches_are_listed_together(built):
    _, engine = built
    env = Environment("11.0.0", "NVIDIA L4", "8.9", {})
    problems = ec.sidecar_problems(ec.read_sidecar(engine), env, precision="fp32")
    assert len(problems) == 4
    assert [p.split(",")[0] for p in problems] == [
        "it was built with TensorRT 10.9.0.34", "it was built for compute capability 8.0 (NVIDIA A100-SXM4-40GB)",
        "it was built at precision fp16", "it uses plugin attnserve::WindowAttention (version 1)"]


def test_fingerprint_reads_a_file_again_only_when_its_size_or_time_changed(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"abc")
    first = ec.fingerprint([f])
    assert first["model.onnx"]["sha256"] == ec.file_sha256(f)
    stale = {"model.onnx": {**first["model.onnx"], "sha256": "recorded"}}
    assert ec.fingerprint([f], stale)["model.onnx"]["sha256"] == "recorded"  # stat matched: not re-read
    os.utime(f, ns=(first["model.onnx"]["mtime_ns"] + 10**9,) * 2)
    assert ec.fingerprint([f], stale)["model.onnx"]["sha256"] == first["model.onnx"]["sha256"]


def test_onnx_files_without_external_data(tmp_path):
    model = oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                                        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    assert ec.onnx_files(tmp_path / "m.onnx") == [tmp_path / "m.onnx"]
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert ec.onnx_files(tmp_path / "junk.onnx") == [tmp_path / "junk.onnx"]


def test_missing_corrupt_and_foreign_sidecars(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(EngineMismatchError, match="has no sidecar model.engine.json"):
        ec.read_sidecar(engine)
    ec.sidecar_path(engine).write_text("{not json")
    with pytest.raises(EngineMismatchError, match="is not readable JSON"):
        ec.read_sidecar(engine)
    ec.sidecar_path(engine).write_text(json.dumps({"format": 99}))
    with pytest.raises(EngineMismatchError, match="sidecar format 99; this attnserve reads format 1"):
        ec.read_sidecar(engine)


def test_cache_decision(built, tmp_path):
    onnx_path, engine = built
    assert ec.cache_decision(engine, [], onnx_path, rebuild=False) == "use"
    assert ec.cache_decision(engine, ["it was built at precision fp16, fp32 was asked for"], onnx_path,
                             rebuild=True) == "rebuild"
    with pytest.raises(EngineMismatchError) as e:
        ec.cache_decision(engine, ["it was built with TensorRT 10.9.0.34, this machine has TensorRT 10.13.0"],
                          onnx_path, rebuild=False)
    msg = str(e.value)
    assert msg.startswith(f"{engine} cannot be used here: it was built with TensorRT 10.9.0.34")
    assert f"attnserve build-engine {onnx_path} -o {engine}" in msg
    with pytest.raises(EngineMismatchError, match="is not here"):
        ec.cache_decision(engine, ["x"], tmp_path / "gone.onnx", rebuild=True)
    with pytest.raises(EngineMismatchError, match="from the ONNX model it came from"):
        ec.cache_decision(engine, ["x"], None, rebuild=True)


@pytest.fixture
def fake_machine(monkeypatch):
    """load_engine's view of a machine like HERE, with TensorRT, the GPU, plugin
    registration and the builder replaced by fakes; returns the builds made."""
    builds = []
    monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: types.SimpleNamespace(__version__=HERE.tensorrt))
    monkeypatch.setattr(trt_rt, "import_cudart", lambda: None)
    monkeypatch.setattr(trt_rt, "gpu_info", lambda cudart, device: trt_rt.GpuInfo(
        HERE.gpu_name, HERE.compute_capability, 8 << 30, 40 << 30))
    monkeypatch.setattr(trt_rt, "register_plugins", lambda trt, sources: (dict(HERE.plugins), list(sources)))

    def build(onnx_path, out, profiles=None, precision="fp32", plugins=(), device=0, spec=None, **options):
        builds.append({"profiles": profiles, "precision": precision, "plugins": plugins, **options})
        out.write_bytes(b"rebuilt plan")
        ec.write_sidecar(out, ec.make_sidecar(engine=out, onnx_path=onnx_path, env=HERE, precision=precision,
                                              profiles=profiles, plugins=HERE.plugins, plugin_sources=plugins))
        return out

    monkeypatch.setattr(trt_rt, "build_engine", build)
    return builds


def test_a_matching_engine_is_used_as_is(built, fake_machine):
    onnx_path, engine = built
    loaded = runtime.load_engine(engine, onnx_path, precision="fp16", profiles=PROFILES)
    assert (loaded.data, loaded.rebuilt, fake_machine) == (b"plan", False, [])


def test_a_mismatching_engine_is_rebuilt_as_it_was_built(built, fake_machine):
    onnx_path, engine = built
    ec.write_sidecar(engine, {**ec.read_sidecar(engine), "tensorrt": "10.3.0"})
    loaded = runtime.load_engine(engine, workspace=1 << 30)  # the ONNX path comes from the sidecar
    assert loaded.rebuilt and loaded.data == b"rebuilt plan"
    assert fake_machine == [{"profiles": PROFILES, "precision": "fp16", "plugins": ["attnserve"],
                             "workspace": 1 << 30}]
    assert ec.read_sidecar(engine)["tensorrt"] == HERE.tensorrt


def test_asking_for_another_precision_or_profile_rebuilds_with_it(built, fake_machine):
    onnx_path, engine = built
    wider = {"x": ((1, 4), (16, 4), (64, 4))}
    runtime.load_engine(engine, onnx_path, precision="fp32", profiles=wider)
    assert fake_machine[0]["precision"] == "fp32" and fake_machine[0]["profiles"] == wider


def test_a_mismatch_without_rebuilding_is_refused_naming_every_difference(built, fake_machine, monkeypatch):
    onnx_path, engine = built
    ec.write_sidecar(engine, {**ec.read_sidecar(engine), "tensorrt": "10.3.0"})

    def no_plugins(trt, sources):
        raise PluginError("attnserve's TensorRT plugins (attnserve.plugins) are not in this installation")

    monkeypatch.setattr(trt_rt, "register_plugins", no_plugins)
    with pytest.raises(EngineMismatchError) as e:
        runtime.load_engine(engine, onnx_path, rebuild=False)
    msg = str(e.value)
    assert "it was built with TensorRT 10.3.0, this machine has TensorRT 10.9.0.34" in msg
    assert "attnserve.plugins) are not in this installation" in msg
    assert "it uses plugin attnserve::WindowAttention (version 1), which is not registered here" in msg
    assert fake_machine == []


def test_a_missing_engine_is_built_from_the_onnx_or_refused(built, fake_machine, tmp_path):
    onnx_path, _ = built
    engine = tmp_path / "new" / "model.engine"
    engine.parent.mkdir()
    with pytest.raises(EngineMismatchError, match="does not exist.*from the ONNX model it came from"):
        runtime.load_engine(engine)
    loaded = runtime.load_engine(engine, onnx_path.parent)  # an export directory will do
    assert loaded.rebuilt and fake_machine[0]["precision"] == "fp32"


def test_an_edited_onnx_model_rebuilds_its_engine(built, fake_machine):
    onnx_path, engine = built
    onnx_path.with_name("model.onnx.data").write_bytes(np.zeros(4, np.float32).tobytes())
    assert runtime.load_engine(engine).rebuilt


# ---- the runner's plain parts -------------------------------------------------------------------------

def test_dtype_mapping():
    assert {k: trt_rt.numpy_dtype(k, "t") for k in trt_rt.TRT_TO_NUMPY} == {
        "FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
        "BOOL": "bool", "UINT8": "uint8"}
    with pytest.raises(TensorRTError, match="tensor logits is BF16, which numpy has no type for"):
        trt_rt.numpy_dtype("BF16", "logits")


def test_buffer_sizes():
    assert trt_rt.nbytes((8, 3, 224, 224), "float16") == 8 * 3 * 224 * 224 * 2
    assert trt_rt.nbytes((4, 2, 4, 0, 8), "float32") == 0


TWO_PROFILES = [{"images": ((1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))},
                {"images": ((5, 3, 32, 32), (16, 3, 32, 32), (32, 3, 32, 32))}]


def test_profile_selection():
    assert trt_rt.select_profile(TWO_PROFILES, {"images": (2, 3, 32, 32)}) == 0
    assert trt_rt.select_profile(TWO_PROFILES, {"images": (32, 3, 32, 32)}) == 1
    assert trt_rt.select_profile([], {"images": (2, 3, 32, 32)}) == 0  # a static engine


def test_shapes_outside_the_profile_are_an_input_error():
    with pytest.raises(InputError) as e:
        trt_rt.select_profile(TWO_PROFILES[:1], {"images": (9, 3, 32, 32)})
    assert "images axis 0 is 9, the profile allows 1..4" in str(e.value)
    assert "attnserve build-engine --shape" in str(e.value)
    with pytest.raises(InputError, match=r"profile 0: images axis 0 is 64, .*\| profile 1: images axis 0 is 64, "
                                         r"the profile allows 5..32"):
        trt_rt.select_profile(TWO_PROFILES, {"images": (64, 3, 32, 32)})
    with pytest.raises(InputError, match="images has rank 3, the profile rank 4"):
        trt_rt.select_profile(TWO_PROFILES, {"images": (64, 3, 32)})


def test_io_specs_take_named_axes_from_the_sidecar():
    recorded = [{"name": "src", "dtype": "int64", "shape": ["batch", "src_len"], "value_range": [4, 100]}]
    specs = trt_rt.io_specs(["src", "extra"], {"src": "int64", "extra": "float32"},
                            {"src": (-1, -1), "extra": (-1, 3)}, recorded)
    assert specs == [TensorSpec("src", "int64", ("batch", "src_len"), (4, 100)),
                     TensorSpec("extra", "float32", ("extra_dim0", 3))]


def test_pinned_buffer_views_round_trip():
    memory = ctypes.create_string_buffer(64)
    raw = trt_rt.host_bytes(ctypes.addressof(memory), 64)
    view = trt_rt.host_view(raw, "float32", (2, 3))
    view[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.frombuffer(memory.raw[:24], np.float32).tolist() == [0, 1, 2, 3, 4, 5]
    again = trt_rt.host_view(raw, "float32", (3, 2))  # the same memory, reused with another shape
    assert again.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert trt_rt.host_view(raw, "int64", (0, 4)).shape == (0, 4)
    with pytest.raises(InternalError, match="needs 72 bytes, the buffer has 64"):
        trt_rt.host_view(raw, "float64", (9,))


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:2", 2), ("gpu:1", 1), (3, 3)])
def test_devices(device, index):
    assert trt_rt.parse_device(device) == index


def test_the_trt_runner_does_not_run_on_the_cpu():
    with pytest.raises(BackendUnavailableError, match="NVIDIA GPU: pass device 'cuda' or 'cuda:N', not 'cpu'"):
        trt_rt.parse_device("cpu")


class FakeError:
    def __init__(self, value, name):
        self.value, self.name = value, name


def test_cuda_results_are_checked():
    ok = FakeError(0, "cudaSuccess")
    assert trt_rt.cuda_check((ok, 42), "cudaMalloc") == 42
    assert trt_rt.cuda_check((ok, 1, 2), "cudaMemGetInfo") == (1, 2)
    assert trt_rt.cuda_check((ok,), "cudaFree") is None
    with pytest.raises(TensorRTError, match=r"CUDA call cudaMalloc\(8\) failed: cudaErrorMemoryAllocation \(2\)"):
        trt_rt.cuda_check((FakeError(2, "cudaErrorMemoryAllocation"), 0), "cudaMalloc(8)")


class FakeCudart:
    def __init__(self, fail=False):
        self.fail = fail

    def cudaSetDevice(self, device):  # noqa: N802
        return (FakeError(100, "cudaErrorNoDevice") if self.fail else FakeError(0, "ok"),)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return FakeError(0, "ok"), types.SimpleNamespace(name=b"NVIDIA L4\x00\x00junk", major=8, minor=9)

    def cudaMemGetInfo(self):  # noqa: N802
        return FakeError(0, "ok"), 3 << 30, 24 << 30


def test_gpu_info():
    assert trt_rt.gpu_info(FakeCudart(), 0) == trt_rt.GpuInfo("NVIDIA L4", "8.9", 3 << 30, 24 << 30)
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU 0 here: .*cudaErrorNoDevice"):
        trt_rt.gpu_info(FakeCudart(fail=True), 0)


def test_plugin_versions_and_sets():
    creators = [types.SimpleNamespace(name="WindowAttention", plugin_version="1", plugin_namespace="attnserve"),
                types.SimpleNamespace(name="GridSampler", plugin_version=2, plugin_namespace="attnserve"),
                types.SimpleNamespace(name="NMS_TRT", plugin_version="1", plugin_namespace="")]
    registry = types.SimpleNamespace(all_creators=creators)
    assert trt_rt.plugin_versions(registry, {"attnserve"}) == {
        "attnserve::WindowAttention": "1", "attnserve::GridSampler": "2"}
    assert trt_rt.plugins_to_register(("lib.so",), custom_ops=True) == ["lib.so", "attnserve"]
    assert trt_rt.plugins_to_register(("attnserve", "attnserve"), custom_ops=True) == ["attnserve"]
    assert trt_rt.plugins_to_register((), custom_ops=False) == []


@pytest.fixture
def fresh_plugin_registration(monkeypatch):
    monkeypatch.setattr(trt_rt, "_registered_attnserve", False)


def test_a_missing_plugin_module_is_a_clear_error(monkeypatch, fresh_plugin_registration):
    monkeypatch.setitem(sys.modules, "attnserve.plugins", None)
    with pytest.raises(PluginError, match=r"attnserve's TensorRT plugins \(attnserve.plugins\) are not in this "
                                          r"installation.*--no-custom-ops"):
        trt_rt.register_plugins(types.SimpleNamespace(), ["attnserve"])


def test_plugins_that_cannot_register_say_why(monkeypatch, fresh_plugin_registration):
    def refuse():
        raise BackendUnavailableError("TensorRT 10.3 has no ahead-of-time Python plugins")

    monkeypatch.setitem(sys.modules, "attnserve.plugins", types.SimpleNamespace(register_plugins=refuse))
    with pytest.raises(PluginError, match="no ahead-of-time Python plugins; or export the model with --no-custom"):
        trt_rt.register_plugins(types.SimpleNamespace(), ["attnserve"])
    monkeypatch.setitem(sys.modules, "attnserve.plugins", types.SimpleNamespace())
    with pytest.raises(PluginError, match="has no register_plugins"):
        trt_rt.register_plugins(types.SimpleNamespace(), ["attnserve"])


def test_plugins_are_registered_once_and_versions_recorded(monkeypatch, fresh_plugin_registration, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "attnserve.plugins",
                        types.SimpleNamespace(register_plugins=lambda: calls.append(1)))
    creator = types.SimpleNamespace(name="GridSampler", plugin_version="1", plugin_namespace="attnserve")
    loaded = []
    registry = types.SimpleNamespace(all_creators=[creator], load_library=lambda path: loaded.append(path) or "handle")
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    lib = tmp_path / "libplugins.so"
    lib.write_bytes(b"\x7fELF")
    for _ in range(2):
        versions, sources = trt_rt.register_plugins(trt, ["attnserve", str(lib)])
    assert calls == [1] and loaded == [str(lib)] * 2
    assert versions == {"attnserve::GridSampler": "1", "library:libplugins.so": ec.file_sha256(lib)[:16]}
    assert sources == ["attnserve", str(lib)]
    with pytest.raises(PluginError, match="'nope.so' is neither 'attnserve' nor a plugin library file"):
        trt_rt.register_plugins(trt, ["nope.so"])


def test_attnserve_op_names_match_the_custom_ops():
    from attnserve.ops.onnx_ops import PLUGIN_NAMESPACE, SCHEMAS

    assert trt_rt.ATTNSERVE_OPS == tuple(s.name for s in SCHEMAS)
    assert trt_rt.PLUGIN_NAMESPACE == PLUGIN_NAMESPACE


# ---- which spec an ONNX file has, where engines go ----------------------------------------------------

def fake_export(root: Path, spec: ModelSpec, parts: dict | None = None, generation=None) -> Path:
    """An export directory as the builder reads it (the graph is only hashed and parsed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"not a real graph")
    manifest = {"spec": spec.to_dict(), "parts": {}, "generation": generation}
    for part, part_spec in (parts or {}).items():
        (root / part).mkdir()
        (root / part / "model.onnx").write_bytes(b"part")
        manifest["parts"][part] = {"onnx": f"{part}/model.onnx", "spec": part_spec.to_dict()}
    (root / "attnserve.json").write_text(json.dumps(manifest))
    return root


def test_specs_of_exports_parts_and_bare_onnx_files(tmp_path, transformer_parts):
    specs, generation = transformer_parts
    root = fake_export(tmp_path / "tr", get_spec("transformer", "tiny"), specs, generation)
    spec, gen = trt_rt.model_spec_for(root / "model.onnx")
    assert spec.input_names == ["src", "src_lengths", "tgt"] and gen is None
    spec, gen = trt_rt.model_spec_for(root / "decoder_step" / "model.onnx")
    assert spec.input_names[0] == "tokens" and gen == generation
    bare = write_tiny_onnx(tmp_path / "bare" / "net.onnx")
    spec, _ = trt_rt.model_spec_for(bare)
    assert spec.inputs == (TensorSpec("x", "float32", ("batch", 4)),)
    assert derive_profiles(spec) == PROFILES
    unnamed = write_tiny_onnx(tmp_path / "bare2" / "net.onnx", batch=None)
    with pytest.raises(ProfileError, match="input x has dynamic axis 'x_dim0'"):
        derive_profiles(trt_rt.model_spec_for(unnamed)[0])


def test_engine_paths(tmp_path):
    onnx_path = tmp_path / "vit" / "model.onnx"
    assert trt_rt.engine_path_for(onnx_path) == tmp_path / "vit" / "model.engine"
    assert trt_rt.engine_path_for(onnx_path, tmp_path / "engines") == tmp_path / "engines" / "model.engine"
    assert trt_rt.engine_path_for(onnx_path, tmp_path / "x.plan") == tmp_path / "x.plan"
    with pytest.raises(AttnserveError, match="does not exist; pass an export directory or an .onnx file"):
        trt_rt.resolve_onnx(tmp_path / "nothing")


# ---- build_engine and TrtRunner against fakes of TensorRT's Python API and cuda-python ----------------
# The fakes have the signatures of the bindings (NVIDIA/TensorRT python/src/infer/pyCore.cpp,
# parsers/pyOnnx.cpp, 10.x and 11) and of cuda.bindings.runtime (12.9 and 13.x): every CUDA call
# returns (error, *results), set_optimization_profile_async raises RuntimeError where the C++ API
# returns false, and a capture records enqueued work that cudaGraphLaunch replays.

OK = FakeError(0, "cudaSuccess")


class FakeStream:
    def __int__(self):
        return 0xC0FFEE


class FakeCudaRuntime:
    """Device and pinned memory are host memory (ctypes) here; copies check their kind."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)  # noqa: N815
    cudaStreamCaptureMode = types.SimpleNamespace(  # noqa: N815
        cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1, cudaStreamCaptureModeRelaxed=2)

    def __init__(self):
        self.memory, self.device_addrs, self.host_addrs = {}, set(), set()
        self.calls, self.capturing, self.captured = [], False, None

    def _alloc(self, size, where):
        buf = ctypes.create_string_buffer(size)
        self.memory[ctypes.addressof(buf)] = buf
        where.add(ctypes.addressof(buf))
        return OK, ctypes.addressof(buf)

    def cudaSetDevice(self, device):  # noqa: N802
        self.calls.append(("cudaSetDevice", device))
        return (OK,)

    def cudaMalloc(self, size):  # noqa: N802
        return self._alloc(size, self.device_addrs)

    def cudaMallocHost(self, size):  # noqa: N802
        return self._alloc(size, self.host_addrs)

    def cudaFree(self, ptr):  # noqa: N802
        self.calls.append(("cudaFree", ptr))
        self.device_addrs.remove(ptr)
        return (OK,)

    def cudaFreeHost(self, ptr):  # noqa: N802
        self.calls.append(("cudaFreeHost", ptr))
        self.host_addrs.remove(ptr)
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert isinstance(stream, FakeStream) and not self.capturing
        h2d = kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert (src in self.host_addrs and dst in self.device_addrs) if h2d else \
            (src in self.device_addrs and dst in self.host_addrs), "copy of the wrong kind"
        ctypes.memmove(dst, src, count)
        self.calls.append(("cudaMemcpyAsync", "H2D" if h2d else "D2H", count))
        return (OK,)

    def cudaStreamCreate(self):  # noqa: N802
        return OK, FakeStream()

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert not self.capturing, "synchronising a capturing stream"
        self.calls.append(("cudaStreamSynchronize",))
        return (OK,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.calls.append(("cudaStreamDestroy",))
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.calls.append(("cudaStreamBeginCapture", mode))
        self.capturing, self.captured = True, []
        return (OK,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        self.capturing = False
        return OK, ("graph", tuple(self.captured))

    def cudaGraphInstantiateWithFlags(self, graph, flags):  # noqa: N802
        assert flags == 0
        return OK, ("exec", graph[1])

    def cudaGraphLaunch(self, executable, stream):  # noqa: N802
        self.calls.append(("cudaGraphLaunch",))
        for kernel in executable[1]:
            kernel()
        return (OK,)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        self.calls.append(("cudaGraphDestroy",))
        return (OK,)

    def cudaGraphExecDestroy(self, executable):  # noqa: N802
        self.calls.append(("cudaGraphExecDestroy",))
        return (OK,)

    def cudaGetLastError(self):  # noqa: N802
        self.calls.append(("cudaGetLastError",))
        return (OK,)


class FakeILogger:
    Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self):  # a subclass that skips this has no C++ logger: TensorRT refuses it
        self.base_initialised = True


def _logger_ok(logger):
    assert getattr(logger, "base_initialised", False), "trt.ILogger.__init__ was not called"
    return logger


def _io_mode():
    return types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")


class FakeContext:
    """y = x * scale + 1 on `x` (-1, 4) and the static `scale` (4,). Like TensorRT, the
    first enqueueV3 after a change of shapes or profile prepares state that the kernels
    read; a kernel run against state prepared for other shapes writes NaN."""

    def __init__(self, engine):
        self.engine, self.cudart = engine, engine.cudart
        self.profile, self.shapes, self.addresses, self.prepared = 0, {}, {}, None
        self.profile_calls, self.enqueues = [], 0

    def set_optimization_profile_async(self, profile_index, stream_handle):
        assert isinstance(stream_handle, int)
        self.profile_calls.append(profile_index)
        if profile_index in self.engine.refused_profiles or profile_index >= self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.profile, self.prepared = profile_index, None
        return True

    def set_input_shape(self, name, shape):
        assert isinstance(shape, tuple)
        lo, _, hi = self.engine.profiles[self.profile].get(name, (shape, shape, shape))
        if not all(a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        assert isinstance(memory, int) and memory in self.cudart.device_addrs
        self.addresses[name] = memory
        return True

    def get_tensor_shape(self, name):
        if name == "y":
            return (self.shapes["x"][0], 4) if "x" in self.shapes else (-1, 4)
        return self.shapes.get(name, self.engine.get_tensor_shape(name))

    def _kernel(self, shapes, addresses):
        rows = shapes["x"][0]
        x = np.ctypeslib.as_array((ctypes.c_float * (rows * 4)).from_address(addresses["x"])).reshape(rows, 4)
        scale = np.ctypeslib.as_array((ctypes.c_float * 4).from_address(addresses["scale"]))
        y = np.ctypeslib.as_array((ctypes.c_float * (rows * 4)).from_address(addresses["y"])).reshape(rows, 4)
        y[:] = x * scale + 1 if self.prepared == (self.profile, shapes) else np.nan

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 0xC0FFEE
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        if self.cudart.capturing:
            if self.engine.fail_capture:
                return False
            self.cudart.captured.append(lambda: self._kernel(shapes, addresses))
            return True
        self.enqueues += 1
        self.prepared = (self.profile, shapes)
        self._kernel(shapes, addresses)
        return True


class FakeEngine:
    names = ("x", "scale", "y")
    static = {"x": (-1, 4), "scale": (4,), "y": (-1, 4)}

    def __init__(self, trt, cudart, *, no_context=False, fail_capture=False, refused_profiles=()):
        self.trt, self.cudart = trt, cudart
        self.profiles = [{"x": ((1, 4), (2, 4), (4, 4))}, {"x": ((5, 4), (8, 4), (16, 4))}]
        self.no_context, self.fail_capture, self.refused_profiles = no_context, fail_capture, refused_profiles
        self.profile_queries, self.contexts = [], []

    num_io_tensors = 3
    num_optimization_profiles = 2

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.OUTPUT if name == "y" else self.trt.TensorIOMode.INPUT

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name="FLOAT")

    def get_tensor_shape(self, name):
        return self.static[name]

    def get_tensor_profile_shape(self, name, profile_index):
        assert isinstance(name, str) and isinstance(profile_index, int)  # (name, profile_index)
        self.profile_queries.append((name, profile_index))
        return list(self.profiles[profile_index].get(name, (self.static[name],) * 3))

    def create_execution_context(self):
        if self.no_context:
            return None
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(version="10.9.0.34", **engine_options):
    trt = types.SimpleNamespace(__version__=version, ILogger=FakeILogger, TensorIOMode=_io_mode(),
                                builtin_plugin_inits=[], engines=[])
    cudart = FakeCudaRuntime()

    def init_libnvinfer_plugins(logger, namespace):
        trt.builtin_plugin_inits.append((_logger_ok(logger), namespace))
        return True

    class Runtime:
        def __init__(self, logger):
            self.logger = _logger_ok(logger)

        def deserialize_cuda_engine(self, serialized_engine):
            if serialized_engine != b"plan":
                self.logger.log(FakeILogger.Severity.ERROR, "Serialization assertion failed: magic tag")
                return None
            trt.engines.append(FakeEngine(trt, cudart, **engine_options))
            return trt.engines[-1]

    trt.init_libnvinfer_plugins, trt.Runtime = init_libnvinfer_plugins, Runtime
    return trt, cudart


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """TrtRunner over the fakes; returns make(**engine_options) -> (runner, trt, cudart)."""
    monkeypatch.setattr(trt_rt, "_builtin_plugins_logger", None)
    engine_path = tmp_path / "model.engine"
    sidecar = {"io": {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
                                 {"name": "scale", "dtype": "float32", "shape": [4]}],
                      "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}]}}

    def make(data=b"plan", device="cuda:1", **options):
        trt, cudart = fake_tensorrt(**options)
        monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(trt_rt, "import_cudart", lambda: cudart)
        monkeypatch.setattr(trt_rt, "load_engine", lambda *a, **k: ec.LoadedEngine(engine_path, data, sidecar, False))
        return trt_rt.TrtRunner(engine_path, device=device), trt, cudart

    return make


SCALE = np.array([1, 2, 3, 4], np.float32)


def _rows(batch):
    return {"x": np.arange(batch * 4, dtype=np.float32).reshape(batch, 4), "scale": SCALE}


def test_trt_runner_moves_data_through_the_tensor_api(fake_gpu):
    runner, trt, cudart = fake_gpu()
    engine = trt.engines[0]
    assert runner.input_names == ["x", "scale"] and runner.output_names == ["y"]
    assert runner.inputs[0].shape == ("batch", 4)  # named axes from the sidecar
    assert trt.builtin_plugin_inits == [(trt.builtin_plugin_inits[0][0], "")]  # before deserialising
    assert engine.profile_queries == [("x", 0), ("x", 1)]  # the dynamic input's profiles only
    context = engine.contexts[0]
    for batch in (3, 9, 2):  # profile 0, then 1, then 0 again
        cudart.calls.clear()
        y = runner.run(_rows(batch))["y"]
        np.testing.assert_array_equal(y, _rows(batch)["x"] * SCALE + 1)
        assert cudart.calls[0] == ("cudaSetDevice", 1)  # the runner's device, in the calling thread
        copies = [c for c in cudart.calls if c[0] == "cudaMemcpyAsync"]
        assert copies == [("cudaMemcpyAsync", "H2D", batch * 16), ("cudaMemcpyAsync", "H2D", 16),
                          ("cudaMemcpyAsync", "D2H", batch * 16)]
        assert cudart.calls[-1] == ("cudaStreamSynchronize",)
    # the buffers were sized for the largest profile: 16 rows, allocated once
    assert len(cudart.device_addrs) == 3 and context.profile_calls == [1, 0, 1, 0]
    with pytest.raises(InputError, match="x axis 0 is 17, the profile allows 5..16"):
        runner.run(_rows(17))


def test_a_profile_that_cannot_be_selected_is_a_tensorrt_error(fake_gpu):
    # the binding raises RuntimeError where the C++ API returns false
    with pytest.raises(TensorRTError, match="TensorRT cannot switch to profile 1"):
        fake_gpu(refused_profiles=(1,))


def test_engines_that_do_not_load_or_get_no_context_say_so(fake_gpu):
    with pytest.raises(TensorRTError, match="could not deserialize .*model.engine: Serialization assertion failed"):
        fake_gpu(data=b"not a plan")
    with pytest.raises(TensorRTError, match="could not create an execution context"):
        fake_gpu(no_context=True)


def test_cuda_graphs_are_captured_after_a_plain_enqueue_and_replayed_only_for_unchanged_shapes(fake_gpu):
    runner, trt, cudart = fake_gpu()
    runner.cuda_graph = True
    context = trt.engines[0].contexts[0]
    launches = []
    for batch in (2, 2, 2, 5, 5, 2, 2):
        before = len([c for c in cudart.calls if c[0] == "cudaGraphLaunch"])
        y = runner.run(_rows(batch))["y"]
        np.testing.assert_array_equal(y, _rows(batch)["x"] * SCALE + 1)  # NaN: a replay on stale state
        launches.append(len([c for c in cudart.calls if c[0] == "cudaGraphLaunch"]) - before)
    # captured once per shape set after its plain enqueue; a change of shapes enqueues plainly again
    assert launches == [0, 1, 1, 0, 1, 0, 1]
    assert [c for c in cudart.calls if c[0] == "cudaStreamBeginCapture"] == [
        ("cudaStreamBeginCapture", cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)] * 2
    assert len(runner._graphs) == 2
    calls_before_close = len(cudart.calls)
    runner.close()
    closing = [c[0] for c in cudart.calls[calls_before_close:]]
    assert closing[:2] == ["cudaSetDevice", "cudaStreamSynchronize"]
    assert closing.count("cudaGraphExecDestroy") == 2 and closing.count("cudaGraphDestroy") == 2
    assert closing.index("cudaGraphDestroy") < closing.index("cudaFree") < closing.index("cudaStreamDestroy")
    assert not cudart.device_addrs and not cudart.host_addrs
    assert not hasattr(runner, "_context") and context.enqueues == 3  # the calls with launches == 0


def test_a_failed_capture_falls_back_to_plain_execution(fake_gpu):
    runner, trt, cudart = fake_gpu(fail_capture=True)
    runner.cuda_graph = True
    with pytest.warns(UserWarning, match="CUDA graph capture failed .*execute_async_v3 failed while capturing"):
        y = runner.run(_rows(2))["y"]
    np.testing.assert_array_equal(y, _rows(2)["x"] * SCALE + 1)
    assert ("cudaGetLastError",) in cudart.calls and ("cudaGraphDestroy",) in cudart.calls
    runner.run(_rows(2))  # no second capture for these shapes
    assert len([c for c in cudart.calls if c[0] == "cudaStreamBeginCapture"]) == 1 and not runner._graphs


class FakeNetwork:
    def __init__(self, inputs):
        self.inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in inputs.items()]

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


def fake_builder_tensorrt(version="10.9.0.34", *, serialized=b"built plan", parse_ok=True, timing_cache_none=False):
    """A TensorRT with the builder side: records what build_engine asks of it."""
    rec = {"network_flags": [], "set_flags": [], "clear_flags": [], "pool": [], "opt_level": None,
           "profiles": [], "timing_caches": [], "set_timing_cache": [], "builtin_plugin_inits": [], "parsed": []}
    major = int(version.split(".")[0])
    flags = ["TF32", "DEBUG"] + (["FP16", "INT8", "BF16"] if major < 11 else [])
    trt = types.SimpleNamespace(
        __version__=version, ILogger=FakeILogger, rec=rec,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2),
        BuilderFlag=types.SimpleNamespace(**{f: f for f in flags}),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return memoryview(b"timings")

    class Config:
        def set_flag(self, flag):
            rec["set_flags"].append(flag)

        def clear_flag(self, flag):
            rec["clear_flags"].append(flag)

        def set_memory_pool_limit(self, pool, pool_size):
            rec["pool"].append((pool, pool_size))

        @property
        def builder_optimization_level(self):
            return rec["opt_level"]

        @builder_optimization_level.setter
        def builder_optimization_level(self, level):
            rec["opt_level"] = level

        def add_optimization_profile(self, profile):
            rec["profiles"].append(profile.shapes)
            return 0

        def create_timing_cache(self, serialized_timing_cache):
            rec["timing_caches"].append(bytes(serialized_timing_cache))
            if timing_cache_none and serialized_timing_cache:
                return None
            self.cache = TimingCache(serialized_timing_cache)
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            rec["set_timing_cache"].append((cache.data, ignore_mismatch))
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 (the binding's argument names)
            self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class Parser:
        def __init__(self, network, logger):
            self.network, self.logger = network, _logger_ok(logger)
            self.errors = [] if parse_ok else [FakeParserError(3, "/head/NonMaxSuppression", "NonMaxSuppression",
                                                               "No importer registered for op: NonMaxSuppression")]

        def parse_from_file(self, model):
            rec["parsed"].append(model)
            return parse_ok

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

    class Builder:
        def __init__(self, logger):
            self.logger = _logger_ok(logger)

        def create_network(self, flags=0):
            rec["network_flags"].append(flags)
            return FakeNetwork({"x": (-1, 4)})

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if serialized is None:
                self.logger.log(FakeILogger.Severity.ERROR, "Error Code 4: Internal Error (out of memory)")
            return serialized

    def init_libnvinfer_plugins(logger, namespace):
        rec["builtin_plugin_inits"].append((_logger_ok(logger), namespace))
        return True

    trt.OnnxParser, trt.Builder, trt.init_libnvinfer_plugins = Parser, Builder, init_libnvinfer_plugins
    return trt


@pytest.fixture
def fake_builder(monkeypatch, tmp_path):
    """build_engine over a fake TensorRT; returns build(trt, **options) -> engine path."""
    monkeypatch.setattr(trt_rt, "_builtin_plugins_logger", None)
    monkeypatch.setattr(trt_rt, "import_cudart", lambda: None)
    monkeypatch.setattr(trt_rt, "gpu_info", lambda cudart, device: trt_rt.GpuInfo("NVIDIA L4", "8.9", 8 << 30, 24 << 30))
    onnx_path = write_tiny_onnx(tmp_path / "export" / "model.onnx")

    def build(trt, **options):
        monkeypatch.setattr(trt_rt, "import_tensorrt", lambda: trt)
        return trt_rt.build_engine(onnx_path, **options)

    return build


def test_build_engine_on_tensorrt_10_sets_what_the_plan_says(fake_builder, tmp_path):
    trt = fake_builder_tensorrt()
    cache = tmp_path / "timing.cache"
    engine = fake_builder(trt, precision="fp16", workspace=1 << 30, timing_cache=cache, builder_optimization_level=4)
    rec = trt.rec
    assert rec["network_flags"] == [0]  # weakly typed: no flag (EXPLICIT_BATCH is implied and deprecated in 10)
    assert rec["set_flags"] == ["FP16"] and rec["clear_flags"] == []
    assert rec["pool"] == [("WORKSPACE", 1 << 30)] and rec["opt_level"] == 4
    assert rec["profiles"] == [PROFILES]  # the dynamic input's (min, opt, max)
    assert [ns for _, ns in rec["builtin_plugin_inits"]] == [""]
    assert rec["timing_caches"] == [b""] and rec["set_timing_cache"] == [(b"", False)]  # a new cache
    assert cache.read_bytes() == b"timings" and engine.read_bytes() == b"built plan"
    sidecar = ec.read_sidecar(engine)
    assert sidecar["tensorrt"] == "10.9.0.34" and sidecar["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert sidecar["build"]["set_flags"] == ["FP16"] and sidecar["precision"] == "fp16"


def test_build_engine_strongly_typed_on_10_and_always_on_11(fake_builder):
    trt = fake_builder_tensorrt()
    fake_builder(trt, precision="onnx")
    assert trt.rec["network_flags"] == [1 << 1]  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt.rec["clear_flags"] == ["TF32"] and trt.rec["set_flags"] == []
    trt11 = fake_builder_tensorrt("11.1.0.7")
    fake_builder(trt11)
    assert trt11.rec["network_flags"] == [0] and trt11.rec["clear_flags"] == ["TF32"]
    with pytest.raises(PrecisionError, match="strongly typed networks only"):
        fake_builder(fake_builder_tensorrt("11.1.0.7"), precision="fp16")


def test_build_engine_failures_are_reported(fake_builder):
    with pytest.raises(trt_rt.EngineBuildError, match=r"could not build an engine .*Error Code 4: Internal Error"):
        fake_builder(fake_builder_tensorrt(serialized=None))
    with pytest.raises(ParserError, match="node /head/NonMaxSuppression \\(NonMaxSuppression\\): No importer"):
        fake_builder(fake_builder_tensorrt(parse_ok=False))


def test_an_unreadable_timing_cache_is_replaced(fake_builder, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another TensorRT")
    trt = fake_builder_tensorrt(timing_cache_none=True)
    with pytest.warns(UserWarning, match="starting a new timing cache"):
        fake_builder(trt, timing_cache=cache)
    assert trt.rec["timing_caches"] == [b"from another TensorRT", b""]
    assert cache.read_bytes() == b"timings"


def test_a_plugin_library_that_does_not_load_is_warned_about(monkeypatch, tmp_path):
    monkeypatch.setattr(trt_rt, "_loaded_libraries", set())
    lib = tmp_path / "libplugins.so"
    lib.write_bytes(b"\x7fELF")
    handles = iter([None])
    registry = types.SimpleNamespace(load_library=lambda path: next(handles, None))
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    with pytest.warns(UserWarning, match="TensorRT did not load plugin library .*libplugins.so"):
        trt_rt.register_plugins(trt, [str(lib)])
    handles = iter(["handle"])  # loaded once; a second load returns None as documented: no warning
    trt_rt.register_plugins(trt, [str(lib)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trt_rt.register_plugins(trt, [str(lib)])


# ---- without TensorRT ---------------------------------------------------------------------------------

no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed here")


@no_tensorrt
def test_build_engine_without_tensorrt_says_so_after_checking_the_profiles(tmp_path):
    root = fake_export(tmp_path / "detr", get_spec("detr", "tiny"))
    with pytest.raises(ProfileError, match="images axis 0"):  # checked before TensorRT is needed
        runtime.build_engine(root, profiles={"images": ((9, 3, 64, 64), (1, 3, 64, 64), (9, 3, 64, 64))})
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed here"):
        runtime.build_engine(root)


@no_tensorrt
def test_trt_backend_and_engine_loading_without_tensorrt(tmp_path):
    root = fake_export(tmp_path / "vit", get_spec("vit", "tiny"))
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed here"):
        runtime.load(root, "trt", device="cuda")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed here"):
        runtime.load_engine(root / "model.engine")
    assert "trt" in runtime.BACKENDS


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env)


@no_tensorrt
def test_cli_build_engine_without_tensorrt_is_one_sentence(tmp_path):
    root = fake_export(tmp_path / "vit", get_spec("vit", "tiny"))
    result = run_cli("build-engine", root, "--precision", "fp16", "--workspace", "1G")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    err = " ".join(result.stderr.split())
    assert err.startswith("error: TensorRT is not installed here (import tensorrt failed: No module named "
                          "'tensorrt'); build and run engines on a machine with an NVIDIA GPU"), err
    assert not list(root.glob("*.engine*"))


def test_cli_build_engine_refuses_bad_shapes_before_building(tmp_path):
    root = fake_export(tmp_path / "vit", get_spec("vit", "tiny"))
    result = run_cli("build-engine", root, "--shape", "images:8x3x32x32:2x3x32x32:16x3x32x32")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: bad optimisation profiles for vit: images axis 0 ('batch'): min 8 > opt 2" in \
        " ".join(result.stderr.split())
    result = run_cli("build-engine", root, "--shape", "images=1x3x32x32")
    assert result.returncode == 1 and "--shape takes NAME:MIN:OPT:MAX" in " ".join(result.stderr.split())


# ---- ONNX Runtime's TensorRT and CUDA providers -------------------------------------------------------

def test_cpu_providers_are_unchanged():
    assert ort_runtime.provider_options("cpu", "x/model.onnx") == ["CPUExecutionProvider"]


def test_cuda_provider_options():
    assert ort_runtime.provider_options("cuda", device_id=1) == [
        ("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}), "CPUExecutionProvider"]


def test_tensorrt_provider_options_turn_the_engine_cache_on(tmp_path):
    providers = ort_runtime.provider_options(
        "tensorrt", tmp_path / "vit" / "model.onnx", fp16=True, workspace=2 << 30,
        profiles={"images": ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)),
                  "src": ((1, 3), (8, 7), (8, 14))})
    name, options = providers[0]
    cache = str(tmp_path / "vit" / "ort-trt-cache")
    assert name == "TensorrtExecutionProvider"
    assert options == {
        "device_id": "0",
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
        "trt_fp16_enable": "True", "trt_max_workspace_size": str(2 << 30),
        "trt_profile_min_shapes": "images:1x3x32x32,src:1x3",
        "trt_profile_opt_shapes": "images:8x3x32x32,src:8x7",
        "trt_profile_max_shapes": "images:16x3x32x32,src:8x14",
    }
    assert providers[1][0] == "CUDAExecutionProvider" and providers[2] == "CPUExecutionProvider"
    options = ort_runtime.provider_options("tensorrt", engine_cache=tmp_path / "c")[0][1]
    assert options["trt_engine_cache_path"] == str(tmp_path / "c") and options["trt_fp16_enable"] == "False"
    assert "trt_profile_min_shapes" not in options and "trt_max_workspace_size" not in options


def test_unknown_ort_device():
    with pytest.raises(BackendUnavailableError, match="unknown device 'tpu' for onnxruntime"):
        ort_runtime.provider_options("tpu")


def test_tensorrt_provider_profiles_come_from_the_spec(tmp_path):
    detr = fake_export(tmp_path / "detr", get_spec("detr", "tiny"))
    assert ort_runtime._spec_profiles(detr / "model.onnx") == {
        "images": ((1, 3, 32, 32), (8, 3, 64, 64), (8, 3, 128, 128))}
    unsized = ModelSpec("m", "custom", "x", (TensorSpec("images", "float32", ("batch", 3, "h", "w")),), ())
    assert ort_runtime._spec_profiles(fake_export(tmp_path / "m", unsized) / "model.onnx") is None


def test_asking_for_the_tensorrt_provider_without_it_says_what_to_install(tmp_path):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    root = fake_export(tmp_path / "vit", get_spec("vit", "tiny"))
    with pytest.raises(BackendUnavailableError, match="no TensorrtExecutionProvider.*gpu"):
        runtime.load(root, "ort", device="tensorrt")


# ---- on a GPU: eager vs TensorRT for every registered model ---------------------------------------------

def _feed(spec: ModelSpec, precision: str, batch: int = 2) -> tuple[dict, dict]:
    """(the engine's feed, the eager model's feed): an fp16 graph takes fp16 inputs, the
    reference the same values in fp32 (as the export's parity check does)."""
    feed = spec.example_inputs(batch, seed=batch)
    if any(t.dtype == "float16" for t in spec.inputs):
        half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feed.items()}
        return half, {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in half.items()}
    return feed, feed


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", list_models())
def test_tensorrt_matches_eager(name, precision, exported_tiny, tmp_path):
    from attnserve.compare import compare_outputs
    from attnserve.export import export_onnx

    trt = trt_rt.import_tensorrt()
    major = trt_rt.tensorrt_major(trt.__version__)
    if precision == "fp16" and major >= 11:
        # TensorRT 11 takes its precision from the graph: an fp16 export, built as is.
        out_dir, build_precision = export_onnx(name, tmp_path / "fp16", fp16=True).out_dir, "fp32"
    else:
        out_dir, build_precision = exported_tiny(name).out_dir, precision
    engine = trt_rt.build_engine(out_dir, tmp_path / "model.engine", precision=build_precision)
    spec = get_entry(name).spec("tiny")
    with trt_rt.TrtRunner(engine, out_dir / "model.onnx") as trt_runner, runtime.load(out_dir, "torch") as eager:
        for batch in (1, 3):
            feed, reference_feed = _feed(trt_runner_spec(trt_runner, spec), precision, batch)
            report = compare_outputs(eager.run(reference_feed), trt_runner.run(feed), spec.tolerance(precision),
                                     classes_last_axis=spec.task.endswith("classification")
                                     or spec.task in ("translation", "image-captioning"),
                                     label=f"{name} {precision} batch {batch}")
            assert report.passed, f"{report.label}: {', '.join(report.failures())}"


def trt_runner_spec(runner, spec: ModelSpec) -> ModelSpec:
    """The spec with the engine's input dtypes (fp16 inputs for an fp16 graph)."""
    dtypes = {t.name: t.dtype for t in runner.inputs}
    inputs = tuple(TensorSpec(t.name, dtypes[t.name], t.shape, t.value_range) for t in spec.inputs)
    return ModelSpec(spec.name, spec.config, spec.task, inputs, spec.outputs, spec.default_dims,
                     spec.tolerances, spec.preprocessing, spec.labels, spec.vocab_sizes)


@pytest.fixture
def vit_engine(exported_tiny, tmp_path):
    out_dir = exported_tiny("vit").out_dir
    return trt_rt.build_engine(out_dir, tmp_path / "model.engine"), out_dir


def _images(batch):
    return {"images": np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)}


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
def test_cuda_graphs_replay_the_same_numbers(vit_engine):
    engine, out_dir = vit_engine
    with trt_rt.TrtRunner(engine, device="cuda") as plain, \
            trt_rt.TrtRunner(engine, device="cuda", cuda_graph=True) as graphed:
        for batch in (2, 2, 2, 5, 5, 2):  # captures at the 1st call of a shape, replays after
            want = plain.run(_images(batch))["logits"]
            np.testing.assert_allclose(graphed.run(_images(batch))["logits"], want, rtol=1e-5, atol=1e-5)
        assert graphed._graphs


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
def test_shapes_outside_the_profile_are_refused_before_running(vit_engine):
    engine, _ = vit_engine
    with trt_rt.TrtRunner(engine) as runner:
        with pytest.raises(InputError, match="images axis 0 is 9, the profile allows 1..8"):
            runner.run(_images(9))
        assert runner.run(_images(8))["logits"].shape == (8, 10)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)
def test_a_stale_engine_is_rebuilt_or_refused(vit_engine):
    engine, out_dir = vit_engine
    sidecar = ec.read_sidecar(engine)
    ec.write_sidecar(engine, {**sidecar, "tensorrt": "0.0.0"})
    with pytest.raises(EngineMismatchError, match="built with TensorRT 0.0.0"):
        runtime.load_engine(engine, rebuild=False)
    loaded = runtime.load_engine(engine, out_dir / "model.onnx")
    assert loaded.rebuilt and ec.read_sidecar(engine)["tensorrt"] != "0.0.0"
