"""Generation in the server (BLS): the encoder model runs once, the decoder-step model
in a loop, both as Triton models called through Business Logic Scripting, so steps of
concurrent requests meet in the step model's dynamic batcher.

Inputs: the encoder's inputs, optional `max_length` and `beam_width` (1: greedy); a
translator saved with a source vocabulary also takes `source_text` (one string per batch
item) instead of token ids.
Outputs per batch item: `tokens` (padded with the pad id 0), `length`, `score`, `text`
(decoded with the model's target vocabulary, if it has one) and `attention` (one row
of weights per generated token, zero-padded).
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from attnserve.errors import AttnserveError
from attnserve.runtime.base import Runner
from attnserve.runtime.generate import GenerationConfig, beam_search, greedy_search
from attnserve.serving.triton_models.common import version_dir
from attnserve.spec import ModelSpec
from attnserve.text import Vocabulary


class TritonModelRunner(Runner):
    """A Runner whose graph is another model in this server."""

    backend = "triton-bls"

    def __init__(self, model: str, spec: ModelSpec):
        super().__init__(spec.inputs, spec.outputs)
        self.model = model
        # Tensors that are only the batch axis travel as (batch, 1) (config.pbtxt reshape).
        self.flat = {t.name for t in spec.inputs + spec.outputs if len(t.shape) == 1}

    def _run(self, feed):
        tensors = [pb_utils.Tensor(n, a[:, None] if n in self.flat else a) for n, a in feed.items()]
        response = pb_utils.InferenceRequest(model_name=self.model, requested_output_names=self.output_names,
                                             inputs=tensors).exec()
        if response.has_error():
            raise AttnserveError(f"{self.model}: {response.error().message()}")
        out = {}
        for n in self.output_names:
            a = pb_utils.get_output_tensor_by_name(response, n).as_numpy()
            out[n] = a.reshape(len(a)) if n in self.flat else a
        return out

    def _close(self):
        pass


class TritonPythonModel:
    def initialize(self, args):
        setup = json.loads((version_dir(args) / "generation.json").read_text())
        g = setup["generation"]
        self.config = GenerationConfig(**{**g, "static": tuple(g["static"]), "state": tuple(g["state"])})
        encoder_spec = ModelSpec.from_dict(setup["encoder"]["spec"])
        self.encoder = TritonModelRunner(setup["encoder"]["model"], encoder_spec)
        step_spec = ModelSpec.from_dict(setup["decoder_step"]["spec"])
        self.step = TritonModelRunner(setup["decoder_step"]["model"], step_spec)
        self.input_names = [t.name for t in encoder_spec.inputs]
        folder = version_dir(args)
        self.vocabulary = Vocabulary.load(folder / setup["vocabulary"]) if setup.get("vocabulary") else None
        source = setup.get("source_vocabulary")
        self.source_vocabulary = Vocabulary.load(folder / source) if source else None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._generate(request))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def _option(self, request, name: str, default: int) -> int:
        t = pb_utils.get_input_tensor_by_name(request, name)
        return default if t is None else int(t.as_numpy().ravel()[0])

    def _inputs(self, request) -> dict[str, np.ndarray]:
        text = pb_utils.get_input_tensor_by_name(request, "source_text")
        if text is not None and self.source_vocabulary is not None:
            ids = [self.source_vocabulary.encode(t.decode()) for t in text.as_numpy().ravel()]
            src = np.zeros((len(ids), max(map(len, ids))), dtype=np.int64)
            for i, row in enumerate(ids):
                src[i, :len(row)] = row
            return dict(zip(self.input_names, (src, np.array([len(r) for r in ids], np.int64)), strict=True))
        tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.input_names}
        missing = [n for n, t in tensors.items() if t is None]
        if missing:
            raise AttnserveError(f"the request lacks {', '.join(missing)}"
                                 + (" (or source_text)" if self.source_vocabulary else ""))
        return {n: t.as_numpy() for n, t in tensors.items()}

    def _generate(self, request):
        inputs = self._inputs(request)
        max_length = self._option(request, "max_length", self.config.max_length)
        beam_width = self._option(request, "beam_width", 1)
        if beam_width < 1:
            raise AttnserveError(f"beam_width must be at least 1, got {beam_width}")
        if beam_width == 1:
            results = greedy_search(self.encoder, self.step, inputs, self.config, max_length)
        else:
            results = beam_search(self.encoder, self.step, inputs, self.config, beam_width=beam_width,
                                  max_length=max_length)
        longest = max(len(r.tokens) for r in results)
        tokens = np.zeros((len(results), longest), dtype=np.int64)
        for i, r in enumerate(results):
            tokens[i, :len(r.tokens)] = r.tokens
        texts = [self.vocabulary.decode(r.tokens) if self.vocabulary else "" for r in results]
        outputs = [
            pb_utils.Tensor("tokens", tokens),
            pb_utils.Tensor("length", np.array([[len(r.tokens)] for r in results], dtype=np.int32)),
            pb_utils.Tensor("score", np.array([[r.score] for r in results], dtype=np.float32)),
            pb_utils.Tensor("text", np.array([[t.encode()] for t in texts], dtype=object)),
        ]
        if self.config.attention_output:
            rows = [np.stack(r.attention) for r in results]
            attention = np.zeros((len(results), longest, *rows[0].shape[1:]), dtype=np.float32)
            for i, a in enumerate(rows):
                attention[i, :len(a)] = a
            outputs.append(pb_utils.Tensor("attention", attention))
        return pb_utils.InferenceResponse(output_tensors=outputs)
