"""Precision decided in the ONNX graph: fp16 with fp32 islands, and int8 as Q/DQ nodes.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags), so the
precision of an engine is the precision written in its ONNX graph. This module writes it:

- `mixed`: the fp32 export converted to fp16 by onnxconverter-common's
  `float16.convert_float_to_float16` (inputs and outputs stay fp32, `keep_io_types`),
  with the nodes that cannot be fp16 kept in fp32. Which nodes is found by bisection
  against the eager model at the spec's fp16 tolerance (`bisect_fp32_nodes`), and each
  kept node is reported with the PyTorch module it came from (`node_module`).
- `int8`: Q/DQ nodes from ONNX Runtime's `quantize_static`, calibrated on the spec's
  example inputs or on a folder of images, with the placement TensorRT asks for
  (symmetric int8, per-channel weights, float biases, only the inputs of Conv, Gemm and
  MatMul quantized) and judged by `Int8Criterion`, as no element-wise tolerance fits int8.
  When the whole model fails that, the same bisection finds the quantized nodes that
  must stay float (`dequantized` makes a node float again).

Why our own bisection rather than `onnxconverter_common.auto_mixed_precision`: that
module compares the converted ONNX model with the fp32 ONNX model (not the eager model),
on one feed, through its own `np.allclose`, and prints every step to stdout. We hold
every attempt to the same comparator, feeds and tolerance as the parity check (so the
result passes parity by construction), order the suspects first, drop nodes that hold
no float from the search, and record why each kept node failed. Its segment-splitting
idea is the same; the conversion itself is the library's.

The bisection runs on ONNX Runtime's CPU provider, which has no fp16 kernels for most
arithmetic ops: it computes them in fp32 between inserted Casts and removes the Casts
between two such ops (InsertCastTransformer and RemoveDuplicateCastTransformer in
onnxruntime/core/optimizer/insert_cast_transformer.cc), so as run, an fp16 graph never
stores most of its fp16 tensors, and an overflow past 65504 between two ops goes unseen.
Each attempt therefore runs a copy of the candidate in which every fp16 tensor is stored
(`with_fp16_storage`): what a strongly typed fp16 graph says. fp16 accumulation inside
an op is still not seen; TensorRT's own parity suite is the final word (docs/tensorrt.md).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from attnserve.compare import ComparisonReport, OutputComparison, compare_outputs
from attnserve.errors import AttnserveError, ExportError, InputError, InternalError, first_line
from attnserve.spec import ModelSpec, Tolerance

PRECISIONS = ("fp32", "fp16", "mixed", "int8")
# The spec tolerance each element-wise precision is held to; int8 has a criterion instead.
_TOLERANCE_OF = {"fp32": "fp32", "fp16": "fp16", "mixed": "fp16"}
# Tasks whose last output axis is a vocabulary: parity also reports top-1 agreement.
_TOKEN_TASKS = ("translation", "image-captioning")

# torch.onnx's dynamo exporter records, on every node, the module scopes it was traced in
# (torch/onnx/_internal/exporter/_core.py, `_set_node_metadata`; checked on torch 2.13):
# name_scopes "['', 'blocks', 'blocks.0', 'blocks.0.attn', 'softmax']" (module paths, then
# the FX node) and class_hierarchy (the modules' classes, then the aten op).
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
_NAMESPACE = "namespace"  # ": Class/path: Class/.../fx_node", older exporters' only record


def resolve_precision(precision: str | None, fp16: bool = False) -> str:
    """The precision asked for: `precision`, with `fp16=True` as an alias of "fp16"."""
    if precision is None:
        return "fp16" if fp16 else "fp32"
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fp16 and precision != "fp16":
        raise ExportError(f"fp16=True (--fp16) and precision {precision!r} contradict each other; "
                          "give one of them")
    return precision


def tolerance_key(precision: str) -> str | None:
    """The spec tolerance a precision is checked with (None: int8, judged by a criterion)."""
    resolve_precision(precision)
    return _TOLERANCE_OF.get(precision)


def has_class_axis(spec: ModelSpec) -> bool:
    """Whether the outputs' last axis holds classes (or tokens): top-1 agreement applies."""
    return spec.task.endswith("classification") or spec.task in _TOKEN_TASKS


# ---------------------------------------------------------------- node -> module


@dataclass(frozen=True)
class ModuleRef:
    """The PyTorch module an ONNX node was traced in: its dotted path in the model
    ("blocks.0.attn"; "" is the model itself) and its class."""

    path: str
    type: str

    def describe(self) -> str:
        return f"{self.path or '<model>'} ({self.type.rsplit('.', 1)[-1] or '?'})"


def node_module(node: onnx.NodeProto) -> ModuleRef | None:
    """The module `node` came from, read from the metadata torch.onnx's dynamo exporter
    writes on each node; None for nodes without it (added after export, e.g. Casts)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = _literal_list(meta.get(_NAME_SCOPES))
    if len(scopes) >= 2:  # [..., innermost module, FX node]
        classes = _literal_list(meta.get(_CLASS_HIERARCHY))
        return ModuleRef(scopes[-2], classes[-2] if len(classes) == len(scopes) else "")
    namespace = meta.get(_NAMESPACE)
    if namespace and "/" in namespace:
        path, _, cls = namespace.split("/")[-2].partition(": ")
        return ModuleRef(path, cls)
    return None


def node_modules(model: onnx.ModelProto) -> dict[str, ModuleRef]:
    """Node name -> the module it came from, for every top-level node that says."""
    return {n.name: ref for n in model.graph.node if (ref := node_module(n)) is not None}


def _literal_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


# ---------------------------------------------------------------- reports


@dataclass(frozen=True)
class KeptNode:
    """A node left at a higher precision than the rest of the graph, and why."""

    name: str
    op_type: str
    module: str | None
    module_type: str | None
    reason: str

    @classmethod
    def of(cls, node: onnx.NodeProto, reason: str) -> KeptNode:
        ref = node_module(node)
        return cls(node.name, node.op_type, ref.path if ref else None, ref.type if ref else None, reason)

    def describe(self) -> str:
        where = (ModuleRef(self.module, self.module_type or "").describe()
                 if self.module is not None else "no module recorded")
        return f"{self.name} ({self.op_type}) from {where}: {self.reason}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PrecisionReport:
    """How one graph's precision was decided.

    Attributes:
        precision: "mixed" or "int8".
        fp32_nodes: mixed: the nodes kept in fp32 (found by bisection, or in
            onnxconverter-common's default op block list).
        float_nodes: int8: the nodes of quantizable op types left unquantized (the
            attention-probability MatMuls, and those the bisection kept float).
        attempts: candidate models run on ONNX Runtime by the bisection.
        candidates: mixed: nodes the bisection decided on; int8: nodes quantized.
        quantization: int8: format, op types, Q/DQ counts, calibration source.
    """

    precision: str
    fp32_nodes: list[KeptNode] = field(default_factory=list)
    float_nodes: list[KeptNode] = field(default_factory=list)
    attempts: int = 0
    candidates: int = 0
    quantization: dict | None = None

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "fp32_nodes": [k.to_dict() for k in self.fp32_nodes],
            "float_nodes": [k.to_dict() for k in self.float_nodes],
            "attempts": self.attempts,
            "candidates": self.candidates,
            "quantization": self.quantization,
        }

    def lines(self) -> list[str]:
        """What a person wants to read: which nodes kept a higher precision and why."""
        if self.precision == "mixed":
            head = (f"fp16 with {len(self.fp32_nodes)} node(s) kept in fp32 "
                    f"({self.attempts} bisection attempt(s) over {self.candidates} nodes)")
            return [head] + [f"  fp32: {k.describe()}" for k in self.fp32_nodes]
        q = self.quantization or {}
        counts = q.get("qdq_nodes", {})
        head = (f"int8 Q/DQ on the inputs of {', '.join(q.get('op_types', []))}: {self.candidates} node(s) "
                f"quantized, {counts.get('QuantizeLinear', 0)} QuantizeLinear / "
                f"{counts.get('DequantizeLinear', 0)} DequantizeLinear; calibrated on {q.get('calibration')}"
                + (f"; {self.attempts} bisection attempt(s)" if self.attempts > 1 else ""))
        return [head] + [f"  float: {k.describe()}" for k in self.float_nodes]


# ---------------------------------------------------------------- mixed precision

# Ops whose fp16 failures are usual (reductions, exponentials, normalisation, sampling):
# tried first, so that failing nodes sit together and the passing halves are large.
_SUSPECT_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "Pow", "Sqrt", "Exp", "Log", "Div", "Reciprocal", "Erf", "Gelu", "GridSample", "AffineGrid",
    "CumSum", "Einsum",
})
_LIBRARY_BLOCKED = "onnxconverter-common keeps this op type in fp32 (float16.DEFAULT_OP_BLOCK_LIST)"


def bisect_fp32_nodes(
    candidates: Sequence[str],
    passes: Callable[[frozenset[str]], tuple[bool, str]],
    on_attempt: Callable[[int, int, int], None] | None = None,
) -> tuple[dict[str, str], int]:
    """The candidates that must stay fp32, found by bisection.

    `passes(converted)` runs the model with `converted` in fp16 and every other candidate
    in fp32, returning (ok, why not). Everything is tried first; when that fails, the
    largest untried segment is tried on top of the segments already known to pass, split
    in two when it fails, and a single node that fails on its own is kept. Last, each
    kept node is tried once more with the final set, so every node kept is needed given
    the others (a node that failed only because of an interaction goes back to fp16).

    Returns ({kept node: why it failed}, attempts). `on_attempt(attempt, converted, kept)`
    reports progress.
    """
    attempts = 0

    def trial(converted: set[str]) -> tuple[bool, str]:
        nonlocal attempts
        attempts += 1
        ok, why = passes(frozenset(converted))
        if on_attempt:
            on_attempt(attempts, len(converted), len(kept))
        return ok, why

    kept: dict[str, str] = {}
    good: set[str] = set()
    if not candidates or trial(set(candidates))[0]:
        return {}, attempts
    pending = _halves(list(candidates))
    while pending:
        # The largest untried segment, earliest first among equals.
        segment = pending.pop(max(range(len(pending)), key=lambda i: (len(pending[i]), -i)))
        ok, why = trial(good | set(segment))
        if ok:
            good.update(segment)
        elif len(segment) == 1:
            kept[segment[0]] = why
        else:
            pending.extend(_halves(segment))
    for name in list(kept):
        ok, why = trial(good | {name})
        if ok:
            good.add(name)
            del kept[name]
        else:
            kept[name] = why
    return kept, attempts


def _halves(segment: list[str]) -> list[list[str]]:
    mid = len(segment) // 2
    return [segment[:mid], segment[mid:]]


@dataclass
class _Fp16Converter:
    """Converts one shape-inferred fp32 model to fp16 with a given set of fp32 nodes
    through onnxconverter-common's convert_float_to_float16, working around the problems
    of its 1.16 release that our graphs meet (each helper says which, with its issue)."""

    base: onnx.ModelProto

    def __post_init__(self):
        from onnxconverter_common import float16

        self._float16 = float16
        self.library_blocked = set(float16.DEFAULT_OP_BLOCK_LIST)
        self.added = _split_read_outputs(self.base.graph)
        self.float_types = _value_types(self.base)
        graph = self.base.graph
        self.nodes = {n.name: n for n in graph.node}
        self.consumers: dict[str, list[str]] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n.name)

    def holds_float(self, node: onnx.NodeProto) -> bool:
        names = [*node.input, *node.output]
        return any(self.float_types.get(x) == TensorProto.FLOAT for x in names if x)

    def convert(self, fp32_nodes: set[str]) -> onnx.ModelProto:
        model = copy.deepcopy(self.base)
        graph = model.graph
        blocked = set(fp32_nodes) | {n.name for n in graph.node if n.op_type in self.library_blocked}
        # A Constant read only by fp32 nodes keeps its exact value, as their initializers do.
        blocked |= {n.name for n in graph.node if n.op_type == "Constant" and n.output[0] in self.consumers
                    and all(c in blocked for c in self.consumers[n.output[0]])}
        _unshare_initializers(graph, blocked)
        _retarget_float_casts(graph, blocked, self.consumers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the float32 number ... will be truncated"
            model = self._float16.convert_float_to_float16(
                model, keep_io_types=True, disable_shape_infer=True, node_block_list=sorted(blocked),
                op_block_list=self._float16.DEFAULT_OP_BLOCK_LIST,
                # Its "already fp16" guard looks for Casts to fp16, such as the ones retargeted above.
                check_fp16_ready=False,
            )
        _join_fp32_islands(model.graph, [o.name for o in self.base.graph.output])
        return model


def _rename_value(graph, producer, old: str, new: str) -> None:
    """`old` becomes `new` in its producer's outputs and every reader's inputs, so that
    a graph output of the old name can be produced by a node added after it."""
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
    producer.output[list(producer.output).index(old)] = new



def _split_read_outputs(graph: onnx.GraphProto) -> set[str]:
    """Graph outputs that nodes also read get an Identity of their own, the nodes reading
    the value before it. With keep_io_types the library casts a graph output back to fp32
    under its name, and a converted reader would then get fp32 where it expects fp16
    ("Type (tensor(float16)) of output arg ... does not match expected type"). Returns
    the names of the Identity nodes added."""
    read = {x for n in graph.node for x in n.input}
    infos = {v.name: v for v in [*graph.value_info, *graph.output]}
    producer = {o: n for n in graph.node for o in n.output}
    added = set()
    for out in graph.output:
        if out.name not in read or out.name not in producer:
            continue
        inner, node = f"{out.name}__read", producer[out.name]
        _rename_value(graph, node, out.name, inner)
        info = graph.value_info.add()
        info.CopyFrom(infos[out.name])
        info.name = inner
        identity = onnx.helper.make_node("Identity", [inner], [out.name], name=f"{out.name}__output")
        graph.node.insert(list(graph.node).index(node) + 1, identity)
        added.add(identity.name)
    return added


def _retarget_float_casts(graph: onnx.GraphProto, blocked: set[str], consumers: dict[str, list[str]]) -> None:
    """Make every Cast(to=FLOAT) agree with where its readers compute.

    The library leaves a converted Cast(to=FLOAT) as it is while typing its output fp16
    (https://github.com/microsoft/onnxconverter-common/issues/320), and its cast remover
    joins a Cast(to=FLOAT16) of an integer with the Cast(to=FLOAT) it puts before an fp32
    reader, handing that reader the integer. So: a Cast read only by fp32 nodes stays
    fp32 (it joins `blocked`); one read only by fp16 nodes casts to fp16; one read by both
    is split in two, the original for the fp32 readers and a Cast to fp16 for the others.
    """
    for n in list(graph.node):
        to = next((a for a in n.attribute if a.name == "to"), None)
        if n.op_type != "Cast" or n.name in blocked or to is None or to.i != TensorProto.FLOAT:
            continue
        readers = consumers.get(n.output[0], [])
        fp32_readers = [r for r in readers if r in blocked]
        if readers and len(fp32_readers) == len(readers):
            blocked.add(n.name)
        elif not fp32_readers:
            to.i = TensorProto.FLOAT16
        else:
            half = f"{n.output[0]}__fp16"
            for r in graph.node:
                if r.name in readers and r.name not in blocked:
                    for i, x in enumerate(r.input):
                        if x == n.output[0]:
                            r.input[i] = half
            graph.node.insert(list(graph.node).index(n) + 1, onnx.helper.make_node(
                "Cast", list(n.input), [half], name=f"{n.name}__fp16", to=TensorProto.FLOAT16))
            blocked.add(n.name)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _unshare_initializers(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """Give fp32 nodes their own copy of a float initializer that converted nodes also
    read: the library leaves a shared one in fp32, and the fp16 reader fails to load.
    https://github.com/microsoft/onnxconverter-common/issues/304 (fix proposed in #329)."""
    floats = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    readers: dict[str, set[bool]] = {}
    for n in graph.node:
        for x in n.input:
            if x in floats:
                readers.setdefault(x, set()).add(n.name in blocked)
    for name, kinds in readers.items():
        if kinds != {True, False}:
            continue
        copy_ = graph.initializer.add()
        copy_.CopyFrom(floats[name])
        copy_.name = f"{name}__fp32"
        for n in graph.node:
            if n.name in blocked:
                for i, x in enumerate(n.input):
                    if x == name:
                        n.input[i] = copy_.name


def _join_fp32_islands(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Remove the fp32 -> fp16 -> fp32 round trips the library leaves between two fp32
    nodes when the fp16 value has several readers (its cast remover handles single
    readers only), and restore fp32 graph outputs that an fp32 producer turned fp16
    (`insert_cast16_after_node` retypes the graph output, defeating keep_io_types)."""
    types = _value_types_of_graph(graph)
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if out.name in outputs and out.type.tensor_type.elem_type == TensorProto.FLOAT16:
            node = producer.get(out.name)
            if node is None:
                continue
            fp16_name = f"{out.name}__fp16"
            _rename_value(graph, node, out.name, fp16_name)
            graph.node.append(onnx.helper.make_node(
                "Cast", [fp16_name], [out.name], name=f"{fp16_name}_to_fp32", to=TensorProto.FLOAT))
            out.type.tensor_type.elem_type = TensorProto.FLOAT
            types[fp16_name] = TensorProto.FLOAT16
            producer = {o: n for n in graph.node for o in n.output}
    cast_to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None)
               for n in graph.node if n.op_type == "Cast"}
    for n in graph.node:
        if cast_to.get(n.name) != TensorProto.FLOAT:
            continue
        up = producer.get(n.input[0])
        if up is None or cast_to.get(up.name) != TensorProto.FLOAT16:
            continue
        if types.get(up.input[0]) == TensorProto.FLOAT:  # fp32 -> fp16 -> fp32: keep the fp32
            n.op_type = "Identity"
            del n.attribute[:]
            n.input[0] = up.input[0]
    read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
    for n in dead:
        graph.node.remove(n)


def _value_types_of_graph(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    return types


def _inferred(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The model with a type for every value: ONNX shape inference, then ONNX Runtime
    for what inference leaves untyped (the library skips untyped values when casting)."""
    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    typed |= {i.name for i in model.graph.initializer}
    untyped = [o for n in model.graph.node for o in n.output if o and o not in typed]
    if untyped:
        import contextlib
        import io

        from onnxconverter_common.auto_mixed_precision import add_missing_dtypes_using_ort

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a count
            model = add_missing_dtypes_using_ort(model, dict(feed))
    return model


def with_fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which ONNX Runtime's CPU provider stores every fp16 tensor.

    After each node output typed fp16 (by the model's value_info) comes an Identity whose
    output is a graph output and which the readers read instead. ONNX Runtime keeps a
    node that writes a graph output at its declared type (IsIsolatedFp16Node and
    RemoveDuplicateCastTransformer both leave graph outputs alone), and Identity has an
    fp16 CPU kernel, so the value is rounded to fp16 (and overflows to inf) as the graph
    says. Extra outputs are computed but need not be fetched.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    types = {v.name: v for v in graph.value_info}
    keep = {o.name for o in graph.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for i, x in enumerate(n.input):
            readers.setdefault(x, []).append((n, i))
    nodes = []
    for n in list(graph.node):
        nodes.append(n)
        for out in n.output:
            info = types.get(out)
            if info is None or out in keep or info.type.tensor_type.elem_type != TensorProto.FLOAT16:
                continue
            stored = f"{out}__stored"
            for reader, i in readers.get(out, []):
                reader.input[i] = stored
            nodes.append(onnx.helper.make_node("Identity", [out], [stored], name=f"{stored}_identity"))
            exposed = graph.output.add()
            exposed.CopyFrom(info)
            exposed.name = stored
    del graph.node[:]
    graph.node.extend(nodes)
    return model


class _OrtCheck:
    """Runs candidate models on ONNX Runtime (CPU), fp16 tensors stored
    (`with_fp16_storage`), and compares them with fixed eager outputs, through the one
    comparator."""

    def __init__(self, feeds: list[tuple[str, dict]], expected: list[dict], tolerance: Tolerance,
                 classes_last_axis: bool):
        self.feeds, self.expected = feeds, expected
        self.tolerance, self.classes_last_axis = tolerance, classes_last_axis

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="attnserve-fp16-") as tmp:
            try:
                source = _serialized(with_fp16_storage(model), Path(tmp))
                session = ort.InferenceSession(source, sess_options=options,
                                               providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own unexported exception types
                return False, f"ONNX Runtime cannot load it ({first_line(e)})"
            names = [o.name for o in session.get_outputs() if not o.name.endswith("__stored")]
            for (label, feed), expected in zip(self.feeds, self.expected, strict=True):
                actual = dict(zip(names, session.run(names, feed), strict=True))
                report = compare_outputs(expected, actual, self.tolerance,
                                         classes_last_axis=self.classes_last_axis, label=label)
                if not report.passed:  # the first failing batch says enough
                    return False, f"{label}: {', '.join(report.failures())}"
        return True, ""


def _serialized(model: onnx.ModelProto, tmp: Path) -> bytes | str:
    if model.ByteSize() < 1_800_000_000:  # protobuf's limit is 2 GiB
        return model.SerializeToString()
    path = tmp / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
    return str(path)


def convert_mixed(
    model_fp32: onnx.ModelProto,
    reference,
    spec: ModelSpec,
    batch_sizes: Sequence[int],
    *,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """fp16 with fp32 islands, found by bisection against the eager model.

    Args:
        model_fp32: the fp32 export (with its weights loaded).
        reference: the eager model (an nn.Module taking the spec's inputs).
        spec: its ModelSpec; the islands are whatever it takes to meet tolerance("fp16").
        batch_sizes, seed: the feeds, as the parity check makes them
            (`spec.example_inputs(b, seed=seed + b)`), so the result passes parity.
        on_progress: called with a line per bisection attempt.

    Returns:
        (the mixed-precision model with fp32 inputs and outputs, its PrecisionReport).
    """
    from attnserve.runtime.torch_runner import TorchRunner

    feeds = [(f"batch {b}", spec.example_inputs(b, seed=seed + b)) for b in batch_sizes]
    runner = TorchRunner(reference, spec)
    expected = [runner.run(feed) for _, feed in feeds]
    check = _OrtCheck(feeds, expected, spec.tolerance("fp16"), has_class_axis(spec))
    converter = _Fp16Converter(_inferred(model_fp32, feeds[0][1]))
    nodes = list(converter.base.graph.node)
    library = [n for n in nodes if n.op_type in converter.library_blocked and converter.holds_float(n)]
    search = [n for n in nodes if n.op_type != "Constant" and n.op_type not in converter.library_blocked
              and n.name not in converter.added and converter.holds_float(n)]
    search.sort(key=lambda n: not (n.op_type in _SUSPECT_OPS or n.domain not in ("", "ai.onnx")))
    names = [n.name for n in search]
    if len(set(names)) != len(names) or not all(names):
        raise InternalError(f"{spec.name}: the exported graph has unnamed or duplicate node names")
    everything = set(names)

    def passes(converted: frozenset[str]) -> tuple[bool, str]:
        return check(converter.convert(everything - converted))

    def progress(attempt: int, converted: int, kept: int) -> None:
        if on_progress:
            on_progress(f"{spec.name}: fp16 bisection attempt {attempt}: {converted} of {len(names)} nodes "
                        f"in fp16, {kept} kept in fp32")

    kept, attempts = bisect_fp32_nodes(names, passes, progress)
    model = converter.convert(set(kept))
    by_name = converter.nodes
    report = PrecisionReport(
        "mixed",
        fp32_nodes=[KeptNode.of(n, _LIBRARY_BLOCKED) for n in library]
        + [KeptNode.of(by_name[name], f"in fp16: {kept[name]}") for name in by_name if name in kept],
        attempts=attempts,
        candidates=len(names),
    )
    return model, report


# ---------------------------------------------------------------- int8


@dataclass(frozen=True)
class Int8Criterion:
    """What int8 parity means. Element-wise tolerances do not fit int8 (every value moves
    by up to half a quantisation step of its tensor), so an int8 model passes when, for
    every float output and batch, the cosine similarity of the flattened outputs with
    the eager model's is at least `min_cosine`, and, for outputs whose last axis holds
    classes or tokens, the argmax agrees on at least `min_top1` of all rows of the check
    (pooled over its batches; int8 checks add a batch of INT8_CHECK_BATCH so that is
    a fraction of more than a handful of rows).

    Measured on ONNX Runtime CPU over 32 normal-noise images (vit tiny / vit s16, random
    weights, against the fp32 ONNX model): with the placement used here, cosine 0.998 /
    0.998 and top-1 agreement 97% / 97%; with ONNX Runtime's default placement (Softmax,
    LayerNormalization, Add, ... and the MatMul outputs quantized too) cosine 0.95 / 0.90
    and top-1 100% / 66%. 0.99 and 90% pass the first and refuse the second; a user
    loses about a point of accuracy at 97% agreement, which is what int8 usually costs.
    """

    min_cosine: float = 0.99
    min_top1: float = 0.90


INT8_CRITERION = Int8Criterion()
INT8_CHECK_BATCH = 8
# TensorRT's Q/DQ placement advice: quantize the inputs of the weighted ops (and
# matrix multiplies); normalisation, softmax and element-wise ops stay float.
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul")
# Ops that move data without computing, between a Softmax and the MatMul that reads it.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Flatten"})
CALIBRATION_SAMPLES = 16
CALIBRATION_SEED = 1000
MAX_CALIBRATION_IMAGES = 64
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Int8Report(ComparisonReport):
    """A ComparisonReport judged by an Int8Criterion instead of a tolerance."""

    criterion: Int8Criterion = INT8_CRITERION

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["tolerance"] = None
        d["criterion"] = dataclasses.asdict(self.criterion)
        return d


def judge_int8(reports: Sequence[ComparisonReport],
               criterion: Int8Criterion = INT8_CRITERION) -> list[Int8Report]:
    """The per-batch reports of an int8 check, judged by `criterion` (top-1 agreement
    pooled over all batches, weighted by rows)."""
    pooled: dict[str, tuple[float, int]] = {}
    for r in reports:
        for o in r.outputs:
            if o.top1_agreement is not None:
                rows = int(np.prod(o.shape[:-1]))
                agree, total = pooled.get(o.name, (0.0, 0))
                pooled[o.name] = (agree + o.top1_agreement * rows, total + rows)
    judged = []
    for r in reports:
        outputs = []
        for o in r.outputs:
            problems = [o.problem] if o.problem else []
            if not o.problem and o.cosine_similarity < criterion.min_cosine:
                problems.append(f"cosine similarity {o.cosine_similarity:.4f} < {criterion.min_cosine}")
            if o.name in pooled and not o.problem:
                agree, total = pooled[o.name]
                if agree / total < criterion.min_top1:
                    problems.append(f"top-1 agreement {agree / total:.0%} over {total} rows of all batches "
                                    f"< {criterion.min_top1:.0%}")
            outputs.append(_rejudged(o, problems))
        judged.append(Int8Report(tolerance=r.tolerance, outputs=outputs, label=r.label, criterion=criterion))
    return judged


def _rejudged(o: OutputComparison, problems: list[str]) -> OutputComparison:
    return dataclasses.replace(o, passed=not problems, problem="; ".join(problems) or None)


def int8_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    return tuple(batch_sizes) + ((INT8_CHECK_BATCH,) if INT8_CHECK_BATCH not in batch_sizes else ())


def check_int8_inputs(spec: ModelSpec) -> None:
    """Refuse int8 for a model with no float input to calibrate."""
    if not any(np.dtype(t.dtype).kind == "f" for t in spec.inputs):
        names = ", ".join(f"{t.name} ({t.dtype})" for t in spec.inputs)
        raise ExportError(
            f"int8 calibrates its ranges from float inputs, and {spec.name} takes only {names}; "
            "export it with --precision fp16 or mixed instead")


def calibration_feeds(
    spec: ModelSpec,
    folder: str | Path | None = None,
    *,
    samples: int = CALIBRATION_SAMPLES,
    seed: int = CALIBRATION_SEED,
    max_images: int = MAX_CALIBRATION_IMAGES,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds of batch 1 to calibrate int8 ranges on, and a line saying what they are.

    Without a folder: `samples` example inputs (seeds seed, seed + 1, ...; apart from
    the parity check's). With one: up to `max_images` images from it (sorted by name),
    decoded and preprocessed as the spec says (attnserve.imaging), as the first input;
    any other input from the example inputs.
    """
    check_int8_inputs(spec)
    if folder is None:
        return ([spec.example_inputs(1, seed=seed + i) for i in range(samples)],
                f"{samples} example inputs (seeds {seed}-{seed + samples - 1})")
    from attnserve.imaging import decode_image, preprocess

    folder = Path(folder)
    first = spec.inputs[0]
    pre = spec.preprocessing
    if pre.get("layout") != "NCHW" or np.dtype(first.dtype).kind != "f" or len(first.shape) != 4:
        raise ExportError(
            f"--calibration takes a folder of images for models whose first input is an NCHW image; "
            f"{spec.name}'s first input {first.name} is {first.dtype} {first.describe_shape()}"
            + (f" ({pre.get('layout')})" if pre.get("layout") else ""))
    if not folder.is_dir():
        raise ExportError(f"the calibration folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    feeds, unreadable = [], 0
    for i, path in enumerate(files):
        if len(feeds) == max_images:
            break
        try:
            image = preprocess(decode_image(path.read_bytes()), pre)[None]  # (1, C, H, W)
        except (InputError, OSError):
            unreadable += 1
            continue
        if not first.matches(image.shape):
            raise ExportError(f"{path} preprocessed to {image.shape}, but {spec.name} takes {first.name} of "
                              f"shape {first.describe_shape()}")
        feed = spec.example_inputs(1, seed=seed + i, **_image_dims(first, image.shape))
        feed[first.name] = image.astype(first.dtype)
        feeds.append(feed)
    if not feeds:
        looked = f"{len(files)} image file(s), none readable" if files else "no image files"
        raise ExportError(f"the calibration folder {folder} has {looked} "
                          f"({', '.join(_IMAGE_SUFFIXES)} that OpenCV can decode)")
    note = f", {unreadable} unreadable skipped" if unreadable else ""
    return feeds, f"{len(feeds)} image(s) from {folder}{note}"


def _image_dims(t, shape: tuple[int, ...]) -> dict[str, int]:
    """The named dynamic axes of input `t` other than the batch, at `shape`'s sizes."""
    return {d: s for d, s in zip(t.shape, shape, strict=True) if isinstance(d, str) and d != "batch"}


def _softmax_readers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMuls that read a Softmax's output (attention probabilities times values),
    through ops that only move data."""
    producer = {o: n for n in graph.node for o in n.output}

    def from_softmax(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in _LAYOUT_OPS:
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "Softmax"

    return [n for n in graph.node if n.op_type == "MatMul" and any(from_softmax(x) for x in n.input)]


class _FeedReader:
    """An onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self):
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


def quantize_int8(
    onnx_path: str | Path,
    feeds: list[dict[str, np.ndarray]],
    calibration: str,
    check: Callable[[onnx.ModelProto], tuple[bool, str]] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, PrecisionReport]:
    """Q/DQ int8 of the fp32 ONNX file at `onnx_path`, calibrated (min/max) on `feeds`.

    With `check` (a model -> (passes, why not), e.g. an `Int8Check`): when the fully
    quantized model fails it, the quantized nodes that must stay float are found by
    bisection (`bisect_fp32_nodes`; a node is made float again by `dequantized`, with
    the same calibration) and reported with their modules, as mixed precision does.

    onnxruntime.quantization.quantize_static with QuantFormat.QDQ; the options are the
    ones TensorRT takes (see its docstring: symmetric QInt8 activations and weights for
    GPU/TRT): ActivationSymmetric and WeightSymmetric (zero points 0), per-channel
    weights, QuantizeBias off (TensorRT parses no int32 DequantizeLinear:
    https://github.com/onnx/onnx-tensorrt/issues/850), only the inputs of Conv/Gemm/MatMul
    quantized (OpTypesToExcludeOutputQuantization: their outputs stay float, so Softmax,
    LayerNormalization and the residual adds read float), and MatMuls reading attention
    probabilities kept float. quant_pre_process is not run:
    its ONNX Runtime optimisation writes com.microsoft fused ops TensorRT cannot parse.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    header = onnx.load(str(onnx_path), load_external_data=False)
    excluded = _softmax_readers(header.graph)
    with tempfile.TemporaryDirectory(prefix="attnserve-int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        logging.disable(logging.WARNING)  # "Please consider to run pre-processing before quantization"
        try:
            quantize_static(
                str(onnx_path), str(out), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OP_TYPES), per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=[n.name for n in excluded], use_external_data_format=True,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "OpTypesToExcludeOutputQuantization": list(INT8_OP_TYPES)},
            )
        except AttnserveError:
            raise
        except Exception as e:
            raise ExportError(
                f"onnxruntime.quantization could not quantize {onnx_path}: {first_line(e)}") from e
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(out))
    nodes = model.graph.node
    qdq = {op: sum(n.op_type == op for n in nodes) for op in ("QuantizeLinear", "DequantizeLinear")}
    dq_outputs = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n for n in nodes if n.op_type in INT8_OP_TYPES and any(x in dq_outputs for x in n.input)]
    if not quantized:
        raise ExportError(f"{onnx_path} has no {', '.join(INT8_OP_TYPES)} node with float inputs to "
                          "quantize; int8 would change nothing")
    kept, attempts = {}, 0
    if check is not None:
        names = [n.name for n in quantized]
        everything = set(names)
        fp32 = onnx.load(str(onnx_path))

        def passes(converted: frozenset[str]) -> tuple[bool, str]:
            return check(dequantized(model, fp32, everything - converted))

        def progress(attempt: int, converted: int, kept: int) -> None:
            if on_progress:
                on_progress(f"int8 bisection attempt {attempt}: {converted} of {len(names)} nodes "
                            f"quantized, {kept} kept float")

        kept, attempts = bisect_fp32_nodes(names, passes, progress)
        if kept:
            model = dequantized(model, fp32, set(kept))
            quantized = [n for n in quantized if n.name not in kept]
            nodes = model.graph.node
            qdq = {op: sum(n.op_type == op for n in nodes) for op in ("QuantizeLinear", "DequantizeLinear")}
    report = PrecisionReport(
        "int8",
        float_nodes=[KeptNode.of(n, "reads attention probabilities (a Softmax's output)") for n in excluded]
        + [KeptNode.of(n, f"in int8: {kept[n.name]}") for n in header.graph.node if n.name in kept],
        attempts=attempts,
        candidates=len(quantized),
        quantization={"format": "QDQ", "op_types": list(INT8_OP_TYPES),
                      "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per channel",
                      "bias": "float", "outputs": "float", "calibration": calibration,
                      "calibrate_method": "MinMax", "qdq_nodes": qdq,
                      "criterion": dataclasses.asdict(INT8_CRITERION)},
    )
    return model, report


def dequantized(model: onnx.ModelProto, fp32: onnx.ModelProto, nodes: set[str]) -> onnx.ModelProto:
    """A copy of the Q/DQ `model` in which `nodes` read float again: each takes the inputs
    it has in the `fp32` model it was quantized from (quantize_static keeps node and
    activation names; its weights' float initializers come back from `fp32`), and the
    QuantizeLinear / DequantizeLinear nodes and int8 weights nobody reads any more go."""
    model = copy.deepcopy(model)
    graph = model.graph
    original = {n.name: n for n in fp32.graph.node}
    missing = set(nodes) - original.keys()
    if missing:
        raise InternalError(f"nodes {sorted(missing)} of the int8 graph are not in the fp32 one")
    for n in graph.node:
        if n.name in nodes:
            del n.input[:]
            n.input.extend(original[n.name].input)
    have = {i.name for i in graph.initializer}
    read = {x for n in graph.node for x in n.input}
    graph.initializer.extend(i for i in fp32.graph.initializer if i.name in read and i.name not in have)
    _drop_unread_qdq(graph)
    return model


def _drop_unread_qdq(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        read = {x for n in graph.node for x in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {x for n in graph.node for x in n.input}
    kept = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


class Int8Check:
    """Runs int8 candidates on ONNX Runtime (CPU) against fixed eager outputs at the int8
    check's batch sizes, judged as the parity check judges them (`judge_int8`), so a
    model that passes here passes parity."""

    def __init__(self, reference, spec: ModelSpec, batch_sizes: Sequence[int], *, seed: int = 0,
                 criterion: Int8Criterion = INT8_CRITERION):
        from attnserve.runtime.torch_runner import TorchRunner

        self.spec, self.criterion = spec, criterion
        self.feeds = [(f"batch {b}", spec.example_inputs(b, seed=seed + b))
                      for b in int8_batch_sizes(batch_sizes)]
        runner = TorchRunner(reference, spec)
        self.expected = [runner.run(feed) for _, feed in self.feeds]
        self.classes_last_axis = has_class_axis(spec)

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="attnserve-int8-") as tmp:
            try:
                session = ort.InferenceSession(_serialized(model, Path(tmp)), sess_options=options,
                                               providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own unexported exception types
                return False, f"ONNX Runtime cannot load it ({first_line(e)})"
            names = [o.name for o in session.get_outputs()]
            reports = []
            for (label, feed), expected in zip(self.feeds, self.expected, strict=True):
                actual = dict(zip(names, session.run(names, feed), strict=True))
                reports.append(compare_outputs(expected, actual, self.spec.tolerance("fp16"),
                                               classes_last_axis=self.classes_last_axis, label=label))
        failed = [r for r in judge_int8(reports, self.criterion) if not r.passed]
        return not failed, "; ".join(f"{r.label}: {', '.join(r.failures())}" for r in failed[:1])
