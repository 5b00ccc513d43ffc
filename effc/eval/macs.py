"""Multiply-accumulate (MAC) counting from static shapes, with a registry for effc operators.

A MAC is one multiply plus one add into an accumulator; bias additions, ``alpha``/``beta`` scaling, activations
and normalizations are not counted. Built-in counters cover ``MatMul`` (batched and broadcast, 1-D operands per
numpy rules), ``Gemm`` (``transA``/``transB``), ``Conv`` (groups and dilations through the output shape, which is
computed from the attributes when the output has no static shape), ``ConvTranspose``, and their integer /
QLinear variants. effc operators are counted by the counter of their :class:`effc.ops.base.OpSpec` (the effc
operator registry, keyed by op type); operators of other domains register a counter with
:func:`register_mac_counter`, e.g.::

    @register_mac_counter("FancyMatMul", domain="vendor")
    def _count(node: ir.Node) -> int | None:
        x = static_shape(node.inputs[0])
        return None if x is None else ...  # None: shapes unknown

Which nodes are counted: the main graph and control-flow bodies (``If`` branches, ``Loop``/``Scan`` bodies). Each
body is counted **once** — both branches of an ``If`` are added, a ``Loop`` body counts as one iteration —
because the trip count and the branch taken are only known at run time. Model-local function bodies are not
walked: the node that calls the function is counted by its registered counter (counting the reference body too
would count it twice).

Counting needs static shapes on values (``value.shape`` with integer dims), as produced by
``effc.ir.canonicalize.canonicalize`` (or ``onnx.shape_inference`` followed by ``ir.from_proto``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.errors import ShapeError
from effc.ir.queries import static_shape
from effc.ops import EFFC_DOMAIN, get_op
from effc.ops.base import MacCounter

logger = logging.getLogger(__name__)

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_COUNTERS: dict[tuple[str, str], MacCounter] = {}


def _norm_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def register_mac_counter(op_type: str, fn: MacCounter | None = None, *, domain: str):
    """Register ``fn`` as the MAC counter of ``domain::op_type``; usable as a decorator.

    Args:
        op_type: the operator name, e.g. ``"FancyMatMul"``.
        fn: ``fn(node) -> int | None`` (None when a needed shape is not static); when omitted, a decorator is
            returned.
        domain: the operator's domain (``""`` for standard ONNX, a vendor's domain); never ``"effc"``: effc
            operators count their MACs through their ``OpSpec`` (:func:`effc.ops.base.register_op`), the one
            registry of effc operators.

    Returns:
        ``fn`` (or the decorator).

    Raises:
        ValueError: ``op_type`` is empty, ``fn`` is not callable, or ``domain`` is ``"effc"``.
    """
    if not op_type:
        raise ValueError("register_mac_counter needs an op_type")
    if _norm_domain(domain) == EFFC_DOMAIN:
        raise ValueError(f"effc operators count MACs through their OpSpec: register_op(OpSpec({op_type!r}, "
                         "count_macs=...)) in effc/ops, not register_mac_counter")

    def decorate(func: MacCounter) -> MacCounter:
        if not callable(func):
            raise ValueError(f"MAC counter for {op_type!r} is not callable: {func!r}")
        key = (_norm_domain(domain), op_type)
        if key in _COUNTERS and _COUNTERS[key] is not func:
            logger.debug("replacing MAC counter for %s::%s", domain, op_type)
        _COUNTERS[key] = func
        return func

    return decorate if fn is None else decorate(fn)


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def matmul_macs(a: tuple[int, ...], b: tuple[int, ...], where: str = "MatMul") -> int:
    """MACs of numpy-style ``matmul(a, b)`` for shapes ``a = (..., M, K)``, ``b = (..., K, N)``.

    1-D operands follow numpy: ``a`` of shape ``(K,)`` is ``(1, K)``, ``b`` of shape ``(K,)`` is ``(K, 1)``.
    Batch dims broadcast. Returns ``prod(batch) * M * N * K``.

    Raises:
        ShapeError: the reduction dims differ or the batch dims do not broadcast (``where`` names the node).
    """
    a = (1, *a) if len(a) == 1 else a
    b = (*b, 1) if len(b) == 1 else b
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        raise ShapeError(f"{where}: cannot multiply shapes {a} and {b}", "run shape inference / canonicalize first")
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError as exc:
        raise ShapeError(f"{where}: batch dims of {a} and {b} do not broadcast", "check the model's shapes") from exc
    return math.prod(batch) * a[-2] * b[-1] * a[-1]


def _matmul_counter(a_index: int, b_index: int) -> MacCounter:
    def count(node: ir.Node) -> int | None:
        a, b = static_shape(_input(node, a_index)), static_shape(_input(node, b_index))
        if a is None or b is None:
            return None
        return matmul_macs(a, b, f"{node.op_type} node {node.name!r}")

    return count


def _gemm(node: ir.Node) -> int | None:
    a, b = static_shape(_input(node, 0)), static_shape(_input(node, 1))
    if a is None or b is None:
        return None
    m, k = a[::-1] if node.attributes.get_int("transA", 0) else a
    _, n = b[::-1] if node.attributes.get_int("transB", 0) else b
    return m * n * k


def _conv_output_spatial(node: ir.Node, x: tuple[int, ...], w: tuple[int, ...]) -> tuple[int, ...]:
    spatial, kernel = x[2:], w[2:]
    rank = len(spatial)
    strides = node.attributes.get_ints("strides", None) or [1] * rank
    dilations = node.attributes.get_ints("dilations", None) or [1] * rank
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-size // s) for size, s in zip(spatial, strides, strict=True))
    pads = [0] * (2 * rank) if auto_pad == "VALID" else (node.attributes.get_ints("pads", None) or [0] * (2 * rank))
    return tuple(
        (size + pads[i] + pads[i + rank] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        for i, size in enumerate(spatial)
    )


def _conv_counter(x_index: int, w_index: int) -> MacCounter:
    def count(node: ir.Node) -> int | None:
        x, w = static_shape(_input(node, x_index)), static_shape(_input(node, w_index))
        if w is None:
            return None
        y = static_shape(node.outputs[0]) if node.outputs else None
        if y is None:
            if x is None:
                return None
            y = (x[0], w[0], *_conv_output_spatial(node, x, w))
        # each output element reduces over (Cin / group) * prod(kernel) products
        return math.prod(y) * w[1] * math.prod(w[2:])

    return count


def _conv_transpose(node: ir.Node) -> int | None:
    x, w = static_shape(_input(node, 0)), static_shape(_input(node, 1))
    if x is None or w is None:
        return None
    # W is (Cin, Cout / group, *kernel): every input element is scattered into Cout/group * prod(kernel) outputs
    return math.prod(x) * w[1] * math.prod(w[2:])


for _op, _fn in {
    "MatMul": _matmul_counter(0, 1),
    "MatMulInteger": _matmul_counter(0, 1),
    "QLinearMatMul": _matmul_counter(0, 3),
    "Gemm": _gemm,
    "Conv": _conv_counter(0, 1),
    "ConvInteger": _conv_counter(0, 1),
    "QLinearConv": _conv_counter(0, 3),
    "ConvTranspose": _conv_transpose,
}.items():
    register_mac_counter(_op, _fn, domain="")


def _effc_counter(node: ir.Node) -> MacCounter | None:
    """The registered effc operator's counter (:mod:`effc.ops`), or None for other domains and unknown ops."""
    spec = get_op(node.op_type) if node.domain == EFFC_DOMAIN else None
    return spec.count_macs if spec is not None else None


def _unique(name: str, taken: dict[str, int]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


def count_macs(model: ir.Model, strict: bool = False) -> dict[str, Any]:
    """Count MACs of every counted node (see the module docstring for which nodes and how bodies count).

    Args:
        model: a model with static shapes on the values its MatMul/Gemm/Conv/effc nodes read.
        strict: raise instead of skipping when a node's shapes are not static.

    Returns:
        ``{"total": int, "by_op": {op_type: int}, "by_node": {node name: int}, "unknown_shape": [node names],
        "uncounted": {op_type: [node names]}}``. ``unknown_shape`` lists counted op types whose shapes were not
        static (left out of the total, logged as a warning); ``uncounted`` lists nodes of non-standard domains
        without a registered counter (they may hide MACs). Unnamed nodes are keyed ``"<op_type>_<index>"``.

    Raises:
        ShapeError: ``strict`` and a node's shapes are not static, or shapes that cannot be multiplied.
    """
    by_op: dict[str, int] = {}
    by_node: dict[str, int] = {}
    unknown: list[str] = []
    uncounted: dict[str, list[str]] = {}
    graphs = [model.graph, *model.graph.subgraphs()]
    index = 0
    for graph in graphs:
        for node in graph:
            index += 1
            name = node.name or f"{node.op_type}_{index}"
            counter = _COUNTERS.get((_norm_domain(node.domain), node.op_type)) or _effc_counter(node)
            if counter is None:
                if node.domain not in _STANDARD_DOMAINS:
                    uncounted.setdefault(node.op_type, []).append(name)
                continue
            macs = counter(node)
            if macs is None:
                if strict:
                    raise ShapeError(
                        f"{node.op_type} node {name!r} has no static input/output shapes",
                        "canonicalize the model first (effc.ir.canonicalize.canonicalize with --input-shape)",
                    )
                unknown.append(name)
                continue
            by_op[node.op_type] = by_op.get(node.op_type, 0) + int(macs)
            by_node[_unique(name, by_node)] = int(macs)
    if unknown:
        logger.warning("MACs not counted for %d node(s) without static shapes: %s", len(unknown), unknown[:5])
    if uncounted:
        logger.warning("no MAC counter registered for %s", sorted(uncounted))
    return {
        "total": sum(by_op.values()),
        "by_op": by_op,
        "by_node": by_node,
        "unknown_shape": unknown,
        "uncounted": uncounted,
    }
