"""``effc.DecodeAttentionMX``: ``effc.DecodeAttention`` over a KV cache stored as MX rows (codes + E8M0 scales).

Schema (domain ``effc``, opset 1)::

    Y = effc.DecodeAttentionMX(Q, past_key, past_value, key, value, attn_mask, positions,
                               scale=s, format=f, block_size=b)

As :mod:`effc.ops.decode_attention`, except the cache: ``past_key`` and ``past_value`` are both ``(Hkv, S, W)``
uint8, one row per slot of ``D`` element codes then ``D / b`` E8M0 scales (:mod:`effc.ops.kv_blocks`; keys are
not transposed). ``key`` ``(Hkv, D, T)`` and ``value`` ``(Hkv, T, D)`` are the chunk's own entries as float32
(already on the MX grid: the decoded rows the chunk writes). The result is ``DecodeAttention`` of the decoded cache
(keys transposed): the reference body decodes the rows (:func:`effc.ops.kv_blocks.add_kv_decode`'s nodes) and
runs :func:`effc.ops.decode_attention.attention_nodes`; the kernel (:mod:`effc.codegen.ops.decode_attention_mx`)
decodes inside its slot walk and reads only the ``L`` valid rows: ``2 · Hkv · L · W`` bytes per layer
(``W = 66`` for SmolLM2's ``D = 64``: 3.88× fewer than float32). MACs as ``DecodeAttention``.

Sources: OCP MX v1.0 (element and scale encodings); the operators of :mod:`effc.ops.decode_attention`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from effc.ops import decode_attention as plain
from effc.ops.base import EFFC_DOMAIN, OpSpec, add_function, register_op
from effc.ops.block_formats import BlockFormat
from effc.ops.block_quant import _Body
from effc.ops.kv_blocks import check_stored, decode_body, decode_reference, row_overload

__all__ = ["OP_TYPE", "decode_attention_mx", "reference"]

OP_TYPE = "DecodeAttentionMX"
ATTRIBUTES = ("scale", "format", "block_size")


def reference(q: np.ndarray, past_key: np.ndarray, past_value: np.ndarray, key: np.ndarray, value: np.ndarray,
              attn_mask: np.ndarray, positions: np.ndarray, *, scale: float, format: str,  # noqa: A002
              block_size: int) -> np.ndarray:
    """Numpy ``effc.DecodeAttentionMX``: :func:`effc.ops.decode_attention.reference` of the decoded rows."""
    keys = decode_reference(past_key, format=format, block_size=block_size).transpose(0, 2, 1)
    values = decode_reference(past_value, format=format, block_size=block_size)
    return plain.reference(q, keys, values, key, value, attn_mask, positions, scale=scale)


def attention_mx_function(opset: int, fmt: BlockFormat, block_size: int, head_dim: int) -> ir.Function:
    """Reference body (standard ONNX ops, opset ≥ 13) for one format, block size and ``head_dim``."""
    nodes = []
    for name in ("past_key", "past_value"):
        b = _Body(f"{name}_dec", opset)
        out = decode_body(b, fmt, block_size, head_dim, rows=name)
        nodes += b.nodes
        perm = [0, 2, 1] if name == "past_key" else [0, 1, 2]  # keys as DecodeAttention reads them: (Hkv, D, S)
        nodes.append(helper.make_node("Transpose", [out], [f"{name}_f"], perm=perm))
    nodes += plain.attention_nodes("past_key_f", "past_value_f")
    proto = helper.make_function(EFFC_DOMAIN, OP_TYPE, list(plain.INPUTS), ["Y"], nodes,
                                 [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))
    proto.overload = row_overload(fmt, block_size, head_dim)
    return ir.serde.deserialize_function(proto)


def decode_attention_mx(model: ir.Model, inputs: list[ir.Value], scale: float, fmt: BlockFormat, block_size: int,
                        name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.DecodeAttentionMX`` node; attaches the function body to ``model``.

    Args:
        model: the model the node will be inserted into.
        inputs: the values of :data:`effc.ops.decode_attention.INPUTS`, in that order (``Q`` with a static shape).
        scale: the score scale.
        fmt: the rows' element format (:data:`effc.ops.kv_blocks.STORED_FORMATS`).
        block_size: entries per E8M0 scale along ``head_dim``.
        name: the node's name.

    Raises:
        ValueError: ``fmt`` cannot be stored, or ``head_dim`` is not a multiple of ``block_size``.
    """
    head_dim = int(inputs[0].shape[-1])
    check_stored(fmt, head_dim, block_size)
    add_function(model, attention_mx_function(max(model.opset_imports.get("", 13), 13), fmt, block_size, head_dim))
    attrs = [ir.AttrFloat32("scale", float(scale)), ir.AttrString("format", fmt.name),
             ir.AttrInt64("block_size", block_size)]
    return ir.Node(EFFC_DOMAIN, OP_TYPE, inputs, attributes=attrs, overload=row_overload(fmt, block_size, head_dim),
                   name=name)


def count_macs(node: ir.Node) -> int | None:
    """As :func:`effc.ops.decode_attention.count_macs`; the rows ``(Hkv, S, W)`` count the slots on axis 1."""
    return plain.count_macs(node, slot_axis=1)


SPEC = register_op(OpSpec(OP_TYPE, plain.INPUTS, ATTRIBUTES, count_macs, reference))
