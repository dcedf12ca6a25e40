"""The client SDK against a real server (the session's tritonserver, conftest): every task
method gives the eager model's answer; preprocessing equals the reference transform;
streaming from a video file written here; shared memory and async give the same results;
errors are one sentence."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnserve import runtime
from attnserve.client import (
    AsyncClient,
    Client,
    ClientError,
    iter_frames,
    load_image,
    sliding_clips,
    visualize,
)
from attnserve.client._core import pixels
from attnserve.errors import InputError
from attnserve.imaging import encode_jpeg, top_k
from attnserve.runtime.generate import beam_search, greedy_search
from conftest import SERVE_PYTHON

pytestmark = pytest.mark.skipif(not SERVE_PYTHON.exists(), reason="no .venv-serve: run `make serve-env`")


def photo(seed: int, height: int = 45, width: int = 60, shift: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    x = x + 3 * shift
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 - c) + phase[c]) for c in range(3)],
                    axis=-1).astype(np.uint8)


def reference_transform(image: np.ndarray, pp: dict) -> np.ndarray:
    """The spec's preprocessing written with torch: bilinear resize of the short side
    (align_corners=False), centre crop, scale, normalise."""
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    h, w = image.shape[:2]
    scale = pp["resize"] / min(h, w)
    size = (max(pp["resize"], round(h * scale)), max(pp["resize"], round(w * scale)))
    r = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
    s = pp["image_size"]
    top, left = (size[0] - s) // 2, (size[1] - s) // 2
    r = r[:, top:top + s, left:left + s] / 255
    return ((r - torch.tensor(pp["mean"])[:, None, None]) / torch.tensor(pp["std"])[:, None, None]).numpy()


@pytest.fixture(scope="module")
def client(triton_server):
    with Client(triton_server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, served_exports):
    """An MJPG video written with OpenCV: T + 4 frames of a moving pattern."""
    import cv2

    frames = served_exports["vivit"].spec.inputs[0].shape[1] + 4
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    for t in range(frames):
        writer.write(cv2.cvtColor(photo(9, 40, 48, shift=t), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.parametrize("size", [(45, 60), (300, 200), (20, 90)])
def test_preprocessing_equals_the_reference_transform(served_exports, size):
    spec = served_exports["vit"].spec
    image = photo(0, *size)
    got = pixels(spec, [load_image(encode_jpeg(image, 100))])[0]
    want = reference_transform(load_image(encode_jpeg(image, 100)), spec.preprocessing)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Colour order: an OpenCV (BGR) array gives the same tensor when said so.
    bgr = np.ascontiguousarray(image[..., ::-1])
    np.testing.assert_array_equal(pixels(spec, [load_image(bgr, "BGR")]), pixels(spec, [image]))


def test_gray_preprocessing_gives_one_channel_of_the_pixels_as_written(tmp_path):
    from attnserve.imaging import preprocess
    from attnserve.models import get_spec

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    path = tmp_path / "digit.png"
    visualize.save_png(np.repeat(grey[..., None], 3, axis=2), path)
    spec = get_spec("stn", "digits")  # a grey 40 x 40 canvas, no crop
    got = pixels(spec, [load_image(path)])
    assert got.shape == (1, 1, 40, 40)
    np.testing.assert_array_equal(got[0, 0], grey.astype(np.float32) / 255)
    # A colour picture becomes its luma.
    colour = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    luma = colour.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(preprocess(colour, spec.preprocessing)[0] * 255, luma, atol=0.6)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classify_equals_eager(triton_server, served_exports, protocol, tmp_path):
    spec = served_exports["vit"].spec
    image = photo(1)
    path = tmp_path / "image.png"
    visualize.save_png(image, path)
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with Client(url, protocol) as c, runtime.load(served_exports["vit"].out_dir, backend="torch") as eager:
        scores, ids = top_k(eager.run({"images": pixels(spec, [image])})["logits"], 3)
        for source in (path, path.read_bytes(), image):
            got = c.classify("vit-tiny", source, top_k=3)
            assert [p.class_id for p in got] == ids[0].tolist()
            np.testing.assert_allclose([p.score for p in got], scores[0], atol=1e-4)


@pytest.mark.parametrize("beam_width", [1, 3])
def test_caption_equals_eager_and_draws_attention(client, served_exports, beam_width, tmp_path):
    export = served_exports["vit_captioner"]
    image = photo(2)
    encoder, step, config = runtime.load_generator(export.out_dir, backend="torch")
    spec = client.model_info("vit_captioner-tiny-generate").spec
    feed = {"images": pixels(spec, [image])}
    search = greedy_search if beam_width == 1 else lambda *a, **k: beam_search(*a, beam_width=beam_width, **k)
    want = search(encoder, step, feed, config)[0]
    got = client.caption("vit_captioner-tiny", image, beam_width=beam_width)
    assert got.tokens == want.tokens
    assert got.text == runtime.load_vocabularies(export.out_dir)["target"].decode(want.tokens)
    np.testing.assert_allclose(got.attention, np.stack(want.attention), atol=1e-4)
    sheet = visualize.caption_attention(image, got)
    assert sheet.shape[0] % (visualize.PANEL + 24) == 0  # whole rows of panels
    panels = (sheet.shape[0] // (visualize.PANEL + 24)) * (sheet.shape[1] // visualize.PANEL)
    assert len(got.tokens) <= panels < len(got.tokens) + 5
    assert visualize.save_png(sheet, tmp_path / "caption.png").stat().st_size > 0


def test_attention_panel_is_brightest_where_the_weight_is():
    from attnserve.client import Generated

    weights = np.zeros(16, np.float32)
    weights[5] = 1.0  # row 1, column 1 of a 4x4 grid
    sheet = visualize.caption_attention(np.full((64, 64, 3), 200, np.uint8), Generated("a", [7], 0.0, weights[None]))
    panel = sheet[:visualize.PANEL, :visualize.PANEL].mean(axis=2)
    y, x = np.unravel_index(panel.argmax(), panel.shape)
    cell = visualize.PANEL // 4
    assert (y // cell, x // cell) == (1, 1)


def test_translate_equals_eager(client, served_exports):
    export = served_exports["bahdanau_seq2seq"]
    vocabs = runtime.load_vocabularies(export.out_dir)
    text = "w5 w9 w7 w11"
    ids = vocabs["source"].encode(text)
    encoder, step, config = runtime.load_generator(export.out_dir, backend="torch")
    want = greedy_search(encoder, step, {"src": np.array([ids]), "src_lengths": np.array([len(ids)])}, config)[0]
    got = client.translate("bahdanau_seq2seq-tiny", text)
    assert got.tokens == want.tokens and got.text == vocabs["target"].decode(want.tokens)


def test_recognize_actions_and_stream_from_a_video_file(client, served_exports, video_file, tmp_path):
    export = served_exports["vivit"]
    spec = export.spec
    frames = spec.inputs[0].shape[1]
    stride = max(1, frames // 2)  # the stream model's default stride
    decoded = list(iter_frames(video_file))
    assert len(decoded) == frames + 4
    with runtime.load(export.out_dir, backend="torch") as eager:
        want = [(start, top_k(eager.run({"video": pixels(spec, clip)[None]})["logits"], 5)[1][0].tolist())
                for start, clip in sliding_clips(decoded, frames, stride)]
    clips = client.recognize_actions("vivit-tiny", video_file, stride=stride)
    assert [(w.start, [p.class_id for p in w.predictions]) for w in clips] == want
    streamed = list(client.stream_actions("vivit-tiny", video_file))
    assert [(w.start, w.end) for w in streamed] == [(w.start, w.end) for w in clips]
    assert [[p.class_id for p in w.predictions] for w in streamed] == [ids for _, ids in want]
    timeline = visualize.action_timeline(streamed)
    assert timeline.shape[1] > 800 and visualize.save_png(timeline, tmp_path / "actions.png").exists()


def test_stream_from_a_frame_iterator_holds_one_frame_at_a_time(client, served_exports):
    frames = served_exports["vivit"].spec.inputs[0].shape[1]
    produced = []

    def camera():
        for t in range(frames + 2):
            produced.append(t)
            yield photo(3, 40, 48, shift=t)

    seen_when_answered = []
    for window in client.stream_actions("vivit-tiny", camera()):
        seen_when_answered.append((window.end, len(produced)))
    # Each answer comes before the source is asked for more than one frame beyond it.
    assert seen_when_answered and all(n <= end + 1 for end, n in seen_when_answered)


def test_async_client_gives_the_same_answers(triton_server, client, video_file):
    image = photo(4)

    async def run():
        async with AsyncClient(triton_server.grpc_url) as c:
            classes = await c.classify("vit-tiny", image)
            caption = await c.caption("vit_captioner-tiny", image)
            clips = await c.recognize_actions("vivit-tiny", video_file)
            streamed = [w async for w in c.stream_actions("vivit-tiny", video_file)]
            generated = await c.generate_image("sagan-tiny", class_id=2, seed=1)
            found = await c.detect("detr-tiny", image, threshold=0.0)
            return classes, caption, clips, streamed, generated, found

    classes, caption, clips, streamed, generated, found = asyncio.run(run())
    np.testing.assert_array_equal(generated, client.generate_image("sagan-tiny", class_id=2, seed=1))
    assert found == client.detect("detr-tiny", image, threshold=0.0)
    assert classes == client.classify("vit-tiny", image)
    assert caption.tokens == client.caption("vit_captioner-tiny", image).tokens
    assert clips == client.recognize_actions("vivit-tiny", video_file)
    assert streamed == list(client.stream_actions("vivit-tiny", video_file))


def test_shared_memory_gives_the_same_result_as_plain_transfer(client, served_exports):
    spec = served_exports["vivit"].spec
    clip = spec.example_inputs(batch_size=2, seed=5)
    plain = client.infer("vivit-tiny", clip)
    shared = client.infer("vivit-tiny", clip, shared_memory=True)
    np.testing.assert_array_equal(shared["logits"], plain["logits"])
    again = client.infer("vivit-tiny", spec.example_inputs(batch_size=1, seed=6), shared_memory=True)
    assert again["logits"].shape == (1, plain["logits"].shape[1])  # the region is reused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_down_is_one_sentence_after_retries(protocol):
    with Client(f"127.0.0.1:{free_port()}", protocol, timeout_s=2, retries=1, retry_delay_s=0.01) as c:
        with pytest.raises(ClientError, match="no Triton server answers at|cannot reach"):
            c.classify("vit-tiny", photo(0))


def test_unknown_model_timeout_and_bad_files(client, triton_server, tmp_path):
    with pytest.raises(ClientError, match="model nope is not ready"):
        client.classify("nope", photo(0))
    with pytest.raises(ClientError, match="model broken is not ready"):
        client.infer("broken", {"x": np.zeros(1, np.float32)})
    with Client(triton_server.grpc_url, timeout_s=1e-4) as hurried:
        with pytest.raises(ClientError, match="within 0.0001 s"):
            hurried.infer("vivit-tiny", {"video": np.zeros((1, *hurried_shape(client)), np.float32)})
    with pytest.raises(InputError, match="is not a file"):
        client.classify("vit-tiny", tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not an image OpenCV can decode"):
        client.classify("vit-tiny", tmp_path / "bad.jpg")
    with pytest.raises(InputError, match="takes clips of exactly"):
        client.recognize_actions("vivit-tiny", tmp_path / "bad.jpg", clip_len=3)


def hurried_shape(client) -> tuple[int, ...]:
    return client.model_info("vivit-tiny").spec.inputs[0].shape[1:]


def test_cli_infer(triton_server, served_exports, tmp_path, video_file):
    image = tmp_path / "image.png"
    visualize.save_png(photo(1), image)
    cli = [sys.executable, "-m", "attnserve.cli", "infer"]

    def run(*args):
        return subprocess.run(cli + [str(a) for a in args] + ["--url", triton_server.grpc_url],
                              capture_output=True, text=True)

    classified = run("vit-tiny", image, "--top-k", "2")
    assert classified.returncode == 0, classified.stderr
    assert len(classified.stdout.strip().splitlines()) == 2
    captioned = run("vit_captioner-tiny", image, "--png", tmp_path / "att.png")
    assert captioned.returncode == 0 and (tmp_path / "att.png").exists(), captioned.stderr
    actions = run("vivit-tiny", video_file, "--stream", "--json")
    assert actions.returncode == 0 and '"predictions"' in actions.stdout, actions.stderr
    down = subprocess.run(cli + ["vit-tiny", str(image), "--url", f"127.0.0.1:{free_port()}", "--timeout", "2"],
                          capture_output=True, text=True)
    assert down.returncode == 1 and down.stderr.startswith("error:") and "Traceback" not in down.stderr


def test_generate_image_is_the_eager_generators_and_repeatable(client, served_exports):
    from attnserve.postprocess_gan import sample_latents, to_uint8_images

    export = served_exports["sagan"]
    z = sample_latents(1, export.spec.inputs[0].shape[1], seed=7)
    with runtime.load(export.out_dir, backend="torch") as eager:
        want = to_uint8_images(eager.run({"z": z, "class_id": np.array([3])})["image"])[0]
    got = client.generate_image("sagan-tiny", class_id=3, seed=7)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding of 1e-7 differences
    np.testing.assert_array_equal(client.generate_image("sagan-tiny", class_id=3, seed=7), got)
    assert not np.array_equal(client.generate_image("sagan-tiny", class_id=3, seed=8), got)
    with pytest.raises(InputError, match="class_id must lie in"):
        client.generate_image("sagan-tiny", class_id=10_000)


def test_detect_maps_boxes_back_to_the_image_and_equals_eager(client, served_exports, tmp_path):
    from attnserve.postprocess_detr import postprocess

    export = served_exports["detr"]
    spec = export.spec
    image = photo(6, 90, 120)  # not the model's size: resized without crop, boxes scale back
    with runtime.load(export.out_dir, backend="torch") as eager:
        out = eager.run({"images": pixels(spec, [image])})
    # A random-weight detector's scores sit near 1 / classes: a low threshold keeps some. The
    # cut goes mid-way into the widest gap among the top scores, so that the served scores
    # (ONNX Runtime, ~1e-6 from eager) fall on the same side of it; a cut on a score itself
    # kept or dropped that query by rounding.
    scores = np.sort(postprocess(out["logits"], out["boxes"], image.shape[:2], 0.0)[0].scores)[::-1]
    k = int(np.argmax(scores[:5] - scores[1:6]))
    assert scores[k] - scores[k + 1] > 1e-4, "no clear gap among the top scores of this picture"
    threshold = float(scores[k] + scores[k + 1]) / 2
    want = postprocess(out["logits"], out["boxes"], image.shape[:2], threshold)[0]
    got = client.detect("detr-tiny", image, threshold=threshold)
    assert len(got) == len(want) >= 1
    np.testing.assert_allclose([d.box for d in got], want.boxes, atol=1e-2)
    assert [d.class_id for d in got] == want.labels.tolist()
    assert client.detect("detr-tiny", image, threshold=0.999) == []  # nothing above: an empty list
    drawn = visualize.detection_boxes(image, np.array([d.box for d in got]), [d.label for d in got],
                                      [d.score for d in got])
    assert drawn.shape == image.shape and not np.array_equal(drawn, image)
