"""What Client and AsyncClient share: model information from the server's configs, the
tensors each task sends, what it makes of the answers, and errors in one sentence.
Transport-free, so the two clients differ only in how they wait."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from attnserve.client.results import Detection, Generated, Prediction
from attnserve.errors import AttnserveError, InputError
from attnserve.imaging import preprocess, top_k
from attnserve.serving.repository import SPEC_PARAMETER
from attnserve.spec import ModelSpec, clip_frames

TRITON_TO_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                   "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


class ClientError(AttnserveError):
    """The server could not be reached, refused a request, or took too long."""


@dataclass(frozen=True)
class ModelInfo:
    """A served model as its config describes it; `spec` is attnserve's own, for models
    from `attnserve repo build` (names, preprocessing, labels)."""

    name: str
    inputs: dict[str, tuple[str, list[int]]]  # name -> (Triton type, dims)
    outputs: list[str]
    max_batch_size: int
    spec: ModelSpec | None
    sequence: bool

    @classmethod
    def from_config(cls, config: Mapping) -> ModelInfo:
        config = config.get("config", config)  # gRPC's as_json wraps it
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        spec = ModelSpec.from_dict(json.loads(params[SPEC_PARAMETER])) if SPEC_PARAMETER in params else None
        # The wire protocol calls config's TYPE_STRING "BYTES".
        inputs = {t["name"]: (t["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES"),
                              [int(d) for d in t.get("dims", [])]) for t in config.get("input", [])}
        return cls(config["name"], inputs, [t["name"] for t in config.get("output", [])],
                   int(config.get("max_batch_size", 0)), spec, "sequence_batching" in config)

    def require_spec(self) -> ModelSpec:
        if self.spec is None:
            raise ClientError(f"model {self.name} carries no attnserve spec; serve it from a repository "
                              "written by `attnserve repo build`")
        return self.spec


def pixels(spec: ModelSpec, images: Sequence[np.ndarray]) -> np.ndarray:
    """RGB uint8 images -> the model's float input, exactly as the spec preprocesses."""
    if not spec.preprocessing:
        raise ClientError(f"{spec.name} has no preprocessing in its spec; send tensors with infer()")
    return np.stack([preprocess(image, spec.preprocessing) for image in images])


def predictions(spec: ModelSpec, logits: np.ndarray, k: int) -> list[list[Prediction]]:
    if k < 1:
        raise InputError(f"top_k must be at least 1, got {k}")
    scores, ids = top_k(logits, min(k, logits.shape[-1]))
    labels = spec.labels
    return [[Prediction(labels[i] if labels else str(i), int(i), float(s)) for s, i in zip(row_s, row_i,
                                                                                          strict=True)]
            for row_s, row_i in zip(scores, ids, strict=True)]


def detections(spec: ModelSpec, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int],
               threshold: float) -> list[Detection]:
    """A detector's logits and boxes for one image -> its detections above `threshold`."""
    from attnserve.postprocess_detr import postprocess

    if not 0 <= threshold < 1:
        raise InputError(f"threshold must lie in [0, 1), got {threshold}")
    found = postprocess(outputs["logits"], outputs["boxes"], image_size, threshold)[0]
    labels = spec.labels
    return [Detection(labels[c] if labels else str(int(c)), int(c), float(s), tuple(map(float, b)))
            for b, s, c in zip(found.boxes, found.scores, found.labels, strict=True)]


def latents(spec: ModelSpec, class_id: int, seed: int, truncation: float | None) -> dict[str, np.ndarray]:
    """The generator's inputs for one image: seeded latents and the class."""
    from attnserve.postprocess_gan import sample_latents

    z, cls = spec.inputs[0], spec.inputs[1]
    low, high = cls.value_range or (0, None)
    if class_id < low or (high is not None and class_id >= high):
        raise InputError(f"class_id must lie in [{low}, {high}), got {class_id}")
    return {z.name: sample_latents(1, z.shape[1], seed, truncation), cls.name: np.array([class_id], np.int64)}


def generation_inputs(tensors: Mapping[str, np.ndarray], beam_width: int,
                      max_length: int | None) -> dict[str, np.ndarray]:
    if beam_width < 1:
        raise InputError(f"beam_width must be at least 1, got {beam_width}")
    batch = len(next(iter(tensors.values())))
    feed = {n: (a[:, None] if a.ndim == 1 else a) for n, a in tensors.items()}
    feed["beam_width"] = np.full((batch, 1), beam_width, np.int32)
    if max_length is not None:
        feed["max_length"] = np.full((batch, 1), max_length, np.int32)
    return feed


def generated(outputs: Mapping[str, np.ndarray]) -> list[Generated]:
    out = []
    for b in range(len(outputs["tokens"])):
        n = int(outputs["length"][b, 0])
        attention = outputs["attention"][b, :n] if "attention" in outputs else None
        text = outputs["text"][b, 0]
        out.append(Generated(text.decode() if isinstance(text, bytes) else str(text),
                             outputs["tokens"][b, :n].tolist(), float(outputs["score"][b, 0]), attention))
    return out


def generate_model(model: str) -> str:
    return model if model.endswith("-generate") else f"{model}-generate"


def clip_length(spec: ModelSpec, clip_len: int | None) -> int:
    if not isinstance(spec.inputs[0].shape[1], int):  # any length: the caller's, or the trained one
        return clip_len or clip_frames(spec)
    frames = spec.inputs[0].shape[1]
    if clip_len is not None and clip_len != frames:
        raise InputError(f"{spec.name} takes clips of exactly {frames} frames, not {clip_len}")
    return frames


def explain(error: Exception, url: str, model: str | None, timeout_s: float) -> tuple[ClientError, bool]:
    """-> (one-sentence error, whether retrying is safe: only if the request never
    reached the server)."""
    from tritonclient.utils import InferenceServerException

    about = f" (model {model})" if model else ""
    if isinstance(error, InferenceServerException):
        status, message = str(error.status() or ""), " ".join(str(error.message() or error).split())
        lowered = message.lower()
        if "UNAVAILABLE" in status and ("connect" in lowered or "unavailable" in lowered):
            return ClientError(f"no Triton server answers at {url}: {message}"), True
        if "DEADLINE_EXCEEDED" in status or "deadline" in lowered or "timed out" in lowered:
            return ClientError(f"no answer from {url}{about} within {timeout_s:g} s"), False
        if "unknown model" in lowered or "no available versions" in lowered or "not ready" in lowered:
            return ClientError(f"model {model} is not ready on {url}: {message}"), False
        return ClientError(f"{url} refused the request{about}: {message}"), False
    if isinstance(error, (ConnectionRefusedError, ConnectionResetError)):
        return ClientError(f"no Triton server answers at {url} ({type(error).__name__})"), True
    if isinstance(error, TimeoutError) or type(error).__name__ in ("Timeout", "TimeoutError", "timeout"):
        return ClientError(f"no answer from {url}{about} within {timeout_s:g} s"), False
    if isinstance(error, OSError):
        return ClientError(f"cannot reach {url}: {error.strerror or error}"), True
    raise error
