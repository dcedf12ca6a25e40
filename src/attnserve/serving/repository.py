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

Flavors: "native" serves the graphs on Triton's own ONNX Runtime backend (the NGC
container); "python" runs them with ONNX Runtime inside Triton's Python backend (the
pip-installed server, which ships no ONNX Runtime backend). Both add Python-backend
models around the graphs:

    <model>-preprocess-jpeg, -preprocess-frames, -topk   image classifiers: decoding,
    <model>-jpeg, <model>-frames                         resizing, normalising and top-k
                                                         in the server (ensembles)
    <model>-stream                                       video classifiers: a stream of
                                                         frames, a sliding window per
                                                         sequence id in the server
    <model>-encoder, <model>-decoder_step, <model>-generate   generative models: the
                                                         parts and a BLS loop over them

The repository is staged beside `out_dir` and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from attnserve.artifact import ONNX_NAME, read_artifact
from attnserve.errors import AttnserveError
from attnserve.spec import ModelSpec, TensorSpec, clip_frames

FLAVORS = ("native", "python")
TRITON_MODELS = Path(__file__).parent / "triton_models"
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
        top_k: classes the classification pipelines return.
        stream_stride: frames between a video stream's answers (0: half the clip).
        stream_idle_s: a stream that sends nothing for this long is forgotten.
    """

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500
    dynamic_batching: bool = True
    instances: int = 1
    device: str = "cpu"
    warmup: bool = True
    top_k: int = 5
    stream_stride: int = 0
    stream_idle_s: int = 60

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
    return _dim_list([_dim(d) for d in (t.shape[1:] if batched else t.shape)])


def _dim(d) -> int:
    # A fixed size of 0 (a cache that starts empty) is not a valid Triton dim: -1 holds it.
    return d if isinstance(d, int) and d > 0 else -1


def _dim_list(dims: list[int]) -> str:
    # A tensor that is only its batch axis is sent as [batch, 1] and reshaped for the model.
    if not dims:
        return "[ 1 ]\n    reshape: { shape: [ ] }"
    return "[ " + ", ".join(map(str, dims)) + " ]"


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


SPEC_PARAMETER = "attnserve.spec"


def _parameters(params: dict[str, str]) -> str:
    # A JSON string literal is a valid text-format string (quotes and backslashes escaped).
    return "\n".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: '
                     f"{json.dumps(v, ensure_ascii=False)} }}\n}}" for k, v in params.items())


def _spec_parameter(spec: ModelSpec) -> dict[str, str]:
    """The spec travels in the config, so a client learns names, preprocessing and labels
    from the server (get_model_config) and needs no export directory."""
    return {SPEC_PARAMETER: json.dumps(spec.to_dict(), separators=(",", ":"))}


def _scheduling(policy: ServingPolicy, batched: bool) -> list[str]:
    lines = []
    if batched and policy.dynamic_batching:
        preferred = ", ".join(map(str, policy.preferred_batch_sizes))
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
                     f"  max_queue_delay_microseconds: {policy.max_queue_delay_us}\n}}")
    kind = "KIND_GPU" if policy.device == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {policy.instances}\n    kind: {kind}\n  }}\n]")
    return lines


def model_config(name: str, spec: ModelSpec, policy: ServingPolicy = ServingPolicy(),
                 labels: bool = False, filename: str = ONNX_NAME, backend: str = "onnxruntime") -> str:
    """config.pbtxt for an exported ONNX model, run by Triton's ONNX Runtime backend
    (`backend="onnxruntime"`) or by ONNX Runtime inside the Python backend ("python")."""
    policy.check()
    batched = _batched(spec)
    label_output = spec.outputs[0].name if labels else None
    lines = [f'name: "{name}"']
    if backend == "python":
        lines += ['backend: "python"', _parameters({"onnx": filename, **_spec_parameter(spec)})]
    else:
        lines += ['platform: "onnxruntime_onnx"', f'default_model_filename: "{filename}"',
                  _parameters(_spec_parameter(spec))]
    lines.append(f"max_batch_size: {policy.max_batch_size if batched else 0}")
    lines.append("input [\n" + ",\n".join(_tensor(t, batched) for t in spec.inputs) + "\n]")
    outputs = [_tensor(t, batched, f'\n    label_filename: "{LABELS_NAME}"' if t.name == label_output else "")
               for t in spec.outputs]
    lines.append("output [\n" + ",\n".join(outputs) + "\n]")
    lines += _scheduling(policy, batched)
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
            _add_model(staging, name, artifact, policy, flavor)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _model_name(manifest: dict) -> str:
    # fp32 keeps the plain name; fp16, mixed and int8 exports of one model sit beside it.
    precision = "" if manifest.get("precision", "fp32") == "fp32" else f"-{manifest['precision']}"
    # Config names with overrides ("tiny+img_size=64") become folder-safe ("tiny-img_size64").
    name = f"{manifest['model']}-{manifest['config']}{precision}"
    return name.replace("+", "-").replace(",", "-").replace("=", "")


def _add_model(repo: Path, name: str, artifact, policy: ServingPolicy, flavor: str) -> None:
    spec = artifact.spec
    _add_onnx_model(repo / name, name, artifact.onnx_path, spec, policy, flavor)
    parts = artifact.manifest.get("parts") or {}
    for part, entry in parts.items():
        part_spec = ModelSpec.from_dict(entry["spec"])
        _add_onnx_model(repo / f"{name}-{part}", f"{name}-{part}", artifact.onnx_path.parent / entry["onnx"],
                        part_spec, policy, flavor)
    if artifact.manifest.get("generation") and {"encoder", "decoder_step"} <= set(parts):
        _add_generator(repo, name, artifact, policy)
    kind = _pipeline_kind(spec)
    if kind:
        _add_classification_pipelines(repo, name, spec, policy, kind)
    if kind == "video":
        _add_stream(repo, name, spec, policy)


def _add_onnx_model(folder: Path, name: str, source: Path, spec: ModelSpec, policy: ServingPolicy,
                    flavor: str) -> None:
    version = folder / VERSION
    version.mkdir(parents=True)
    # The weights file's name is recorded inside the graph: the pair keeps its names.
    for f in (source, source.with_name(source.name + ".data")):
        if f.exists():
            shutil.copy2(f, version / f.name)
    if flavor == "python":
        shutil.copy2(TRITON_MODELS / "onnx_model.py", version / "model.py")
    if spec.labels:
        (folder / LABELS_NAME).write_text("\n".join(spec.labels) + "\n")
    backend = "python" if flavor == "python" else "onnxruntime"
    config = model_config(name, spec, policy, labels=bool(spec.labels), filename=source.name, backend=backend)
    (folder / "config.pbtxt").write_text(config)


# Python-backend models around the exported graphs: (name, Triton type, dims) per tensor.
Tensor = tuple[str, str, list[int]]


def _python_config(name: str, inputs: list[Tensor], outputs: list[Tensor], policy: ServingPolicy,
                   params: dict[str, str], batching: bool = True) -> str:
    def block(tensors: list[Tensor]) -> str:
        return ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {dt}\n    dims: {_dim_list(d)}\n  }}'
                          for n, dt, d in tensors)

    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {policy.max_batch_size}",
             f"input [\n{block(inputs)}\n]", f"output [\n{block(outputs)}\n]"]
    if params:
        lines.append(_parameters(params))
    lines += _scheduling(policy if batching else replace(policy, dynamic_batching=False), batched=True)
    return "\n".join(lines) + "\n"


def _add_python_model(folder: Path, module: str, config: str, files: dict[str, str] | None = None) -> None:
    version = folder / VERSION
    version.mkdir(parents=True)
    shutil.copy2(TRITON_MODELS / f"{module}.py", version / "model.py")
    for filename, text in (files or {}).items():
        (version / filename).write_text(text)
    (folder / "config.pbtxt").write_text(config)


def _pipeline_kind(spec: ModelSpec) -> str | None:
    """"image" for an image classifier taking one NCHW float input, "video" for a video
    classifier taking one (N, T, C, H, W) clip, when the spec says how to preprocess."""
    if len(spec.inputs) != 1 or not spec.preprocessing or spec.inputs[0].dtype != "float32":
        return None
    shape = spec.inputs[0].shape
    if spec.task == "image-classification" and len(shape) == 4 and shape[1] == 3:
        return "image"
    if spec.task == "video-classification" and len(shape) == 5 and shape[2] == 3:
        return "video"
    return None


def _add_classification_pipelines(repo: Path, name: str, spec: ModelSpec, policy: ServingPolicy,
                                  kind: str) -> None:
    """Ensembles that take raw input, preprocess it in the server, run the model and
    return the top k: <name>-jpeg (encoded images) and <name>-frames (RGB uint8 frames:
    one image, or a clip of T frames for a video model)."""
    image, logits = spec.inputs[0], spec.outputs[0]
    size = spec.preprocessing["image_size"]
    pixels = [3, size, size]
    if kind == "video":
        frames = _dim(image.shape[1])  # -1: the model takes clips of any length
        sources = {"frames": ("TYPE_UINT8", [frames, -1, -1, 3])}
        pixels = [frames, *pixels]
    else:
        sources = {"jpeg": ("TYPE_STRING", [1]), "frames": ("TYPE_UINT8", [-1, -1, 3])}
    classes = logits.shape[-1]
    k = min(policy.top_k, classes)
    for source, (dtype, dims) in sources.items():
        config = _python_config(f"{name}-preprocess-{source}", [(source, dtype, dims)],
                                [(image.name, "TYPE_FP32", pixels)], policy, {"source": source},
                                batching=source == "jpeg")
        _add_python_model(repo / f"{name}-preprocess-{source}", "image_preprocess", config,
                          {"preprocessing.json": json.dumps(spec.preprocessing)})
    outputs = _topk_outputs(k)
    config = _python_config(f"{name}-topk", [(logits.name, "TYPE_FP32", [classes])], outputs, policy,
                            {"k": str(k)})
    _add_python_model(repo / f"{name}-topk", "topk", config, {LABELS_NAME: _labels_text(spec)})
    for source, (dtype, dims) in sources.items():
        steps = [(f"{name}-preprocess-{source}", {source: source}, {image.name: "_image"}),
                 (name, {image.name: "_image"}, {logits.name: "_logits"}),
                 (f"{name}-topk", {logits.name: "_logits"}, {n: n for n, _, _ in outputs})]
        config = _ensemble_config(f"{name}-{source}", [(source, dtype, dims)], outputs, policy, steps)
        (repo / f"{name}-{source}" / VERSION).mkdir(parents=True)
        (repo / f"{name}-{source}" / "config.pbtxt").write_text(config)


def _topk_outputs(k: int) -> list[Tensor]:
    return [("scores", "TYPE_FP32", [k]), ("classes", "TYPE_INT64", [k]), ("labels", "TYPE_STRING", [k])]


def _labels_text(spec: ModelSpec) -> str:
    return "\n".join(spec.labels or [str(i) for i in range(spec.outputs[0].shape[-1])]) + "\n"


def _add_stream(repo: Path, name: str, spec: ModelSpec, policy: ServingPolicy) -> None:
    """<name>-stream: frames of a video sent one at a time under a sequence id; the server
    keeps each stream's last T frames and answers with the top k every `stride` frames."""
    clip, logits = spec.inputs[0], spec.outputs[0]
    frames = clip_frames(spec)
    stride = policy.stream_stride or max(1, frames // 2)
    k = min(policy.top_k, logits.shape[-1])
    outputs = [("ready", "TYPE_BOOL", [1]), ("frames", "TYPE_INT64", [1]), *_topk_outputs(k)]
    params = {"clip_model": name, "clip_input": clip.name, "clip_output": logits.name, "frames": str(frames),
              "stride": str(stride), "k": str(k)}
    config = _python_config(f"{name}-stream", [("frame", "TYPE_UINT8", [-1, -1, 3])], outputs, policy, params,
                            batching=False)
    # Every request of a sequence goes to the same instance, which holds the windows.
    controls = ",\n".join(
        f'    {{\n      name: "{flag}"\n'
        f"      control [ {{ kind: CONTROL_SEQUENCE_{flag} int32_false_true: [ 0, 1 ] }} ]\n    }}"
        for flag in ("START", "END"))
    config = config.replace("instance_group", f"sequence_batching {{\n  max_sequence_idle_microseconds: "
                            f"{policy.stream_idle_s * 1_000_000}\n  control_input [\n{controls}\n  ]\n}}\n"
                            "instance_group", 1)
    _add_python_model(repo / f"{name}-stream", "video_stream", config,
                      {"preprocessing.json": json.dumps(spec.preprocessing), LABELS_NAME: _labels_text(spec)})


def _ensemble_config(name: str, inputs: list[Tensor], outputs: list[Tensor], policy: ServingPolicy,
                     steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> str:
    text = _python_config(name, inputs, outputs, policy, {}, batching=False)
    head = text[:text.index("instance_group")].replace('backend: "python"', 'platform: "ensemble"')

    def maps(kind: str, m: dict[str, str]) -> str:
        return "".join(f'\n      {kind} {{ key: "{k}" value: "{v}" }}' for k, v in m.items())

    body = ",\n".join(f'    {{\n      model_name: "{model}"\n      model_version: -1'
                       f"{maps('input_map', ins)}{maps('output_map', outs)}\n    }}"
                       for model, ins, outs in steps)
    return head + f"ensemble_scheduling {{\n  step [\n{body}\n  ]\n}}\n"


def _add_generator(repo: Path, name: str, artifact, policy: ServingPolicy) -> None:
    """<name>-generate: a Python-backend (BLS) model that runs <name>-encoder once and
    <name>-decoder_step in a loop (greedy or beam search) and returns tokens, text,
    score and attention weights."""
    manifest = artifact.manifest
    parts = manifest["parts"]
    encoder = ModelSpec.from_dict(parts["encoder"]["spec"])
    step = ModelSpec.from_dict(parts["decoder_step"]["spec"])
    inputs: list[Tensor] = [(t.name, _triton_dtype(t), [_dim(d) for d in t.shape[1:]])
                            for t in encoder.inputs]
    vocabularies = manifest.get("vocabularies") or {}
    # With a source vocabulary, clients may send text instead of token ids.
    text_input = [("source_text", "TYPE_STRING", [1])] if "source" in vocabularies else []
    inputs += text_input + [("max_length", "TYPE_INT32", [1]), ("beam_width", "TYPE_INT32", [1])]
    outputs: list[Tensor] = [("tokens", "TYPE_INT64", [-1]), ("length", "TYPE_INT32", [1]),
                             ("score", "TYPE_FP32", [1]), ("text", "TYPE_STRING", [1])]
    attention = manifest["generation"].get("attention_output")
    if attention:
        per_token = next(t for t in step.outputs if t.name == attention)
        outputs.append(("attention", "TYPE_FP32", [-1] * len(per_token.shape)))  # (tokens, *weights)
    config = _python_config(f"{name}-generate", inputs, outputs, policy, _spec_parameter(encoder),
                            batching=False)
    optional = {n for n, _, _ in inputs} if text_input else {"max_length", "beam_width"}
    config = _optional(config, optional)
    files = {"generation.json": json.dumps({
        "generation": manifest["generation"],
        "encoder": {"model": f"{name}-encoder", "spec": parts["encoder"]["spec"]},
        "decoder_step": {"model": f"{name}-decoder_step", "spec": parts["decoder_step"]["spec"]},
        "vocabulary": vocabularies.get("target"),
        "source_vocabulary": vocabularies.get("source"),
    })}
    for f in vocabularies.values():
        files[f] = (artifact.onnx_path.parent / f).read_text()
    _add_python_model(repo / f"{name}-generate", "generate", config, files)


def _optional(config: str, names: set[str]) -> str:
    """Mark inputs optional (in the input block only: an output may share a name)."""
    head, tail = config.split("output [", 1)
    for n in sorted(names):
        head = head.replace(f'name: "{n}"\n', f'name: "{n}"\n    optional: true\n', 1)
    return head + "output [" + tail
