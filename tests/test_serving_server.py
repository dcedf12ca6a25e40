"""A real Triton server on a python-flavor repository of tiny models: answers over gRPC
and HTTP equal the eager models within each spec's tolerance, pre- and postprocessing
and the generation loop included; concurrent clients each get their own answer; bad
requests get errors while the server keeps serving; a model that fails to load leaves
the others up.

The server runs from the serving environment `.venv-serve` (`make serve-env`).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from attnserve import runtime
from attnserve.artifact import read_artifact
from attnserve.compare import compare_outputs
from attnserve.imaging import encode_jpeg, preprocess, top_k
from attnserve.runtime.generate import beam_search, greedy_search
from attnserve.serving import ServerError, TritonServer
from attnserve.spec import ModelSpec
from conftest import SERVE_PYTHON, add_broken_model

pytestmark = pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no .venv-serve: run `make serve-env`")

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

CLASSIFIERS = ["vit", "swin", "vivit"]
GENERATORS = ["vit_captioner", "bahdanau_seq2seq"]


@pytest.fixture(scope="module")
def exports(served_exports):
    return served_exports


@pytest.fixture(scope="module")
def server(triton_server):
    return triton_server




def infer(protocol: str, url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]):
    lib = grpcclient if protocol == "grpc" else httpclient
    client = lib.InferenceServerClient(url)
    tensors = []
    for name, value in inputs.items():
        t = lib.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[lib.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def test_every_model_loads_but_the_broken_one(server):
    assert set(server.failed) == {"broken"}
    assert "this model is broken on purpose" in server.failed["broken"]
    assert server.models["vit-tiny"] == "READY" and server.models["vit_captioner-tiny-generate"] == "READY"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_served_outputs_equal_eager(server, exports, name, protocol):
    export = exports[name]
    spec = export.spec
    inputs = spec.example_inputs(batch_size=3, seed=7)
    with runtime.load(export.out_dir, backend="torch") as eager:
        want = eager.run(inputs)
    got = infer(protocol, url(server, protocol), f"{name}-tiny", inputs, spec.output_names)
    report = compare_outputs(want, got, spec.tolerance())
    assert report.passed, report.summary()


def _photo(seed: int, height: int = 45, width: int = 60, shift: int = 0) -> np.ndarray:
    """A smooth RGB test image (JPEG keeps smooth images close to the original)."""
    y, x = np.mgrid[0:height, 0:width]
    x = x + 3 * shift
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, 3)
    channels = [127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 - c) + phase[c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensembles_preprocess_classify_and_rank_in_the_server(server, exports, protocol):
    export = exports["vit"]
    spec = export.spec
    images = [_photo(1), _photo(2)]
    jpegs = [encode_jpeg(image) for image in images]
    from attnserve.imaging import decode_image

    with runtime.load(export.out_dir, backend="torch") as eager:
        for source, batch, decoded in [
            ("jpeg", np.array([[j] for j in jpegs], dtype=object), [decode_image(j) for j in jpegs]),
            ("frames", np.stack(images), images),
        ]:
            pixels = np.stack([preprocess(image, spec.preprocessing) for image in decoded])
            scores, classes = top_k(eager.run({spec.input_names[0]: pixels})[spec.output_names[0]], 5)
            got = infer(protocol, url(server, protocol), f"vit-tiny-{source}", {source: batch},
                        ["scores", "classes", "labels"])
            np.testing.assert_array_equal(got["classes"], classes)
            np.testing.assert_allclose(got["scores"], scores, atol=1e-4)
            labels = [str(i) for i in range(spec.outputs[0].shape[-1])] if not spec.labels else spec.labels
            assert [[b.decode() for b in row] for row in got["labels"]] == [[labels[i] for i in row]
                                                                            for row in classes]


def _video(seed: int, frames: int, height: int = 40, width: int = 48) -> np.ndarray:
    """Frames of a moving smooth pattern, uint8 (T, H, W, 3)."""
    return np.stack([_photo(seed, height, width, shift=t) for t in range(frames)])


def test_clip_ensemble_classifies_raw_frames_as_the_eager_model(server, exports):
    export = exports["vivit"]
    spec = export.spec
    frames = spec.inputs[0].shape[1]
    clips = np.stack([_video(1, frames), _video(2, frames)])
    pixels = np.stack([[preprocess(f, spec.preprocessing) for f in clip] for clip in clips])
    with runtime.load(export.out_dir, backend="torch") as eager:
        scores, classes = top_k(eager.run({"video": pixels})["logits"], 5)
    got = infer("grpc", server.grpc_url, "vivit-tiny-frames", {"frames": clips}, ["scores", "classes"])
    np.testing.assert_array_equal(got["classes"], classes)
    np.testing.assert_allclose(got["scores"], scores, atol=1e-4)


def _stream(server, model: str, sequence_id: int, frames: np.ndarray, start: bool = True):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = []
    for t, frame in enumerate(frames):
        x = grpcclient.InferInput("frame", [1, *frame.shape], "UINT8")
        x.set_data_from_numpy(frame[None])
        result = client.infer(model, [x], sequence_id=sequence_id, sequence_start=start and t == 0,
                              sequence_end=t == len(frames) - 1)
        answers.append({n: result.as_numpy(n)[0] for n in ("ready", "frames", "scores", "classes")})
    return answers


def test_stream_answers_every_stride_with_the_labels_of_clip_by_clip_inference(server, exports):
    """Two interleaved streams, frame by frame: every answer equals the eager model on
    the clip of that stream's last T frames."""
    export = exports["vivit"]
    spec = export.spec
    frames = spec.inputs[0].shape[1]
    stride = max(1, frames // 2)
    videos = {11: _video(3, frames + 2 * stride), 12: _video(4, frames + 2 * stride)}
    results = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, _stream(server, "vivit-tiny-stream", k,
                                                                                  videos[k])))
               for k in videos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with runtime.load(export.out_dir, backend="torch") as eager:
        for key, video in videos.items():
            answers = results[key]
            ready = [t + 1 for t, a in enumerate(answers) if a["ready"][0]]
            assert ready == [frames, frames + stride, frames + 2 * stride]
            for seen in ready:
                clip = np.stack([preprocess(f, spec.preprocessing) for f in video[seen - frames:seen]])
                scores, classes = top_k(eager.run({"video": clip[None]})["logits"], 5)
                answer = answers[seen - 1]
                assert answer["frames"][0] == seen
                np.testing.assert_array_equal(answer["classes"], classes[0])
                np.testing.assert_allclose(answer["scores"], scores[0], atol=1e-4)


def test_a_stream_that_was_never_started_gets_an_error(server):
    with pytest.raises(InferenceServerException, match="(?i)start"):
        _stream(server, "vivit-tiny-stream", 999, _video(5, 1), start=False)


def test_concurrent_clients_each_get_their_own_answer(server, exports):
    """16 threads x 50 requests through the dynamic batcher: every answer arrives and
    matches its own request (a mix-up between batched requests would not)."""
    export = exports["vit"]
    spec = export.spec
    inputs = [spec.example_inputs(batch_size=1, seed=s)["images"] for s in range(40)]
    with runtime.load(export.out_dir) as ort:
        want = [ort.run({"images": x})["logits"] for x in inputs]
    errors, answered = [], [0] * 16

    def client(thread: int) -> None:
        c = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for i in range(50):
                k = (thread * 7 + i) % len(inputs)
                t = grpcclient.InferInput("images", list(inputs[k].shape), "FP32")
                t.set_data_from_numpy(inputs[k])
                got = c.infer("vit-tiny", [t]).as_numpy("logits")
                if not np.allclose(got, want[k], atol=1e-4):
                    errors.append(f"thread {thread} request {i}: answer of another input")
                answered[thread] += 1
        except Exception as e:
            errors.append(f"thread {thread}: {e}")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert answered == [50] * 16


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("beam_width", [1, 3])
def test_generation_loop_in_the_server_equals_eager(server, exports, name, beam_width):
    export = exports[name]
    encoder, step, config = runtime.load_generator(export.out_dir, backend="torch")
    inputs = encoder_example(export)
    if beam_width == 1:
        want = greedy_search(encoder, step, inputs, config, max_length=8)
    else:
        want = beam_search(encoder, step, inputs, config, beam_width=beam_width, max_length=8)
    feed = {**inputs, "max_length": np.full((2, 1), 8, np.int32),
            "beam_width": np.full((2, 1), beam_width, np.int32)}
    feed = {n: (a[:, None] if a.ndim == 1 else a) for n, a in feed.items()}
    outputs = ["tokens", "length", "score", "text"] + (["attention"] if config.attention_output else [])
    got = infer("grpc", server.grpc_url, f"{name}-tiny-generate", feed, outputs)
    vocabulary = runtime.load_vocabularies(export.out_dir)["target"]
    for b, generation in enumerate(want):
        n = int(got["length"][b, 0])
        assert got["tokens"][b, :n].tolist() == generation.tokens
        assert got["score"][b, 0] == pytest.approx(generation.score, abs=1e-3)
        assert got["text"][b, 0].decode() == vocabulary.decode(generation.tokens)
        if config.attention_output:
            np.testing.assert_allclose(got["attention"][b, :n], np.stack(generation.attention), atol=1e-4)


def encoder_example(export) -> dict[str, np.ndarray]:
    manifest = read_artifact(export.out_dir).manifest
    return ModelSpec.from_dict(manifest["parts"]["encoder"]["spec"]).example_inputs(batch_size=2, seed=3)


BAD_REQUESTS = {
    "wrong shape": ("vit-tiny", {"images": np.zeros((1, 3, 16, 16), np.float32)}, "shape"),
    "wrong dtype": ("vit-tiny", {"images": np.zeros((1, 3, 32, 32), np.float64)}, "data-type"),
    "batch above max_batch_size": ("vit-tiny", {"images": np.zeros((9, 3, 32, 32), np.float32)}, "batch"),
    "empty jpeg": ("vit-tiny-jpeg", {"jpeg": np.array([[b""]], dtype=object)}, "empty"),
    "corrupt jpeg": ("vit-tiny-jpeg", {"jpeg": np.array([[b"\xff\xd8not a jpeg"]], dtype=object)}, "decode"),
    "unknown model": ("no-such-model", {"images": np.zeros((1, 3, 32, 32), np.float32)}, "unknown model"),
    "model that failed to load": ("broken", {"x": np.zeros((1,), np.float32)}, "no available versions"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, exports, case, protocol):
    model, inputs, words = BAD_REQUESTS[case]
    output = "logits" if model.startswith("vit-tiny") and "jpeg" not in model else None
    outputs = [output] if output else (["scores"] if "jpeg" in model else ["y"])
    with pytest.raises(InferenceServerException) as error:
        infer(protocol, url(server, protocol), model, inputs, outputs)
    assert words in str(error.value).lower()
    good = exports["vit"].spec.example_inputs(batch_size=1)
    assert infer(protocol, url(server, protocol), "vit-tiny", good, ["logits"])["logits"].shape == (1, 10)


def test_strict_start_names_the_model_that_did_not_load(tmp_path):
    add_broken_model(tmp_path / "repo" / "broken")
    with pytest.raises(ServerError, match="model broken did not load: .*broken on purpose"):
        TritonServer(tmp_path / "repo", python=SERVE_PYTHON, strict=True, log_file=tmp_path / "log").start()


def test_a_missing_serving_environment_is_one_sentence(tmp_path):
    with pytest.raises(ServerError, match="no Python at"):
        TritonServer(tmp_path, python=tmp_path / "nowhere" / "python").start()


def test_a_port_in_use_is_explained_from_the_servers_log(tmp_path):
    import socket

    add_broken_model(tmp_path / "repo" / "broken")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(tmp_path / "repo", python=SERVE_PYTHON, http_port=port, log_file=tmp_path / "log")
        with pytest.raises(ServerError, match=r"tritonserver exited with code \d+: failed to start HTTP service: .* already in use"):
            server.start()
    assert not server.running


def test_readiness_timeout(tmp_path):
    """A model that takes longer to load than the timeout: one sentence, no server left."""
    folder = tmp_path / "repo" / "slow"
    add_broken_model(folder)
    (folder / "config.pbtxt").write_text((folder / "config.pbtxt").read_text().replace("broken", "slow"))
    (folder / "1" / "model.py").write_text("import time\n\nclass TritonPythonModel:\n"
                                           "    def initialize(self, args):\n        time.sleep(4)\n")
    server = TritonServer(tmp_path / "repo", python=SERVE_PYTHON, timeout_s=1, log_file=tmp_path / "log")
    with pytest.raises(ServerError, match="did not answer within 1 s"):
        server.start()
    assert not server.running
