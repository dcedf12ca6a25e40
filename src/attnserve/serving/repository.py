"""Triton model repositories written from attnserve exports.

    <repo>/<model>/config.pbtxt        written from the export's ModelSpec
    <repo>/<model>/labels.txt          when the task has class names
    <repo>/<model>/1/model.onnx        the graph and, beside it, its weights file
    <repo>/<model>/1/model.onnx.data

`config.pbtxt` follows Triton's ModelConfig schema (model_config.proto): the batch axis
every tensor shares becomes `max_batch_size` and is left out of `dims`; other dynamic
axes are -1; dynamic batching gets preferred sizes and a queue delay; an instance group
places the model on the CPU or GPU; float-only models get a warm-up request so the first
client does not pay for ONNX Runtime's first run.

Flavors: "native" is for Triton's own backends (ONNX Runtime here; TensorRT plans later).
The repository is staged beside `out_dir` and moved into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnserve.artifact import ONNX_NAME, read_artifact
from attnserve.errors import AttnserveError
from attnserve.spec import ModelSpec, TensorSpec

FLAVORS = ("native",)
VERSION = "1"
LABELS_NAME = "labels.txt"

# numpy dtype name -> Triton data type (model_config.proto, DataType).
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32",
    "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}
BATCH_AXIS = "batch"


@dataclass(frozen=True)
class ServingPolicy:
    """How Triton schedules one model.

    Attributes:
        max_batch_size: the largest batch the dynamic batcher forms (and a client may send).
        preferred_batch_sizes: batch sizes the batcher waits for, up to the queue delay.
        max_queue_delay_us: how long a request may wait for others to join its batch.
        dynamic_batching: False serves each request as it comes.
        instances: model instances (parallel executions) per device.
        device: "cpu" or "gpu" (Triton's KIND_CPU / KIND_GPU).
        warmup: send one request of batch 1 while loading (float-only models).
    """

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500
    dynamic_batching: bool = True
    instances: int = 1
    device: str = "cpu"
    warmup: bool = True

    def check(self) -> None:
        if self.max_batch_size < 1:
            raise AttnserveError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise AttnserveError(
                f"preferred batch sizes must lie in 1..max_batch_size ({self.max_batch_size}), got {too_big}"
            )
        if self.instances < 1:
            raise AttnserveError(f"instances must be at least 1, got {self.instances}")
        if self.device not in ("cpu", "gpu"):
            raise AttnserveError(f"device must be 'cpu' or 'gpu', got {self.device!r}")


def _batched(spec: ModelSpec) -> bool:
    """Triton batches along a first axis that every input and output has."""
    return all(t.shape and t.shape[0] == BATCH_AXIS for t in spec.inputs + spec.outputs)


def _dims(t: TensorSpec, batched: bool) -> str:
    shape = t.shape[1:] if batched else t.shape
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _triton_dtype(t: TensorSpec) -> str:
    try:
        return TRITON_DTYPES[t.dtype]
    except KeyError:
        raise AttnserveError(f"{t.name} has dtype {t.dtype}, which Triton does not serve") from None


def _tensor(t: TensorSpec, batched: bool, extra: str = "") -> str:
    return (f'  {{\n    name: "{t.name}"\n    data_type: {_triton_dtype(t)}\n'
            f"    dims: {_dims(t, batched)}{extra}\n  }}")


def _warmup(spec: ModelSpec, batched: bool) -> str | None:
    # Token ids, lengths and counts must be valid to run at all: warm up float inputs only.
    if any(not t.dtype.startswith("float") for t in spec.inputs):
        return None
    sizes = spec.dims(1)
    if any(isinstance(d, str) and d not in sizes for t in spec.inputs for d in t.shape):
        return None
    inputs = []
    for t in spec.inputs:
        dims = ", ".join(map(str, t.concrete_shape(sizes)[1 if batched else 0:]))
        inputs.append(f'    inputs {{\n      key: "{t.name}"\n      value {{\n'
                      f"        data_type: {_triton_dtype(t)}\n        dims: [ {dims} ]\n"
                      f"        random_data: true\n      }}\n    }}")
    return ('model_warmup [\n  {\n    name: "random"\n    batch_size: 1\n' + "\n".join(inputs) + "\n  }\n]")


def model_config(name: str, spec: ModelSpec, policy: ServingPolicy = ServingPolicy(),
                 labels: bool = False, filename: str = ONNX_NAME) -> str:
    """config.pbtxt for an ONNX model served by Triton's ONNX Runtime backend."""
    policy.check()
    batched = _batched(spec)
    label_output = spec.outputs[0].name if labels else None
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f'default_model_filename: "{filename}"',
             f"max_batch_size: {policy.max_batch_size if batched else 0}"]
    lines.append("input [\n" + ",\n".join(_tensor(t, batched) for t in spec.inputs) + "\n]")
    outputs = [_tensor(t, batched, f'\n    label_filename: "{LABELS_NAME}"' if t.name == label_output else "")
               for t in spec.outputs]
    lines.append("output [\n" + ",\n".join(outputs) + "\n]")
    if batched and policy.dynamic_batching:
        preferred = ", ".join(map(str, policy.preferred_batch_sizes))
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
                     f"  max_queue_delay_microseconds: {policy.max_queue_delay_us}\n}}")
    kind = "KIND_GPU" if policy.device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {policy.instances}\n    kind: {kind}\n  }}\n]")
    warmup = _warmup(spec, batched) if policy.warmup else None
    if warmup:
        lines.append(warmup)
    return "\n".join(lines) + "\n"


def build_repository(exports: Sequence[str | Path], out_dir: str | Path, flavor: str = "native",
                     policy: ServingPolicy = ServingPolicy(), names: Sequence[str] | None = None) -> Path:
    """Write a Triton model repository holding `exports` (directories written by
    `attnserve export`), one model folder each, named after the export's model and
    config ("vit-tiny") unless `names` are given. An existing `out_dir` is replaced
    whole, once the new repository is complete.
    """
    if flavor not in FLAVORS:
        raise AttnserveError(f"unknown flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    if not exports:
        raise AttnserveError("no exports given: pass the directories `attnserve export` wrote")
    if names is not None and len(names) != len(exports):
        raise AttnserveError(f"{len(names)} names for {len(exports)} exports")
    policy.check()
    artifacts = []
    for path in exports:
        artifact = read_artifact(path)
        if artifact.manifest is None:
            raise AttnserveError(f"{path} has no attnserve.json manifest; export it with `attnserve export`")
        artifacts.append(artifact)
    chosen = list(names) if names is not None else [
        _model_name(a.manifest) for a in artifacts
    ]
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise AttnserveError(f"two exports would both be named {duplicates[0]!r}; pass distinct names")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-staging-", dir=out_dir.parent))
    try:
        for name, artifact in zip(chosen, artifacts, strict=True):
            _add_model(staging / name, name, artifact, policy)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _model_name(manifest: dict) -> str:
    precision = "-fp16" if manifest.get("precision") == "fp16" else ""
    # Config names with overrides ("tiny+img_size=64") become folder-safe ("tiny-img_size64").
    name = f"{manifest['model']}-{manifest['config']}{precision}"
    return name.replace("+", "-").replace(",", "-").replace("=", "")


def _add_model(folder: Path, name: str, artifact, policy: ServingPolicy) -> None:
    spec = artifact.spec
    version = folder / VERSION
    version.mkdir(parents=True)
    source = artifact.onnx_path
    # The weights file's name is recorded inside the graph: the pair keeps its names.
    for f in (source, source.with_name(source.name + ".data")):
        if f.exists():
            shutil.copy2(f, version / f.name)
    if spec.labels:
        (folder / LABELS_NAME).write_text("\n".join(spec.labels) + "\n")
    config = model_config(name, spec, policy, labels=bool(spec.labels), filename=source.name)
    (folder / "config.pbtxt").write_text(config)
