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

One factory, :func:`attention_kernel`, builds the kernel for every cache layout: a :class:`CacheReader` gives the
cache's buffers and its two walks (the scores of step 1 and the value rows of step 3; :func:`float32_cache` here,
:func:`effc.codegen.ops.decode_attention_mx.mx_cache` for MX rows decoded in the walk); the chunk's own keys and
values, the softmax, the output and the parallel split are the same for all.

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

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.script import tirx as T

from effc.codegen.frontend import register_converter
from effc.ops.decode_attention import HEAD_DIM_MULTIPLE, SLOT_MULTIPLE

__all__ = ["LANES", "CacheReader", "attention_call", "attention_kernel", "float32_cache"]

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


def lanes(start):
    """The ``LANES`` consecutive indices from ``start`` (a vector access)."""
    return T.ramp(start, 1, LANES)


def key_step(g: int, d: int):
    """TIR macro ``(h, tok, Q, K, jb, acc)``: one 16-slot step over transposed keys ``K (Hkv, D, ·)``.

    ``acc[a · 8 : a · 8 + 8]`` (``a < 2 g``) gets the unscaled dot products of query row ``a // 2`` with keys
    ``16 jb + 8 (a % 2)`` to ``16 jb + 8 (a % 2) + 7``.
    """

    @T.macro
    def step(h, tok, Q, K, jb, acc):
        for a in T.unroll(g * VECS):
            acc[lanes(a * LANES)] = _vec(0.0)
        for k in range(d):
            for a in T.unroll(g * VECS):
                acc[lanes(a * LANES)] = acc[lanes(a * LANES)] + T.broadcast(
                    Q[h, a // VECS, tok, k], LANES) * K[h, k, lanes(jb * WIDE + a % VECS * LANES)]

    return step


def softmax_steps(g: int, t: int, d: int, s: int, scale: float):
    """TIR macros shared by the decode-attention kernels, for one KV head ``h`` and one token ``tok`` of the chunk.

    ``chunk_scores(h, tok, Q, KN, MASK, sc, acc, row)``: the scores of the chunk's own ``t`` keys ``KN (Hkv, D, T)``
    into ``sc[:, s:]`` (16 at a time when ``t % 16 == 0``, else one by one). ``softmax(sc, acc, row, length)``: row
    max, ``exp`` and row sum over the ``length[0]`` cache slots (vectors of 8; ``sc`` holds ``_INVALID`` up to the
    next multiple of 8 past ``length``) and the chunk's tokens; ``row[r]`` gets the max and ``row[g + r]`` the sum of
    query row ``r``, ``sc`` the unnormalized probabilities. ``acc`` is scratch of ``g · 16`` floats at least.
    """
    chunk_vectors = t % WIDE == 0  # the chunk's own keys walk in vectors too (prefill); else one by one (decode)

    keys = key_step(g, d)

    @T.macro
    def chunk_scores(h, tok, Q, KN, MASK, sc, acc, row):
        if chunk_vectors:  # the chunk's own keys, 16 at a time, as the cache's
            for jb in range(t // WIDE):
                keys(h, tok, Q, KN, jb, acc)
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


@dataclass(frozen=True)
class CacheReader:
    """How :func:`attention_kernel` reads one layout of the KV cache: buffer shapes and the two cache walks.

    Attributes:
        key_shape: shape of ``past_key`` after the ``Hkv`` axis (float32: ``(D, S)``, keys transposed).
        value_shape: shape of ``past_value`` after the ``Hkv`` axis.
        dtype: element type of both cache buffers.
        slices: 8-wide slices of ``D`` accumulated per pass over the value rows (1: a pass per slice, ``D / 8``:
            one pass over whole rows); divides ``D / 8``.
        scores: TIR macro ``(h, tok, Q, PK, MASK, sc, acc, length)`` that writes ``sc[r, j]`` = scaled score plus
            mask for the ``length[0]`` valid slots of KV head ``h`` and ``_INVALID`` up to the next multiple of
            8 slots (``acc``: scratch of ``g · 16`` floats).
        values: TIR macro ``(h, c0, PV, sc, acc, length)`` that adds ``Σ_j sc[r, j] · V[h, j, (c0 + c) · 8 :]``
            over the ``length[0]`` valid rows to ``acc[(r · slices + c) · 8 :]`` (``c < slices``, 8 floats each).
    """

    key_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    dtype: str
    slices: int
    scores: Callable
    values: Callable


def float32_cache(g: int, d: int, s: int, scale: float) -> CacheReader:
    """The reader of the float32 cache of :mod:`effc.ops.decode_attention`: keys ``(D, S)``, values ``(S, D)``.

    Scores: 16 slots of a row of ``Kᵀ`` per step for the ``g`` query rows. Values: one 8-wide slice of ``D`` per
    pass over the value rows (``g`` accumulators in registers).

    Raises:
        ValueError: ``S`` is not a multiple of 16 or ``D`` of 8.
    """
    if s % WIDE or d % LANES:
        raise ValueError(f"decode attention needs S % {WIDE} == 0 and D % {LANES} == 0, got S={s}, D={d}")

    keys = key_step(g, d)

    @T.macro
    def scores(h, tok, Q, PK, MASK, sc, acc, length):
        for jb in range((length[0] + WIDE - 1) // WIDE):
            keys(h, tok, Q, PK, jb, acc)
            for a in T.unroll(g * VECS):
                sc[a // VECS, lanes(jb * WIDE + a % VECS * LANES)] = T.Select(
                    lanes(jb * WIDE + a % VECS * LANES) < T.broadcast(length[0], LANES),
                    acc[lanes(a * LANES)] * _vec(scale) + MASK[tok, lanes(jb * WIDE + a % VECS * LANES)],
                    _vec(_INVALID))

    @T.macro
    def values(h, c0, PV, sc, acc, length):
        for j in range(length[0]):
            for r in T.unroll(g):
                acc[lanes(r * LANES)] = acc[lanes(r * LANES)] + T.broadcast(
                    sc[r, j], LANES) * PV[h, j, lanes(c0 * LANES)]

    return CacheReader((d, s), (s, d), "float32", 1, scores, values)


def attention_kernel(hkv: int, g: int, t: int, d: int, s: int, scale: float, parallel_from: int,
                     cache: CacheReader | None = None) -> tvm.tirx.PrimFunc:
    """``main(Q, past_key, past_value, key, value, attn_mask, positions, Y)`` of the module docstring.

    The cache is read through ``cache`` (default: :func:`float32_cache`); the chunk's own keys and values, the
    softmax and the output are the same for every cache layout. KV heads run in parallel when the context ``L``
    reaches ``parallel_from`` slots (decided per call), else on the calling thread (waking the pool costs more than
    a short context's attention).

    Raises:
        ValueError: ``D`` is not a multiple of 8, or the cache reader refuses the shape (:func:`float32_cache`).
    """
    cache = cache or float32_cache(g, d, s, scale)
    if d % LANES or s % LANES or (d // LANES) % cache.slices:
        raise ValueError(f"decode attention needs S and D multiples of {LANES}, got S={s}, D={d}")
    total, slices, passes = s + t, cache.slices, d // LANES // cache.slices
    key_shape, value_shape, dtype = (hkv, *cache.key_shape), (hkv, *cache.value_shape), cache.dtype
    scratch = g * max(VECS, slices) * LANES
    parallel_from = T.int64(min(parallel_from, 2**62))
    chunk_scores, softmax = softmax_steps(g, t, d, s, scale)
    cache_scores, cache_values = cache.scores, cache.values

    @T.macro
    def one_token(h, tok, Q, PK, PV, KN, VN, MASK, POS, Y):
        sc = T.alloc_buffer((g, total), "float32", scope="global")
        acc = T.alloc_buffer((scratch,), "float32", scope="global")
        row = T.alloc_buffer((2 * g,), "float32", scope="global")  # per query row: max, then sum
        length = T.alloc_buffer((1,), "int32", scope="global")
        length[0] = T.max(T.min(T.Cast("int32", POS[0, 0]), s), 0)
        cache_scores(h, tok, Q, PK, MASK, sc, acc, length)
        chunk_scores(h, tok, Q, KN, MASK, sc, acc, row)
        softmax(sc, acc, row, length)
        for p in range(passes):
            for a in T.unroll(g * slices):
                acc[lanes(a * LANES)] = _vec(0.0)
            cache_values(h, p * slices, PV, sc, acc, length)
            for j in range(t):
                for c in range(slices):
                    for r in T.unroll(g):
                        acc[lanes((r * slices + c) * LANES)] = acc[lanes((r * slices + c) * LANES)] + T.broadcast(
                            sc[r, s + j], LANES) * VN[h, j, lanes((p * slices + c) * LANES)]
            for r in T.unroll(g):
                for c in range(slices):
                    Y[h, r, tok, lanes((p * slices + c) * LANES)] = acc[lanes(
                        (r * slices + c) * LANES)] / T.broadcast(row[g + r], LANES)

    @T.prim_func(s_tir=False)
    def main(q_h: T.handle, pk_h: T.handle, pv_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle,
             p_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        Q = T.match_buffer(q_h, (hkv, g, t, d), "float32")
        PK = T.match_buffer(pk_h, key_shape, dtype)
        PV = T.match_buffer(pv_h, value_shape, dtype)
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


def attention_call(bb, inputs, slot_axis: int, kernel: Callable[..., tvm.tirx.PrimFunc], name: str, fix: str):
    """``call_tir`` of a decode-attention kernel on a converter's inputs; ``Y`` has the shape of ``Q``.

    Args:
        bb: the Relax block builder.
        inputs: ``(Q, past_key, past_value, key, value, attn_mask, positions)``.
        slot_axis: the axis of ``past_key`` that counts the cache slots ``S``.
        kernel: ``kernel(hkv, g, t, d, s) -> PrimFunc``; raises ValueError for shapes it cannot read.
        name: the kernel's name in the module.
        fix: what the user can change when the kernel refuses the shapes.

    Raises:
        NotImplementedError: the kernel refuses the shapes (effc's frontend reports it with the node's name).
    """
    q = bb.normalize(inputs[0])
    hkv, g, t, d = (int(x) for x in q.ty.shape.values)
    s = int(bb.normalize(inputs[1]).ty.shape.values[slot_axis])
    try:
        func = kernel(hkv, g, t, d, s)
    except ValueError as exc:
        raise NotImplementedError(f"{exc}; fix: {fix}") from exc
    gv = bb.add_func(func.without_attr("global_symbol"), name)
    return relax.call_tir(gv, [q, *inputs[1:]], out_ty=relax.TensorType([hkv, g, t, d], "float32"))


@register_converter("DecodeAttention")
class DecodeAttentionConverter:
    """``effc.DecodeAttention(Q, past_key, past_value, key, value, attn_mask, positions)`` → ``call_tir``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        scale = float(attr["scale"])
        return attention_call(bb, inputs, 2, lambda *shape: attention_kernel(*shape, scale, PARALLEL_FROM),
                              "effc_decode_attention", f"compile with a --max-cache that is a multiple of {WIDE}")
