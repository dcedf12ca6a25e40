"""Runners: validation of every bad feed, backend selection, and no torch at import."""

import subprocess
import sys

import numpy as np
import pytest

from attnserve import runtime
from attnserve.errors import AttnserveError, BackendUnavailableError, InputError


@pytest.fixture(scope="module")
def vit_dir(exported_tiny):
    return exported_tiny("vit").out_dir


@pytest.fixture(scope="module")
def ort_runner(vit_dir):
    with runtime.load(vit_dir, "ort") as r:
        yield r


def good_feed(batch=2):
    return {"images": np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)}


def test_runner_describes_its_io(ort_runner):
    assert ort_runner.input_names == ["images"] and ort_runner.output_names == ["logits"]
    out = ort_runner.run(good_feed(4))
    assert out["logits"].shape == (4, 10) and out["logits"].dtype == np.float32
    assert ort_runner.last_latency_s > 0


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"images": np.zeros((2, 3, 32, 32), np.float64)}, "images has dtype float64, expected float32"),
        ({"images": np.zeros((2, 3, 64, 64), np.float32)},
         r"shape \(2, 3, 64, 64\), expected \(batch, 3, 32, 32\)"),
        ({"images": np.zeros((3, 32, 32), np.float32)}, r"shape \(3, 32, 32\)"),
        ({}, "missing input"),
        ({**good_feed(), "mask": np.zeros(2)}, "unexpected input.*mask"),
        ({"images": [[1.0]]}, "is a list, expected a numpy array"),
        ({"images": np.zeros((0, 3, 32, 32), np.float32)}, "empty axis 'batch'"),
    ],
)
def test_bad_feeds_are_refused_with_one_sentence(ort_runner, feed, message):
    with pytest.raises(InputError, match=message):
        ort_runner.run(feed)


def test_all_problems_are_reported_together(ort_runner):
    with pytest.raises(InputError) as e:
        ort_runner.run({"images": np.zeros((2, 3, 8, 8), np.int32), "x": np.zeros(1)})
    msg = str(e.value)
    assert "dtype int32" in msg and "shape (2, 3, 8, 8)" in msg and "unexpected input(s) x" in msg


def test_torch_runner_validates_the_same_way(vit_dir):
    with runtime.load(vit_dir, "torch") as r, pytest.raises(InputError, match="dtype float64"):
        r.run({"images": np.zeros((1, 3, 32, 32))})


def test_torch_and_ort_agree(vit_dir, ort_runner):
    with runtime.load(vit_dir, "torch") as ref:
        np.testing.assert_allclose(
            ref.run(good_feed())["logits"], ort_runner.run(good_feed())["logits"], atol=1e-5
        )


def test_unknown_backend_and_device(vit_dir):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        runtime.load(vit_dir, "tvm")
    with pytest.raises(BackendUnavailableError, match="unknown device"):
        runtime.load(vit_dir, "ort", device="tpu")
    with pytest.raises(AttnserveError, match="does not exist"):
        runtime.load(vit_dir / "nope", "ort")


def test_a_closed_runner_refuses_work(vit_dir):
    r = runtime.load(vit_dir, "ort")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.run(good_feed())


def test_corrupt_onnx_file_is_one_sentence(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(AttnserveError, match="onnxruntime cannot load"):
        runtime.load(tmp_path, "ort")


def _has_cuda_provider() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda_provider(), reason="needs onnxruntime-gpu and an NVIDIA GPU (none here)")
def test_cuda_provider_matches_cpu(vit_dir, ort_runner):
    with runtime.load(vit_dir, "ort", device="cuda") as gpu:
        assert gpu.providers[0] == "CUDAExecutionProvider"
        np.testing.assert_allclose(gpu.run(good_feed())["logits"], ort_runner.run(good_feed())["logits"],
                                   atol=1e-4)


@pytest.mark.skipif(_has_cuda_provider(), reason="this machine has the CUDA provider")
def test_asking_for_cuda_without_it_says_what_to_install(vit_dir):
    with pytest.raises(BackendUnavailableError, match="no CUDAExecutionProvider.*gpu"):
        runtime.load(vit_dir, "ort", device="cuda")


def test_runtime_bench_client_and_serving_import_no_torch():
    code = (
        "import sys, attnserve.runtime, attnserve.runtime.ort, attnserve.bench, attnserve.compare, "
        "attnserve.spec, attnserve.artifact, attnserve.runtime.generate, attnserve.text, "
        "attnserve.client, attnserve.client.visualize, attnserve.serving, attnserve.imaging; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_tensorrt_path_imports_only_numpy_besides_tensorrt_and_cuda_python():
    """A Jetson runs engines with numpy + tensorrt + cuda-python alone (JetPack's TensorRT,
    no onnxruntime or torch wheels for it): the runner, the engine cache, the plugins'
    registration and the benchmark must not pull anything else in at import."""
    code = (
        "import sys, attnserve.runtime.tensorrt, attnserve.runtime.engine_cache, attnserve.plugins, "
        "attnserve.bench, attnserve.bench.latency; "
        "heavy = {'torch', 'onnxruntime', 'onnx', 'openvino', 'triton', 'tritonclient'} & set(sys.modules); "
        "assert not heavy, f'imported {sorted(heavy)}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
