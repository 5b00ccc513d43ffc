"""Graph queries of the block-quantization passes: quantizable weights, attention K/V values.

Private stand-ins for ``effc.ir.queries`` (which names linear layers but not embedding tables or K/V).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

__all__ = ["QuantTarget", "find_kv_values", "find_targets", "projection_of"]

_PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclasses.dataclass
class QuantTarget:
    """A node reading a constant weight that block-quant can rewrite.

    Attributes:
        node: the MatMul / Gemm / Gather node.
        kind: its op type.
        weight: the initializer value.
        array: the weight in the rewrite layout: ``(K, N)`` for MatMul/Gemm (Gemm ``transB=1`` transposed), the
            table ``(V, D)`` for Gather (a ``(D, V)`` table gathered along axis 1, e.g. a tied embedding stored as
            the output projection, transposed), ``(Cout, Cin/group * prod(kernel))`` for Conv (blocked along axis 1).
        bias: Gemm's ``C`` / Conv's ``B`` input, or None.
        gather_axis: the Gather's axis (0, or 1 for a transposed table).
    """

    node: ir.Node
    kind: str
    weight: ir.Value
    array: np.ndarray
    bias: ir.Value | None = None
    gather_axis: int = 0


def _const_2d(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    if len(value.const_value.shape) != 2 or not value.const_value.dtype.is_floating_point():
        return None
    return value.const_value.numpy().astype(np.float32)


def find_targets(model: ir.Model, ops: tuple[str, ...], skipped: list[dict]) -> list[QuantTarget]:
    """MatMul/Gemm (constant 2-D weight), Gather (constant 2-D table, axis 0 or 1) and Conv of the main graph.

    Conv weights are flattened to ``(Cout, Cin/group * prod(kernel))``.

    Nodes that are close but not rewritable are appended to ``skipped`` with a reason.
    """
    found: list[QuantTarget] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        if node.op_type == "Conv":
            conv = _conv_target(node)
            if conv is not None:
                found.append(conv)
            continue
        if node.op_type == "Gather":
            table, axis = _const_2d(node.inputs[0]), node.attributes.get_int("axis", 0) % 2
            if table is not None:
                found.append(QuantTarget(node, "Gather", node.inputs[0], table.T.copy() if axis else table,
                                         gather_axis=axis))
            continue
        w = _const_2d(node.inputs[1] if len(node.inputs) > 1 else None)
        if w is None:
            continue
        if node.op_type == "Gemm":
            a = node.attributes
            if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
                skipped.append({"node": node.name, "weight": node.inputs[1].name, "reason": "Gemm transA/alpha/beta"})
                continue
            w = w.T.copy() if a.get_int("transB", 0) else w
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            found.append(QuantTarget(node, "Gemm", node.inputs[1], w, bias))
        else:
            found.append(QuantTarget(node, "MatMul", node.inputs[1], w))
    return found


def _conv_target(node: ir.Node) -> QuantTarget | None:
    """Conv with a constant float weight ``(Cout, Cin/group, *kernel)`` as a ``(Cout, Cin/group * prod(kernel))`` table.

    One row per output channel; blocks run along the flattened ``Cin/group × kh × kw`` reduction axis.
    """
    value = node.inputs[1] if len(node.inputs) > 1 else None
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    if len(value.const_value.shape) < 3 or not value.const_value.dtype.is_floating_point():
        return None
    w = value.const_value.numpy().astype(np.float32)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return QuantTarget(node, "Conv", value, w.reshape(w.shape[0], -1), bias)


def projection_of(value: ir.Value) -> tuple[ir.Value, ir.Node] | None:
    """Walk back from ``value`` through reshapes/transposes and constant scalings/bias adds to a weight MatMul/Gemm.

    Returns:
        ``(v, node)``: the last value before the first layout op (the projection output incl. bias, whose last
        axis is the projection's output channels) and the MatMul/Gemm with a constant weight; None if the chain
        reaches anything else.
    """
    before_layout = None
    while True:
        node = value.producer()
        if node is None:
            return None
        if node.op_type in _PASS_THROUGH:
            before_layout = None
            value = node.inputs[0]
            continue
        if before_layout is None:
            before_layout = value
        if node.op_type in ("Add", "Mul", "Div") and len(node.inputs) == 2:
            consts = [i for i in node.inputs if i is not None and i.const_value is not None]
            if len(consts) != 1:
                return None
            value = node.inputs[0] if node.inputs[1] is consts[0] else node.inputs[1]
            continue
        if node.op_type in ("MatMul", "Gemm") and _const_2d(node.inputs[1]) is not None:
            return before_layout, node
        return None


def find_kv_values(model: ir.Model) -> list[tuple[str, ir.Value]]:
    """Attention keys and values: ``("k" | "v", projection output)`` for each activation × activation MatMul.

    A MatMul whose two inputs are both computed (no constant) is an attention product; the weight projection
    reached backwards from its second input is K (when its first input is not a Softmax) or V (after Softmax).
    """
    found, seen = [], set()
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        if any(i is None or i.const_value is not None for i in node.inputs):
            continue
        proj = projection_of(node.inputs[1])
        if proj is None or id(proj[0]) in seen:
            continue
        first = node.inputs[0].producer()
        role = "v" if first is not None and first.op_type == "Softmax" else "k"
        seen.add(id(proj[0]))
        found.append((role, proj[0]))
    return found
