"""The attnserve ops as TensorRT quickly deployable plugins with an AOT implementation.

API (NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin, `_lib.py`,
`_validate.py`, `_plugin_class.py`, `_tensor.py`; sample samples/python/
quickly_deployable_plugins/qdp_defs.py):

- `tensorrt.plugin.register("ns::name")` (TensorRT >= 10.6): a function of the input
  `TensorDesc`s, then the attributes (annotated int, float, str or
  `numpy.typing.NDArray[dtype]`; here str and NDArray only, see `ANNOTATIONS`), returning
  the output `TensorDesc`. It is called with fake shape expressions for the types and
  with real ones for the shapes.
- `tensorrt.plugin.autotune` (>= 10.6): the type/format combinations TensorRT may pick.
- `tensorrt.plugin.aot_impl` (>= 10.9): (inputs, attributes, outputs, tactic) ->
  (kernel name, PTX, `KernelLaunchParams`, `SymIntExprs` of `SymInt32` scalars). TensorRT
  calls it with *every* attribute, positionally, in the order of its plugin fields,
  which the ONNX parser fills in the creator's order (the register order); so each
  aot_impl here declares all attributes in that order. The kernel is launched with
  inputs, then these scalars, then outputs; the PTX is baked into the engine.

The decorated functions' signatures are built from `shapes.PLUGINS` (their
`__signature__`), so the declarations the decorators validate come from the same table
the ONNX tests check. This module must not use `from __future__ import annotations`:
tensorrt.plugin inspects annotations as classes.

Only `register_plugins()` in `attnserve.plugins` imports this module, after tensorrt.
"""

import inspect
from typing import Any

import numpy as np
import numpy.typing as npt

from attnserve.errors import AttnserveError
from attnserve.plugins import shapes

_REGISTERED: set[str] = set()


class TrtArith:
    """`shapes.Arith` over TensorRT's symbolic integers (`tensorrt.plugin.SymInt32`,
    `ShapeExpr`, `cdiv`); valid inside aot_impl, where an expression builder is active."""

    def __init__(self, trtp):
        self._trtp = trtp

    def lift(self, value: int):
        return self._trtp.SymInt32(int(value))

    def cdiv(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)  # tensorrt.plugin.cdiv refuses two ints
        return self._trtp.cdiv(self.lift(a) if isinstance(a, int) else a, b)

    def static(self, dim) -> int | None:
        if isinstance(dim, int):
            return dim
        # A ShapeExpr is "fake" outside shape calculations; is_constant / constant_value
        # are ShapeExpr properties (SymIntExpr.is_constant needs attributes only ShapeExpr has).
        if getattr(dim, "is_fake", False) or not dim.is_constant:
            return None
        return int(dim.constant_value())


# The ONNX parser hands INT and INTS as INT32 fields, FLOAT as FLOAT32 and STRING as
# NUL-terminated CHAR (onnx-tensorrt loadFields); PluginField.data is a 1-D array even
# for one value. tensorrt.plugin (_TemplatePluginCreator.create_plugin, 10.9 to 11.1)
# converts a field with `annotation(f.data)` for int/float, which numpy >= 2.4 refuses
# for a 1-D array ("only 0-dimensional arrays can be converted to Python scalars"), and
# with `f.data.astype(dtype)` for NDArray annotations. So INT and FLOAT are declared as
# one-element arrays of the parser's field types; shapes.normalize_attrs unwraps them.
ANNOTATIONS = {
    "ints": npt.NDArray[np.int32], "int": npt.NDArray[np.int32], "float": npt.NDArray[np.float32], "str": str,
}


def _annotation(kind: str):
    return ANNOTATIONS[kind]


def _dtype(trt, dtype) -> str:
    names = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16"}
    if dtype not in names:
        raise AttnserveError(f"the attnserve plugins take float32 or float16 tensors, got {dtype}")
    return names[dtype]


def _plugin_functions(spec: shapes.PluginSpec, trt, trtp) -> tuple:
    """(describe, autotune, aot_impl) for one plugin, with tensorrt.plugin's signatures."""
    P = inspect.Parameter
    tensors = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in spec.inputs]
    attrs = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=_annotation(kind)) for n, kind in spec.attributes]
    outputs = P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=tuple[trtp.TensorDesc])
    tactic = P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)

    def split(sig: inspect.Signature, args, kwargs) -> tuple[list, dict, dict]:
        bound = sig.bind(*args, **kwargs).arguments
        descs = [bound[n] for n in spec.inputs]
        values = shapes.normalize_attrs(spec.name, {n: bound[n] for n in spec.attribute_names})
        return descs, values, bound

    def describe(*args, **kwargs):
        descs, values, _ = split(describe.__signature__, args, kwargs)
        dims = shapes.output_shape(spec.name, [list(d.shape_expr) for d in descs], values)
        return trtp.from_shape_expr(tuple(dims), dtype=descs[0].dtype)

    def autotune(*args, **kwargs):
        # every tensor fp32, or every tensor fp16; linear layout (the default)
        return [trtp.AutoTuneCombination(", ".join(["FP32|FP16"] * (len(spec.inputs) + 1)))]

    def aot_impl(*args, **kwargs):
        descs, values, bound = split(aot_impl.__signature__, args, kwargs)
        dtypes = {_dtype(trt, d.dtype) for d in (*descs, *bound["outputs"])}
        if len(dtypes) != 1:
            raise AttnserveError(f"{spec.name} takes tensors of one dtype, got {sorted(dtypes)}")
        from attnserve.plugins import aot

        plan = shapes.plan(spec.name, [list(d.shape_expr) for d in descs], values, TrtArith(trtp))
        kernel = aot.compile_ptx(spec.name, aot.current_cc(), dtype=dtypes.pop(), num_warps=plan.num_warps,
                                 **plan.constexprs)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
        launch.block_x = kernel.block_x
        launch.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in plan.scalar_values])
        return kernel.name, kernel.ptx, launch, extra

    describe.__signature__ = inspect.Signature(tensors + attrs, return_annotation=trtp.TensorDesc)
    autotune.__signature__ = inspect.Signature(tensors + [outputs],
                                               return_annotation=list[trtp.AutoTuneCombination])
    aot_impl.__signature__ = inspect.Signature(
        tensors + attrs + [outputs, tactic],
        return_annotation=tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs],
    )
    for f, role in ((describe, "describe"), (autotune, "autotune"), (aot_impl, "aot_impl")):
        f.__name__ = f.__qualname__ = f"{spec.name}_{role}"
    return describe, autotune, aot_impl


def register_all(trt, trtp) -> list[str]:
    """Register every plugin of `shapes.PLUGINS` once per process; returns their ids."""
    for spec in shapes.PLUGINS.values():
        if spec.plugin_id in _REGISTERED:
            continue
        describe, autotune, aot_impl = _plugin_functions(spec, trt, trtp)
        try:
            trtp.register(spec.plugin_id)(describe)
            trtp.autotune(spec.plugin_id)(autotune)
            trtp.aot_impl(spec.plugin_id)(aot_impl)
        except ValueError as e:  # tensorrt.plugin's way of refusing a definition
            raise AttnserveError(f"TensorRT refused the plugin {spec.plugin_id}: {e}") from None
        _REGISTERED.add(spec.plugin_id)
    return [s.plugin_id for s in shapes.PLUGINS.values()]


def signatures(tensor_desc: Any, autotune_combination: Any, launch_params: Any, sym_exprs: Any) -> dict:
    """Not for TensorRT: the three signatures per plugin built with stand-in classes, so
    tests compare them with tensorrt.plugin's schema rules without TensorRT."""

    class _Trtp:
        TensorDesc = tensor_desc
        AutoTuneCombination = autotune_combination
        KernelLaunchParams = launch_params
        SymIntExprs = sym_exprs

    out = {}
    for spec in shapes.PLUGINS.values():
        fns = _plugin_functions(spec, None, _Trtp)
        roles = ("register", "autotune", "aot_impl")
        out[spec.name] = {role: inspect.signature(f) for role, f in zip(roles, fns, strict=True)}
    return out
