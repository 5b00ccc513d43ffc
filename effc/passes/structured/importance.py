"""Importance policies for structured pruning: ``importance(group) -> one score per unit`` (higher = keep).

``magnitude``: the L2 norm of every weight slice that a unit removes — output rows/filters of its sources and
input columns of its sinks — summed in squares over the group (Li et al., "Pruning Filters for Efficient ConvNets",
2017; group form as in Torch-Pruning's ``GroupMagnitudeImportance``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from effc.passes.structured import mechanics as mech
from effc.passes.structured.coupling import Group


def _sq_norms(w: np.ndarray, axis: int) -> np.ndarray:
    w = np.moveaxis(w.astype(np.float64), axis, 0)
    return np.square(w.reshape(w.shape[0], -1)).sum(axis=1)


def magnitude(group: Group) -> np.ndarray:
    """``(units,)`` L2 norm of the weights each unit removes (sources' output slices + sinks' input slices)."""
    per_value: dict[str, np.ndarray] = {n: np.zeros(size) for n, (_, _, size) in group.values.items()}
    for node in group.sources:
        w_axis, _ = mech.source_axis(node)
        per_value[node.outputs[0].name] += _sq_norms(node.inputs[1].const_value.numpy(), w_axis)
    for node, _, name in group.sinks:
        w = node.inputs[1].const_value.numpy()
        if node.op_type == "Gemm":
            axis = 1 if node.attributes.get_int("transB", 0) else 0
        else:
            axis = {"MatMul": 0, "Conv": 1, "ConvTranspose": 0}[node.op_type]
        per_value[name] += _sq_norms(w, axis)
    return np.sqrt(np.array([sum(per_value[n][c] for n, c in unit) for unit in group.units]))


IMPORTANCE: dict[str, Callable[[Group], np.ndarray]] = {"magnitude": magnitude}
