"""Weights that effc operators store packed, read back as the dense weights they stand for.

Size accounting counts bytes as the file holds them (:func:`effc.eval.cost.param_bytes`), but sparsity statistics
must count the zeros a packed format leaves out: an N:M-packed layer stores only its kept values, so its stored
tensor has no zeros although the weight it stands for is ``(M - N) / M`` zeros.

The reader of each operator is its :attr:`effc.ops.base.OpSpec.packed_weight`, found in the effc operator registry
by op type (``effc.NMSparseMatMul``: ``values`` ``(K·n/m, Cout)`` stands for a ``(K, Cout)`` weight, see
:mod:`effc.ops.nm_sparse`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.ops import EFFC_DOMAIN, PackedWeight, get_op

__all__ = ["PackedWeight", "coded_weights", "packed_weights"]


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
        spec = get_op(node.op_type) if node.domain == EFFC_DOMAIN else None
        result = spec.packed_weight(node) if spec is not None and spec.packed_weight is not None else None
        if result is not None:
            found[id(result[0].const_value)] = result[1]
    return found


def coded_weights(model: ir.Model) -> dict[int, tuple[np.ndarray, str]]:
    """Weights stored as codes (block quantization, :attr:`effc.ops.base.OpSpec.coded_weight`), decoded.

    Args:
        model: the model (weight data is read and decoded).

    Returns:
        ``id(stored tensor) -> (decoded float32 weight, storage label)``; malformed nodes are left out.
    """
    found: dict[int, tuple[np.ndarray, str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        spec = get_op(node.op_type) if node.domain == EFFC_DOMAIN else None
        result = spec.coded_weight(node) if spec is not None and spec.coded_weight is not None else None
        if result is not None:
            found[id(result[0].const_value)] = result[1:]
    return found
