"""Reading checkpoints safely and fitting them to a model.

Checkpoints are untrusted files: `.safetensors` is read with safetensors, everything
else with `torch.load(weights_only=True)`, which refuses pickles that would run code.
Every way a file can fail to fit becomes one `CheckpointError` that says what was
found and what to do.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from attnserve.errors import CheckpointError, first_line

# Containers that trainers wrap a state dict in (timm, DeiT, torchvision references,
# Lightning); the first one present wins.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torch pickle, without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({first_line(e)}); "
                "it may be truncated or not a safetensors file at all"
            ) from None
    try:
        with warnings.catch_warnings():  # the refusal below says all that matters
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path} holds objects other than tensors, which weights_only loading "
                "refuses because unpickling them could run code; re-save it as a plain "
                "state dict (torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from None
        raise CheckpointError(f"{path} is not a torch checkpoint ({first_line(e)})") from None
    except Exception as e:  # garbage bytes make the unpickler fail in arbitrary ways
        raise CheckpointError(
            f"{path} could not be read as a torch checkpoint ({first_line(e)}); "
            "it may be truncated or corrupt"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)"
        )
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{path} is not a state dict: {len(non_tensors)} entries are not tensors "
            f"(e.g. {non_tensors[0]!r})"
        )
    # DataParallel / DDP checkpoints prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None = None,
) -> None:
    """Load `path` into `model`, mapping foreign layouts with `checkpoint_filter`.

    Keys must match exactly (BatchNorm step counters aside); otherwise the error lists
    every missing key, unexpected key and shape mismatch.
    """
    sd = read_state_dict(path)
    if checkpoint_filter is not None:
        sd = checkpoint_filter(sd, model)
    own = model.state_dict()
    # BatchNorm's step counter does not affect inference; checkpoints may omit it.
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own and not k.endswith("num_batches_tracked"))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape: {_listing(mismatched)}")
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} with this config: "
            + "; ".join(parts)
            + ". Check the model name and --config match the checkpoint."
        )
    own_keys = {k for k in sd if k in own}
    model.load_state_dict({k: sd[k] for k in own_keys}, strict=False)


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save `model`'s weights; `.safetensors` by suffix, otherwise a plain torch file."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory (tied embedding and output
        # weights); each name gets its own copy, and loading ties them again.
        save_file({k: v.clone() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
