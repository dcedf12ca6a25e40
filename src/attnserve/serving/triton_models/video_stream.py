"""A video stream classified in the server, frame by frame.

Triton's sequence batcher routes every request of a stream (a correlation id) to the
same model instance, which keeps the stream's last T preprocessed frames. Every
`stride` frames, once T have arrived, the clip runs through the clip model (a BLS call
to the exported graph) and the answer carries the top-k actions with `ready` true;
between answers `ready` is false. Clients send each frame once, never whole clips.

(Implicit state, Triton's other way to keep a sequence's state, is a feature of the
ONNX Runtime and TensorRT backends; the Python backend keeps its state itself.)
"""

from __future__ import annotations

import collections
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from attnserve.imaging import preprocess, top_k
from attnserve.serving.triton_models.common import parameters, version_dir


class Stream:
    def __init__(self, frames: int):
        self.window = collections.deque(maxlen=frames)
        self.seen = 0


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.clip_model = params["clip_model"]
        self.clip_input, self.clip_output = params["clip_input"], params["clip_output"]
        self.frames = int(params["frames"])
        self.stride = int(params["stride"])
        self.k = int(params["k"])
        folder = version_dir(args)
        self.preprocessing = json.loads((folder / "preprocessing.json").read_text())
        self.labels = (folder / "labels.txt").read_text().splitlines()
        self.streams: dict[int, Stream] = {}

    def execute(self, requests):
        responses: list = [None] * len(requests)
        due = []  # (request index, clip, frames seen) of streams whose stride is up
        for i, request in enumerate(requests):
            try:
                stream = self._stream(request)
                frame = pb_utils.get_input_tensor_by_name(request, "frame").as_numpy()[0]
                stream.window.append(preprocess(frame, self.preprocessing))
                stream.seen += 1
                if self._flag(request, "END"):
                    self.streams.pop(request.correlation_id(), None)
                if len(stream.window) == self.frames and (stream.seen - self.frames) % self.stride == 0:
                    due.append((i, np.stack(stream.window), stream.seen))
                else:
                    responses[i] = self._response(False, stream.seen)
            except Exception as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        if due:
            self._classify(requests, responses, due)
        return responses

    def _flag(self, request, name: str) -> bool:
        t = pb_utils.get_input_tensor_by_name(request, name)
        return t is not None and bool(t.as_numpy().ravel()[0])

    def _stream(self, request) -> Stream:
        key = request.correlation_id()
        if self._flag(request, "START"):
            self.streams[key] = Stream(self.frames)
        elif key not in self.streams:
            raise ValueError(f"stream {key} was never started: send its first frame with sequence_start=True")
        return self.streams[key]

    def _classify(self, requests, responses, due) -> None:
        clips = np.stack([clip for _, clip, _ in due])
        result = pb_utils.InferenceRequest(
            model_name=self.clip_model, requested_output_names=[self.clip_output],
            inputs=[pb_utils.Tensor(self.clip_input, clips)]).exec()
        if result.has_error():
            error = pb_utils.TritonError(result.error().message())
            for i, _, _ in due:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return
        scores, ids = top_k(pb_utils.get_output_tensor_by_name(result, self.clip_output).as_numpy(), self.k)
        for row, (i, _, seen) in enumerate(due):
            responses[i] = self._response(True, seen, scores[row], ids[row])

    def _response(self, ready: bool, seen: int, scores=None, ids=None):
        if scores is None:
            scores, ids = np.zeros(self.k, np.float32), np.full(self.k, -1, np.int64)
        labels = np.array([self.labels[i].encode() if i >= 0 else b"" for i in ids], dtype=object)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("ready", np.array([[ready]])),
            pb_utils.Tensor("frames", np.array([[seen]], np.int64)),
            pb_utils.Tensor("scores", scores[None]), pb_utils.Tensor("classes", ids[None]),
            pb_utils.Tensor("labels", labels[None])])
