"""Graph queries: op histogram and linear layers with constant weights (analyses recomputed on demand).

Reduction axes follow the ONNX operator spec: ``MatMul(X, W)`` with ``W: (K, N)`` reduces over W's axis 0;
``Gemm(A, B)`` reduces over B's axis 0 (``transB=0``, ``B: (K, N)``) or 1 (``transB=1``, ``B: (N, K)``);
``Conv(X, W)`` with ``W: (Cout, Cin/group, kh, kw)`` reduces over axes 1..3, of which axis 1 is the channel axis
that N:M sparsity and channel pruning group along.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir


@dataclass(frozen=True)
class LinearLayer:
    """A MatMul/Gemm/Conv node whose weight is a constant.

    Attributes:
        node: the node (in the model's main graph).
        weight: the constant weight value (initializer, or output of a ``Constant`` node).
        kind: ``"matmul"``, ``"gemm"`` or ``"conv"``.
        reduction_axis: the weight axis summed over (input features / input channels).
        weight_input: index of the weight among ``node.inputs`` (1 for all three kinds).
    """

    node: ir.Node
    weight: ir.Value
    kind: Literal["matmul", "gemm", "conv"]
    reduction_axis: int
    weight_input: int = 1

    @property
    def name(self) -> str:
        """The node's name."""
        return self.node.name or ""


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    for graph in model.graphs():
        yield from graph
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def op_types(model: ir.Model) -> collections.Counter:
    """How many nodes of each op type the model has, subgraphs and model-local functions included.

    Keys are ``op_type`` for the default domain and ``"domain::op_type"`` otherwise (e.g. ``"effc::MoEFFN"``).
    """
    return collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in _all_nodes(model)
    )


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind ``value`` when it is an initializer or a ``Constant`` node output, else None."""
    if value is None:
        return None
    if value.const_value is not None and (value.is_initializer() or value.producer() is None):
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        return attr.as_tensor() if attr is not None else None
    return None


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value`` as a tuple of ints, or None when the value is absent or any dim is not static."""
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape.dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _reduction_axis(node: ir.Node, rank: int) -> tuple[str, int] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and rank >= 2:
        return "matmul", rank - 2
    if node.op_type == "Gemm" and rank == 2:
        return "gemm", 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "Conv" and rank >= 3:
        return "conv", 1
    return None


def linear_layers(model: ir.Model) -> list[LinearLayer]:
    """MatMul/Gemm/Conv nodes of the main graph whose second input (the weight) is a constant, in graph order.

    A MatMul whose constant operand is the first input (``W @ X``) is not listed: its reduction runs along W's
    last axis and passes treat it separately.
    """
    layers = []
    for node in model.graph:
        if len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        tensor = constant_tensor(weight)
        if tensor is None:
            continue
        found = _reduction_axis(node, len(tensor.shape))
        if found is not None:
            kind, axis = found
            layers.append(LinearLayer(node=node, weight=weight, kind=kind, reduction_axis=axis))
    return layers
