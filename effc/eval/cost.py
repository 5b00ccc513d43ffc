"""Size accounting: parameter bytes and counts as stored, and weight sparsity.

What counts as a parameter: every initializer and every ``Constant`` node's value, in the main graph, in the
bodies of control flow (``If``/``Loop``/``Scan`` subgraphs) and in model-local function bodies (effc operators keep
their packed weights as initializers of the main graph, their function bodies may hold small constants). Each
tensor is counted once. Bytes are as stored: ``ceil(elements * bits / 8)`` per tensor, so sub-byte types
(``INT4``, ``UINT4``, ``FLOAT4E2M1``, ``INT2``) count by bits, not by the numpy container they unpack into;
``STRING`` tensors count the UTF-8 bytes of their strings.

Weight sparsity (:func:`sparsity_stats`) counts a packed weight (N:M values, see :mod:`effc.eval.packed`) in the
dense shape it stands for, so the zeros its format leaves out are counted while its bytes stay as stored.

MAC counting lives in :mod:`effc.eval.macs` and is re-exported here (:func:`count_macs`,
:func:`register_mac_counter`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.eval.macs import count_macs, register_mac_counter
from effc.eval.packed import coded_weights, packed_weights
from effc.ir.queries import static_shape

__all__ = [
    "count_macs",
    "param_bytes",
    "param_count",
    "parameter_tensors",
    "register_mac_counter",
    "SPARSE_TENSOR_MIN",
    "sparsity_stats",
    "static_shape",
]

logger = logging.getLogger(__name__)

SPARSE_TENSOR_MIN = 0.01
"""A weight tensor with at least this fraction of zeros counts as sparse (trained dense weights hold ~0.1%)."""

# Constant's scalar/list attributes and the bytes of one element (ONNX stores them as float32 / int64).
_CONSTANT_LIST_ATTRS = {"value_float": 4, "value_floats": 4, "value_int": 8, "value_ints": 8}


def all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its control-flow subgraphs, and every function body with its subgraphs (each once)."""
    seen: set[int] = set()
    roots = [model.graph, *(f.graph for f in model.functions.values())]
    for root in roots:
        for graph in (root, *root.subgraphs()):
            if id(graph) not in seen:
                seen.add(id(graph))
                yield graph


def parameter_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol | None, int, int]]:
    """Every stored parameter once: ``(name, tensor or None, elements, bytes)``.

    ``tensor`` is None for ``Constant`` scalar/list attributes (``value_floats`` ...); initializers without a value
    (declared but holding no data) are skipped. Reading ``elements``/``bytes`` never loads external data.
    """
    seen: set[int] = set()
    for graph in all_graphs(model):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield name, tensor, tensor.size, tensor_bytes(tensor)
        for node in graph:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            label = node.outputs[0].name if node.outputs and node.outputs[0].name else (node.name or "Constant")
            for attr_name, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR:
                    if id(attr.value) in seen:
                        continue
                    seen.add(id(attr.value))
                    yield label, attr.value, attr.value.size, tensor_bytes(attr.value)
                elif attr_name in _CONSTANT_LIST_ATTRS:
                    n = len(attr.value) if isinstance(attr.value, (list, tuple)) else 1
                    yield label, None, n, n * _CONSTANT_LIST_ATTRS[attr_name]
                elif attr_name in ("value_string", "value_strings"):
                    strings = attr.value if isinstance(attr.value, (list, tuple)) else [attr.value]
                    yield label, None, len(strings), sum(len(_as_bytes(s)) for s in strings)


def _as_bytes(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else str(s).encode("utf-8")


def tensor_bytes(tensor: ir.TensorProtocol) -> int:
    """Bytes of ``tensor`` as stored: ``ceil(elements * bits / 8)``; STRING tensors: total UTF-8 bytes."""
    if tensor.dtype == ir.DataType.STRING:
        try:
            return sum(len(_as_bytes(s)) for s in np.asarray(tensor.numpy()).ravel())
        except Exception:  # noqa: BLE001 - a string tensor without readable data counts as empty
            logger.warning("cannot read STRING tensor %r; counted as 0 bytes", tensor.name)
            return 0
    return math.ceil(tensor.size * tensor.dtype.bitwidth / 8)


def param_bytes(model: ir.Model) -> int:
    """Total bytes of all parameters as stored (see the module docstring for what counts).

    Args:
        model: the model; external data is not loaded.

    Returns:
        Bytes (not elements), sub-byte types counted by bits and rounded up per tensor.

    Example:
        >>> import numpy as np
        >>> g = ir.Graph([], [], nodes=[], initializers=[ir.Value(name="w", const_value=ir.tensor(np.zeros((4, 4),
        ...     np.float32)))], opset_imports={"": 21})
        >>> param_bytes(ir.Model(g, ir_version=10))
        64
    """
    return sum(nbytes for _, _, _, nbytes in parameter_tensors(model))


def param_count(model: ir.Model) -> int:
    """Total number of parameter elements (same tensors as :func:`param_bytes`)."""
    return sum(count for _, _, count, _ in parameter_tensors(model))


def sparsity_stats(model: ir.Model, min_rank: int = 2) -> dict[str, Any]:
    """Fraction of zero values per weight tensor and over all weights, packed N:M zeros included.

    A weight tensor is a floating-point parameter (initializer or Constant) of rank >= ``min_rank`` (so biases and
    scalars are left out; embedding tables count). A tensor that an effc operator stores packed
    (:mod:`effc.eval.packed`, e.g. the ``values`` of ``effc.NMSparseMatMul``) counts as the dense weight it stands
    for: a 2:4-packed ``(K/2, Cout)`` values tensor is a ``(K, Cout)`` weight with ``K·Cout/2`` zeros that are not
    stored, plus any literal zeros among its kept values. Block-quantized codes (:func:`effc.eval.packed.coded_weights`)
    count the zeros they decode to. Other tensors count their literal (stored) zeros. Bytes
    are not affected: see :func:`param_bytes`.

    Args:
        model: the model; weight data is read (external data loaded).
        min_rank: the smallest rank that counts as a weight.

    Returns:
        ``{"tensors": {name: row}, "total": {...}}``. ``row``: ``"shape"`` (the dense shape), ``"elements"`` (of the
        dense shape), ``"zeros"`` (= ``"literal_zeros"`` + ``"packed_zeros"``), ``"sparsity"`` (``zeros /
        elements``, a fraction in [0, 1]), ``"storage"`` (``"dense"`` or e.g. ``"packed 2:4, vector 16"``), and
        for packed tensors ``"stored_shape"``. ``"total"``: ``"elements"``, ``"zeros"``, ``"sparsity"`` (0.0
        when there are no weights), ``"literal_zeros"``, ``"packed_zeros"``, ``"tensors"`` (count), and two groups
        ``{"tensors", "elements", "zeros", "sparsity"}``: ``"by_storage"`` (storage -> group) and
        ``"sparse_tensors"`` (the tensors with at least :data:`SPARSE_TENSOR_MIN` zeros, i.e. those a pass made
        sparse, without the dense embedding tables and layers that dilute the model-wide fraction).
    """
    packed, coded = packed_weights(model), coded_weights(model)
    tensors: dict[str, dict[str, Any]] = {}
    for name, tensor, count, _ in parameter_tensors(model):
        if tensor is not None and id(tensor) in coded:  # block-quantized codes: the zeros they decode to
            dense, storage = coded[id(tensor)]
            zeros = int(dense.size - np.count_nonzero(dense))
            tensors[name if name not in tensors else f"{name}#{len(tensors)}"] = {
                "shape": list(dense.shape), "stored_shape": list(tensor.shape.numpy()), "elements": int(dense.size),
                "storage": storage, "zeros": zeros, "literal_zeros": zeros, "packed_zeros": 0,
                "sparsity": zeros / dense.size}
            continue
        if tensor is None or not tensor.dtype.is_floating_point() or len(tensor.shape) < min_rank or count == 0:
            continue
        literal = int(count - np.count_nonzero(tensor.numpy()))
        info = packed.get(id(tensor))
        row: dict[str, Any] = {"shape": list(tensor.shape.numpy()), "elements": count, "storage": "dense"}
        if info is not None:
            row.update(shape=list(info.dense_shape), stored_shape=row["shape"], elements=info.dense_elements,
                       storage=info.storage)
        structural = info.structural_zeros if info is not None else 0
        row.update(zeros=literal + structural, literal_zeros=literal, packed_zeros=structural,
                   sparsity=(literal + structural) / row["elements"])
        tensors[name if name not in tensors else f"{name}#{len(tensors)}"] = row
    sparse = [t for t in tensors.values() if t["sparsity"] >= SPARSE_TENSOR_MIN]
    return {"tensors": tensors, "total": {**_sums(tensors.values()), "tensors": len(tensors),
                                          "by_storage": _by_storage(tensors.values()),
                                          "sparse_tensors": _group(sparse)}}


def _sums(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    total = {key: sum(r[key] for r in rows) for key in ("elements", "zeros", "literal_zeros", "packed_zeros")}
    total["sparsity"] = total["zeros"] / total["elements"] if total["elements"] else 0.0
    return total


def _group(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {"tensors": len(rows), **{k: v for k, v in _sums(rows).items() if k in ("elements", "zeros", "sparsity")}}


def _by_storage(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["storage"], []).append(row)
    return {storage: _group(group) for storage, group in groups.items()}
