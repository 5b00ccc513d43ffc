"""Weights that effc operators store packed, read back as the dense weights they stand for.

Size accounting counts bytes as the file holds them (:func:`effc.eval.cost.param_bytes`), but sparsity statistics
must count the zeros a packed format leaves out: an N:M-packed layer stores only its kept values, so its stored
tensor has no zeros although the weight it stands for is ``(M - N) / M`` zeros.

Readers are kept in a table keyed by ``(domain, op_type)``. Built in: ``effc.NMSparseMatMul(X, values, indices)``
with attributes ``n``, ``m``, ``vector`` (DESIGN "effc operators"; format in :mod:`effc.passes.nm_sparsity`):

* ``values``  ``(K·n/m, Cout)``: the kept weights of a dense ``MatMul`` weight ``W`` of shape ``(K, Cout)``
  (``K`` = reduction axis), ``n`` of every ``m`` consecutive input rows per output column;
* so ``W`` has ``K·Cout`` elements of which ``K·Cout·(m - n)/m`` are zeros that are not stored
  (``K·(m - n)/m`` per output channel, i.e. per row of the ``(Cout, K)`` PyTorch-layout weight).

``K`` is ``rows · m / n`` and is checked against the static last dim of ``X`` when known. Source: Mishra et al.,
"Accelerating Sparse Deep Neural Networks" (2021) for the N:M format.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import onnx_ir as ir

from effc.eval.macs import static_shape

__all__ = ["PackedWeight", "packed_weights"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One packed weight tensor and the dense weight it stands for.

    Attributes:
        node: name of the effc operator node that reads it.
        storage: how it is stored, for reports, e.g. ``"packed 2:4, vector 16"``.
        dense_shape: shape of the dense weight it stands for, e.g. ``(K, Cout)`` for ``MatMul(X, W)``.
        stored_elements: elements the stored tensor holds (kept values only).
    """

    node: str
    storage: str
    dense_shape: tuple[int, ...]
    stored_elements: int

    @property
    def dense_elements(self) -> int:
        """Elements of the dense weight (stored values plus the zeros the format leaves out)."""
        return math.prod(self.dense_shape)

    @property
    def structural_zeros(self) -> int:
        """Zeros of the dense weight that the packed format does not store."""
        return self.dense_elements - self.stored_elements


Reader = Callable[[ir.Node], "tuple[ir.Value, PackedWeight] | None"]


def _int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return attr.value if attr is not None and isinstance(attr.value, int) else None


def _read_nm(node: ir.Node) -> tuple[ir.Value, PackedWeight] | None:
    """``effc.NMSparseMatMul``: ``values`` (K·n/m, Cout) stands for a (K, Cout) weight; None when malformed."""
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
    return values, PackedWeight(node.name or "NMSparseMatMul", storage, (k, cout), rows * cout)


_READERS: dict[tuple[str, str], Reader] = {("effc", "NMSparseMatMul"): _read_nm}


def packed_weights(model: ir.Model) -> dict[int, PackedWeight]:
    """Packed weights read by effc operators of the main graph and its control-flow bodies.

    Args:
        model: the model (weight data is not read; only shapes and attributes).

    Returns:
        ``id(tensor) -> PackedWeight``, keyed by the identity of the stored tensor (``value.const_value``) so that
        :func:`effc.eval.cost.parameter_tensors` entries can be looked up. Malformed nodes are logged and left out
        (their tensors then count as stored).
    """
    found: dict[int, PackedWeight] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        reader = _READERS.get((node.domain, node.op_type))
        result = reader(node) if reader is not None else None
        if result is not None:
            found[id(result[0].const_value)] = result[1]
    return found
