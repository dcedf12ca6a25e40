"""A model's method as a module: how generative models hand their parts to the exporter.

torch.export takes an nn.Module and maps `dynamic_shapes` onto the parameters of its
forward, and the TorchRunner calls forward with the spec's input names, so each part
needs a forward with the method's own signature. `model_part` builds that module once per
method, instead of a hand-written wrapper class per family and part.
"""

from __future__ import annotations

import inspect

from torch import nn

from attnserve.spec import ModelSpec


class ModelPart(nn.Module):
    """Runs `model.<method>`; made by `model_part`, which gives forward its signature."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method


def model_part(model: nn.Module, method: str) -> ModelPart:
    """A module whose forward is `model.<method>`, parameters and names included."""
    params = list(inspect.signature(getattr(model, method)).parameters.values())

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = inspect.Signature([self_param, *params])
    cls = type(f"{type(model).__name__}_{method}", (ModelPart,), {"forward": forward})
    return cls(model, method)


def encoder_and_step(model: nn.Module, encoder: ModelSpec, step: ModelSpec) -> dict:
    """`export_parts()` of a generative model: its `encode` and `step` methods with their specs."""
    return {"encoder": (model_part(model, "encode"), encoder),
            "decoder_step": (model_part(model, "step"), step)}
