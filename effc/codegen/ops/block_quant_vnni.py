"""Integer-dot GEMV (``M = 1``) for int8 activation blocks × int4 / int4_asym / int8 weight blocks, AVX-512 VNNI.

For ``block-quant(..., mode=weight_act, act_format=int8)`` (llama.cpp's Q4_1 × Q8_1 and Q8_0 × Q8_0 dot products)
the activation row is quantized once per call into int8 blocks of 32 along K (:func:`quantize_act_kernel`: codes
``qx = round(x / sx)`` in ``[-127, 127]``, float32 ``sx = amax / 127`` per block, exactly the ``int8`` quantizer of
:func:`effc.ops.block_formats.quantize` with ``scale_dtype="float32"`` and the ``effc.BlockQDQ`` body of
``model.onnx``), and every weight block meets it in one integer dot product::

    Y[j] = sum_b  d[j, b] * sx[b] * sum_{k in b} qw[j, k] * qx[k]   (+ m[j, b] * sx[b] * sum_{k in b} qx[k])

``qw`` are the weight codes (int4_asym: unsigned 0..15 with the block minimum ``m``, GGUF Q4_1; int4: -8..7; int8:
-127..127), ``d`` the float16 / float32 block scales. ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.256``: u8 × s8,
4 products summed into each int32 lane) needs the weight side unsigned: int4 / int8 codes are read offset by
``o`` = 8 / 128 (an XOR of the code bits), and each block's integer sum starts at ``-o * sum(qx)`` (lane 0 of the
accumulator, from the block sums of ``qx`` computed once per call), so the int32 sums are exact; each is converted
to float32 once and multiplied by ``d * sx``. The minimum term uses the same block sums (``sx * sum(qx)``).

Weights keep the kernel layout of :func:`effc.codegen.ops.block_quant_gemv.kernel_rows` (one constant for the
prefill GEMM, the embedding lookup and this kernel). 4-bit chunks of 64 weights: element ``64q + 8i + l`` is nibble
``i`` of int32 lane ``l``, so ``raw & 0x0F0F`` (nibbles 0, 2 in bytes 0, 1 of each lane) and ``(raw >> 4) & 0x0F0F``
(nibbles 1, 3) hold block ``2q``, the masks ``0x0F0F0000`` block ``2q + 1``; the activation codes are permuted once
per call to match (``XA[q, 4l + t] = qx[64q + 16t + l]``, ``XB[q, 4l + t] = qx[64q + 16t + 8 + l]``). Per 64
weights of a row: one 32-byte load, a shift, 4 ANDs, 4 ``vpdpbusd``; per block a ``vcvtdq2ps`` and an FMA with
the broadcast ``d * sx``. 8-bit rows: one 32-byte load, an XOR and one ``vpdpbusd`` per block. ``ROWS`` output
channels per tile (independent chains), tiles in parallel over the threads (each streams a contiguous part of
``W``) from the target's ``min_parallel_gemv``. Minimums tile-major as in the float GEMV.

Applies (:func:`vnni_applies`) on x86 targets whose features include ``avx512vnni`` and ``avx512vl``; elsewhere the
activation quantize-dequantize and the float decode-in-GEMV / GEMM kernels compute the same numbers up to fp32
rounding. Sources: Intel SDM ``VPDPBUSD``; ggml-quants.c ``ggml_vec_dot_q4_1_q8_1`` / ``ggml_vec_dot_q8_0_q8_0``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from effc.codegen.ops.block_quant_gemv import CHUNK, PREFETCH_BYTES, ROWS, hsum, prefetch
from effc.codegen.ops.block_quant_int8 import current_tile_config
from effc.ops.block_formats import BlockFormat

__all__ = ["quantize_act_kernel", "supports_vnni", "vnni_applies", "vnni_gemv", "vnni_gemv_kernel"]

BLOCK = 32
LANES = 8
QMAX = 127
# Offset that makes a weight code unsigned for vpdpbusd (XOR of the code bits; the int32 sum is corrected by it).
OFFSETS = {"int4_asym": 0, "int4": 8, "int8": 128}


def supports_vnni(target: tvm.target.Target | None) -> bool:
    """True when ``target`` is an LLVM x86 target with AVX-512 VNNI and AVX-512VL (256-bit ``vpdpbusd``)."""
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:
        return all(bool(codegen.target_has_features(f, target)) for f in ("avx512vnni", "avx512vl"))
    except Exception:  # noqa: BLE001  (a non-x86 triple has no such feature name)
        return False


def vnni_applies(fmt: BlockFormat, block_size: int, act_fmt: BlockFormat, act_block_size: int, k: int,
                 n: int) -> bool:
    """Whether a one-row ``BlockQuantMatMul`` fed by an int8 ``BlockQDQ`` lowers to :func:`vnni_gemv_kernel`.

    Weights ``int4_asym`` / ``int4`` (``K`` a multiple of 64, the 4-bit chunk) or ``int8`` (``K`` a multiple of 32),
    int8 activations, blocks of 32 on both sides, ``N`` a multiple of :data:`ROWS`, and the TVM target in scope has
    AVX-512 VNNI; otherwise the float kernels run on the quantize-dequantized activation.
    """
    fits = k % (CHUNK if fmt.bits == 4 else BLOCK) == 0 and n % ROWS == 0
    return (fmt.name in OFFSETS and act_fmt.name == "int8" and block_size == act_block_size == BLOCK and fits
            and supports_vnni(tvm.target.Target.current(allow_none=True)))


def _part(x, i, b, u):
    """float32x8 lanes ``8u .. 8u + 7`` of block ``b`` of row ``i`` of ``x``."""
    return x[i, T.ramp(b * BLOCK + u * LANES, 1, LANES)]


def _block_absmax(x, i, b):
    """float32x8 lane-wise max ``|x|`` over the four 8-lane parts of block ``b`` of row ``i``."""
    return T.max(T.max(T.abs(_part(x, i, b, 0)), T.abs(_part(x, i, b, 1))),
                 T.max(T.abs(_part(x, i, b, 2)), T.abs(_part(x, i, b, 3))))


def _act_scale(amax):
    """``amax / 127`` (float32 division), 1 for an all-zero block."""
    raw = amax / T.float32(QMAX)
    return T.Select(raw > T.float32(0), raw, T.float32(1))


def _act_codes(x, i, b, u, amax):
    """int8x8 codes ``nearbyint(clamp(x / scale, -127, 127))`` of part ``u`` of block ``b`` of row ``i``."""
    return T.Cast("int8x8", T.nearbyint(T.max(T.min(
        _part(x, i, b, u) / T.broadcast(_act_scale(amax), LANES), T.broadcast(T.float32(QMAX), LANES)),
        T.broadcast(T.float32(-QMAX), LANES))))


@T.macro
def _quantize_block(X, Q, SX, vmax, amax, i, b):
    """Scale ``SX[i, b]`` and codes ``Q[i, 32 b : 32 b + 32]`` of block ``b`` of row ``i``.

    The float operations of :func:`quantize_act_kernel`; ``vmax (8,)`` and ``amax (1,)`` are scratch.
    """
    vmax[T.ramp(0, 1, LANES)] = _block_absmax(X, i, b)
    amax[0] = vmax[0]
    for lane in T.unroll(1, LANES):
        amax[0] = T.max(amax[0], vmax[lane])
    SX[i, b] = _act_scale(amax[0])
    for u in T.unroll(BLOCK // LANES):
        Q[i, T.ramp(b * BLOCK + u * LANES, 1, LANES)] = _act_codes(X, i, b, u, amax[0])


def quantize_act_kernel(m: int, k: int) -> tvm.tirx.PrimFunc:
    """``main(X (M, K) f32, Q (M, K) i8, SX (M, K/32) f32)``: int8 activation blocks of 32 along K.

    ``SX = amax / 127`` (float32 division; 1 where it is 0), ``Q = nearbyint(clamp(X / SX, -127, 127))`` — the float
    operations of :func:`effc.ops.block_formats.quantize` (``"int8"``, ``scale_dtype="float32"``) and of the
    ``effc.BlockQDQ`` ONNX body, so the codes match them bit for bit (``Q * SX`` is the quantize-dequantize output).
    Blocks are read as four 8-lane vectors; rows in parallel from the target's ``min_parallel_elems``.

    Raises:
        ValueError: ``K`` not a multiple of 32.
    """
    if k % BLOCK:
        raise ValueError(f"int8 activation blocks need K % {BLOCK} == 0, got K={k}")
    blocks = k // BLOCK
    rows = T.parallel if m * k >= current_tile_config().min_parallel_elems else T.serial

    @T.prim_func(s_tir=True)  # a root block: Relax's reshape-pattern analysis requires one for one-input kernels
    def main(x_h: T.handle, q_h: T.handle, sx_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (m, k), "float32")
        Q = T.match_buffer(q_h, (m, k), "int8")
        SX = T.match_buffer(sx_h, (m, blocks), "float32")
        with T.sblock("root"):
            for i in rows(m):
                vmax = T.alloc_buffer((LANES,), "float32", scope="global")  # stack allocas (see block_quant_int8)
                amax = T.alloc_buffer((1,), "float32", scope="global")
                for b in range(blocks):
                    _quantize_block(X, Q, SX, vmax, amax, i, b)

    return main


def _vec(r):
    return T.ramp(r * LANES, 1, LANES)


def _dpbusd(acc, unsigned, signed):
    """``acc`` (int32x8) + per lane the sum of the 4 byte products ``unsigned`` (u8) × ``signed`` (s8)."""
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc,
                                   T.reinterpret("int8x32", unsigned), T.reinterpret("int8x32", signed))


def _mask(value: int):
    """int32x8 of the 32-bit pattern ``value`` (as two's complement)."""
    return T.broadcast(T.int32(value - (1 << 32) if value >= 1 << 31 else value), LANES)


def _block_dot(w, q, xa, xb, corr, j, c, half: int, fmt: BlockFormat, k: int):
    """int32x8 lane sums of weight block ``per * c + half`` of row ``j`` with the activation codes (exact).

    4-bit: chunk ``c`` (64 weights, 32 bytes): all nibbles ``raw & 0x0F0F0F0F`` and ``(raw >> 4) & 0x0F0F0F0F``
    against the permuted codes of block ``half`` only (``xa`` / ``xb`` hold zeros in the other block's bytes);
    8-bit: block ``c``, codes XOR 0x80 against ``q``. ``corr`` starts each block at ``-offset * sum(qx)``.
    """
    off = OFFSETS[fmt.name]
    if fmt.bits == 8:
        raw = T.reinterpret("int32x8", w[j, T.ramp(c * BLOCK, 1, BLOCK)]) ^ _mask(0x80808080)
        return _dpbusd(corr[_vec(c)], raw, q[0, T.ramp(c * BLOCK, 1, BLOCK)])
    raw = T.reinterpret("int32x8", w[j, T.ramp(c * 32, 1, 32)])
    raw = raw ^ _mask(off * 0x11111111) if off else raw
    codes = T.ramp(half * (k // 2) + c * 32, 1, 32)
    low = _dpbusd(corr[_vec(2 * c + half)], raw & _mask(0x0F0F0F0F), xa[codes])
    return _dpbusd(low, T.shift_right(raw, _mask(4)) & _mask(0x0F0F0F0F), xb[codes])


def _pair_dot(acc, parts, s, sx, j, b: int):
    """``acc`` + the float32x8 partial sums of blocks ``b``, ``b + 1`` of row ``j`` from their int32 lane sums.

    ``vphaddd`` puts 4 pair sums of each block side by side (lanes 0, 1, 4, 5: block ``b``; 2, 3, 6, 7: ``b + 1``;
    still exact), so one convert and one FMA with ``[s0, s0, s1, s1, s0, s0, s1, s1]`` (``s = d * sx`` of the two
    blocks from one 2-lane load, convert and multiply) cover both blocks.
    """
    pair = T.Cast("float32x2", s[j, T.ramp(b, 1, 2)]) * sx[0, T.ramp(b, 1, 2)]
    scale = T.Shuffle([pair, pair, pair, pair], [0, 0, 1, 1, 0, 0, 1, 1])
    sums = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.phadd.d", parts[0], parts[1])
    return acc + T.Cast("float32x8", sums) * scale


def _lane_sums(q, b):
    """int32x8 sums of 4 consecutive activation codes of block ``b`` (``vpdpbusd`` with all-ones bytes).

    Their total is the block's ``sum(qx)``; times ``-offset`` they start the block's integer sums (lane ``l`` of
    an 8-bit block meets exactly these 4 codes; a 4-bit block's lanes meet permuted codes, whose lane total is the
    same, and only the total reaches ``Y``).
    """
    return _dpbusd(T.broadcast(T.int32(0), LANES), _mask(0x01010101), q[0, T.ramp(b * BLOCK, 1, BLOCK)])


def _permuted(q, c, base: int, half: int):
    """int8x32 activation codes of chunk ``c`` in nibble order, block ``half``'s bytes only (zeros elsewhere).

    Byte ``4l + t`` = ``qx[64c + 16t + base + l]`` where ``t // 2 == half`` (nibbles ``2t``, ``2t + 1`` of lane ``l``
    hold elements ``16t + l`` and ``16t + 8 + l`` of the chunk), else 0.
    """
    codes = T.Shuffle([q[0, T.ramp(c * CHUNK, 1, CHUNK)]], [16 * (p % 4) + base + p // 4 for p in range(32)])
    keep = _mask(0x0000FFFF if half == 0 else 0xFFFF0000)
    return T.reinterpret("int8x32", T.reinterpret("int32x8", codes) & keep)


def vnni_gemv_kernel(k: int, n: int, fmt: BlockFormat, scale_dtype: str) -> tvm.tirx.PrimFunc:
    """``main(X (1, K) f32, W (N, K*bits/8) u8, S (N, K/32), [M (N/4, K/32, 4),] Y (1, N) f32)``.

    ``X`` is quantized in the kernel's preamble with the float operations of :func:`quantize_act_kernel` (the same
    codes and scales bit for bit; a separate quantizer call with its two outputs cost more in the Relax VM than
    recomputing 576-1536 codes per layer); ``W`` :func:`~effc.codegen.ops.block_quant_gemv.kernel_rows`;
    ``S`` the ONNX scales ``(N, K/32)`` (``scale_dtype``: float16 / float32); ``M`` the block minimums of
    ``int4_asym`` in the
    :func:`~effc.codegen.ops.block_quant_gemv.kernel_minimums` layout. See the module docstring.

    Raises:
        ValueError: a format or shape :func:`vnni_applies` refuses (the target aside).
    """
    if fmt.name not in OFFSETS or k % (CHUNK if fmt.bits == 4 else BLOCK) or n % ROWS:
        raise ValueError(f"no VNNI GEMV kernel for {fmt.name} with K={k}, N={n}")
    blocks, row_bytes, tiles, off = k // BLOCK, k * fmt.bits // 8, n // ROWS, OFFSETS[fmt.name]
    per = 2 if fmt.bits == 4 else 1  # blocks per 32-byte load
    step = 2 if blocks % 2 == 0 else 1  # blocks per step of the row loop (their scales are loaded together)
    tile_loop = T.parallel if k * n >= current_tile_config().min_parallel_gemv else T.serial

    ahead = -(-PREFETCH_BYTES // row_bytes)  # rows between the one read and the one prefetched
    step_bytes = BLOCK * step * fmt.bits // 8  # weight bytes of a row per step

    def dot(acc, w, q, xa, xb, corr, s, sx, jt, r, c):  # acc + the sums of the blocks of step c of row r
        j = jt * ROWS + r
        parts = [_block_dot(w, q, xa, xb, corr, j, c if per == 2 else step * c + h, h, fmt, k) for h in range(step)]
        if step == 2:
            return _pair_dot(acc, parts, s, sx, j, 2 * c)
        return acc + T.Cast("float32x8", parts[0]) * T.broadcast(T.Cast("float32", s[j, c]) * sx[0, c], LANES)

    def minimum(low, m, xs, jt, c):  # the tile's minimum terms m * sx * sum(qx) of the blocks of step c
        total = low[T.ramp(0, 1, ROWS)]
        for h in range(step):
            b = step * c + h
            total = total + T.Cast("float32x4", m[jt, b, T.ramp(0, 1, ROWS)]) * T.broadcast(xs[b], ROWS)
        return total

    @T.prim_func(s_tir=False)
    def main(x_h: T.handle, w_h: T.handle, s_h: T.handle, m_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (1, k), "float32")
        W = T.match_buffer(w_h, (n, row_bytes), "uint8")
        S = T.match_buffer(s_h, (n, blocks), scale_dtype)
        M = T.match_buffer(m_h, (tiles, blocks, ROWS), scale_dtype)
        Y = T.match_buffer(y_h, (1, n), "float32")
        Q = T.alloc_buffer((1, k), "int8", scope="global")  # the activation codes and block scales
        SX = T.alloc_buffer((1, blocks), "float32", scope="global")
        vmax = T.alloc_buffer((LANES,), "float32", scope="global")
        amax = T.alloc_buffer((1,), "float32", scope="global")
        xa = T.alloc_buffer((k,), "int8", scope="global")  # 4-bit: codes in the order of the nibble masks
        xb = T.alloc_buffer((k,), "int8", scope="global")
        corr = T.alloc_buffer((blocks * LANES,), "int32", scope="global")  # -offset * sum(qx) in lane 0
        xs = T.alloc_buffer((blocks,), "float32", scope="global")  # sx * sum(qx) (the minimum terms)
        sums = T.alloc_buffer((LANES,), "int32", scope="global")
        for b in range(blocks):  # the activation codes and scales (quantize_act_kernel's float operations)
            _quantize_block(X, Q, SX, vmax, amax, 0, b)
        for b in range(blocks):
            sums[T.ramp(0, 1, LANES)] = _lane_sums(Q, b)
            corr[T.ramp(b * LANES, 1, LANES)] = sums[T.ramp(0, 1, LANES)] * T.broadcast(T.int32(-off), LANES)
            xs[b] = SX[0, b] * T.Cast("float32", hsum(sums, 0))
        for c in range(k // CHUNK if fmt.bits == 4 else 0):
            xa[T.ramp(c * 32, 1, 32)] = _permuted(Q, c, 0, 0)  # block 2c's bytes, then block 2c + 1's
            xa[T.ramp(k // 2 + c * 32, 1, 32)] = _permuted(Q, c, 0, 1)
            xb[T.ramp(c * 32, 1, 32)] = _permuted(Q, c, 8, 0)
            xb[T.ramp(k // 2 + c * 32, 1, 32)] = _permuted(Q, c, 8, 1)
        for jt in tile_loop(tiles):
            acc = T.alloc_buffer((ROWS * LANES,), "float32", scope="global")
            low = T.alloc_buffer((ROWS,), "float32", scope="global")
            for r in T.unroll(ROWS):
                acc[_vec(r)] = T.broadcast(T.float32(0), LANES)
            low[T.ramp(0, 1, ROWS)] = T.broadcast(T.float32(0), ROWS)
            for c in range(blocks // step):
                for r in T.unroll(ROWS):
                    T.evaluate(prefetch(W, jt * ROWS + r + ahead, c * step_bytes))
                    acc[_vec(r)] = dot(acc[_vec(r)], W, Q, xa, xb, corr, S, SX, jt, r, c)
                low[T.ramp(0, 1, ROWS)] = minimum(low, M, xs, jt, c)
            for r in T.unroll(ROWS):
                Y[0, jt * ROWS + r] = hsum(acc, r) + low[r]

    if not fmt.has_minimum:  # no minimums: the unused M input is dropped (and with it the minimum terms)
        return _without_minimums(k, n, fmt, scale_dtype, tile_loop, dot, step, ahead, step_bytes)
    return main


def _without_minimums(k: int, n: int, fmt: BlockFormat, scale_dtype: str, tile_loop, dot, step: int,
                      ahead: int, step_bytes: int) -> tvm.tirx.PrimFunc:
    """The kernel of :func:`vnni_gemv_kernel` for the symmetric formats (no ``M`` input, no minimum terms)."""
    blocks, row_bytes, tiles, off = k // BLOCK, k * fmt.bits // 8, n // ROWS, OFFSETS[fmt.name]

    @T.prim_func(s_tir=False)
    def main(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (1, k), "float32")
        W = T.match_buffer(w_h, (n, row_bytes), "uint8")
        S = T.match_buffer(s_h, (n, blocks), scale_dtype)
        Y = T.match_buffer(y_h, (1, n), "float32")
        Q = T.alloc_buffer((1, k), "int8", scope="global")  # the activation codes and block scales
        SX = T.alloc_buffer((1, blocks), "float32", scope="global")
        vmax = T.alloc_buffer((LANES,), "float32", scope="global")
        amax = T.alloc_buffer((1,), "float32", scope="global")
        xa = T.alloc_buffer((k,), "int8", scope="global")
        xb = T.alloc_buffer((k,), "int8", scope="global")
        corr = T.alloc_buffer((blocks * LANES,), "int32", scope="global")
        for b in range(blocks):
            _quantize_block(X, Q, SX, vmax, amax, 0, b)
            corr[T.ramp(b * LANES, 1, LANES)] = _lane_sums(Q, b) * T.broadcast(T.int32(-off), LANES)
        for c in range(k // CHUNK if fmt.bits == 4 else 0):
            xa[T.ramp(c * 32, 1, 32)] = _permuted(Q, c, 0, 0)  # block 2c's bytes, then block 2c + 1's
            xa[T.ramp(k // 2 + c * 32, 1, 32)] = _permuted(Q, c, 0, 1)
            xb[T.ramp(c * 32, 1, 32)] = _permuted(Q, c, 8, 0)
            xb[T.ramp(k // 2 + c * 32, 1, 32)] = _permuted(Q, c, 8, 1)
        for jt in tile_loop(tiles):
            acc = T.alloc_buffer((ROWS * LANES,), "float32", scope="global")
            for r in T.unroll(ROWS):
                acc[_vec(r)] = T.broadcast(T.float32(0), LANES)
            for c in range(blocks // step):
                for r in T.unroll(ROWS):
                    T.evaluate(prefetch(W, jt * ROWS + r + ahead, c * step_bytes))
                    acc[_vec(r)] = dot(acc[_vec(r)], W, Q, xa, xb, corr, S, SX, jt, r, c)
            for r in T.unroll(ROWS):
                Y[0, jt * ROWS + r] = hsum(acc, r)

    return main


def vnni_gemv(bb: relax.BlockBuilder, x: relax.Expr, weights: list[np.ndarray], fmt: BlockFormat, k: int,
              n: int) -> relax.Expr:
    """Emit the VNNI GEMV of the float activation ``x`` (quantized inside the kernel); returns ``Y (1, N)`` float32.

    Args:
        bb: the frontend's block builder.
        x: the float activation with ``K`` elements (before its ``effc.BlockQDQ``).
        weights: the kernel constants: :func:`~effc.codegen.ops.block_quant_gemv.kernel_rows` ``(N, K * bits / 8)``
            uint8, the ONNX scales ``(N, K/32)`` float16 / float32 and, for ``int4_asym``, the block minimums in
            the :func:`~effc.codegen.ops.block_quant_gemv.kernel_minimums` layout.
        fmt: the weight format.
        k: reduction size.
        n: output columns.
    """
    gfn = bb.add_func(vnni_gemv_kernel(k, n, fmt, str(weights[1].dtype)).without_attr("global_symbol"),
                      f"effc_block_quant_vnni_{fmt.name}")
    x2 = bb.normalize(relax.op.reshape(x, (1, k)))
    consts = [relax.const(v) for v in weights]
    return bb.normalize(relax.call_tir(gfn, [x2, *consts], out_ty=relax.TensorType((1, n), "float32")))
