"""The model registry: the single source of truth for what attnserve can build.

A family module (`models/vit.py`, ...) registers each architecture once with
`register_model`, naming its config presets (a `tiny` one for tests beside the paper's),
the function that writes its `ModelSpec`, and the checkpoint filter that maps foreign key
layouts (timm, torchvision, ...) onto ours. Tests, the CLI, export, serving and the
benchmark iterate over `list_models()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnserve.errors import UnknownConfigError, UnknownModelError
from attnserve.spec import ModelSpec

SpecFn = Callable[[str, str, Any], ModelSpec]  # (name, config name, config) -> spec
CheckpointFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture.

    Attributes:
        name: registry name.
        model_cls: the nn.Module class; its only constructor argument is a config.
        configs: preset name -> frozen config dataclass. "tiny" is always present.
        spec_fn: builds the ModelSpec for a config.
        paper: the paper the implementation follows.
        checkpoint_filter: maps a foreign state dict (timm, torchvision, ...) onto this
            model's keys; None when only native checkpoints exist.
        checkpoint_formats: names of the foreign layouts the filter understands.
        custom_ops: the attnserve ONNX ops its export may contain (the catalog's "custom
            op" column); tests check the exported graphs against it.
    """

    name: str
    model_cls: type[nn.Module]
    configs: Mapping[str, Any]
    spec_fn: SpecFn
    paper: str
    checkpoint_filter: CheckpointFilter | None = None
    checkpoint_formats: tuple[str, ...] = ()
    custom_ops: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        return self.spec("tiny").task

    def config(self, config: str | Any = "tiny", **overrides: Any) -> tuple[str, Any]:
        """Resolve a preset name or config object (plus field overrides) to
        (name, config)."""
        if isinstance(config, str):
            if config not in self.configs:
                raise UnknownConfigError(
                    f"model {self.name!r} has no config {config!r}; "
                    f"choose one of: {', '.join(self.configs)}"
                )
            config_name, cfg = config, self.configs[config]
        else:
            config_name, cfg = "custom", config
        if overrides:
            fields = {f.name for f in dataclasses.fields(cfg)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise UnknownConfigError(
                    f"config of {self.name!r} has no field {unknown[0]!r}; "
                    f"fields: {', '.join(sorted(fields))}"
                )
            cfg = dataclasses.replace(cfg, **overrides)
            config_name = f"{config_name}+" + ",".join(f"{k}={v}" for k, v in overrides.items())
        return config_name, cfg

    def spec(self, config: str | Any = "tiny", **overrides: Any) -> ModelSpec:
        config_name, cfg = self.config(config, **overrides)
        return self.spec_fn(self.name, config_name, cfg)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    configs: Mapping[str, Any],
    spec: SpecFn,
    paper: str,
    checkpoint_filter: CheckpointFilter | None = None,
    checkpoint_formats: tuple[str, ...] = (),
    custom_ops: tuple[str, ...] = (),
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers an architecture under `name`."""
    if "tiny" not in configs:
        raise ValueError(f"model {name!r} must register a 'tiny' config for the tests")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(
            name, cls, dict(configs), spec, paper, checkpoint_filter, checkpoint_formats, custom_ops
        )
        return cls

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; `attnserve models` lists the {len(_REGISTRY)} known "
            f"ones ({', '.join(list_models())})"
        ) from None


def get_spec(name: str, config: str | Any = "tiny", **overrides: Any) -> ModelSpec:
    """The export spec of `name` in `config` (a preset name or a config object)."""
    return get_entry(name).spec(config, **overrides)


def create_model(
    name: str,
    config: str | Any = "tiny",
    checkpoint: str | None = None,
    *,
    seed: int | None = 0,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model in eval mode.

    Args:
        name: registry name (see `list_models()`).
        config: preset name or a config object of the model's config class.
        checkpoint: a `.pt`/`.pth`/`.bin` (loaded with weights_only=True) or
            `.safetensors` file, in our key layout or a foreign one the model's
            checkpoint filter knows (timm, ...). Keys must match exactly.
        seed: seeds the random initialisation, so an un-checkpointed model is the same
            model every time (the exporter and the torch runner rely on it).
        **overrides: config fields to change (e.g. img_size=384).
    """
    entry = get_entry(name)
    _, cfg = entry.config(config, **overrides)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = entry.model_cls(cfg)
    else:
        model = entry.model_cls(cfg)
    if checkpoint is not None:
        from attnserve.export.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint, entry.checkpoint_filter)
    return model.eval()
