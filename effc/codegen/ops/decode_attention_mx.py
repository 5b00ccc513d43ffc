"""TVM lowering of ``effc.DecodeAttentionMX``: decode attention over a cache of MX rows, decoded in the slot walk.

Operator and layouts: :mod:`effc.ops.decode_attention_mx` (keys and values both ``(Hkv, S, W)`` uint8: per slot
``D`` element codes then ``D / B`` E8M0 scales). The kernel is
:func:`effc.codegen.ops.decode_attention.attention_kernel` (parallel split, the chunk's own keys and values,
softmax, output) with the cache reader :func:`mx_cache`, which walks the ``L`` valid slots one row at a time:

1. scores (its key row is ``W`` contiguous bytes): per block of ``B`` entries, 8 codes at a time are decoded once
   into a float32x8 (:func:`effc.codegen.ops.kv_blocks.element_vector`) and multiplied into the ``G`` query rows'
   partial sums; each block's sum is scaled by its E8M0 scale once (not per element); the ``G`` sums are reduced
   across lanes;
2. ``P · V``, one value row at a time: ``G × D / 8`` vector accumulators; per block the probability of each query
   row is multiplied by the block scale once and the decoded codes are added with that weight.

Keys and values are read once per token as ``2 · Hkv · L · W`` bytes. Requires ``S % 8 == 0`` and
``B % 8 == 0``.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from effc.codegen.frontend import register_converter
from effc.codegen.ops.block_quant import _format_attrs
from effc.codegen.ops.decode_attention import (
    _INVALID,
    LANES,
    PARALLEL_FROM,
    CacheReader,
    _vec,
    attention_call,
    attention_kernel,
    lanes,
)
from effc.codegen.ops.kv_blocks import e8m0, element_vector
from effc.ops.block_formats import BlockFormat
from effc.ops.kv_blocks import row_bytes

__all__ = ["attention_mx_kernel", "mx_cache"]


def mx_cache(g: int, d: int, s: int, scale: float, fmt: BlockFormat, block_size: int) -> CacheReader:
    """The reader of a cache of MX rows: keys and values both ``(S, W)`` uint8, decoded slot by slot.

    Scores: one key row at a time; per block, 8 codes decoded once into a float32x8 for the ``g`` query rows'
    partial sums, the block sum scaled once, the ``g`` sums reduced across lanes. Values: one pass over whole rows
    (``D / 8`` accumulators per query row); per block the probability is multiplied by the block scale once.

    Raises:
        ValueError: ``S`` is not a multiple of 8, or ``block_size`` not a multiple of 8 dividing ``D``.
    """
    if s % LANES or block_size % LANES or d % block_size:
        raise ValueError(f"MX decode attention needs S % {LANES} == 0 and head_dim a multiple of block_size, a "
                         f"multiple of {LANES}; got S={s}, D={d}, block_size={block_size}")
    nb, vpb, w = d // block_size, block_size // LANES, row_bytes(d, block_size)

    @T.macro
    def scores(h, tok, Q, PK, MASK, sc, acc, length):
        part = T.alloc_buffer((g * LANES,), "float32", scope="global")
        kv = T.alloc_buffer((LANES,), "float32", scope="global")
        dot = T.alloc_buffer((g,), "float32", scope="global")
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
                dot[r] = acc[r * LANES]
                for i in range(1, LANES):
                    dot[r] = dot[r] + acc[r * LANES + i]
                sc[r, j] = dot[r] * T.float32(scale) + MASK[tok, j]

    @T.macro
    def values(h, c0, PV, sc, acc, length):
        kv = T.alloc_buffer((LANES,), "float32", scope="global")
        weight = T.alloc_buffer((g,), "float32", scope="global")
        for j in range(length[0]):
            for b in T.unroll(nb):
                for r in T.unroll(g):
                    weight[r] = sc[r, j] * e8m0(PV[h, j, d + c0 // vpb + b])
                for c in T.unroll(vpb):
                    kv[lanes(0)] = element_vector(PV[h, j, lanes((c0 + b * vpb + c) * LANES)], fmt)
                    for r in T.unroll(g):
                        acc[lanes((r * nb * vpb + b * vpb + c) * LANES)] = acc[lanes(
                            (r * nb * vpb + b * vpb + c) * LANES)] + T.broadcast(weight[r], LANES) * kv[lanes(0)]

    return CacheReader((s, w), (s, w), "uint8", nb * vpb, scores, values)


def attention_mx_kernel(hkv: int, g: int, t: int, d: int, s: int, scale: float, fmt: BlockFormat,
                        block_size: int, parallel_from: int = PARALLEL_FROM) -> tvm.tirx.PrimFunc:
    """``main(Q, past_key, past_value, key, value, attn_mask, positions, Y)``: :func:`attention_kernel` over MX rows.

    Raises:
        ValueError: as :func:`mx_cache`.
    """
    return attention_kernel(hkv, g, t, d, s, scale, parallel_from, mx_cache(g, d, s, scale, fmt, block_size))


@register_converter("DecodeAttentionMX")
class DecodeAttentionMXConverter:
    """``effc.DecodeAttentionMX(Q, past_key, past_value, key, value, attn_mask, positions)`` → ``call_tir``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        (fmt, bs), scale = _format_attrs(attr), float(attr["scale"])
        return attention_call(bb, inputs, 1, lambda *shape: attention_mx_kernel(*shape, scale, fmt, bs),
                              "effc_decode_attention_mx",
                              f"compile with a --max-cache that is a multiple of {LANES} and block_size 32")
