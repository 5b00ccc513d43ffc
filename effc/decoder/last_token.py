"""The ``prefill_last`` entry point: a prefill chunk that computes the logits of one token only.

Generation needs the logits of the last real token of the prompt; perplexity needs those of every token. The
``prefill`` entry point computes all ``P`` rows of the LM head (on SmolLM2 a ``(P, 576) x (576, 49152)`` product,
a fifth of a 128-token prefill); ``prefill_last`` is the same chunk with one more graph input, ``last_index``
int64 ``(1,)`` (the row of the chunk's last real token, after the KV-cache inputs), and a ``Gather`` of that row
of the LM head's input: the LM head runs on one row and the output ``logits`` is ``(1, 1, V)``. Everything else
(keys and values of the whole chunk, written to the cache as ``prefill`` writes them) is unchanged.

The LM head is the node that computes the logits before their ``Unsqueeze``: a linear layer whose rows are
independent (:data:`ROW_WISE`: ``MatMul`` or an effc matmul with constant weights), so gathering its input row
gives the row of its output. The final norm before it still runs on all ``P`` rows (``P × hidden`` elements,
negligible). The graph is derived from the rewritten token-generic graph (:func:`with_last_index`), so the
compiler, ``model.onnx`` under onnxruntime and the benchmarks all build it the same way; the ``prefill`` and
``prefill_last`` functions of ``model.so`` share their weight constants (:mod:`effc.codegen.entries`).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from effc.errors import ShapeError
from effc.ir.decoder import LAST_INDEX, OUTPUTS, PREFILL_LAST, specialize
from effc.ops.base import EFFC_DOMAIN

logger = logging.getLogger(__name__)

#: ``(domain, op_type)`` of linear layers whose output row ``i`` depends on input row ``i`` only (input 0 is the
#: ``(T, K)`` activation; the other inputs are constant weights).
ROW_WISE = frozenset({("", "MatMul"), (EFFC_DOMAIN, "BlockQuantMatMul"), (EFFC_DOMAIN, "NMSparseMatMul")})
#: Shape-only nodes allowed between the LM head and the ``logits`` output.
_PASS_THROUGH = frozenset({"Unsqueeze", "Identity"})


def lm_head(model: ir.Model) -> ir.Node:
    """The node that computes the ``(T, V)`` logits of a decoder graph (before their ``Unsqueeze``).

    Raises:
        ShapeError: the logits are not computed by a row-wise linear layer (:data:`ROW_WISE`) with constant
            weights behind shape-only nodes.
    """
    outputs = {v.name: v for v in model.graph.outputs}
    node = outputs[OUTPUTS[0]].producer() if OUTPUTS[0] in outputs else None
    while node is not None and node.domain == "" and node.op_type in _PASS_THROUGH:
        node = node.inputs[0].producer()
    constant = node is not None and all(v is None or v.const_value is not None for v in node.inputs[1:])
    if node is None or (node.domain, node.op_type) not in ROW_WISE or not constant:
        found = "nothing" if node is None else f"{node.domain or 'onnx'}.{node.op_type} node {node.name!r}"
        raise ShapeError(f"the decoder's logits come from {found}, not from a linear layer with constant weights, "
                         "so the last-token prefill cannot gather one row before it",
                         "report the pass that rewrote the LM head; generation can use the prefill entry")
    return node


def entry_graph(generic: ir.Model, chunk: int) -> ir.Model:
    """The ``prefill_last`` graph: :func:`with_last_index` specialized to ``chunk`` tokens.

    Its attention is fused as the ``prefill`` entry's (:func:`effc.decoder.attention.fuse_decode_attention`).

    Raises:
        ShapeError: as :func:`lm_head`.
    """
    from effc.decoder.attention import fuse_decode_attention

    graph = specialize(with_last_index(generic), chunk)
    fuse_decode_attention(graph)
    return graph


def with_last_index(generic: ir.Model) -> ir.Model:
    """A copy of the token-generic decoder graph whose LM head reads only row ``last_index`` of the chunk.

    Args:
        generic: the rewritten token-generic graph (:func:`effc.ir.decoder.regeneralize`; not changed).

    Returns:
        The graph with the extra input ``last_index`` int64 ``(1,)`` (last) and ``logits`` ``(1, 1, V)``; specialize
        it to the chunk with :func:`effc.ir.decoder.specialize`.

    Raises:
        ShapeError: as :func:`lm_head`.
    """
    copy = ir.from_proto(ir.to_proto(generic))
    head = lm_head(copy)
    index = ir.Value(name=LAST_INDEX, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
    copy.graph.inputs.append(index)
    gather = ir.node("Gather", [head.inputs[0], index], attributes={"axis": 0},
                     name=f"{head.name}/last_row", metadata_props={"effc.pass": PREFILL_LAST})
    gather.outputs[0].name = f"{head.inputs[0].name}_last_row"
    copy.graph.insert_before(head, gather)
    head.replace_input_with(0, gather.outputs[0])
    logits = next(v for v in copy.graph.outputs if v.name == OUTPUTS[0])
    logits.shape = None  # (1, 1, V) now: inferred again by specialize
    logger.info("last-token prefill: %s reads row %s of its input only", head.name, LAST_INDEX)
    return copy
