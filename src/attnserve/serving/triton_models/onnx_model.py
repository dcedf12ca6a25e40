"""An exported ONNX model served by Triton's Python backend, with ONNX Runtime inside.

Requests the dynamic batcher hands over together run as one batch when their shapes
agree; if that batch fails, each request runs alone, so one bad request gets its own
error and the others their answers.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from attnserve.runtime.ort import OrtRunner
from attnserve.serving.triton_models.common import device, group_by_shape, parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.batched = config.get("max_batch_size", 0) > 0
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.runner = OrtRunner(version_dir(args) / params.get("onnx", "model.onnx"), device=device(args),
                                threads=int(params.get("threads", "0")))

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names}
                 for r in requests]
        responses = [None] * len(requests)
        groups = group_by_shape(feeds) if self.batched else [[i] for i in range(len(requests))]
        for group in groups:
            try:
                outputs = self._run_together([feeds[i] for i in group])
            except Exception:
                outputs = [self._run_alone(feeds[i]) for i in group]
            for i, out in zip(group, outputs, strict=True):
                responses[i] = out if isinstance(out, pb_utils.InferenceResponse) else self._response(out)
        return responses

    def _run_together(self, feeds):
        if len(feeds) == 1:
            return [self.runner.run(feeds[0])]
        sizes = [len(next(iter(f.values()))) for f in feeds]
        batch = {n: np.concatenate([f[n] for f in feeds]) for n in self.input_names}
        out = self.runner.run(batch)
        bounds = np.cumsum(sizes)[:-1]
        split = {n: np.split(a, bounds) for n, a in out.items()}
        return [{n: split[n][k] for n in out} for k in range(len(feeds))]

    def _run_alone(self, feed):
        try:
            return self.runner.run(feed)
        except Exception as e:  # the client gets the runner's one-sentence reason
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))

    def _response(self, out):
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(out[n])) for n in self.output_names])

    def finalize(self):
        self.runner.close()
