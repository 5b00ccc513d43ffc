"""``effc.NMSparseMatMul``: a MatMul whose constant weight is stored N:M-packed (values + absolute row indices).

Schema (domain ``effc``, opset 1)::

    Y = effc.NMSparseMatMul(X, values, indices, n=2, m=4, vector=1)

* ``X``       ``(..., K)`` float32: the activation; ``K`` = reduction axis of the dense weight ``W`` ``(K, Cout)``.
* ``values``  ``(G·n, Cout)`` float32 (``G = K / m`` groups): the kept weights, group by group, ascending input
  index within a group.
* ``indices`` ``(G·n, Cout / vector)`` uint16: the absolute input row (0..K-1) each kept value multiplies; with
  ``vector = V`` one index set is shared by ``V`` adjacent output channels (``V = 1``: element-wise N:M).
* ``Y``       ``(..., Cout)`` float32: ``X @ W`` with ``W[indices[r, j // V], j] = values[r, j]`` and zeros elsewhere.
* attributes ``n`` (kept per group), ``m`` (group length along K), ``vector`` (ints).

``n`` of every ``m`` consecutive input rows (after an optional input permutation, which the absolute indices
absorb) are kept per output block, so ``W`` has ``K·Cout·(m - n)/m`` zeros that are not stored. The reference body
(:func:`nm_function`, standard ONNX ops, opset ≥ 13) scatters ``values`` into a dense ``(K, Cout)`` matrix and
multiplies. MACs: ``rows × (K·n/m) × Cout`` (only the kept weights multiply). The TVM kernel
(:mod:`effc.codegen.ops.nm_sparse`) re-lays the packed form out into column panels at compile time.

Sources: Mishra et al., "Accelerating Sparse Deep Neural Networks" (2021); Pool & Yu, "Channel Permutations for N:M
Sparsity" (NeurIPS 2021).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from effc.errors import PassError
from effc.ir.queries import static_shape
from effc.ops.base import EFFC_DOMAIN, OpSpec, PackedWeight, add_function, effc_nodes, register_op

__all__ = ["OP_TYPE", "check_nm", "nm_function", "nm_sparse_matmul", "pack_nm", "packed_layers", "reference",
           "unpack_nm"]

logger = logging.getLogger(__name__)

OP_TYPE = "NMSparseMatMul"
MIN_OPSET = 13


def check_nm(n: int, m: int, vector: int, shape: tuple[int, int]) -> None:
    """Check that a ``(Cout, Cin)`` weight can carry an N:M pattern with the given vector width.

    Raises:
        PassError: ``Cin`` is not a multiple of ``m`` or ``Cout`` not a multiple of ``vector``.
    """
    cout, cin = shape
    if cin % m:
        raise PassError(f"reduction axis of length {cin} is not a multiple of m={m}", "choose m dividing Cin")
    if cout % vector:
        raise PassError(
            f"{cout} output channels are not a multiple of vector={vector}", "use vector=1 or a divisor of Cout"
        )


def pack_nm(
    weight: np.ndarray, n: int, m: int, vector: int = 1, perm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pack a ``(K, Cout)`` MatMul weight that already satisfies N:M into ``(values, indices)``.

    Args:
        weight: ``(K, Cout)``; along axis 0 (after ``perm``) every group of ``m`` rows has at most ``n`` non-zero
            rows per block of ``vector`` adjacent columns.
        n: kept per group.
        m: group length along the reduction axis.
        vector: columns sharing one index set.
        perm: ``(K,)`` input order the groups are formed over (default: identity).

    Returns:
        ``values`` ``(K/m·n, Cout)`` float32 and ``indices`` ``(K/m·n, Cout/vector)`` uint16 (absolute rows).

    Raises:
        PassError: shapes that do not divide, K ≥ 65536, or a group holding more than ``n`` non-zeros.
    """
    k, cout = weight.shape
    check_nm(n, m, vector, (cout, k))
    if k >= 1 << 16:
        raise PassError(f"reduction axis {k} too long for uint16 indices", "split the layer first")
    perm = np.arange(k) if perm is None else np.asarray(perm)
    wp = weight[perm]
    g, cb = k // m, cout // vector
    nz = (wp.reshape(g, m, cb, vector) != 0).any(axis=-1)  # (G, M, CB)
    counts = nz.sum(axis=1)
    if (counts > n).any():
        gi, bi = np.argwhere(counts > n)[0]
        raise PassError(
            f"weight is not {n}:{m} (vector={vector}): group {gi} of output block {bi} has {counts[gi, bi]} non-zeros",
            f"prune it first (e.g. nm-sparsity(n={n},m={m},vector={vector})) or pack with larger n",
        )
    off = np.sort(np.argsort(~nz, axis=1, kind="stable")[:, :n, :], axis=1)  # (G, n, CB) offsets in group
    rows = off + (np.arange(g) * m)[:, None, None]  # permuted row index
    rows_full = np.repeat(rows, vector, axis=2).reshape(g * n, cout)
    values = np.take_along_axis(wp, rows_full, axis=0).astype(np.float32)
    indices = perm[rows.reshape(g * n, cb)].astype(np.uint16)
    return values, indices


def unpack_nm(values: np.ndarray, indices: np.ndarray, k: int) -> np.ndarray:
    """Dense ``(K, Cout)`` weight from the packed form (inverse of :func:`pack_nm`, exact)."""
    rows, cout = values.shape
    vector = cout // indices.shape[1]
    full = np.repeat(indices.astype(np.int64), vector, axis=1)
    dense = np.zeros((k, cout), dtype=values.dtype)
    np.put_along_axis(dense, full, values, axis=0)
    return dense


def reference(x: np.ndarray, values: np.ndarray, indices: np.ndarray, *, n: int, m: int, vector: int) -> np.ndarray:
    """Numpy ``effc.NMSparseMatMul``: ``X (..., K) @ unpack_nm(values, indices, K)`` (float32 ``(..., Cout)``)."""
    del n, m, vector  # implied by the shapes of values and indices
    return np.matmul(x, unpack_nm(values, indices, x.shape[-1]))


def nm_function(opset: int) -> ir.Function:
    """Reference body of ``effc.NMSparseMatMul(X, values, indices) -> Y`` in standard ONNX ops (opset ≥ 13)."""
    i64 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(v)], v)
    )
    nodes = [
        i64("c0", [0]), i64("c1", [1]), i64("c2", [2]), i64("cm1", [-1]), i64("cbig", [1 << 62]),
        helper.make_node("Cast", ["indices"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Shape", ["values"], ["sv"]),
        helper.make_node("Shape", ["indices"], ["si"]),
        helper.make_node("Shape", ["X"], ["sx"]),
        helper.make_node("Slice", ["sv", "c0", "c1"], ["r"]),
        helper.make_node("Slice", ["sv", "c1", "c2"], ["cout"]),
        helper.make_node("Slice", ["si", "c1", "c2"], ["cb"]),
        helper.make_node("Div", ["cout", "cb"], ["vec"]),
        helper.make_node("Slice", ["sx", "cm1", "cbig"], ["k"]),
        helper.make_node("Unsqueeze", ["idx", "c2"], ["idx3"]),
        helper.make_node("Concat", ["r", "cb", "vec"], ["eshape"], axis=0),
        helper.make_node("Expand", ["idx3", "eshape"], ["idxe"]),
        helper.make_node("Reshape", ["idxe", "sv"], ["rows"]),
        helper.make_node("Concat", ["k", "cout"], ["dshape"], axis=0),
        helper.make_node("ConstantOfShape", ["dshape"], ["zeros"]),
        helper.make_node("ScatterElements", ["zeros", "rows", "values"], ["w"], axis=0),
        helper.make_node("MatMul", ["X", "w"], ["Y"]),
    ]
    proto = helper.make_function(
        EFFC_DOMAIN, OP_TYPE, ["X", "values", "indices"], ["Y"], nodes,
        [helper.make_opsetid("", opset)], attributes=["n", "m", "vector"],
    )
    return ir.serde.deserialize_function(proto)


def nm_sparse_matmul(model: ir.Model, x: ir.Value, values: ir.Value, indices: ir.Value, n: int, m: int,
                     vector: int, name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.NMSparseMatMul`` node; attaches the function body to ``model``.

    Args:
        model: the model the node will be inserted into (receives the function and the ``effc`` opset).
        x: the activation ``(..., K)``.
        values: the packed values ``(K·n/m, Cout)`` (an initializer of ``model``).
        indices: the packed indices ``(K·n/m, Cout/vector)`` (an initializer of ``model``).
        n: kept per group.
        m: group length along K.
        vector: output channels sharing one index set.
        name: the node's name.

    Raises:
        PassError: the model's default opset is below 13.
    """
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise PassError(f"model opset {opset} < {MIN_OPSET}", "canonicalize or convert the model to opset >= 13")
    add_function(model, nm_function(opset))
    return ir.Node(
        EFFC_DOMAIN, OP_TYPE, [x, values, indices],
        attributes=[ir.AttrInt64("n", n), ir.AttrInt64("m", m), ir.AttrInt64("vector", vector)], name=name,
    )


def packed_layers(model: ir.Model) -> list[ir.Node]:
    """All ``effc.NMSparseMatMul`` nodes of the main graph."""
    return effc_nodes(model, OP_TYPE)


def count_macs(node: ir.Node) -> int | None:
    """Effective MACs of ``effc.NMSparseMatMul``: rows × (K·n/m) × Cout — only the kept weights multiply."""
    x, vals = static_shape(node.inputs[0]), static_shape(node.inputs[1])
    return None if x is None or vals is None else int(np.prod(x[:-1])) * vals[0] * vals[1]


def _int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return attr.value if attr is not None and isinstance(attr.value, int) else None


def packed_weight(node: ir.Node) -> tuple[ir.Value, PackedWeight] | None:
    """``values`` ``(K·n/m, Cout)`` stands for a ``(K, Cout)`` weight; None (logged) when the node is malformed.

    ``K`` is ``rows · m / n`` and is checked against the static last dim of ``X`` when known.
    """
    n, m, vector = (_int_attr(node, a) for a in ("n", "m", "vector"))
    values = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = values.const_value if values is not None else None
    if tensor is None or n is None or m is None or len(tensor.shape) != 2:
        return None
    rows, cout = (int(d) for d in tensor.shape.numpy())
    if not 1 <= n < m or rows % n:
        logger.warning("NMSparseMatMul %r: n=%s, m=%s do not fit %d packed rows; counted as stored", node.name, n,
                       m, rows)
        return None
    k = rows // n * m
    x = static_shape(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if x is not None and x[-1] != k:
        logger.warning("NMSparseMatMul %r: input width %d != %d rows·m/n; counted as stored", node.name, x[-1], k)
        return None
    storage = f"packed {n}:{m}" + (f", vector {vector}" if vector and vector > 1 else "")
    return values, PackedWeight(node.name or OP_TYPE, storage, (k, cout), rows * cout)


SPEC = register_op(OpSpec(OP_TYPE, ("X", "values", "indices"), ("n", "m", "vector"), count_macs, reference,
                          packed_weight))
