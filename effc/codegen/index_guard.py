"""In-graph range checks of computed index operands: the compiled code refuses out-of-range indices.

TVM's ``take``/``gather_elements``/``gather_nd``/``scatter_*`` kernels do not check bounds: an index outside
``[-s, s)`` reads or writes outside the tensor (garbage, or SIGSEGV). :mod:`effc.runtime.index_check` checks index
operands that are graph inputs (or reach the operand through Cast/Reshape/...) before the kernel runs, with the
offending position and value in its message; indices *computed* in the graph (``Add(idx, 1)``, ``Cast(float →
int64)``) escape it. The converters here wrap TVM's own for Gather, GatherElements, GatherND, ScatterElements,
ScatterND and Scatter: when the index operand is not a constant, they first call the packed function
:data:`~effc.runtime.index_check.GUARD_FUNCTION` on the flag ``all(low <= idx < high)`` — one fused elementwise
compare and one reduction over the indices, negligible next to the gather itself. The function (registered by
effc's runtime; TVM's own ``R.assert_op`` is registered by the TVM Python package, absent from a deployed runtime)
returns nothing or raises with a message that starts with :data:`~effc.runtime.index_check.MARKER`, which the
runtime (:func:`effc.runtime.index_check.guard_error`) turns into a :class:`~effc.errors.DataError`. The in-graph
check stays in the artifact when the Python pre-check is switched off (``check_indices=False``,
``--no-check-indices``): it is the guard against memory errors, the pre-check gives the position and value.

Ranges follow the ONNX operator spec (opset 13+), as in :mod:`effc.ir.index_inputs`: along ``axis`` of ``data``
for Gather/GatherElements/ScatterElements/Scatter; per coordinate of the last indices axis into data axes
``batch_dims ..`` for GatherND and ScatterND.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

from effc.runtime.index_check import GUARD_FUNCTION, MARKER

__all__ = ["INDEX_GUARDS"]

#: A rule: ``(data shape, indices shape, attrs) -> (data axes, their sizes)`` or None (sizes not static).
_Rule = Callable[[list[int], list[int], dict[str, Any]], tuple[list[int], list[int]] | None]


def _along_axis(dims: list[int], idx_dims: list[int], attr: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    axis = int(attr.get("axis", 0))
    axis = axis + len(dims) if axis < 0 else axis
    return ([axis], [dims[axis]]) if 0 <= axis < len(dims) else None


def _leading_axes(dims: list[int], idx_dims: list[int], attr: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    start = int(attr.get("batch_dims", 0))
    axes = list(range(start, start + idx_dims[-1])) if idx_dims else []
    return (axes, [dims[a] for a in axes]) if axes and axes[-1] < len(dims) else None


def _static(expr: relax.Expr) -> list[int] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):  # symbolic dims
        return None


def _emit_guard(bb: relax.BlockBuilder, op: str, node: str, data: relax.Expr, idx: relax.Expr,
                attr: dict[str, Any], rule: _Rule) -> relax.Expr:
    """Emit the range check ``all(-size <= idx < size)`` of ``idx`` (none for constants, dynamic shapes); return it."""
    dims, idx_dims = _static(data), _static(idx)
    if isinstance(idx, tvm.ir.expr.Constant) or not dims or idx_dims is None or not np.prod(idx_dims):
        return idx
    found = rule(dims, idx_dims, attr)
    if found is None:
        return idx
    axes, sizes = found
    dtype = str(idx.ty.dtype)
    per_coordinate = len(sizes) > 1
    high = np.asarray(sizes if per_coordinate else sizes[0], dtype=dtype)
    inside = relax.op.logical_and(relax.op.greater_equal(idx, relax.const(-high, dtype)),
                                  relax.op.less(idx, relax.const(high, dtype)))
    ok = relax.op.equal(relax.op.min(relax.op.astype(inside, "int8")), relax.const(1, "int8"))
    where = "coordinates" if per_coordinate else "values"
    ranges = ", ".join(f"axis {a}: {-s}..{s - 1}" for a, s in zip(axes, sizes, strict=True))
    message = (f"{MARKER} {op} node {node!r}: an index computed in the model lies outside the valid range of its "
               f"{where} ({ranges}; negative values count from the end)")
    check = relax.Call(relax.ExternFunc(GUARD_FUNCTION), [bb.emit(ok), tvm.ir.StringImm(message)],
                       ty_args=[relax.TupleType([])])
    bb.emit(check)  # impure (like R.assert_op): kept, and run before the op that follows
    return idx


def _guarded(tvm_class: type, rule: _Rule, index_position: int = 1) -> type:
    """``tvm_class`` whose converter first emits the range check of input ``index_position``."""

    @classmethod
    def get_converter(cls, opset):
        convert = tvm_class.get_converter(opset)

        def guarded(bb, inputs, attr, params):
            node = str((attr.get("tvm_custom") or {}).get("name", "?"))
            inputs = list(inputs)
            inputs[index_position] = _emit_guard(bb, tvm_class.__name__, node, inputs[0], inputs[index_position],
                                                 attr, rule)
            return convert(bb, inputs, attr, params)

        return guarded

    return type(tvm_class.__name__, (tvm_class,), {"get_converter": get_converter})


#: Op type -> guarded converter class; :func:`effc.codegen.frontend.to_relax` activates it with the std-op fixes.
INDEX_GUARDS: dict[str, type] = {
    **{op: _guarded(getattr(_tvm, op), _along_axis) for op in ("Gather", "GatherElements", "ScatterElements",
                                                                "Scatter")},
    **{op: _guarded(getattr(_tvm, op), _leading_axes) for op in ("GatherND", "ScatterND")},
}
