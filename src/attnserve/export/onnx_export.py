"""torch -> ONNX, followed by the parity check that decides whether the file is kept.

The export is staged in a hidden directory beside the output and moved into place only
after `onnx.checker` and the parity check pass, so an output directory never holds a
half-written or unverified model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from attnserve import __version__
from attnserve.artifact import MANIFEST_NAME, ONNX_NAME, PARITY_NAME, vocabulary_file
from attnserve.compare import ComparisonReport, compare_outputs
from attnserve.errors import AttnserveError, ExportError, ParityError, first_line
from attnserve.export import precision as precisions
from attnserve.models import create_model, get_entry
from attnserve.models.layers import explicit_attention
from attnserve.ops import onnx_ops
from attnserve.spec import ModelSpec, TensorSpec
from attnserve.text import Vocabulary

# torch's exporter warns, on every export, that torchvision's detection ops (nms,
# roi_align, ...) cannot be registered when torchvision is absent; no model here uses them.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# ONNX Runtime 1.31 refuses newer IR versions than this (checked, see DESIGN.md).
MAX_IR_VERSION = 10
MIN_OPSET = 18
# 20: GridSample on 5-D inputs and AffineGrid, which the custom ops' function bodies use.
DEFAULT_OPSET = 20
PARITY_BATCH_SIZES = (1, 3)
# Traced at batch 2: a size-1 example would let the tracer specialise the batch axis.
_TRACE_BATCH = 2


@dataclass
class ExportResult:
    """What `export_onnx` wrote."""

    out_dir: Path
    onnx_path: Path
    spec: ModelSpec
    parity: list[ComparisonReport]
    precision: str
    # Generative models: part name -> its .onnx, and its parity reports.
    parts: dict[str, Path] = dataclasses.field(default_factory=dict)
    part_parity: dict[str, list[ComparisonReport]] = dataclasses.field(default_factory=dict)
    # mixed and int8: how the precision was decided (fp32 nodes, Q/DQ), per graph.
    precision_report: precisions.PrecisionReport | None = None
    part_precision: dict[str, precisions.PrecisionReport] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        reports = self.parity + [r for rs in self.part_parity.values() for r in rs]
        return all(r.passed for r in reports)


def export_onnx(
    name: str,
    out_dir: str | Path,
    config: str | Any = "tiny",
    checkpoint: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    custom_ops: bool = True,
    precision: str | None = None,
    fp16: bool = False,
    calibration: str | Path | None = None,
    allow_mismatch: bool = False,
    parity_batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 0,
    vocabularies: Mapping[str, str | Path | Vocabulary] | None = None,
    labels: Sequence[str] | str | Path | None = None,
    on_progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> ExportResult:
    """Export a registered model to `out_dir` and check it against the eager model.

    Args:
        name: registry name.
        out_dir: directory for model.onnx (+ .data), attnserve.json and parity.json;
            created if missing, existing files of those names are replaced.
        config: preset name or config object.
        checkpoint: weights to load (see `create_model`); None keeps the seeded init.
        opset: ONNX opset (18 or newer; 20 or newer for models with custom ops).
        custom_ops: emit attnserve custom-op nodes where the model has them (with
            model-local function bodies); False writes standard ops only. Models without
            custom ops ignore it.
        precision: the precision written in the graph (None: "fp32", or "fp16" when
            `fp16`), each checked against the fp32 eager model on ONNX Runtime (CPU):
            "fp32"; "fp16": a half-precision graph (fp16 inputs, weights and outputs), at
            the spec's fp16 tolerance; "mixed": the fp32 graph converted to fp16 with fp32
            inputs and outputs and fp32 islands found by bisection (see
            `attnserve.export.precision`), at the fp16 tolerance; "int8": Q/DQ nodes on
            the inputs of Conv/Gemm/MatMul, judged by `precision.INT8_CRITERION`.
        fp16: an alias of precision="fp16".
        calibration: int8: a folder of images to calibrate on, preprocessed as the spec
            says (default: the spec's example inputs).
        allow_mismatch: write the model even if parity fails (the report says so).
        parity_batch_sizes: batch sizes the parity check runs at.
        seed: initialisation seed when no checkpoint is given (recorded, so the torch
            runner rebuilds the same model).
        vocabularies: role ("source", "target"; see ModelSpec.vocab_sizes) -> the
            vocabulary the checkpoint was trained with (a file or a Vocabulary); saved
            beside the model as vocab-<role>.json so clients turn text into ids and back.
        labels: class names of a classifier (a list, or a text file of one per line),
            one per class of its first output; recorded in the spec, so the served
            model and the client name classes.
        on_progress: called with a line as mixed precision's bisection goes.
        **overrides: config field overrides.

    Raises:
        ParityError: parity failed and allow_mismatch is False; nothing was written.
        ExportError: the exporter or onnx.checker failed, an unknown precision, or int8
            without float inputs or readable calibration images.
    """
    precision = precisions.resolve_precision(precision, fp16)
    if calibration is not None and precision != "int8":
        raise ExportError(f"a calibration folder is for int8; this export is {precision}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; attnserve exports opset {MIN_OPSET} or newer")
    entry = get_entry(name)
    config_name, cfg = entry.config(config, **overrides)
    model = create_model(name, cfg, str(checkpoint) if checkpoint else None, seed=seed)
    spec = dataclasses.replace(entry.spec_fn(name, config_name, cfg), config=config_name)
    vocabs = _checked_vocabularies(spec, vocabularies or {})
    if labels is not None:
        spec = dataclasses.replace(spec, labels=_checked_labels(spec, labels))
    half = precision == "fp16"  # the only precision whose inputs and outputs change
    graph_spec = _with_float_dtype(spec, "float16") if half else spec
    # int8: calibration data first, so a bad folder fails before minutes of export.
    calibration_data = precisions.calibration_feeds(spec, calibration) if precision == "int8" else None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        onnx_path = staging / ONNX_NAME
        export_model = copy.deepcopy(model).half() if half else model
        _torch_export(export_model, graph_spec, onnx_path, opset, custom_ops)
        precision_report = _set_precision(model, spec, onnx_path, precision, calibration_data,
                                          parity_batch_sizes, seed=0, on_progress=on_progress)
        reports = check_parity(model, spec, onnx_path, precision, parity_batch_sizes)
        part_reports, part_manifest, part_precision = {}, {}, {}
        if hasattr(model, "export_parts"):  # generative models: encoder + decoder step
            exported_parts = export_model.export_parts()
            for part, (module, part_spec) in model.export_parts().items():
                part_graph_spec = _with_float_dtype(part_spec, "float16") if half else part_spec
                part_path = staging / part / ONNX_NAME
                part_path.parent.mkdir()
                _torch_export(exported_parts[part][0], part_graph_spec, part_path, opset, custom_ops)
                part_calibration = (_part_calibration(part_spec, calibration)
                                    if precision == "int8" else None)
                part_precision[part] = _set_precision(
                    module, part_spec, part_path, precision, part_calibration, parity_batch_sizes, seed=0,
                    on_progress=on_progress)
                part_reports[part] = check_parity(module, part_spec, part_path, precision, parity_batch_sizes)
                part_manifest[part] = {
                    "onnx": f"{part}/{ONNX_NAME}", "spec": part_graph_spec.to_dict(),
                    "parity_passed": all(r.passed for r in part_reports[part]),
                    "precision_report": part_precision[part].to_dict() if part_precision[part] else None,
                }
        passed = all(r.passed for r in reports + [r for rs in part_reports.values() for r in rs])
        if not passed and not allow_mismatch:
            labelled = [(f"{part} {r.label}", r) for part, rs in part_reports.items() for r in rs]
            failures = "; ".join(
                f"{label}: {', '.join(r.failures())}"
                for label, r in [(r.label, r) for r in reports] + labelled if not r.passed
            )
            bound = "the int8 criterion" if precision == "int8" else "tolerance"
            raise ParityError(
                f"{name} ({config_name}, {precision}) differs from the eager model on ONNX "
                f"Runtime beyond {bound} ({failures}); nothing was written. Pass "
                "--allow-mismatch to keep it anyway.",
                reports,
            )
        vocab_files = {role: v.save(staging / vocabulary_file(role)).name for role, v in vocabs.items()}
        _write_json(staging / PARITY_NAME, {
            "passed": passed,
            "precision": precision,
            "backend": "onnxruntime-cpu",
            "reports": [r.to_dict() for r in reports],
            "parts": {part: [r.to_dict() for r in rs] for part, rs in part_reports.items()},
            "precision_report": precision_report.to_dict() if precision_report else None,
        })
        manifest = {
            "format": 1,
            "model": name,
            "config": config if isinstance(config, str) else "custom",
            "overrides": {k: _jsonable(v) for k, v in overrides.items()},
            "config_fields": {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()},
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "seed": None if checkpoint else seed,
            "precision": precision,
            "opset": opset,
            "custom_ops": custom_ops,
            "parity_passed": passed,
            # mixed: the nodes kept in fp32 and the modules they came from; int8: Q/DQ.
            "precision_report": precision_report.to_dict() if precision_report else None,
            "spec": graph_spec.to_dict(),
            "parts": part_manifest,
            # Token generators only: handwriting has parts but samples strokes instead.
            "generation": (dataclasses.asdict(model.generation_config())
                           if part_manifest and hasattr(model, "generation_config") else None),
            "vocabularies": vocab_files,
            "versions": {"attnserve": __version__, "torch": torch.__version__, "onnx": onnx.__version__},
        }
        _write_json(staging / MANIFEST_NAME, manifest)
        final_path = out_dir / ONNX_NAME
        # The data file's name is recorded inside the graph; the pair moves together.
        stale = out_dir / (ONNX_NAME + ".data")
        if stale.exists() and not (staging / stale.name).exists():
            stale.unlink()
        for f in sorted(staging.iterdir()):
            if (out_dir / f.name).is_dir():
                shutil.rmtree(out_dir / f.name)
            os.replace(f, out_dir / f.name)
        parts = {part: out_dir / entry["onnx"] for part, entry in part_manifest.items()}
        return ExportResult(out_dir, final_path, graph_spec, reports, precision, parts, part_reports,
                            precision_report, {p: r for p, r in part_precision.items() if r})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not any(out_dir.iterdir()):
            out_dir.rmdir()


def _checked_labels(spec: ModelSpec, labels: Sequence[str] | str | Path) -> tuple[str, ...]:
    """Class names for `spec`'s first output, one per class, from a list or a file."""
    if isinstance(labels, str | Path):
        path = Path(labels)
        if not path.is_file():
            raise ExportError(f"the labels file {path} does not exist")
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    labels = tuple(str(x) for x in labels)
    if not spec.task.endswith("classification"):
        raise ExportError(f"class names are for classifiers; {spec.name} is a {spec.task} model")
    classes = spec.outputs[0].shape[-1]
    if len(labels) != classes:
        raise ExportError(f"{len(labels)} class names given, but {spec.name} ({spec.config}) "
                          f"has {classes} classes")
    if len(set(labels)) != len(labels):
        raise ExportError("the class names repeat a name; each class needs its own")
    return labels


def _checked_vocabularies(spec: ModelSpec, given: Mapping) -> dict[str, Vocabulary]:
    vocabs = {}
    for role, vocab in given.items():
        if role not in spec.vocab_sizes:
            roles = ", ".join(spec.vocab_sizes) or "none"
            raise ExportError(f"{spec.name} has no {role!r} vocabulary (its vocabularies: {roles})")
        vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary.load(vocab)
        if len(vocab) != spec.vocab_sizes[role]:
            raise ExportError(
                f"the {role} vocabulary has {len(vocab)} tokens but {spec.name} ({spec.config}) "
                f"has {spec.vocab_sizes[role]}; is it the vocabulary the checkpoint was trained with?"
            )
        vocabs[role] = vocab
    return vocabs


def check_parity(
    model: torch.nn.Module,
    spec: ModelSpec,
    onnx_path: Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> list[ComparisonReport]:
    """Run the ONNX file on ONNX Runtime (CPU) and the eager model on the same inputs,
    at each batch size; one report per batch size.

    fp32, fp16 and mixed are held to the spec's tolerance of their precision (mixed: the
    fp16 one); int8 to `precision.INT8_CRITERION`, with a batch of
    `precision.INT8_CHECK_BATCH` added so top-1 agreement is a fraction of enough rows.
    """
    from attnserve.runtime.ort import OrtRunner
    from attnserve.runtime.torch_runner import TorchRunner

    key = precisions.tolerance_key(precision)
    int8 = key is None
    if int8:
        batch_sizes = precisions.int8_batch_sizes(batch_sizes)
    # int8's element-wise figures are reported against the fp16 tolerance, not judged by it.
    tolerance = spec.tolerance(key or "fp16")
    reports = []
    # The function bodies as stored, which every runtime runs.
    with OrtRunner(onnx_path) as onnx_runner:
        reference = TorchRunner(model, spec)
        for batch in batch_sizes:
            feed = spec.example_inputs(batch, seed=seed + batch)
            if precision == "fp16":
                # Both sides see the same fp16-rounded values; the reference stays fp32.
                feed16 = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feed.items()}
                feed = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feed16.items()}
                actual = onnx_runner.run(feed16)
            else:
                actual = onnx_runner.run(feed)
            expected = reference.run(feed)
            reports.append(compare_outputs(
                expected, actual, tolerance, classes_last_axis=precisions.has_class_axis(spec),
                label=f"batch {batch}",
            ))
    return list(precisions.judge_int8(reports)) if int8 else reports


def _set_precision(model: torch.nn.Module, spec: ModelSpec, onnx_path: Path, precision: str,
                   calibration: tuple[list, str] | None, batch_sizes: tuple[int, ...], *, seed: int,
                   on_progress: Callable[[str], None] | None) -> precisions.PrecisionReport | None:
    """Rewrite the fp32 export at `onnx_path` at `precision` (mixed, int8); None for the
    precisions the exporter writes itself."""
    if precision == "mixed":
        converted, report = precisions.convert_mixed(onnx.load(str(onnx_path)), model, spec, batch_sizes,
                                                     seed=seed, on_progress=on_progress)
    elif precision == "int8":
        feeds, source = calibration
        check = precisions.Int8Check(model, spec, batch_sizes, seed=seed)
        converted, report = precisions.quantize_int8(onnx_path, feeds, source, check, on_progress)
    else:
        return None
    _save_checked(converted, onnx_path, spec)
    return report


def _part_calibration(part_spec: ModelSpec, folder: str | Path | None) -> tuple[list, str]:
    """A part's calibration data: the folder's images when the part takes the images
    (an encoder), its example inputs otherwise (a decoder step)."""
    takes_images = folder is not None and part_spec.preprocessing.get("layout") == "NCHW"
    return precisions.calibration_feeds(part_spec, folder if takes_images else None)


def _torch_export(model: torch.nn.Module, spec: ModelSpec, path: Path, opset: int,
                 custom_ops: bool = True) -> None:
    args = tuple(
        torch.from_numpy(v) for v in spec.example_inputs(_TRACE_BATCH, seed=0).values()
    )
    dims: dict[str, torch.export.Dim] = {}
    # Positional, in the spec's input order: forward's parameter names need not match.
    dynamic_shapes = tuple(
        {axis: dims.setdefault(d, torch.export.Dim(d, min=1, max=65536))
         for axis, d in t.dynamic_axes.items()} or None
        for t in spec.inputs
    )
    try:
        with warnings.catch_warnings(), explicit_attention():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, args, dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=dynamic_shapes, input_names=spec.input_names,
                output_names=spec.output_names, report=False,
                custom_translation_table=onnx_ops.custom_translation_table(),
            )
    except AttnserveError:
        raise
    except Exception as e:
        cause = _user_error_in_chain(e)
        if cause is not None:  # our own argument checks, raised while tracing
            raise ExportError(f"{spec.name} ({spec.config}) cannot be exported: {cause}") from None
        raise ExportError(
            f"torch.onnx.export failed for {spec.name} ({spec.config}): {first_line(e)}"
        ) from e
    try:
        proto = onnx_ops.finish_custom_ops(program.model_proto, custom_ops)
    except ValueError as e:
        raise ExportError(f"{spec.name}: {e}") from None
    _save_checked(proto, path, spec)


def _save_checked(proto: onnx.ModelProto, path: Path, spec: ModelSpec) -> None:
    """Save with external data beside `path` (replacing any), then onnx.checker it."""
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph of {spec.name} is not valid ONNX: {first_line(e)}") from None


def _user_error_in_chain(e: BaseException) -> AttnserveError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, AttnserveError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _with_float_dtype(spec: ModelSpec, dtype: str) -> ModelSpec:
    def convert(ts: tuple[TensorSpec, ...]):
        return tuple(dataclasses.replace(t, dtype=dtype) if t.dtype == "float32" else t for t in ts)

    return dataclasses.replace(spec, inputs=convert(spec.inputs), outputs=convert(spec.outputs))


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
