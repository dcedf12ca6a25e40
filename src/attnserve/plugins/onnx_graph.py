"""An exported model made ready for TensorRT's ONNX parser with the attnserve plugins.

The export already gives every custom node what the parser needs to pick a plugin
(op_type == plugin name, a STRING attribute `plugin_namespace`, attributes of the types
the plugin declares; see the parser's FallbackPluginImporter / loadFields in
onnx-tensorrt). Two things differ between ONNX and a plugin and are fixed here, on a
copy, for TensorRT only:

- A plugin has a fixed number of inputs; WindowAttention's rel_pos_bias and mask are
  optional in ONNX. An absent one becomes a rank-1, one-element slice of q (same dtype,
  never read by the kernel; `shapes.ABSENT_RANK`).
- The model-local functions (the ONNX Runtime bodies) are dropped. Depending on the
  parser version a local function can win over a plugin of the same name (onnx-tensorrt
  10.1 imports local functions first; later versions prefer a registered plugin), and
  the parser keys local functions by name only, so with several overloads of one op it
  would use the first body for every node. Without the functions, a plugin that is not
  registered fails the parse at that node ("Plugin not found", or "No importer
  registered for op" from newer parsers) instead of silently running something else.

No `aot` attribute is set: the plugins define only an AOT implementation, so TensorRT
picks it whatever the network's PREFER_*_PYTHON_PLUGINS flags say (tensorrt.plugin
_TemplatePluginCreator.create_plugin: "If only one implementation is defined, use that").
"""

from __future__ import annotations

import onnx
import onnx.helper as oh
from onnx import TensorProto

from attnserve.errors import AttnserveError
from attnserve.plugins import shapes

DOMAIN = "attnserve"  # == attnserve.ops.onnx_ops.DOMAIN (tested)

# attribute kind -> the ONNX attribute type the exporter writes for it
ONNX_ATTR_TYPES = {
    "ints": onnx.AttributeProto.INTS, "str": onnx.AttributeProto.STRING,
    "int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT,
}


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The attnserve nodes of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN]


def check_plugin_nodes(model: onnx.ModelProto) -> None:
    """Raise one AttnserveError listing every attnserve node the plugins cannot take."""
    problems = []
    for node in custom_nodes(model):
        label = f"{node.name or '(unnamed)'} ({node.op_type})"
        if node.op_type not in shapes.PLUGINS:
            problems.append(f"{label}: no plugin of that name")
            continue
        attrs = {a.name: a for a in node.attribute}
        ns = attrs.get("plugin_namespace")
        if ns is None or ns.type != onnx.AttributeProto.STRING or ns.s.decode() != shapes.NAMESPACE:
            problems.append(f"{label}: needs the STRING attribute plugin_namespace={shapes.NAMESPACE!r}")
        for name, kind in shapes.PLUGINS[node.op_type].attributes:
            want = ONNX_ATTR_TYPES[kind]
            if name not in attrs:
                problems.append(f"{label}: attribute {name} is missing")
            elif attrs[name].type != want:
                type_name = onnx.AttributeProto.AttributeType.Name
                problems.append(f"{label}: attribute {name} is {type_name(attrs[name].type)}, "
                                f"the plugin takes {type_name(want)}")
    if problems:
        raise AttnserveError("the model's attnserve nodes do not fit the TensorRT plugins (re-export it with "
                             "this attnserve): " + "; ".join(problems))


def prepare_onnx(model: onnx.ModelProto, *, keep_functions: bool = False) -> onnx.ModelProto:
    """A copy of `model` for TensorRT's parser with `attnserve.plugins.register_plugins()`.

    Args:
        model: an attnserve export with custom ops (`export_onnx(..., custom_ops=True)`).
        keep_functions: keep the model-local function bodies (see the module docstring).

    Raises:
        AttnserveError: listing the custom nodes the plugins cannot take.
    """
    check_plugin_nodes(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {v for n in out.graph.node for v in list(n.input) + list(n.output)}
    taken |= {v.name for v in list(out.graph.input) + list(out.graph.initializer)}
    counter = iter(range(1 << 30))

    def fresh(stem: str) -> str:
        while True:
            name = f"{stem}_{next(counter)}"
            if name not in taken:
                taken.add(name)
                return name

    new_nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.domain == DOMAIN and node.op_type == "WindowAttention":
            n_inputs = len(shapes.PLUGINS["WindowAttention"].inputs)
            names = list(node.input) + [""] * (n_inputs - len(node.input))
            if "" in names:
                placeholder = _placeholder(new_nodes, names[0], fresh)
                names = [v or placeholder for v in names]
                del node.input[:]
                node.input.extend(names)
        if node.domain == DOMAIN and not keep_functions:
            node.overload = ""
        new_nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    if not keep_functions:
        kept = [f for f in out.functions if f.domain != DOMAIN]
        del out.functions[:]
        out.functions.extend(kept)
    return out


def _placeholder(nodes: list[onnx.NodeProto], like: str, fresh) -> str:
    """Append nodes computing `like` flattened and cut to its first element: rank 1, one
    element, like's dtype whatever the model's precision."""
    shape, start, end, flat, out = (fresh("attnserve_absent") for _ in range(5))
    for name, values in ((shape, [-1]), (start, [0]), (end, [1])):
        nodes.append(oh.make_node("Constant", [], [name],
                                  value=oh.make_tensor(name, TensorProto.INT64, [1], values)))
    nodes.append(oh.make_node("Reshape", [like, shape], [flat]))
    nodes.append(oh.make_node("Slice", [flat, start, end], [out]))
    return out
