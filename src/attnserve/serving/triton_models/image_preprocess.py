"""Image preprocessing in the server: encoded images ("jpeg": BYTES) or RGB frames
("frames": uint8 [..., H, W, 3], one image or a clip of T frames per batch item) to the
model's normalised float input ([..., 3, S, S]).

A request with an empty or corrupt image gets an error; the others in the batch are
served.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from attnserve.imaging import decode_image, preprocess
from attnserve.serving.triton_models.common import parameters, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.source = parameters(config)["source"]
        self.output_name = config["output"][0]["name"]
        self.preprocessing = json.loads((version_dir(args) / "preprocessing.json").read_text())

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        batch = pb_utils.get_input_tensor_by_name(request, self.source).as_numpy()
        try:
            if self.source == "jpeg":
                images = [decode_image(bytes(item[0])) for item in batch]
                out = np.stack([preprocess(image, self.preprocessing) for image in images])
            else:
                lead = batch.shape[:-3]
                frames = batch.reshape(-1, *batch.shape[-3:])
                out = np.stack([preprocess(frame, self.preprocessing) for frame in frames])
                out = out.reshape(*lead, *out.shape[1:])
        except Exception as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])
