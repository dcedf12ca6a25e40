"""Top-k postprocessing in the server: logits -> softmax scores, class ids and labels of
the k most likely classes."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from attnserve.imaging import top_k
from attnserve.serving.triton_models.common import parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.k = int(parameters(config)["k"])
        self.input_name = config["input"][0]["name"]
        self.labels = np.array((version_dir(args) / "labels.txt").read_text().splitlines(), dtype=object)

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            scores, ids = top_k(logits, self.k)
            labels = np.vectorize(lambda i: self.labels[i].encode(), otypes=[object])(ids)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("scores", scores), pb_utils.Tensor("classes", ids),
                pb_utils.Tensor("labels", labels)]))
        return responses
