"""CastLike → Cast with every attribute kept, before onnxscript's constant folder sees it.

onnxscript 0.7's folder rewrites ``CastLike(x, like)`` into ``Cast(x, to=like.dtype)`` and drops ``saturate`` and
``round_mode`` (ONNX CastLike-19/25): a float8 CastLike with ``saturate=0`` then saturated instead of giving
inf/NaN. Doing the rewrite here, with the attributes carried over, keeps the ONNX semantics (CastLike is defined
as Cast to the element type of its second input).
"""

from __future__ import annotations

import onnx_ir as ir

#: CastLike attributes that Cast has under the same name and meaning (ONNX CastLike-25 / Cast-25).
_CARRIED = ("saturate", "round_mode")


def cast_likes_to_casts(model: ir.Model) -> int:
    """Replace main-graph ``CastLike`` nodes whose second input has a known dtype by ``Cast`` (in place).

    Args:
        model: the model; nodes are rewritten in place.

    Returns:
        The number of nodes replaced.
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "CastLike" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        like = node.inputs[1]
        if like is None or like.dtype is None:
            continue
        attributes = [ir.AttrInt64("to", like.dtype.value)]
        attributes += [node.attributes[name] for name in _CARRIED if name in node.attributes]
        old = node.outputs[0]
        cast = ir.Node("", "Cast", [node.inputs[0]], attributes, name=node.name)
        new = cast.outputs[0]
        new.shape, new.type = old.shape, old.type
        # replace_nodes_and_values keeps the old value's name (graph outputs keep theirs)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [cast], [old], [new])
        count += 1
    return count
