"""``effc.DecodeAttention``: attention of a decoder chunk over the valid prefix of a static KV cache, GQA.

Schema (domain ``effc``, opset 1)::

    Y = effc.DecodeAttention(Q, past_key, past_value, key, value, attn_mask, positions, scale=s)

* ``Q``          ``(Hkv, G, T, D)`` float32: the queries (RoPE applied), query head ``h = kv_head · G + g``.
* ``past_key``   ``(Hkv, D, S)`` float32: the cached keys, transposed (:func:`effc.ir.decoder.kv_layout`).
* ``past_value`` ``(Hkv, S, D)`` float32: the cached values.
* ``key``        ``(Hkv, D, T)`` float32 and ``value`` ``(Hkv, T, D)``: the chunk's own keys (transposed) and values.
* ``attn_mask``  ``(T, S + T)`` float32: additive mask over the cache slots, then the chunk's tokens.
* ``positions``  ``(1, T)`` int64: absolute positions; ``L = positions[0, 0]`` cache slots hold the context.
* ``Y``          ``(Hkv, G, T, D)`` float32: ``softmax(s · Q·[K_cache[:L] | K_new]ᵀ + mask) · [V_cache[:L] | V_new]``.
* attribute ``scale`` (float): the score scale, ``D^-1/2`` for Llama.

Cache slots ``j >= L`` take no part, whatever ``attn_mask`` says of them: the kernel reads only the valid prefix
(``2 · Hkv · L · D · 4`` bytes per layer instead of the whole cache), and the reference body
(:func:`attention_function`) masks them out. MACs: ``Hkv · G · T · (L + T) · D · 2`` (counted at ``L = S``).

Sources: Vaswani et al., "Attention Is All You Need" (2017); Ainslie et al., "GQA" (2023); Dao et al.,
"Flash-Decoding for long-context inference" (2023) for the one-pass-per-KV-head kernel
(:mod:`effc.codegen.ops.decode_attention`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto, helper

from effc.ir.queries import static_shape
from effc.ops.base import EFFC_DOMAIN, OpSpec, add_function, register_op

__all__ = ["HEAD_DIM_MULTIPLE", "INPUTS", "OP_TYPE", "SLOT_MULTIPLE", "attention_function", "attention_nodes",
           "decode_attention", "reference"]

OP_TYPE = "DecodeAttention"
INPUTS = ("Q", "past_key", "past_value", "key", "value", "attn_mask", "positions")
#: The kernel reads cache slots 16 at a time (one 64-byte line of a row of Kᵀ) and head_dim 8 at a time: the cache
#: length must be a multiple of SLOT_MULTIPLE and head_dim of 8 (the rewrite leaves other shapes alone).
SLOT_MULTIPLE = 16
HEAD_DIM_MULTIPLE = 8
#: Score of cache slots past the valid prefix in the reference body (exp of it is exactly 0 in float32).
_INVALID = -3.0e38


def reference(q: np.ndarray, past_key: np.ndarray, past_value: np.ndarray, key: np.ndarray, value: np.ndarray,
              attn_mask: np.ndarray, positions: np.ndarray, *, scale: float) -> np.ndarray:
    """Numpy ``effc.DecodeAttention`` (float64 inside, float32 out); shapes as in the module docstring."""
    s = past_key.shape[2]
    length = int(np.clip(positions[0, 0], 0, s))
    keys = np.concatenate([past_key[:, :, :length], key], axis=2).astype(np.float64)  # (Hkv, D, L + T)
    values = np.concatenate([past_value[:, :length], value], axis=1).astype(np.float64)  # (Hkv, L + T, D)
    mask = np.concatenate([attn_mask[:, :length], attn_mask[:, s:]], axis=1)  # (T, L + T)
    scores = np.einsum("hgtd,hdj->hgtj", q.astype(np.float64), keys) * scale + mask
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("hgtj,hjd->hgtd", probs, values).astype(np.float32)


def attention_nodes(past_key: str = "past_key", past_value: str = "past_value") -> list[onnx.NodeProto]:
    """The nodes of the reference body over float caches named ``past_key`` and ``past_value``.

    ``past_key`` is ``(Hkv, D, S)``, ``past_value`` ``(Hkv, S, D)``; the other inputs as in :data:`INPUTS`, output
    ``Y``; the nodes read the attribute ``scale``.
    """
    i64 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(v)], v))
    scalar = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [v]))
    scale = helper.make_node("Constant", [], ["scale_c"])
    scale.attribute.append(helper.make_attribute_ref("value_float", AttributeProto.FLOAT, ref_attr_name="scale"))
    nodes = [
        i64("c0", [0]), i64("c1", [1]), i64("c2", [2]), i64("c3", [3]), i64("cm1", [-1]), i64("c00", [0, 0]),
        i64("c11", [1, 1]), scalar("s0", 0), scalar("s1", 1), scale,
        helper.make_node("Constant", [], ["invalid"], value=helper.make_tensor("invalid", TensorProto.FLOAT, [],
                                                                              [_INVALID])),
        helper.make_node("Unsqueeze", ["past_key", "c1"], ["pk"]),
        helper.make_node("Unsqueeze", ["key", "c1"], ["kn"]),
        helper.make_node("Unsqueeze", ["past_value", "c1"], ["pv"]),
        helper.make_node("Unsqueeze", ["value", "c1"], ["vn"]),
        helper.make_node("MatMul", ["Q", "pk"], ["sc"]),
        helper.make_node("MatMul", ["Q", "kn"], ["sn"]),
        helper.make_node("Concat", ["sc", "sn"], ["s"], axis=-1),
        helper.make_node("Mul", ["s", "scale_c"], ["ss"]),
        helper.make_node("Add", ["ss", "attn_mask"], ["sm"]),
        helper.make_node("Shape", ["past_key"], ["shape_k"]),
        helper.make_node("Shape", ["key"], ["shape_n"]),
        helper.make_node("Slice", ["shape_k", "c2", "c3"], ["slots"]),
        helper.make_node("Slice", ["shape_n", "c2", "c3"], ["tokens"]),
        helper.make_node("Add", ["slots", "tokens"], ["total"]),
        helper.make_node("Squeeze", ["total", "c0"], ["total_s"]),
        helper.make_node("Range", ["s0", "total_s", "s1"], ["index"]),
        helper.make_node("Slice", ["positions", "c00", "c11"], ["length"]),
        helper.make_node("Less", ["index", "length"], ["in_prefix"]),
        helper.make_node("GreaterOrEqual", ["index", "slots"], ["is_new"]),
        helper.make_node("Or", ["in_prefix", "is_new"], ["valid"]),
        helper.make_node("Where", ["valid", "sm", "invalid"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("Slice", ["p", "c0", "slots", "cm1"], ["p_cache"]),
        helper.make_node("Slice", ["p", "slots", "total", "cm1"], ["p_new"]),
        helper.make_node("MatMul", ["p_cache", "pv"], ["y_cache"]),
        helper.make_node("MatMul", ["p_new", "vn"], ["y_new"]),
        helper.make_node("Add", ["y_cache", "y_new"], ["Y"]),
    ]
    renames = {"past_key": past_key, "past_value": past_value}
    for node in nodes:
        node.input[:] = [renames.get(name, name) for name in node.input]
    return nodes


def attention_function(opset: int) -> ir.Function:
    """Reference body of ``effc.DecodeAttention`` in standard ONNX ops (opset ≥ 13)."""
    nodes = attention_nodes()
    proto = helper.make_function(EFFC_DOMAIN, OP_TYPE, list(INPUTS), ["Y"], nodes,
                                 [helper.make_opsetid("", opset)], attributes=["scale"])
    return ir.serde.deserialize_function(proto)


def decode_attention(model: ir.Model, inputs: list[ir.Value], scale: float, name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.DecodeAttention`` node; attaches the function body to ``model``.

    Args:
        model: the model the node will be inserted into (receives the function and the ``effc`` opset).
        inputs: the values of :data:`INPUTS`, in that order.
        scale: the score scale.
        name: the node's name.
    """
    add_function(model, attention_function(max(model.opset_imports.get("", 13), 13)))
    return ir.Node(EFFC_DOMAIN, OP_TYPE, inputs, attributes=[ir.AttrFloat32("scale", float(scale))], name=name)


def count_macs(node: ir.Node, slot_axis: int = 2) -> int | None:
    """``Hkv · G · T · (S + T) · D · 2`` (scores and the weighted sum, at a full cache).

    ``S`` is axis ``slot_axis`` of ``past_key`` (2: keys ``(Hkv, D, S)``); None when a shape is not static.
    """
    q, k = static_shape(node.inputs[0]), static_shape(node.inputs[1])
    if q is None or k is None:
        return None
    hkv, g, t, d = q
    return int(hkv * g * t * (k[slot_axis] + t) * d * 2)


SPEC = register_op(OpSpec(OP_TYPE, INPUTS, ("scale",), count_macs, reference))
