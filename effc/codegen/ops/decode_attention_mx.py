"""TVM lowering of ``effc.DecodeAttentionMX``: decode attention over a cache of MX rows, decoded in the slot walk.

Operator and layouts: :mod:`effc.ops.decode_attention_mx` (keys and values both ``(Hkv, S, W)`` uint8: per slot
``D`` element codes then ``D / B`` E8M0 scales). For each KV head and each token of the chunk (one token: heads
serially, :mod:`effc.codegen.ops.decode_attention` measured parallel heads losing; a chunk: its ``Hkv · T`` rows
in parallel), with ``L`` valid slots:

1. scores, one slot at a time (its key row is ``W`` contiguous bytes): per block of ``B`` entries, 8 codes at a time
   are decoded once into a float32x8 (:func:`effc.codegen.ops.kv_blocks.element_vector`) and multiplied into the
   ``G`` query rows' partial sums; each block's sum is scaled by its E8M0 scale once (not per element); the ``G``
   sums are reduced across lanes;
2. the chunk's own scores and the softmax: the shared macros of :func:`effc.codegen.ops.decode_attention.softmax_steps`;
3. ``P · V``, one value row at a time: ``G × D / 8`` vector accumulators; per block the probability of each query
   row is multiplied by the block scale once and the decoded codes are added with that weight.

Keys and values are read once per token as ``2 · Hkv · L · W`` bytes. Requires ``S % 8 == 0`` and
``B % 8 == 0``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from effc.codegen.frontend import register_converter
from effc.codegen.ops.block_quant import _format_attrs
from effc.codegen.ops.decode_attention import _INVALID, LANES, _vec, softmax_steps
from effc.codegen.ops.kv_blocks import e8m0, element_vector
from effc.errors import UnsupportedOpError
from effc.ops.block_formats import BlockFormat
from effc.ops.kv_blocks import row_bytes

__all__ = ["attention_mx_kernel"]


def attention_mx_kernel(hkv: int, g: int, t: int, d: int, s: int, scale: float, fmt: BlockFormat,
                        block_size: int) -> tvm.tirx.PrimFunc:
    """``main(Q, past_key, past_value, key, value, attn_mask, positions, Y)`` of the module docstring.

    Raises:
        ValueError: ``S`` is not a multiple of 8, or ``block_size`` not a multiple of 8 dividing ``D``.
    """
    if s % LANES or block_size % LANES or d % block_size:
        raise ValueError(f"MX decode attention needs S % {LANES} == 0 and head_dim a multiple of block_size, a "
                         f"multiple of {LANES}; got S={s}, D={d}, block_size={block_size}")
    total, dv, nb, vpb, w = s + t, d // LANES, d // block_size, block_size // LANES, row_bytes(d, block_size)
    chunk_scores, softmax = softmax_steps(g, t, d, s, scale)

    def lanes(start):
        return T.ramp(start, 1, LANES)

    @T.macro
    def one_token(h, tok, Q, PK, PV, KN, VN, MASK, POS, Y):
        sc = T.alloc_buffer((g, total), "float32", scope="global")
        acc = T.alloc_buffer((g * dv * LANES,), "float32", scope="global")
        part = T.alloc_buffer((g * LANES,), "float32", scope="global")
        kv = T.alloc_buffer((LANES,), "float32", scope="global")
        row = T.alloc_buffer((2 * g,), "float32", scope="global")  # per query row: max, then sum
        weight = T.alloc_buffer((g,), "float32", scope="global")
        length = T.alloc_buffer((1,), "int32", scope="global")
        length[0] = T.max(T.min(T.Cast("int32", POS[0, 0]), s), 0)
        for jb in range((length[0] + LANES - 1) // LANES):  # slots past L in the last vector: no weight
            for r in T.unroll(g):
                sc[r, lanes(jb * LANES)] = _vec(_INVALID)
        for j in range(length[0]):
            for r in T.unroll(g):
                acc[lanes(r * LANES)] = _vec(0.0)
            for b in T.unroll(nb):
                for r in T.unroll(g):
                    part[lanes(r * LANES)] = _vec(0.0)
                for c in T.unroll(vpb):
                    kv[lanes(0)] = element_vector(PK[h, j, lanes(b * block_size + c * LANES)], fmt)
                    for r in T.unroll(g):
                        part[lanes(r * LANES)] = part[lanes(r * LANES)] + Q[
                            h, r, tok, lanes(b * block_size + c * LANES)] * kv[lanes(0)]
                for r in T.unroll(g):
                    acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + part[lanes(r * LANES)] * T.broadcast(
                        e8m0(PK[h, j, d + b]), LANES)
            for r in T.unroll(g):
                row[r] = acc[r * LANES]
                for i in range(1, LANES):
                    row[r] = row[r] + acc[r * LANES + i]
                sc[r, j] = row[r] * T.float32(scale) + MASK[tok, j]
        chunk_scores(h, tok, Q, KN, MASK, sc, acc, row)
        softmax(sc, acc, row, length)
        for a in range(g * dv):
            acc[lanes(a * LANES)] = _vec(0.0)
        for j in range(length[0]):
            for b in T.unroll(nb):
                for r in T.unroll(g):
                    weight[r] = sc[r, j] * e8m0(PV[h, j, d + b])
                for c in T.unroll(vpb):
                    kv[lanes(0)] = element_vector(PV[h, j, lanes(b * block_size + c * LANES)], fmt)
                    for r in T.unroll(g):
                        acc[lanes((r * dv + b * vpb + c) * LANES)] = acc[lanes(
                            (r * dv + b * vpb + c) * LANES)] + T.broadcast(weight[r], LANES) * kv[lanes(0)]
        for j in range(t):
            for c in range(dv):
                for r in T.unroll(g):
                    acc[lanes((r * dv + c) * LANES)] = acc[lanes((r * dv + c) * LANES)] + T.broadcast(
                        sc[r, s + j], LANES) * VN[h, j, lanes(c * LANES)]
        for r in T.unroll(g):
            for c in range(dv):
                Y[h, r, tok, lanes(c * LANES)] = acc[lanes((r * dv + c) * LANES)] / T.broadcast(
                    row[g + r], LANES)

    @T.prim_func(s_tir=False)
    def main(q_h: T.handle, pk_h: T.handle, pv_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle,
             p_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        Q = T.match_buffer(q_h, (hkv, g, t, d), "float32")
        PK = T.match_buffer(pk_h, (hkv, s, w), "uint8")
        PV = T.match_buffer(pv_h, (hkv, s, w), "uint8")
        KN = T.match_buffer(k_h, (hkv, d, t), "float32")
        VN = T.match_buffer(v_h, (hkv, t, d), "float32")
        MASK = T.match_buffer(m_h, (t, total), "float32")
        POS = T.match_buffer(p_h, (1, t), "int64")
        Y = T.match_buffer(y_h, (hkv, g, t, d), "float32")
        if t > 1:  # a chunk: its tokens and heads are independent rows of work
            for ht in T.parallel(hkv * t):
                one_token(ht // t, ht % t, Q, PK, PV, KN, VN, MASK, POS, Y)
        else:
            for h in range(hkv):
                one_token(h, 0, Q, PK, PV, KN, VN, MASK, POS, Y)

    return main


@register_converter("DecodeAttentionMX")
class DecodeAttentionMXConverter:
    """``effc.DecodeAttentionMX(Q, past_key, past_value, key, value, attn_mask, positions)`` → ``call_tir``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        fmt, bs = _format_attrs(attr)
        q = bb.normalize(inputs[0])
        hkv, g, t, d = (int(x) for x in q.ty.shape.values)
        s = int(bb.normalize(inputs[1]).ty.shape.values[1])
        if s % LANES or bs % LANES or d % bs:
            raise UnsupportedOpError(f"effc.DecodeAttentionMX over a cache of {s} slots, head_dim {d}, blocks of {bs}:"
                                     f" the kernel needs S % {LANES} == 0 and blocks a multiple of {LANES}",
                                     f"compile with a --max-cache that is a multiple of {LANES} and block_size 32")
        func = attention_mx_kernel(hkv, g, t, d, s, float(attr["scale"]), fmt, bs).without_attr("global_symbol")
        gv = bb.add_func(func, "effc_decode_attention_mx")
        return relax.call_tir(gv, [q, *inputs[1:]], out_ty=relax.TensorType([hkv, g, t, d], "float32"))
