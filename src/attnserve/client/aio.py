"""The asyncio client: the same tasks as Client, awaiting tritonclient's aio clients."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping

import numpy as np

from attnserve.client import _core
from attnserve.client._core import ClientError, ModelInfo
from attnserve.client.media import iter_frames, load_image, sliding_clips
from attnserve.client.results import ActionWindow, Detection, Generated, Prediction
from attnserve.client.sync import PROTOCOLS
from attnserve.errors import InputError
from attnserve.spec import clip_frames


class AsyncClient:
    """`Client` for asyncio: `await client.classify(...)`, `async for w in
    client.stream_actions(...)`. Create it inside a running event loop."""

    def __init__(self, url: str = "localhost:8001", protocol: str = "grpc", timeout_s: float = 30.0,
                 retries: int = 2, retry_delay_s: float = 0.5):
        if protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.retries, self.retry_delay_s = retries, retry_delay_s
        if protocol == "grpc":
            import tritonclient.grpc.aio as lib
            self._client = lib.InferenceServerClient(url)
        else:
            import tritonclient.http.aio as lib
            self._client = lib.InferenceServerClient(url, conn_timeout=timeout_s)
        self._lib = lib
        self._infos: dict[str, ModelInfo] = {}

    async def _call(self, make, model: str | None, retry: bool = True):
        attempt = 0
        while True:
            try:
                return await asyncio.wait_for(make(), self.timeout_s)
            except Exception as e:
                if isinstance(e, asyncio.TimeoutError):
                    raise ClientError(
                        f"no answer from {self.url} (model {model}) within {self.timeout_s:g} s") from None
                error, safe = _core.explain(e, self.url, model, self.timeout_s)
                if not (retry and safe) or attempt >= self.retries:
                    raise error from None
            attempt += 1
            await asyncio.sleep(self.retry_delay_s * attempt)

    async def model_info(self, model: str) -> ModelInfo:
        if model not in self._infos:
            if self.protocol == "grpc":
                config = await self._call(lambda: self._client.get_model_config(model, as_json=True), model)
            else:
                config = await self._call(lambda: self._client.get_model_config(model), model)
            self._infos[model] = ModelInfo.from_config(config)
        return self._infos[model]

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None, *,
                    sequence_id: int = 0, sequence_start: bool = False,
                    sequence_end: bool = False) -> dict[str, np.ndarray]:
        info = await self.model_info(model)
        names = outputs or info.outputs
        tensors = []
        for name, value in inputs.items():
            if name not in info.inputs:
                raise InputError(f"{model} has no input {name!r}; it takes {', '.join(info.inputs)}")
            value = np.ascontiguousarray(value)
            if info.max_batch_size and info.inputs[name][1] == [1] and value.ndim == 1:
                value = value[:, None]  # a batch-only tensor travels as (batch, 1)
            if info.inputs[name][0] == "BYTES" and value.dtype != np.object_:
                value = value.astype(np.object_)
            t = self._lib.InferInput(name, list(value.shape), info.inputs[name][0])
            t.set_data_from_numpy(value)
            tensors.append(t)
        requested = [self._lib.InferRequestedOutput(n) for n in names]
        result = await self._call(lambda: self._client.infer(
            model, tensors, outputs=requested, sequence_id=sequence_id, sequence_start=sequence_start,
            sequence_end=sequence_end), model, retry=sequence_id == 0)
        return {n: result.as_numpy(n) for n in names}

    async def _logits(self, model: str, spec, images) -> np.ndarray:
        name, out = spec.input_names[0], spec.output_names[0]
        return (await self.infer(model, {name: _core.pixels(spec, images)}, [out]))[out]

    async def classify(self, model: str, image, top_k: int = 5, color: str = "RGB") -> list[Prediction]:
        spec = (await self.model_info(model)).require_spec()
        return _core.predictions(spec, await self._logits(model, spec, [load_image(image, color)]), top_k)[0]

    async def detect(self, model: str, image, threshold: float = 0.5, color: str = "RGB") -> list[Detection]:
        spec = (await self.model_info(model)).require_spec()
        rgb = load_image(image, color)
        out = await self.infer(model, {spec.input_names[0]: _core.pixels(spec, [rgb])})
        return _core.detections(spec, out, rgb.shape[:2], threshold)

    async def generate_image(self, model: str, class_id: int, seed: int = 0,
                             truncation: float | None = None) -> np.ndarray:
        from attnserve.postprocess_gan import to_uint8_images

        spec = (await self.model_info(model)).require_spec()
        out = await self.infer(model, _core.latents(spec, class_id, seed, truncation), [spec.output_names[0]])
        return to_uint8_images(out[spec.output_names[0]])[0]

    async def _generate(self, name: str, feed, beam_width: int, max_length: int | None):
        return _core.generated(await self.infer(name, _core.generation_inputs(feed, beam_width,
                                                                                max_length)))

    async def caption(self, model: str, image, beam_width: int = 1, max_length: int | None = None,
                      color: str = "RGB") -> Generated:
        name = _core.generate_model(model)
        info = await self.model_info(name)
        spec = info.require_spec()
        feed = {spec.input_names[0]: _core.pixels(spec, [load_image(image, color)])}
        return (await self._generate(name, feed, beam_width, max_length))[0]

    async def translate(self, model: str, text: str, beam_width: int = 1,
                        max_length: int | None = None) -> Generated:
        name = _core.generate_model(model)
        info = await self.model_info(name)
        if "source_text" not in info.inputs:
            raise ClientError(f"{name} takes no text: export the model with its source vocabulary")
        feed = {"source_text": np.array([text.encode()], dtype=np.object_)}
        return (await self._generate(name, feed, beam_width, max_length))[0]

    async def recognize_actions(self, model: str, video, clip_len: int | None = None,
                                stride: int | None = None, top_k: int = 5) -> list[ActionWindow]:
        """Clips go to the server concurrently (the dynamic batcher merges them)."""
        spec = (await self.model_info(model)).require_spec()
        length = _core.clip_length(spec, clip_len)
        clips = list(sliding_clips(iter_frames(video), length, stride or length))
        name, out = spec.input_names[0], spec.output_names[0]
        answers = await asyncio.gather(*(self.infer(model, {name: _core.pixels(spec, frames)[None]}, [out])
                                         for _, frames in clips))
        return [ActionWindow(start, start + length, _core.predictions(spec, a[out], top_k)[0])
                for (start, _), a in zip(clips, answers, strict=True)]

    async def stream_actions(self, model: str, source) -> AsyncIterator[ActionWindow]:
        name = model if model.endswith("-stream") else f"{model}-stream"
        info = await self.model_info(name)
        if not info.sequence:
            raise ClientError(f"{name} is not a stream model (no sequence batching)")
        length = clip_frames((await self.model_info(name.removesuffix("-stream"))).require_spec())
        sequence_id = random.getrandbits(63) or 1
        frames = iter_frames(source)
        current, index = next(frames, None), 0
        while current is not None:
            following = next(frames, None)
            out = await self.infer(name, {"frame": current[None]}, sequence_id=sequence_id,
                                   sequence_start=index == 0, sequence_end=following is None)
            if out["ready"][0, 0]:
                seen = int(out["frames"][0, 0])
                preds = [Prediction(label.decode(), int(c), float(s)) for label, c, s in
                         zip(out["labels"][0], out["classes"][0], out["scores"][0], strict=True)]
                yield ActionWindow(seen - length, seen, preds)
            current, index = following, index + 1

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
