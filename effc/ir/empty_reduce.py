"""Reductions over an empty set become constants: their value is the reduction's identity element.

ONNX defines ``ReduceMax`` of an empty set as ``-inf`` (the dtype's lowest integer), ``ReduceMin`` as ``+inf``,
``ReduceSum``/``ReduceL1``/``ReduceL2``/``ReduceSumSquare`` as 0, ``ReduceProd`` as 1, ``ReduceLogSum``/
``ReduceLogSumExp`` as ``-inf`` (onnx backend cases ``test_reduce_*_empty_set``). TVM's importer turns a 0-sized
dimension into a symbolic one and its max/min start from the dtype's finite extreme, so canonicalization replaces
such nodes (static input shape with a 0 dim, static non-empty output) by an initializer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _lowest(dtype: np.dtype) -> float:
    return -np.inf if dtype.kind == "f" else (False if dtype.kind == "b" else np.iinfo(dtype).min)


def _highest(dtype: np.dtype) -> float:
    return np.inf if dtype.kind == "f" else (True if dtype.kind == "b" else np.iinfo(dtype).max)


#: Reduce op → identity element for a numpy dtype.
IDENTITY = {
    "ReduceMax": _lowest, "ReduceMin": _highest, "ReduceSum": lambda d: 0, "ReduceL1": lambda d: 0,
    "ReduceL2": lambda d: 0, "ReduceSumSquare": lambda d: 0, "ReduceProd": lambda d: 1,
    "ReduceLogSum": lambda d: -np.inf, "ReduceLogSumExp": lambda d: -np.inf,
}


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def fold_empty_reductions(model: ir.Model) -> int:
    """Replace main-graph reductions of empty inputs by constants (in place); returns how many were replaced."""
    graph = model.graph
    replaced = 0
    for node in list(graph):
        fill = IDENTITY.get(node.op_type)
        if fill is None or node.domain not in ("", "ai.onnx") or node.outputs[0].dtype is None:
            continue
        shape_in, shape_out = _static(node.inputs[0]), _static(node.outputs[0])
        if shape_in is None or shape_out is None or 0 not in shape_in or 0 in shape_out:
            continue
        out = node.outputs[0]
        dtype = out.dtype.numpy()
        value = ir.Value(name=f"{out.name}_empty_set", shape=ir.Shape(shape_out), type=ir.TensorType(out.dtype))
        value.const_value = ir.tensor(np.full(shape_out, fill(np.dtype(dtype)), dtype=dtype), name=value.name)
        graph.register_initializer(value)
        identity = ir.Node("", "Identity", [value], name=f"{node.name}_empty_set")  # keeps a graph output's name
        identity.outputs[0].shape, identity.outputs[0].type = out.shape, out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [identity], [out], identity.outputs)
        replaced += 1
    return replaced
