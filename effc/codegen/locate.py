"""Find the ONNX node behind a failure of TVM's lowering or build, which names no node.

TVM lowers the whole imported module at once; when it fails inside legalize, lowering or LLVM code generation
("dtype mismatch on BufferStore", "Data type bfloat16 not supported for isnan op") its message names a TIR
buffer or a PrimFunc, never the ONNX node. :func:`first_failing_node` finds the node by bisection over prefixes of
the graph (nodes in topological order): the prefix ending at node ``k`` is the graph cut after it, its outputs
those of node ``k``. The first prefix that fails the same way ends at the culprit. It costs one build per
halving (about log2(#nodes) builds of small graphs) and runs only after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx_ir as ir

__all__ = ["first_failing_node"]

logger = logging.getLogger(__name__)

#: Graphs with more nodes are not bisected (each try builds up to the whole graph again).
MAX_NODES = 512


def _prefix(model: ir.Model, count: int) -> ir.Model | None:
    """``model`` cut after its first ``count`` nodes, the outputs of the last one as graph outputs.

    None when the last node has no output with a known type and shape (nothing to return).
    """
    proto = ir.to_proto(model)
    graph = proto.graph
    infos = {info.name: info for info in [*graph.value_info, *graph.input, *graph.output]}
    outputs = [infos[name] for name in graph.node[count - 1].output if name in infos]
    if not outputs:
        return None
    del graph.node[count:]
    del graph.output[:]
    graph.output.extend(outputs)
    return ir.from_proto(proto)


def _signature(exc: BaseException) -> str:
    """What identifies a failure: the type and first words of the TVM error behind an effc error."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {str(cause).strip()[:48]}"


def first_failing_node(model: ir.Model, attempt: Callable[[ir.Model], None], failure: BaseException) -> ir.Node | None:
    """The first node of ``model`` whose graph prefix makes ``attempt`` fail as it failed with ``failure``.

    Args:
        model: the canonical model whose build failed (static shapes; main graph in topological order).
        attempt: builds a model, raising on failure (the same import and build that failed).
        failure: the exception the whole model raised; a prefix counts as failing when its error has the same
            type and message start (a prefix can fail otherwise, e.g. a graph that returns a constant).

    Returns:
        The culprit node, or None when no prefix reproduces the failure or the graph is too large to bisect.
    """
    nodes = list(model.graph)
    if len(nodes) == 1:
        return nodes[0]
    if not nodes or len(nodes) > MAX_NODES:
        return None
    wanted = _signature(failure)
    tries: dict[int, bool] = {}

    def fails(count: int) -> bool:
        if count not in tries:
            prefix = _prefix(model, count)
            try:
                if prefix is not None:
                    attempt(prefix)
                tries[count] = False
            except Exception as exc:  # noqa: BLE001  (any failure of the build is a candidate)
                tries[count] = _signature(exc) == wanted
            logger.debug("locate: prefix of %d node(s) fails alike: %s", count, tries[count])
        return tries[count]

    low, high = 1, len(nodes)  # the whole graph fails; find the smallest failing prefix
    while low < high:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return nodes[low - 1] if low < len(nodes) or fails(low) else None
