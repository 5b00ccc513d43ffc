"""``block-quant(mode=kv)`` on a decoder graph: the keys and values as the KV cache stores them, in MX blocks.

A decoder's cache entries are the chunk's ``key.i`` ``(Hkv, D, T)`` and ``value.i`` ``(Hkv, T, D)`` outputs
(:func:`effc.ir.decoder.kv_layout`), keys after RoPE. Each is produced by a ``Transpose`` of a tensor whose last axis
is ``head_dim``; an ``effc.BlockQDQ`` (blocks of 32 along ``head_dim``, OCP MX v1.0) is inserted before that
``Transpose``, so the values written into the cache are exactly the MX-representable ones (quantized when written)
and the chunk's own attention reads the same values the later steps read from the cache. The format is recorded
in the decoder metadata as ``kv_format`` (the report gives the bytes per token it needs).

With an 8-bit MX format (:data:`effc.ops.kv_blocks.STORED_FORMATS`) the cache is stored in blocks
(:func:`store_decoder_kv`): each cache input becomes ``(Hkv, S, W)`` uint8 rows (codes then E8M0 scales, keys no
longer transposed) read through ``effc.KVBlockDecode``, and each chunk output ``effc.KVBlockEncode`` of the new
entries, which the chunk's own attention reads back through ``effc.KVBlockDecode``, so prefill, decode and later
steps all see the same values. The decode graph's attention then reads the rows directly
(``effc.DecodeAttentionMX``, :mod:`effc.decoder.attention`). Other formats (MXFP4, MXFP6) keep the float32 cache
with the values on the MX grid (:func:`quantize_decoder_kv`).

Channel rearrangement (``kv_rearrange=true``; "Accurate Block Quantization in LLMs with Outliers", Trukhanov &
Soloveychik 2024): the value channels of each KV head are sorted by magnitude (the norm of ``W_v``'s column scaled
by the RMSNorm gain) so the large ones share a block, folded into the weights: ``W_v``'s columns and ``W_o``'s rows
of every query head of the group move together (outputs equal before quantization). Keys are left in place: with
RoPE in the half-split form, channel ``c`` rotates with ``c + D/2``; a permutation that keeps pairs together maps
each pair onto one channel in ``[0, D/2)`` and one in ``[D/2, D)``, and with ``D = 64`` those are exactly the two
blocks of 32: a key outlier pair lands in both blocks whatever the order, so no rearrangement can group it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.ir.decoder import METADATA_KEY, decoder_info, kv_layout
from effc.ops import block_quant as bq_ops
from effc.ops import kv_blocks
from effc.ops.block_formats import BlockFormat

__all__ = ["quantize_decoder_kv", "rearrange_values", "store_decoder_kv"]


def _head_dim_source(output: ir.Value, head_dim: int) -> ir.Value | str:
    """The tensor with ``head_dim`` last that the Transpose producing ``output`` reads, or why there is none."""
    node = output.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return f"{output.name} is not produced by a Transpose"
    source = node.inputs[0]
    perm = node.attributes.get_ints("perm", None)
    shape = source.shape
    if shape is None or perm is None or shape[-1] != head_dim or len(list(source.uses())) != 1:
        return f"{output.name}: the Transpose input does not have head_dim {head_dim} last (or has other readers)"
    return source


def quantize_decoder_kv(model: ir.Model, fmt: BlockFormat, block_size: int, pass_name: str,
                        stats: dict[str, Any]) -> int:
    """Insert a BlockQDQ on every cache entry of the decoder ``model`` (in place); returns how many.

    ``stats["kv_values"]`` gets ``{"value", "role", "layer"}`` per quantized entry, ``stats["skipped"]`` the
    entries left alone (with the reason).
    """
    info = decoder_info(model)
    if info["head_dim"] % block_size:
        stats["skipped"].append({"node": "kv cache", "weight": "", "reason": f"head_dim {info['head_dim']} is not "
                                 f"a multiple of block_size {block_size}"})
        return 0
    outputs = {v.name: v for v in model.graph.outputs}
    count = 0
    for slot in kv_layout(info):
        output = outputs.get(slot.output)
        found = _head_dim_source(output, info["head_dim"]) if output is not None else f"no output {slot.output}"
        if isinstance(found, str):
            stats["skipped"].append({"node": slot.output, "weight": "", "reason": found})
            continue
        if found.producer() is not None and found.producer().op_type == "BlockQDQ":
            continue  # already quantized (second run)
        transpose = output.producer()
        node = bq_ops.add_block_qdq(model, found, fmt, block_size, f"{slot.output}/kv_qdq")
        node.metadata_props["effc.pass"] = pass_name
        model.graph.insert_before(transpose, [node])
        transpose.replace_input_with(0, node.outputs[0])
        stats["kv_values"].append({"value": slot.output, "role": slot.kind, "layer": slot.layer})
        count += 1
    if count:
        model.metadata_props[METADATA_KEY] = json.dumps({**info, "kv_format": fmt.name, "kv_block_size": block_size},
                                                        sort_keys=True)
    return count


def _rows_of_output(model: ir.Model, slot: Any, fmt: BlockFormat, block_size: int, info: dict[str, Any],
                    pass_name: str) -> None:
    """Make the chunk output of ``slot`` the encoded rows; its readers get the decoded values (same layout)."""
    graph = model.graph
    index = [v.name for v in graph.outputs].index(slot.output)
    entries = graph.outputs[index]
    readers = [(u.node, u.idx) for u in entries.uses()]
    nodes = []
    rows = entries
    if slot.kind == "key":  # (Hkv, D, T) -> (Hkv, T, D)
        nodes.append(ir.node("Transpose", [entries], {"perm": [0, 2, 1]}, name=f"{slot.output}/rows"))
        rows = nodes[-1].outputs[0]
        rows.shape, rows.type = ir.Shape([info["kv_heads"], entries.shape[2], info["head_dim"]]), entries.type
    nodes.append(kv_blocks.add_kv_encode(model, rows, fmt, block_size, f"{slot.output}/kv_encode"))
    encoded = nodes[-1].outputs[0]
    nodes.append(kv_blocks.add_kv_decode(model, encoded, fmt, block_size, info["head_dim"],
                                         f"{slot.output}/kv_decode"))
    if slot.kind == "key":
        nodes.append(ir.node("Transpose", [nodes[-1].outputs[0]], {"perm": [0, 2, 1]}, name=f"{slot.output}/keys"))
    decoded = nodes[-1].outputs[0]
    decoded.shape, decoded.type = entries.shape, entries.type
    for node in nodes:
        node.metadata_props["effc.pass"] = pass_name
    graph.insert_after(entries.producer(), nodes)
    for node, idx in readers:
        node.replace_input_with(idx, decoded)
    entries.name, encoded.name = f"{slot.output}/float", slot.output
    graph.outputs[index] = encoded


def _rows_of_input(model: ir.Model, slot: Any, fmt: BlockFormat, block_size: int, info: dict[str, Any],
                   rows: int, pass_name: str) -> None:
    """Make the cache input of ``slot`` uint8 rows; its readers get the decoded float32 cache (same layout)."""
    graph = model.graph
    cache = next(v for v in graph.inputs if v.name == slot.input)
    readers = [(u.node, u.idx) for u in cache.uses()]
    cache.shape = ir.Shape([info["kv_heads"], info["max_cache"], rows])
    cache.type = ir.TensorType(ir.DataType.UINT8)
    nodes = [kv_blocks.add_kv_decode(model, cache, fmt, block_size, info["head_dim"], f"{slot.input}/kv_decode")]
    if slot.kind == "key":  # (Hkv, S, D) -> the (Hkv, D, S) the attention reads
        nodes.append(ir.node("Transpose", [nodes[-1].outputs[0]], {"perm": [0, 2, 1]}, name=f"{slot.input}/keys"))
    nodes[-1].outputs[0].shape = ir.Shape(slot.shape(info, info["max_cache"]))
    nodes[-1].outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    for node in nodes:
        node.metadata_props["effc.pass"] = pass_name
    graph.insert_before(next(iter(graph)), nodes)
    for node, idx in readers:
        node.replace_input_with(idx, nodes[-1].outputs[0])


def store_decoder_kv(model: ir.Model, fmt: BlockFormat, block_size: int, pass_name: str,
                     stats: dict[str, Any]) -> int:
    """Store the decoder's KV cache as MX rows (see the module docstring; in place); returns how many entries.

    The metadata gets ``kv_format``, ``kv_block_size`` and ``kv_row_bytes`` (:func:`effc.ir.decoder.kv_layout`
    then describes the uint8 rows); a graph already stored is left alone (0). ``stats`` as
    :func:`quantize_decoder_kv`, plus ``kv_row_bytes``.

    Raises:
        ValueError: ``fmt`` is not one of :data:`effc.ops.kv_blocks.STORED_FORMATS`.
    """
    info = decoder_info(model)
    if info.get("kv_row_bytes") is not None:
        return 0
    if info["head_dim"] % block_size:
        stats["skipped"].append({"node": "kv cache", "weight": "", "reason": f"head_dim {info['head_dim']} is not "
                                 f"a multiple of block_size {block_size}"})
        return 0
    kv_blocks.check_stored(fmt, info["head_dim"], block_size)
    rows = kv_blocks.row_bytes(info["head_dim"], block_size)
    names = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    layout = kv_layout(info)
    missing = [n for slot in layout for n in (slot.input, slot.output) if n not in names]
    if missing:
        stats["skipped"].append({"node": "kv cache", "weight": "", "reason": f"no graph input/output {missing[0]}"})
        return 0
    for slot in layout:
        _rows_of_output(model, slot, fmt, block_size, info, pass_name)
        _rows_of_input(model, slot, fmt, block_size, info, rows, pass_name)
        stats["kv_values"].append({"value": slot.output, "role": slot.kind, "layer": slot.layer})
    stats["kv_row_bytes"] = rows
    model.metadata_props[METADATA_KEY] = json.dumps(
        {**info, "kv_format": fmt.name, "kv_block_size": block_size, "kv_row_bytes": rows}, sort_keys=True)
    return len(layout)


def _weight(model: ir.Model, name: str) -> np.ndarray | None:
    value = model.graph.initializers.get(name)
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def rearrange_values(model: ir.Model, stats: dict[str, Any]) -> int:
    """Sort each KV head's value channels by magnitude, in ``W_v`` ``(hidden, Hkv·D)`` and ``W_o`` ``(H·D, hidden)``.

    Layers whose ``layers.i.self_attn.v_proj`` / ``o_proj`` weights are not plain initializers (e.g. already
    quantized) are skipped (``stats["skipped"]``). Returns how many layers were rearranged;
    ``stats["kv_rearranged"]`` lists them.
    """
    info = decoder_info(model)
    hkv, d, group = info["kv_heads"], info["head_dim"], info["heads"] // info["kv_heads"]
    done = []
    for layer in sorted({slot.layer for slot in kv_layout(info)}):
        prefix = f"layers.{layer}.self_attn."
        wv, wo = _weight(model, prefix + "v_proj"), _weight(model, prefix + "o_proj")
        if wv is None or wo is None or wv.shape[1] != hkv * d or wo.shape[0] != hkv * group * d:
            stats["skipped"].append({"node": prefix + "v_proj", "weight": "", "reason": "no plain W_v/W_o weights"})
            continue
        gain = _weight(model, f"layers.{layer}.input_layernorm")
        scaled = wv * (gain.reshape(-1, 1) if gain is not None and gain.size == wv.shape[0] else 1.0)
        norms = np.linalg.norm(scaled, axis=0).reshape(hkv, d)
        order = np.argsort(-norms, axis=1, kind="stable")  # (Hkv, D): new channel j of head h = old order[h, j]
        columns = (order + np.arange(hkv)[:, None] * d).reshape(-1)
        rows = (np.repeat(order, group, axis=0) + np.arange(hkv * group)[:, None] * d).reshape(-1)
        for name, array in ((prefix + "v_proj", wv[:, columns]), (prefix + "o_proj", wo[rows])):
            model.graph.initializers[name].const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        done.append(layer)
    stats["kv_rearranged"] = done
    return len(done)
