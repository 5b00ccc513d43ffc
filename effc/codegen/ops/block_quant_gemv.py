"""Decode-in-GEMV kernels of ``effc.BlockQuantMatMul`` for one activation row (batch-1 decoding), x86 AVX2.

Decoding one token reads every weight once: the packed blocks are the whole cost, so each is streamed once, decoded
in registers and multiplied in fp32 (``Y (1, N) = X (1, K) @ W``; weights only, the activation stays fp32, so the
result equals the ONNX function body up to fp32 summation order)::

    Y[j] = sum_b  scale(S[j, b]) * sum_{k in block b} X[k] * element(code(W, j, k))  (+ M[j, b] * sum_{k in b} X[k])

Kernel layout (:func:`kernel_rows`, shared with the prefill GEMM and the embedding lookup, so a tied embedding and
the two entry points keep one copy of the constant): one row per output channel ``j``, codes along K. 8-bit codes as
in ONNX; 4-bit codes in chunks of 64 (two blocks, 32 bytes): element ``64q + 8i + l`` is nibble ``i`` of the
little-endian int32 lane ``l`` of chunk ``q``, so one 32-byte load and a shift by ``4i`` give 8 consecutive
elements in 8 lanes without a shuffle. Scales ``S (N, K/32)`` as in ONNX.

Per 8 weights: 4-bit: one ``vpermi2ps`` lookup in the format's 16-entry value table with AVX-512VL, else two
``vpermps`` lookups (the index uses the low 3 bits) and a ``vblendvps`` on bit 3 (moved to the sign bit); 8-bit:
``vpmovsxbd`` + ``vcvtdq2ps``; then one FMA with ``X``. E8M0 scales are the float32 with exponent bits ``S`` (``2^(S
- 127)``; MXINT8's ``2^-6`` folds into it), int scales (float16 / float32) are converted. Asymmetric blocks
(``int4_asym``, GGUF Q4_1: ``w = d * q + m``) look up the unsigned codes like the other 4-bit formats and add the
minimum as ``m * sum(X over the block)``: the block sums of ``X`` are computed once per call, and the minimums are
kept tile-major (:func:`kernel_minimums`: the ``ROWS`` minimums of a tile's block side by side), so one 4-lane
``vcvtph2ps`` + FMA per block adds the minimum terms of all rows of the tile (a per-row broadcast of ``m``, as the
scales need, made the kernel 23% slower: 12.8 vs 15.7 G weights/s, Zen 4, 576×1536 in L2, 1 thread, load 6).
``ROWS`` output channels
per tile give independent accumulator chains; tiles run in parallel over the threads (each streams a contiguous part
of ``W``) when ``K * N`` reaches the target's ``min_parallel_gemv``; each row is prefetched ``PREFETCH_BYTES`` ahead
(:func:`prefetch`). OCP MX v1.0 sections 5.3 and 6.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from effc.codegen.ops.block_quant_int8 import current_tile_config, supports_int8_gemm
from effc.ops.bitpack import unpack_codes
from effc.ops.block_formats import BlockFormat

__all__ = ["ROWS", "gemv_applies", "gemv_kernel", "hsum", "kernel_minimums", "kernel_rows", "prefetch", "row_code",
           "row_minimum"]

BLOCK = 32
LANES = 8
ROWS = 4  # output channels per tile: independent FMA chains
CHUNK = 64  # 4-bit weights per 32-byte load: 8 int32 lanes of 8 nibbles
PREFETCH_BYTES = 8192  # software prefetch distance along the weight stream


def kernel_rows(wq: np.ndarray, fmt: BlockFormat, k: int) -> np.ndarray:
    """ONNX rows ``(N, K * bits / 8)`` → kernel rows (module docstring): 4-bit lane-nibble chunks, 6-bit + 1 pad byte.

    Args:
        wq: packed codes of :mod:`effc.ops.bitpack` (little-endian bit stream per row).
        fmt: their format.
        k: codes per row (the reduction size).

    Returns:
        uint8 ``(N, K * bits / 8)`` (6-bit: one more zero byte per row so that a code straddling two bytes never
        reads past the row). 4-bit with ``K % 64 == 0``: element ``64q + 8i + l`` in nibble ``i`` of the
        little-endian int32 lane ``l`` of the 32-byte chunk ``q``; other 4-bit rows as in ONNX.
    """
    if fmt.bits == 4 and k % CHUNK == 0:
        codes = unpack_codes(wq, 4, k).reshape(len(wq), k // CHUNK, 4, 2, LANES)  # (N, q, i // 2, i % 2, l)
        pairs = codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)  # (N, q, byte i // 2 of the lane, l)
        return np.ascontiguousarray(pairs.transpose(0, 1, 3, 2).reshape(len(wq), k // 2))
    if fmt.bits == 6:
        return np.ascontiguousarray(np.concatenate([wq, np.zeros((len(wq), 1), np.uint8)], axis=1))
    return np.ascontiguousarray(wq)


def kernel_minimums(low: np.ndarray) -> np.ndarray:
    """ONNX block minimums ``(N, K/32)`` → tile-major ``(ceil(N / ROWS), K/32, ROWS)`` (zero rows pad the last tile).

    Element ``[j // ROWS, b, j % ROWS]`` is the minimum of block ``b`` of output channel ``j`` (same dtype).
    """
    n, blocks = low.shape
    padded = np.zeros((-(-n // ROWS) * ROWS, blocks), low.dtype)
    padded[:n] = low
    return np.ascontiguousarray(padded.reshape(-1, ROWS, blocks).transpose(0, 2, 1))


def row_minimum(m, row, b):
    """float32 minimum of block ``b`` of row ``row`` from a :func:`kernel_minimums` buffer ``m``."""
    return m[row // ROWS, b, row % ROWS].astype("float32")


def row_code(t, row, c, bits: int, k: int):
    """Unsigned code (int32 expression) of element ``c`` of row ``row`` of a :func:`kernel_rows` buffer ``t``."""
    if bits == 8:
        return t[row, c].astype("int32")
    if bits == 4 and k % CHUNK == 0:
        i, lane = (c % CHUNK) // LANES, c % LANES
        return (t[row, (c // CHUNK) * 32 + lane * 4 + i // 2].astype("int32") >> ((i % 2) * 4)) & 15
    off = c * bits
    lo = t[row, off // 8].astype("int32") | (t[row, off // 8 + 1].astype("int32") << 8)
    return (lo >> (off % 8)) & ((1 << bits) - 1)


def gemv_applies(fmt: BlockFormat, block_size: int, k: int, n: int) -> bool:
    """Whether a one-row ``BlockQuantMatMul`` lowers to :func:`gemv_kernel`.

    4-bit (``K`` a multiple of 64) and integer 8-bit formats (``mxfp4``, ``int4``, ``mxint8``, ``int8``) with blocks
    of 32, ``N`` a multiple of :data:`ROWS`, and an x86 target with AVX2 in scope; otherwise the decode-in-GEMM
    kernel runs with one row.
    """
    coded = (fmt.bits == 4 and k % CHUNK == 0) or fmt.kind in ("mxint", "int")
    return (coded and block_size == BLOCK and k % BLOCK == 0 and n % ROWS == 0
            and supports_int8_gemm(tvm.target.Target.current(allow_none=True)))


def prefetch(w, row, col):
    """Prefetch (to all cache levels) the weight bytes at ``w[row, col]`` (``PREFETCH_BYTES`` ahead of the read).

    Decode streams each weight row from DRAM once per token; the hardware prefetchers stop at every 4 KiB page, so
    the GEMVs read ahead in software (past the end of ``w`` it is harmless: a prefetch never faults).
    """
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(w[row, col]), T.int32(0), T.int32(3),
                              T.int32(1))


def _vec(r):
    return T.ramp(r * LANES, 1, LANES)


def _scale(s, j, b, fmt: BlockFormat):
    """float32 value of block ``b`` of row ``j``: E8M0 → exponent bits (MXINT8: times 2^-6), int → converted."""
    if fmt.is_mx:
        value = T.reinterpret("float32", T.shift_left(T.Cast("int32", s[j, b]), 23))
        return value * T.float32(1.0 / 64.0) if fmt.kind == "mxint" else value
    return T.Cast("float32", s[j, b])


def _has_avx512vl_in(target: tvm.target.Target | None) -> bool:
    """Whether ``target`` has AVX-512VL (``vpermi2ps`` on 256-bit vectors: a 16-entry lookup)."""
    from tvm.target import codegen

    try:
        return target is not None and bool(codegen.target_has_features("avx512vl", target))
    except Exception:  # noqa: BLE001  (a non-x86 triple has no such feature name)
        return False


def _lut(lut, raw, nibble: int, wide: bool):
    """float32x8 values of nibble ``nibble`` of 8 int32 lanes ``raw`` (the format's 16-entry table ``lut``).

    ``wide`` (AVX-512VL): one ``vpermi2ps`` over the 16 entries held in two registers (it reads the low 4 bits of
    ``raw >> 4 nibble``); else two 8-entry ``vpermps`` lookups (low 3 bits) and a ``vblendvps`` on the nibble's bit 3
    moved to the sign bit. Zen 4, 576×1536 in L2, 1 thread, load 8: two ``vpermps`` + blend per 8 weights (and a
    ``vpmovzxbd`` per 8) 10.9 G weights/s; ``vpermi2ps`` 14.7; one 32-byte load per 64 weights (this layout) 20.
    """
    codes = T.shift_right(raw, T.broadcast(T.int32(4 * nibble), LANES)) if nibble else raw
    if wide:
        return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx512.vpermi2var.ps.256", lut[T.ramp(0, 1, LANES)],
                                       codes, lut[T.ramp(LANES, 1, LANES)])
    lo = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", lut[T.ramp(0, 1, LANES)], codes)
    hi = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", lut[T.ramp(LANES, 1, LANES)], codes)
    bit3 = T.shift_left(raw, T.broadcast(T.int32(28 - 4 * nibble), LANES)) if nibble < 7 else raw
    return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.blendv.ps.256", lo, hi, T.reinterpret("float32x8", bit3))


def _dot4(x, w, lut, j, q, half: int, wide: bool):
    """float32x8 partial sums of block ``2q + half`` of row ``j`` with ``X``.

    The block's 32 weights are nibbles ``4 half`` to ``4 half + 3`` of the 8 lanes of chunk ``q`` (one 32-byte load).
    """
    raw = T.reinterpret("int32x8", w[j, T.ramp(q * 32, 1, 32)])
    total = None
    for nibble in range(4 * half, 4 * half + 4):
        part = x[0, T.ramp(q * CHUNK + nibble * LANES, 1, LANES)] * _lut(lut, raw, nibble, wide)
        total = part if total is None else total + part
    return total


def _dot8(x, w, j, b):
    """float32x8 partial sums of one block of 32 signed 8-bit weights of row ``j`` with ``X`` (32 bytes)."""
    total = None
    for g in range(BLOCK // LANES):
        codes = T.Cast("float32x8", T.Cast("int32x8", T.reinterpret("int8x8", w[j, T.ramp(b * BLOCK + g * LANES, 1,
                                                                                            LANES)])))
        part = x[0, T.ramp(b * BLOCK + g * LANES, 1, LANES)] * codes
        total = part if total is None else total + part
    return total


def hsum(acc, r):
    """Sum of the ``LANES`` lanes of row ``r`` of ``acc`` (a flat buffer of ``rows * LANES`` accumulators)."""
    total = acc[r * LANES]
    for lane in range(1, LANES):
        total = total + acc[r * LANES + lane]
    return total


def gemv_kernel(k: int, n: int, fmt: BlockFormat, scale_dtype: str) -> tvm.tirx.PrimFunc:
    """``main(X (1, K) f32, W (N, K*bits/8) u8, S (N, K/32), [M (N/4, K/32, 4),] [LUT (16,) f32,] Y (1, N) f32)``.

    See the module docstring. The 16-entry value table ``LUT`` (:meth:`BlockFormat.code_table`) is an input of the
    4-bit kernels only, the block minimums ``M`` (:func:`kernel_minimums`, type ``scale_dtype``) of the asymmetric
    one only.

    Raises:
        ValueError: the format or shape is not one :func:`gemv_applies` accepts (the target aside).
    """
    if k % BLOCK or n % ROWS or not ((fmt.bits == 4 and k % CHUNK == 0) or fmt.kind in ("mxint", "int")):
        raise ValueError(f"no GEMV kernel for {fmt.name} with K={k}, N={n}")
    blocks, row_bytes, tiles = k // BLOCK, k * fmt.bits // 8, n // ROWS
    tile_loop = T.parallel if k * n >= current_tile_config().min_parallel_gemv else T.serial
    wide = _has_avx512vl_in(tvm.target.Target.current(allow_none=True))
    ahead = -(-PREFETCH_BYTES // row_bytes)  # rows between the one read and the one prefetched

    if fmt.has_minimum:

        @T.prim_func(s_tir=False)
        def main4a(x_h: T.handle, w_h: T.handle, s_h: T.handle, m_h: T.handle, l_h: T.handle, y_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
            X = T.match_buffer(x_h, (1, k), "float32")
            W = T.match_buffer(w_h, (n, row_bytes), "uint8")
            S = T.match_buffer(s_h, (n, blocks), scale_dtype)
            M = T.match_buffer(m_h, (tiles, blocks, ROWS), scale_dtype)
            L = T.match_buffer(l_h, (16,), "float32")
            Y = T.match_buffer(y_h, (1, n), "float32")
            part = T.alloc_buffer((LANES,), "float32", scope="global")
            xs = T.alloc_buffer((blocks,), "float32", scope="global")  # sum of X over each block
            for b in range(blocks):
                part[T.ramp(0, 1, LANES)] = (X[0, T.ramp(b * BLOCK, 1, LANES)] + X[0, T.ramp(
                    b * BLOCK + LANES, 1, LANES)]) + (X[0, T.ramp(b * BLOCK + 2 * LANES, 1, LANES)] + X[0, T.ramp(
                        b * BLOCK + 3 * LANES, 1, LANES)])
                xs[b] = hsum(part, 0)
            for jt in tile_loop(tiles):
                acc = T.alloc_buffer((ROWS * LANES,), "float32", scope="global")
                low = T.alloc_buffer((ROWS,), "float32", scope="global")  # the tile's minimum terms, one lane a row
                for r in T.unroll(ROWS):
                    acc[_vec(r)] = T.broadcast(T.float32(0), LANES)
                low[T.ramp(0, 1, ROWS)] = T.broadcast(T.float32(0), ROWS)
                for q in range(k // CHUNK):
                    for r in T.unroll(ROWS):
                        T.evaluate(prefetch(W, jt * ROWS + r + ahead, q * 32))
                        acc[_vec(r)] = (acc[_vec(r)] + _dot4(X, W, L, jt * ROWS + r, q, 0, wide) * T.broadcast(
                            _scale(S, jt * ROWS + r, 2 * q, fmt), LANES) + _dot4(X, W, L, jt * ROWS + r, q, 1, wide)
                            * T.broadcast(_scale(S, jt * ROWS + r, 2 * q + 1, fmt), LANES))
                    low[T.ramp(0, 1, ROWS)] = (low[T.ramp(0, 1, ROWS)] + T.Cast(
                        "float32x4", M[jt, 2 * q, T.ramp(0, 1, ROWS)]) * T.broadcast(xs[2 * q], ROWS) + T.Cast(
                        "float32x4", M[jt, 2 * q + 1, T.ramp(0, 1, ROWS)]) * T.broadcast(xs[2 * q + 1], ROWS))
                for r in T.unroll(ROWS):
                    Y[0, jt * ROWS + r] = hsum(acc, r) + low[r]

        return main4a

    if fmt.bits == 4:

        @T.prim_func(s_tir=False)
        def main4(x_h: T.handle, w_h: T.handle, s_h: T.handle, l_h: T.handle, y_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
            X = T.match_buffer(x_h, (1, k), "float32")
            W = T.match_buffer(w_h, (n, row_bytes), "uint8")
            S = T.match_buffer(s_h, (n, blocks), scale_dtype)
            L = T.match_buffer(l_h, (16,), "float32")
            Y = T.match_buffer(y_h, (1, n), "float32")
            for jt in tile_loop(tiles):
                acc = T.alloc_buffer((ROWS * LANES,), "float32", scope="global")  # stack alloca -> registers
                for r in T.unroll(ROWS):
                    acc[_vec(r)] = T.broadcast(T.float32(0), LANES)
                for q in range(k // CHUNK):
                    for r in T.unroll(ROWS):
                        T.evaluate(prefetch(W, jt * ROWS + r + ahead, q * 32))
                        acc[_vec(r)] = (acc[_vec(r)] + _dot4(X, W, L, jt * ROWS + r, q, 0, wide) * T.broadcast(
                            _scale(S, jt * ROWS + r, 2 * q, fmt), LANES) + _dot4(X, W, L, jt * ROWS + r, q, 1, wide)
                            * T.broadcast(_scale(S, jt * ROWS + r, 2 * q + 1, fmt), LANES))
                for r in T.unroll(ROWS):
                    Y[0, jt * ROWS + r] = hsum(acc, r)

        return main4

    @T.prim_func(s_tir=False)
    def main8(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (1, k), "float32")
        W = T.match_buffer(w_h, (n, row_bytes), "uint8")
        S = T.match_buffer(s_h, (n, blocks), scale_dtype)
        Y = T.match_buffer(y_h, (1, n), "float32")
        for jt in tile_loop(tiles):
            acc = T.alloc_buffer((ROWS * LANES,), "float32", scope="global")
            for r in T.unroll(ROWS):
                acc[_vec(r)] = T.broadcast(T.float32(0), LANES)
            for b in range(blocks):
                for r in T.unroll(ROWS):
                    T.evaluate(prefetch(W, jt * ROWS + r + ahead, b * BLOCK))
                    acc[_vec(r)] = acc[_vec(r)] + _dot8(X, W, jt * ROWS + r, b) * T.broadcast(
                        _scale(S, jt * ROWS + r, b, fmt), LANES)
            for r in T.unroll(ROWS):
                Y[0, jt * ROWS + r] = hsum(acc, r)

    return main8
