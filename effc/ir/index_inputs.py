"""Graph inputs whose values index a tensor, and the range each value must lie in (checked before every run).

Compiled index kernels do not check their indices: TVM's ``take``/``gather_elements``/``gather_nd``/``scatter_*``
read or write ``data[index]`` as given (after adding the axis size to a negative index), so an index outside
``[-size, size)`` reads or writes outside the tensor — garbage, or SIGSEGV for ``-2**31``. onnxruntime rejects such
indices. The manifest therefore records, per integer graph input, every index operand it reaches and the range
allowed there; :func:`effc.runtime.index_check.check_index_input` enforces it before the kernel runs.

An input reaches an index operand directly or through ops that keep its values: ``Cast``/``Identity`` keep the
layout too, ``Reshape``/``Squeeze``/``Unsqueeze``/``Flatten``/``Expand`` keep only the values (then a per-coordinate
range of GatherND/ScatterND collapses to the tightest one, which is safe). Indices computed from inputs by
arithmetic are not traced.

Ranges follow the ONNX operator spec (opset 13+): Gather, GatherElements, ScatterElements (and the older Scatter)
index ``data`` along ``axis`` with values in ``[-s, s)`` (negative ones count from the end); GatherND (after
``batch_dims``) and ScatterND index the leading data axes with the last axis of ``indices``, coordinate ``j`` in
``[-s_j, s_j)``. ``effc.BlockQuantGather`` indexes the rows of its packed table like Gather. OneHot is not listed:
the spec defines out-of-range indices (an all-``off_value`` row), onnxruntime and the compiled code agree, and no
memory is read through them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir

__all__ = ["INDEX_OPERANDS", "index_checks", "register_index_operand"]

#: A rule: ``(node, the value's input position) -> (data axes indexed, their sizes, per_coordinate)`` or None when
#: the position is not an index operand (or a size is not static). ``per_coordinate``: the sizes apply along the
#: last axis of the indices (GatherND/ScatterND), else one size for every element.
IndexRule = Callable[[ir.Node, int], tuple[list[int], list[int], bool] | None]

#: (domain, op_type) -> rule; "" is the ONNX domain.
INDEX_OPERANDS: dict[tuple[str, str], IndexRule] = {}

_KEEP_LAYOUT = frozenset({"Cast", "Identity"})
_KEEP_VALUES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand"})


def register_index_operand(op_type: str, domain: str = "") -> Callable[[IndexRule], IndexRule]:
    """Decorator: ``rule`` says which data axes an input of ``domain::op_type`` indexes.

    Raises:
        ValueError: the op already has a rule.
    """

    def add(rule: IndexRule) -> IndexRule:
        if (domain, op_type) in INDEX_OPERANDS:
            raise ValueError(f"index rule for {domain or 'ai.onnx'}::{op_type} registered twice")
        INDEX_OPERANDS[(domain, op_type)] = rule
        return rule

    return add


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = list(value.shape)
    return dims if all(isinstance(d, int) and d >= 0 for d in dims) else None


def _along_axis(node: ir.Node, index: int) -> tuple[list[int], list[int], bool] | None:
    """Gather / GatherElements / ScatterElements / Scatter: input 1 indexes ``data`` along ``axis`` (default 0)."""
    dims = _static_dims(node.inputs[0])
    if index != 1 or not dims:
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    axis = axis + len(dims) if axis < 0 else axis
    return ([axis], [dims[axis]], False) if 0 <= axis < len(dims) else None


def _leading_axes(node: ir.Node, index: int) -> tuple[list[int], list[int], bool] | None:
    """GatherND / ScatterND: the last axis of input 1 holds coordinates into data axes ``batch_dims ..``."""
    dims, idx_dims = _static_dims(node.inputs[0]), _static_dims(node.inputs[1])
    if index != 1 or not dims or not idx_dims:
        return None
    start = node.attributes["batch_dims"].as_int() if "batch_dims" in node.attributes else 0
    axes = list(range(start, start + idx_dims[-1]))
    return (axes, [dims[a] for a in axes], True) if axes and axes[-1] < len(dims) else None


for _op in ("Gather", "GatherElements", "ScatterElements", "Scatter"):
    register_index_operand(_op)(_along_axis)
for _op in ("GatherND", "ScatterND"):
    register_index_operand(_op)(_leading_axes)


@register_index_operand("BlockQuantGather", domain="effc")
def _block_quant_gather(node: ir.Node, index: int) -> tuple[list[int], list[int], bool] | None:
    """``effc.BlockQuantGather(Tq, S, I)``: ``I`` indexes the rows (axis 0) of the packed table ``Tq``."""
    dims = _static_dims(node.inputs[0])
    return ([0], [dims[0]], False) if index == 2 and dims else None


def index_checks(value: ir.Value) -> list[dict[str, Any]]:
    """Every index operand that ``value`` (a graph input) reaches, with the range its values must lie in.

    Returns:
        One JSON-serializable dict per operand: ``op`` (op type), ``node`` (node name), ``axes`` (data axes
        indexed), ``low`` / ``high`` (lists of ints, half-open ``[low, high)``: one entry for every element, or
        one per coordinate along the input's last axis when ``per_coordinate``), ``per_coordinate`` (bool).
        Empty when the value indexes nothing (or only through ops that are not traced).
    """
    checks: list[dict[str, Any]] = []
    todo, seen = [(value, True)], set()
    while todo:
        current, same_layout = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for node, index in current.uses():
            domain = "" if node.domain == "ai.onnx" else node.domain
            rule = INDEX_OPERANDS.get((domain, node.op_type))
            found = rule(node, index) if rule is not None else None
            if found is not None:
                axes, sizes, per_coordinate = found
                if per_coordinate and not same_layout:  # the coordinates' axis is lost: the tightest size for all
                    sizes, per_coordinate = [min(sizes)], False
                checks.append({"op": node.op_type, "node": node.name or "", "axes": axes,
                               "low": [-s for s in sizes], "high": list(sizes), "per_coordinate": per_coordinate})
            elif node.domain in ("", "ai.onnx") and index == 0 and node.op_type in _KEEP_LAYOUT | _KEEP_VALUES:
                todo.extend((out, same_layout and node.op_type in _KEEP_LAYOUT) for out in node.outputs)
    return checks
