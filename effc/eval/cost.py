"""Size accounting: parameter bytes and counts as stored, and weight sparsity.

What counts as a parameter: every initializer and every ``Constant`` node's value, in the main graph, in the
bodies of control flow (``If``/``Loop``/``Scan`` subgraphs) and in model-local function bodies (effc operators keep
their packed weights as initializers of the main graph, their function bodies may hold small constants). Each
tensor is counted once. Bytes are as stored: ``ceil(elements * bits / 8)`` per tensor, so sub-byte types
(``INT4``, ``UINT4``, ``FLOAT4E2M1``, ``INT2``) count by bits, not by the numpy container they unpack into;
``STRING`` tensors count the UTF-8 bytes of their strings.

MAC counting lives in :mod:`effc.eval.macs` and is re-exported here (:func:`count_macs`,
:func:`register_mac_counter`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.eval.macs import count_macs, register_mac_counter, static_shape

__all__ = [
    "count_macs",
    "param_bytes",
    "param_count",
    "parameter_tensors",
    "register_mac_counter",
    "sparsity_stats",
    "static_shape",
]

logger = logging.getLogger(__name__)

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
    """Fraction of exactly-zero values per weight tensor and over all weights.

    A weight tensor is a floating-point parameter (initializer or Constant) of rank >= ``min_rank`` (so biases and
    scalars are left out). Packed formats (N:M values + indices, quantized blocks) are counted as the tensors they
    are stored as: a 2:4-compressed ``values`` tensor is dense.

    Args:
        model: the model; weight data is read (external data loaded).
        min_rank: the smallest rank that counts as a weight.

    Returns:
        ``{"tensors": {name: {"shape": [..], "elements": int, "zeros": int, "sparsity": float}},
        "total": {"elements": int, "zeros": int, "sparsity": float}}``; sparsity is a fraction in [0, 1]
        (0.0 when there are no weights).
    """
    tensors: dict[str, dict[str, Any]] = {}
    for name, tensor, count, _ in parameter_tensors(model):
        if tensor is None or not tensor.dtype.is_floating_point() or len(tensor.shape) < min_rank or count == 0:
            continue
        zeros = int(count - np.count_nonzero(tensor.numpy()))
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = {"shape": list(tensor.shape.numpy()), "elements": count, "zeros": zeros,
                        "sparsity": zeros / count}
    elements = sum(t["elements"] for t in tensors.values())
    zeros = sum(t["zeros"] for t in tensors.values())
    return {
        "tensors": tensors,
        "total": {"elements": elements, "zeros": zeros, "sparsity": zeros / elements if elements else 0.0},
    }
