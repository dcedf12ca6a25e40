"""The blocking client: tritonclient over gRPC or HTTP, plus the tasks."""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterator, Mapping

import numpy as np

from attnserve.client import _core
from attnserve.client._core import ClientError, ModelInfo
from attnserve.client.media import iter_frames, load_image, sliding_clips
from attnserve.client.results import ActionWindow, Detection, Generated, Prediction
from attnserve.errors import InputError
from attnserve.spec import clip_frames

PROTOCOLS = ("grpc", "http")


class SharedInputs:
    """Inputs placed in one system shared-memory region the server reads directly (same
    host only), grown when a request needs more room; freed on close."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name
        self.handle, self.size = None, 0

    def place(self, tensors, arrays: list[np.ndarray]) -> None:
        from tritonclient.utils import shared_memory as shm

        need = sum(a.nbytes for a in arrays)
        if need > self.size:
            self.close()
            self.handle = shm.create_shared_memory_region(self.name, f"/{self.name}", need)
            self.client.register_system_shared_memory(self.name, f"/{self.name}", need)
            self.size = need
        shm.set_shared_memory_region(self.handle, arrays)
        offset = 0
        for tensor, array in zip(tensors, arrays, strict=True):
            tensor.set_shared_memory(self.name, array.nbytes, offset)
            offset += array.nbytes

    def close(self) -> None:
        if self.handle is None:
            return
        from tritonclient.utils import shared_memory as shm

        try:
            self.client.unregister_system_shared_memory(self.name)
        finally:
            shm.destroy_shared_memory_region(self.handle)
            self.handle, self.size = None, 0


class Client:
    """A Triton client that knows attnserve's models.

        with Client("localhost:8001") as client:
            client.classify("vit-s16", "cat.jpg", top_k=5)

    Args:
        url: host:port of the server's gRPC (default 8001) or HTTP (8000) endpoint.
        protocol: "grpc" or "http".
        timeout_s: the longest a request may take.
        retries: further attempts when the server cannot be reached (a request that
            reached the server is never resent; stream frames never are).
    """

    def __init__(self, url: str = "localhost:8001", protocol: str = "grpc", timeout_s: float = 30.0,
                 retries: int = 2, retry_delay_s: float = 0.5):
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.retries, self.retry_delay_s = retries, retry_delay_s
        if protocol == "grpc":
            import tritonclient.grpc as lib
            self._client = lib.InferenceServerClient(url)
        else:
            import tritonclient.http as lib
            self._client = lib.InferenceServerClient(url, connection_timeout=timeout_s,
                                                     network_timeout=timeout_s)
        self._lib = lib
        self._infos: dict[str, ModelInfo] = {}
        self._shared = SharedInputs(self._client, f"attnserve-{os.getpid()}-{id(self):x}")

    # -- plumbing ---------------------------------------------------------------------

    def _call(self, what, model: str | None, retry: bool = True):
        for attempt in itertools.count():
            try:
                return what()
            except Exception as e:
                error, safe = _core.explain(e, self.url, model, self.timeout_s)
                if not (retry and safe) or attempt >= self.retries:
                    raise error from None
                time.sleep(self.retry_delay_s * (attempt + 1))

    def model_info(self, model: str) -> ModelInfo:
        if model not in self._infos:
            if self.protocol == "grpc":
                config = self._call(lambda: self._client.get_model_config(
                    model, as_json=True, client_timeout=self.timeout_s), model)
            else:
                config = self._call(lambda: self._client.get_model_config(model), model)
            self._infos[model] = ModelInfo.from_config(config)
        return self._infos[model]

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None, *,
              shared_memory: bool = False, sequence_id: int = 0, sequence_start: bool = False,
              sequence_end: bool = False) -> dict[str, np.ndarray]:
        """Run `model` on named arrays; returns the outputs named (all, by default).
        `shared_memory=True` passes inputs through system shared memory (server on this
        host)."""
        info = self.model_info(model)
        names = outputs or info.outputs
        tensors, arrays = [], []
        for name, value in inputs.items():
            value = np.asarray(value)
            if name not in info.inputs:
                raise InputError(f"{model} has no input {name!r}; it takes {', '.join(info.inputs)}")
            dtype = info.inputs[name][0]
            text = dtype == "BYTES" and value.dtype.kind in "OSU"
            if value.dtype != _core.TRITON_TO_NUMPY[dtype] and not text:
                raise InputError(f"{name} of {model} must be {dtype}, got {value.dtype}")
            if dtype == "BYTES" and value.dtype != np.object_:
                value = value.astype(np.object_)
            if info.max_batch_size and info.inputs[name][1] == [1] and value.ndim == 1:
                value = value[:, None]  # a batch-only tensor travels as (batch, 1)
            t = self._lib.InferInput(name, list(value.shape), dtype)
            tensors.append(t)
            arrays.append(np.ascontiguousarray(value))
        if shared_memory and all(a.dtype != np.object_ for a in arrays):
            self._shared.place(tensors, arrays)
        else:
            for t, a in zip(tensors, arrays, strict=True):
                t.set_data_from_numpy(a)
        requested = [self._lib.InferRequestedOutput(n) for n in names]
        extra = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call(lambda: self._client.infer(
            model, tensors, outputs=requested, sequence_id=sequence_id, sequence_start=sequence_start,
            sequence_end=sequence_end, **extra), model, retry=sequence_id == 0)
        return {n: result.as_numpy(n) for n in names}

    # -- tasks ------------------------------------------------------------------------

    def classify(self, model: str, image, top_k: int = 5, color: str = "RGB") -> list[Prediction]:
        """The top_k classes of one image (path, bytes or array), preprocessed here as
        the model's spec says."""
        spec = self.model_info(model).require_spec()
        return _core.predictions(spec, self._logits(model, spec, [load_image(image, color)]), top_k)[0]

    def _logits(self, model: str, spec, images) -> np.ndarray:
        name, out = spec.input_names[0], spec.output_names[0]
        return self.infer(model, {name: _core.pixels(spec, images)}, [out])[out]

    def _generate(self, name: str, feed, beam_width: int, max_length: int | None):
        return _core.generated(self.infer(name, _core.generation_inputs(feed, beam_width, max_length)))

    def detect(self, model: str, image, threshold: float = 0.5, color: str = "RGB") -> list[Detection]:
        """Objects in one image, boxes in its own pixels (resized here as the spec says,
        without cropping, so boxes map back exactly)."""
        spec = self.model_info(model).require_spec()
        rgb = load_image(image, color)
        out = self.infer(model, {spec.input_names[0]: _core.pixels(spec, [rgb])})
        return _core.detections(spec, out, rgb.shape[:2], threshold)

    def generate_image(self, model: str, class_id: int, seed: int = 0,
                       truncation: float | None = None) -> np.ndarray:
        """One RGB uint8 image of `class_id` from a served generator; the same seed gives
        the same image."""
        from attnserve.postprocess_gan import to_uint8_images

        spec = self.model_info(model).require_spec()
        out = self.infer(model, _core.latents(spec, class_id, seed, truncation), [spec.output_names[0]])
        return to_uint8_images(out[spec.output_names[0]])[0]

    def caption(self, model: str, image, beam_width: int = 1, max_length: int | None = None,
                color: str = "RGB") -> Generated:
        """Text, token ids and per-word attention for one image, generated in the server."""
        name = _core.generate_model(model)
        info = self.model_info(name)
        spec = info.require_spec()
        feed = {spec.input_names[0]: _core.pixels(spec, [load_image(image, color)])}
        return self._generate(name, feed, beam_width, max_length)[0]

    def translate(self, model: str, text: str, beam_width: int = 1,
                  max_length: int | None = None) -> Generated:
        """A translation made in the server, which holds the model's vocabularies."""
        name = _core.generate_model(model)
        info = self.model_info(name)
        if "source_text" not in info.inputs:
            raise ClientError(f"{name} takes no text: export the model with its source vocabulary "
                              "(`attnserve export --vocab source=...`)")
        feed = {"source_text": np.array([text.encode()], dtype=np.object_)}
        return self._generate(name, feed, beam_width, max_length)[0]

    def recognize_actions(self, model: str, video, clip_len: int | None = None, stride: int | None = None,
                          top_k: int = 5, batch: int = 4) -> list[ActionWindow]:
        """Top actions of every clip of the model's frame count, `stride` frames apart
        (default: the clip length), preprocessed here; clips go `batch` at a time."""
        spec = self.model_info(model).require_spec()
        length = _core.clip_length(spec, clip_len)
        results, pending = [], []

        def flush():
            clips = np.stack([_core.pixels(spec, frames) for _, frames in pending])
            name, out = spec.input_names[0], spec.output_names[0]
            logits = self.infer(model, {name: clips}, [out])[out]
            for (start, _), preds in zip(pending, _core.predictions(spec, logits, top_k), strict=True):
                results.append(ActionWindow(start, start + length, preds))
            pending.clear()

        for start, frames in sliding_clips(iter_frames(video), length, stride or length):
            pending.append((start, frames))
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        return results

    def stream_actions(self, model: str, source) -> Iterator[ActionWindow]:
        """Send frames one at a time to the server's stream model as they arrive, and
        yield its answer each time a window is complete. One frame is in flight at a
        time, so a fast source waits for the server (bounded memory)."""
        name = model if model.endswith("-stream") else f"{model}-stream"
        info = self.model_info(name)
        if not info.sequence:
            raise ClientError(f"{name} is not a stream model (no sequence batching)")
        sequence_id = random.getrandbits(63) or 1
        frames = iter_frames(source)
        current = next(frames, None)
        index = 0
        while current is not None:
            following = next(frames, None)  # one frame of look-ahead to mark the last one
            out = self.infer(name, {"frame": current[None]}, sequence_id=sequence_id,
                             sequence_start=index == 0, sequence_end=following is None)
            if out["ready"][0, 0]:
                seen = int(out["frames"][0, 0])
                labels = [b.decode() for b in out["labels"][0]]
                preds = [Prediction(label, int(c), float(s)) for label, c, s in
                         zip(labels, out["classes"][0], out["scores"][0], strict=True)]
                yield ActionWindow(seen - self._frames(name), seen, preds)
            current, index = following, index + 1

    def _frames(self, stream_model: str) -> int:
        base = self.model_info(stream_model.removesuffix("-stream")).require_spec()
        return clip_frames(base)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        try:
            self._shared.close()
        finally:
            self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
