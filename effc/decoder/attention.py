"""Rewrite each layer's attention of a specialized decoder graph (decode or prefill) into ``effc.DecodeAttention``.

The exported attention (:class:`effc.decoder.llama.StaticLlama`) of layer ``i`` reads its cache inputs
(:func:`effc.ir.decoder.kv_layout`) as::

    MatMul(Q, Unsqueeze(past_key.i, 1)), MatMul(Q, Unsqueeze(key.i, 1)) -> Concat(-1) -> Mul(scale)
      -> Add(attn_mask) -> Softmax(-1) -> Slice [0, S) / [S, S+T) -> MatMul(·, Unsqueeze(past_value.i, 1)),
      MatMul(·, Unsqueeze(value.i, 1)) -> Add -> Y

Every slot of the cache takes part there (masked ones included). The rewrite replaces the final ``Add`` by one
``effc.DecodeAttention`` node (:mod:`effc.ops.decode_attention`) that reads only the valid prefix; the nodes it
made dead are removed. A cache stored as MX rows (``block-quant(mode=kv)``, :mod:`effc.passes.quant.decoder_kv`)
is read through ``effc.KVBlockDecode`` nodes: the pattern is matched on their outputs, and the fused node is
``effc.DecodeAttentionMX`` (:mod:`effc.ops.decode_attention_mx`) reading the rows, so the decode of the whole
cache becomes dead and goes. A layer whose graph does not have this shape is left as it is, with the reason logged.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from effc.ir.decoder import decoder_info, kv_layout
from effc.ops.block_formats import get_format
from effc.ops.decode_attention import HEAD_DIM_MULTIPLE, SLOT_MULTIPLE, decode_attention
from effc.ops.decode_attention_mx import decode_attention_mx

logger = logging.getLogger(__name__)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    node = uses[0].node if len(uses) == 1 else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _unsqueezed(matmul: ir.Node | None, source: ir.Value) -> bool:
    """``matmul``'s second input is ``Unsqueeze(source, [1])``."""
    unsqueeze = _producer(matmul.inputs[1], "Unsqueeze") if matmul is not None else None
    axes = unsqueeze.inputs[1].const_value if unsqueeze is not None and len(unsqueeze.inputs) > 1 else None
    return (unsqueeze is not None and unsqueeze.inputs[0] is source and axes is not None
            and axes.numpy().tolist() == [1])


def _decoded(value: ir.Value) -> ir.Value | None:
    """The float32 tensor that MX rows ``value`` stand for, or None when they are not read so.

    That is its ``effc.KVBlockDecode``'s output, through the Transpose back to ``(Hkv, D, ·)`` for keys
    (:mod:`effc.passes.quant.decoder_kv`).
    """
    uses = list(value.uses())
    node = uses[0].node if len(uses) == 1 else None
    if node is None or node.op_type != "KVBlockDecode" or node.domain != "effc":
        return None
    transpose = _only_consumer(node.outputs[0], "Transpose")
    return transpose.outputs[0] if transpose is not None else node.outputs[0]


def _match(graph: ir.Graph, past_key: ir.Value, past_value: ir.Value, key: ir.Value,
           value: ir.Value) -> tuple[ir.Node, list[ir.Value], float] | str:
    """(the final Add, the operator's inputs, scale) of one layer, or why the layer's graph does not match."""
    unsqueeze_k = _only_consumer(past_key, "Unsqueeze")
    scores_cache = _only_consumer(unsqueeze_k.outputs[0], "MatMul") if unsqueeze_k is not None else None
    concat = _only_consumer(scores_cache.outputs[0], "Concat") if scores_cache is not None else None
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not scores_cache.outputs[0]:
        return "past_key is not read by MatMul(Q, Unsqueeze(past_key)) -> Concat"
    q = scores_cache.inputs[0]
    scores_new = _producer(concat.inputs[1], "MatMul")
    if scores_new is None or scores_new.inputs[0] is not q or not _unsqueezed(scores_new, key):
        return "the chunk's scores are not MatMul(Q, Unsqueeze(key))"
    mul = _only_consumer(concat.outputs[0], "Mul")
    scale = mul.inputs[1].const_value if mul is not None else None
    add_mask = _only_consumer(mul.outputs[0], "Add") if mul is not None else None
    mask = graph.inputs[[v.name for v in graph.inputs].index("attn_mask")]
    if scale is None or scale.size != 1 or add_mask is None or add_mask.inputs[1] is not mask:
        return "the scores are not scaled by a constant and then masked by attn_mask"
    softmax = _only_consumer(add_mask.outputs[0], "Softmax")
    if softmax is None or softmax.attributes.get_int("axis", -1) not in (-1, 3):
        return "no Softmax over the last axis after the mask"
    slices = [u.node for u in softmax.outputs[0].uses()]
    ctx = [_only_consumer(s.outputs[0], "MatMul") for s in slices if s.op_type == "Slice"]
    if len(slices) != 2 or len(ctx) != 2 or None in ctx:
        return "the probabilities are not split in two Slices, each read by a MatMul"
    cache_mm, new_mm = ctx if _unsqueezed(ctx[0], past_value) else ctx[::-1]
    final = _only_consumer(cache_mm.outputs[0], "Add")
    if not (_unsqueezed(cache_mm, past_value) and _unsqueezed(new_mm, value) and final is not None
            and {id(v) for v in final.inputs} == {id(cache_mm.outputs[0]), id(new_mm.outputs[0])}):
        return "the weighted sum is not MatMul(p, Unsqueeze(past_value)) + MatMul(p, Unsqueeze(value))"
    positions = graph.inputs[[v.name for v in graph.inputs].index("positions")]
    return final, [q, past_key, past_value, key, value, mask, positions], float(scale.numpy().reshape(()))


def fuse_decode_attention(model: ir.Model) -> int:
    """Replace each layer's attention by ``effc.DecodeAttention`` (in place); returns how many layers were fused.

    ``model`` is a decoder graph specialized to a chunk of ``T`` tokens (:func:`effc.ir.decoder.specialize`; the
    one-token decode graph and the prefill chunk alike); the chunk's keys and values are its ``key.i`` /
    ``value.i`` outputs.
    """
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    fused = 0
    info = decoder_info(model)
    layout = kv_layout(info)
    stored = None if info.get("kv_row_bytes") is None else (get_format(info["kv_format"]), info["kv_block_size"])
    if info["max_cache"] % SLOT_MULTIPLE or info["head_dim"] % HEAD_DIM_MULTIPLE:
        logger.info("decode attention not fused: the kernel needs max_cache %% %d == 0 and head_dim %% %d == 0",
                    SLOT_MULTIPLE, HEAD_DIM_MULTIPLE)
        return 0
    for key_slot, value_slot in zip(layout[0::2], layout[1::2], strict=True):
        values = [inputs.get(key_slot.input), inputs.get(value_slot.input), outputs.get(key_slot.output),
                  outputs.get(value_slot.output)]
        views = [_decoded(v) for v in values] if stored is not None and None not in values else values
        found = "a cache input or output is missing" if None in views else _match(graph, *views)
        if isinstance(found, str):
            logger.info("layer %d keeps its standard attention: %s", key_slot.layer, found)
            continue
        final, operands, scale = found
        name = f"layers.{key_slot.layer}.self_attn/DecodeAttention"
        if stored is None:
            node = decode_attention(model, operands, scale, name)
        else:  # the kernel reads the rows themselves; the chunk's own entries stay the decoded float32 values
            operands[1:3] = values[:2]
            node = decode_attention_mx(model, operands, scale, *stored, f"{name}MX")
        graph.insert_after(final, node)
        node.outputs[0].shape, node.outputs[0].type = final.outputs[0].shape, final.outputs[0].type
        ir.convenience.replace_all_uses_with(final.outputs[0], node.outputs[0])
        fused += 1
    if fused:
        RemoveUnusedNodesPass()(model)
    logger.info("decode attention: %d of %d layers fused into effc.DecodeAttention", fused, len(layout) // 2)
    return fused
