"""TVM lowering of ``effc.DecodeAttention``: one pass per KV head over the valid prefix of the cache only.

Operator and layouts: :mod:`effc.ops.decode_attention` (keys cached transposed ``(Hkv, D, S)``, values
``(Hkv, S, D)``). For each KV head (in parallel when the full cache holds enough work) and each token of the chunk,
with ``L = clamp(positions[0, 0], 0, S)`` and ``B = ceil(L / 8)`` vectors of 8 slots:

1. scores: ``s[g, j] = scale · Σ_d Q[h, g, t, d] · K[h, d, j] + mask[t, j]``, 16 slots (two vectors, one cache
   line of a row of ``Kᵀ``) per step, the ``G`` query rows of the group in registers so each key vector is loaded
   once for all of them (GQA); slots past ``L`` in the last step get no weight; then the chunk's own ``T`` keys;
2. softmax: row max, ``exp`` by a vectorized polynomial (Cephes ``2^n · p(r)``, as ``topi.fast_exp``; relative
   error ~1e-7), row sum — in a ``G × (S + T)`` scratch row that stays in L1/L2;
3. ``P · V``: for each 8-wide slice of ``D``, ``G`` accumulators over the ``L`` value rows, then the chunk's ``T``
   values; divided by the row sum.

A chunk of ``T > 1`` tokens (prefill, verification) runs its ``Hkv · T`` (head, token) rows in parallel, and when
``T % 16 == 0`` walks its own keys in vectors as it walks the cache's (prefill of 128 tokens after an empty cache,
one SmolLM2 layer, 1 thread: 10.4 ms → 0.70 ms; the exported pattern scores all ``S`` slots).

Keys and values are read once per token, and only ``L`` slots of them: ``2 · Hkv · L · D · 4`` bytes per layer
instead of ``2 · Hkv · S · D · 4``. KV heads run in parallel once the context holds :data:`PARALLEL_FROM` slots,
else on the calling thread (measured on the shared 2-core machine: parallel lost at every context). Requires
``S % 16 == 0`` and ``D % 8 == 0``. Measured (one SmolLM2 layer, 1 thread, load ~15): 8 µs at 128 slots, 110-120
µs at 2048 (min); the exported attention took 460 µs at any context (docs/notes/cpu_decode.md).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from effc.codegen.frontend import register_converter
from effc.errors import UnsupportedOpError
from effc.ops.decode_attention import HEAD_DIM_MULTIPLE, SLOT_MULTIPLE

__all__ = ["LANES", "attention_kernel"]

LANES = HEAD_DIM_MULTIPLE  # float32 lanes of a 256-bit vector: 8 cache slots or 8 head_dim entries per vector
WIDE = SLOT_MULTIPLE  # slots per score step: 16 = one 64-byte line of each row of Kᵀ
VECS = WIDE // LANES
_INVALID = -3.0e38
#: Context (slots) from which the KV heads run in parallel. Measured 2026-12-07 (load 5-6), 30 SmolLM2 layers with
#: cold caches: heads in parallel on 2 threads 3.5 / 17.4 / 29.3 ms vs serial 0.9 / 9.5 / 19.6 ms at 128 / 1024 /
#: 2048 slots (min of 5); one hot layer at 128 slots 12.6 vs 7.9 µs (load 13). Not shown to win: off until measured
#: on a quiet machine.
PARALLEL_FROM = 1 << 30


def _vec(value: float, dtype: str = "float32"):
    return T.broadcast(T.Cast(dtype, value) if dtype != "float32" else T.float32(value), LANES)


def _fast_exp(x):
    """``exp`` of a float32x8 vector: Cephes range reduction and degree-5 polynomial (TVM ``topi.fast_exp``)."""
    x = T.max(T.min(x, _vec(88.3762626647949)), _vec(-88.3762626647949))
    n = T.floor(x * _vec(1.44269504088896341) + _vec(0.5))
    r = x - n * _vec(0.693359375) - n * _vec(-2.12194440e-4)
    poly = (((((_vec(1.9875691500e-4) * r + _vec(1.3981999507e-3)) * r + _vec(8.3334519073e-3)) * r
              + _vec(4.1665795894e-2)) * r + _vec(1.6666665459e-1)) * r + _vec(5.0000001201e-1))
    two_n = T.reinterpret("float32x8", T.shift_left(T.Cast("int32x8", n) + T.broadcast(T.int32(127), LANES),
                                                    T.broadcast(T.int32(23), LANES)))
    return (poly * r * r + r + _vec(1.0)) * two_n


def softmax_steps(g: int, t: int, d: int, s: int, scale: float):
    """TIR macros shared by the decode-attention kernels, for one KV head ``h`` and one token ``tok`` of the chunk.

    ``chunk_scores(h, tok, Q, KN, MASK, sc, acc, row)``: the scores of the chunk's own ``t`` keys ``KN (Hkv, D, T)``
    into ``sc[:, s:]`` (16 at a time when ``t % 16 == 0``, else one by one). ``softmax(sc, acc, row, length)``: row
    max, ``exp`` and row sum over the ``length[0]`` cache slots (vectors of 8; ``sc`` holds ``_INVALID`` up to the
    next multiple of 8 past ``length``) and the chunk's tokens; ``row[r]`` gets the max and ``row[g + r]`` the sum of
    query row ``r``, ``sc`` the unnormalized probabilities. ``acc`` is scratch of ``g · 16`` floats at least.
    """
    chunk_vectors = t % WIDE == 0  # the chunk's own keys walk in vectors too (prefill); else one by one (decode)

    def lanes(start):
        return T.ramp(start, 1, LANES)

    @T.macro
    def chunk_scores(h, tok, Q, KN, MASK, sc, acc, row):
        if chunk_vectors:  # the chunk's own keys, 16 at a time, as the cache's
            for jb in range(t // WIDE):
                for a in T.unroll(g * VECS):
                    acc[lanes(a * LANES)] = _vec(0.0)
                for k in range(d):
                    for a in T.unroll(g * VECS):
                        acc[lanes(a * LANES)] = acc[lanes(a * LANES)] + T.broadcast(
                            Q[h, a // VECS, tok, k], LANES) * KN[h, k, lanes(jb * WIDE + a % VECS * LANES)]
                for a in T.unroll(g * VECS):
                    sc[a // VECS, lanes(s + jb * WIDE + a % VECS * LANES)] = (
                        acc[lanes(a * LANES)] * _vec(scale) + MASK[tok, lanes(s + jb * WIDE + a % VECS * LANES)])
        else:
            for j in range(t):
                for r in T.unroll(g):
                    row[r] = T.float32(0)
                    for k in range(d):
                        row[r] = row[r] + Q[h, r, tok, k] * KN[h, k, j]
                    sc[r, s + j] = row[r] * T.float32(scale) + MASK[tok, s + j]

    @T.macro
    def softmax(sc, acc, row, length):
        for r in T.unroll(g):
            acc[lanes(r * LANES)] = _vec(_INVALID)
            for jb in range((length[0] + LANES - 1) // LANES):
                acc[lanes(r * LANES)] = T.max(acc[lanes(r * LANES)], sc[r, lanes(jb * LANES)])
            if chunk_vectors:
                for jb in range(t // LANES):
                    acc[lanes(r * LANES)] = T.max(acc[lanes(r * LANES)], sc[r, lanes(s + jb * LANES)])
            row[r] = acc[r * LANES]
            for i in range(1, LANES):
                row[r] = T.max(row[r], acc[r * LANES + i])
            if not chunk_vectors:
                for j in range(t):
                    row[r] = T.max(row[r], sc[r, s + j])
            acc[lanes(r * LANES)] = _vec(0.0)
            for jb in range((length[0] + LANES - 1) // LANES):
                sc[r, lanes(jb * LANES)] = T.Select(
                    lanes(jb * LANES) < T.broadcast(length[0], LANES),
                    _fast_exp(sc[r, lanes(jb * LANES)] - T.broadcast(row[r], LANES)), _vec(0.0))
                acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + sc[r, lanes(jb * LANES)]
            if chunk_vectors:
                for jb in range(t // LANES):
                    sc[r, lanes(s + jb * LANES)] = _fast_exp(sc[r, lanes(s + jb * LANES)] - T.broadcast(row[r], LANES))
                    acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + sc[r, lanes(s + jb * LANES)]
            row[g + r] = acc[r * LANES]
            for i in range(1, LANES):
                row[g + r] = row[g + r] + acc[r * LANES + i]
            if not chunk_vectors:
                for j in range(t):
                    sc[r, s + j] = T.exp(sc[r, s + j] - row[r])
                    row[g + r] = row[g + r] + sc[r, s + j]

    return chunk_scores, softmax


def attention_kernel(hkv: int, g: int, t: int, d: int, s: int, scale: float,
                     parallel_from: int) -> tvm.tirx.PrimFunc:
    """``main(Q, past_key, past_value, key, value, attn_mask, positions, Y)`` of the module docstring.

    KV heads run in parallel when the context ``L`` reaches ``parallel_from`` slots (decided per call), else on the
    calling thread (waking the pool costs more than a short context's attention).

    Raises:
        ValueError: ``S`` or ``D`` is not a multiple of 8.
    """
    if s % WIDE or d % LANES:
        raise ValueError(f"decode attention needs S % {WIDE} == 0 and D % {LANES} == 0, got S={s}, D={d}")
    total, dv = s + t, d // LANES
    parallel_from = T.int64(min(parallel_from, 2**62))
    chunk_scores, softmax = softmax_steps(g, t, d, s, scale)

    def lanes(start):
        return T.ramp(start, 1, LANES)

    @T.macro
    def one_token(h, tok, Q, PK, PV, KN, VN, MASK, POS, Y):
        sc = T.alloc_buffer((g, total), "float32", scope="global")
        acc = T.alloc_buffer((g * VECS * LANES,), "float32", scope="global")
        row = T.alloc_buffer((2 * g,), "float32", scope="global")  # per query row: max, then sum
        length = T.alloc_buffer((1,), "int32", scope="global")
        length[0] = T.max(T.min(T.Cast("int32", POS[0, 0]), s), 0)
        for jb in range((length[0] + WIDE - 1) // WIDE):
            for a in T.unroll(g * VECS):
                acc[lanes(a * LANES)] = _vec(0.0)
            for k in range(d):
                for a in T.unroll(g * VECS):
                    acc[lanes(a * LANES)] = acc[lanes(a * LANES)] + T.broadcast(
                        Q[h, a // VECS, tok, k], LANES) * PK[h, k, lanes(jb * WIDE + a % VECS * LANES)]
            for a in T.unroll(g * VECS):
                sc[a // VECS, lanes(jb * WIDE + a % VECS * LANES)] = T.Select(
                    lanes(jb * WIDE + a % VECS * LANES) < T.broadcast(length[0], LANES),
                    acc[lanes(a * LANES)] * _vec(scale) + MASK[tok, lanes(jb * WIDE + a % VECS * LANES)],
                    _vec(_INVALID))
        chunk_scores(h, tok, Q, KN, MASK, sc, acc, row)
        softmax(sc, acc, row, length)
        for c in range(dv):
            for r in T.unroll(g):
                acc[lanes(r * LANES)] = _vec(0.0)
            for j in range(length[0]):
                for r in T.unroll(g):
                    acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + T.broadcast(
                        sc[r, j], LANES) * PV[h, j, lanes(c * LANES)]
            for j in range(t):
                for r in T.unroll(g):
                    acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + T.broadcast(
                        sc[r, s + j], LANES) * VN[h, j, lanes(c * LANES)]
            for r in T.unroll(g):
                Y[h, r, tok, lanes(c * LANES)] = acc[lanes(r * LANES)] / T.broadcast(row[g + r], LANES)

    @T.prim_func(s_tir=False)
    def main(q_h: T.handle, pk_h: T.handle, pv_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle,
             p_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        Q = T.match_buffer(q_h, (hkv, g, t, d), "float32")
        PK = T.match_buffer(pk_h, (hkv, d, s), "float32")
        PV = T.match_buffer(pv_h, (hkv, s, d), "float32")
        KN = T.match_buffer(k_h, (hkv, d, t), "float32")
        VN = T.match_buffer(v_h, (hkv, t, d), "float32")
        MASK = T.match_buffer(m_h, (t, total), "float32")
        POS = T.match_buffer(p_h, (1, t), "int64")
        Y = T.match_buffer(y_h, (hkv, g, t, d), "float32")
        if t > 1:  # a chunk: its tokens and heads are independent rows of work
            for ht in T.parallel(hkv * t):
                one_token(ht // t, ht % t, Q, PK, PV, KN, VN, MASK, POS, Y)
        elif POS[0, 0] >= parallel_from:  # enough slots to pay for waking the thread pool
            for h in T.parallel(hkv):
                one_token(h, 0, Q, PK, PV, KN, VN, MASK, POS, Y)
        else:
            for h in range(hkv):
                one_token(h, 0, Q, PK, PV, KN, VN, MASK, POS, Y)

    return main


@register_converter("DecodeAttention")
class DecodeAttentionConverter:
    """``effc.DecodeAttention(Q, past_key, past_value, key, value, attn_mask, positions)`` → ``call_tir``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        q = bb.normalize(inputs[0])
        hkv, g, t, d = (int(x) for x in q.ty.shape.values)
        s = int(bb.normalize(inputs[1]).ty.shape.values[2])
        if s % WIDE or d % LANES:
            raise UnsupportedOpError(f"effc.DecodeAttention over a cache of {s} slots × head_dim {d}: the kernel "
                                     f"needs S % {WIDE} == 0 and D % {LANES} == 0",
                                     f"compile with a --max-cache that is a multiple of {WIDE}")
        func = attention_kernel(hkv, g, t, d, s, float(attr["scale"]), PARALLEL_FROM).without_attr("global_symbol")
        gv = bb.add_func(func, "effc_decode_attention")
        return relax.call_tir(gv, [q, *inputs[1:]], out_ty=relax.TensorType([hkv, g, t, d], "float32"))
