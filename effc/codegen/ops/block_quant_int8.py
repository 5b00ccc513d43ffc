"""Integer MXINT8 × MXINT8 GEMM for x86 AVX2 (no VNNI): int8 products, int32 block sums, block scales in fp32.

For ``block-quant(format=mxint8,mode=weight_act)`` the activation quantize-dequantize and the weight decode fold
into one integer product (OCP MX v1.0 section 6: a dot product of two MX blocks is the integer dot product of
their elements times the product of the two shared scales)::

    Y[i, j] = sum_b  ( sum_{k in b} qx[i, k] * qw[k, j] )  *  sx[i, b] * sw[b, j]

``qx``, ``qw`` are the int8 element codes in ``[-127, 127]`` (MXINT8 value = code / 64), ``sx = 2^(ex - 6)``,
``sw = 2^(ew - 6)`` the block scales (powers of two, so the fp32 product is exact). Two kernels:

* :func:`quantize_act_kernel` — per block of 32 along K: shared exponent and int8 codes, bit-identical with
  :func:`effc.codegen.ops.block_quant._qdq_kernel` for MXINT8 (``X (M, K) f32 → Q (M, K) i8, SX (M, K/32) f32``).
* :func:`int8_gemm_kernel` — ``Q``, packed weights ``Wp (N/8, K/4, 32) i8`` (``Wp[jb, k4, 4*jj + kk] =
  qw[4*k4 + kk, 8*jb + jj]``: 8 columns × 4 consecutive k per 32-byte vector) and the E8M0 weight scales
  ``SW (K/32, N) u8`` (decoded in the kernel as the float32 with exponent bits ``SW``: 8.25 bits per weight).
  Per step, 4 activation bytes are broadcast to all 8 lanes and ``vpmaddubsw(|w|, sign(x, w))`` (u8 × s8 →
  pairwise-summed s16; ``|w| <= 127`` and ``|x| <= 127`` so ``2 * 127 * 127 = 32258`` never saturates) then
  ``vpmaddwd(·, 1)`` (→ s32) give 8 columns × 4 k of products; the int32 sums of a block are converted and
  multiplied by ``sx * sw`` into an fp32 accumulator once per 32 k.

Zen 3 throughput (Agner Fog's tables): 2 fp32 FMAs per cycle = 16 MAC/cycle; ``vpmaddubsw`` + ``vpmaddwd`` (both
on the two multiply pipes) = 32 MAC per 2 µops = 32 MAC/cycle at best — a 2× ceiling over fp32 before the
``vpsignb``/``vpaddd``/scale overhead.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

__all__ = [
    "builder_state",
    "int8_compute_applies",
    "int8_gemm_kernel",
    "int8_matmul",
    "pack_int8_weights",
    "quantize_act_kernel",
    "supports_int8_gemm",
]

BLOCK = 32
LANES = 8  # int32 lanes of a 256-bit vector = output columns per vector


def supports_int8_gemm(target: tvm.target.Target | None) -> bool:
    """True when ``target`` is an LLVM x86 target with AVX2 (``vpmaddubsw``/``vpmaddwd``/``vpsignb``)."""
    if target is None or target.kind.name != "llvm":
        return False
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features("avx2", target))
    except Exception:  # noqa: BLE001  (a non-x86 triple has no such feature name)
        return False


def pack_int8_weights(codes_kn: np.ndarray, scales_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel layout of MXINT8 weights.

    Args:
        codes_kn: ``(K, N)`` uint8 MXINT8 codes (two's complement of ``value * 64``), K % 32 == 0, N % 8 == 0.
        scales_kn: ``(K/32, N)`` uint8 E8M0 scales.

    Returns:
        ``Wp (N/8, K/4, 32)`` int8 and ``SW (K/32, N)`` uint8 (the E8M0 codes, unchanged).
    """
    k, n = codes_kn.shape
    q = codes_kn.view(np.int8).reshape(k // 4, 4, n // LANES, LANES)  # (k4, kk, jb, jj)
    wp = np.ascontiguousarray(q.transpose(2, 0, 3, 1).reshape(n // LANES, k // 4, 4 * LANES))
    return wp, np.ascontiguousarray(scales_kn, dtype=np.uint8)


def quantize_act_kernel(m: int, k: int) -> tvm.tirx.PrimFunc:
    """``main(X (M, K) f32, Q (M, K) i8, SX (M, K/32) f32)``: dynamic MXINT8 activation blocks (OCP MX v1.0 6.3).

    ``ex = clamp(floor(log2 amax) - 0, -126, 127)``, ``Q = nearbyint(clamp(X / 2^ex, ±127/64) * 64)``,
    ``SX = 2^ex / 64`` — the same float operations as the MXINT8 quantize-dequantize kernel, so the codes match it.
    """
    x = te.placeholder((m, k), "float32", "X")
    r = te.reduce_axis((0, BLOCK), "r")
    amax = te.compute((m, k // BLOCK), lambda i, b: te.max(tirx.abs(x[i, b * BLOCK + r]), axis=r), name="amax")

    def scale(i, b):  # 2^ex / 64 from the exponent bits of amax (amax below 2^-126 counts as 2^-126)
        bits = tirx.reinterpret("int32", tirx.max(amax[i, b], tirx.const(2.0**-126, "float32")))
        shared = tirx.max(tirx.min(((bits >> 23) & 255) - 127, 127), -126)
        return tirx.reinterpret("float32", (shared + 127) << 23) * tirx.const(1.0 / 64.0, "float32")

    sx = te.compute((m, k // BLOCK), scale, name="SX")
    lim = tirx.const(127.0 / 64.0, "float32")

    def code(i, c):
        v = tirx.max(tirx.min(x[i, c] / (sx[i, c // BLOCK] * tirx.const(64.0, "float32")), lim), -lim)
        return tirx.nearbyint(v * tirx.const(64.0, "float32")).astype("int8")

    q = te.compute((m, k), code, name="Q")
    func = te.create_prim_func([x, q, sx]).with_attr("global_symbol", "main")
    return _schedule_quantize(func)


def _schedule_quantize(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    for name in ("amax", "SX"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    i, c = sch.get_loops(sch.get_sblock("Q"))
    sch.parallel(i)
    sch.vectorize(sch.split(c, [None, BLOCK])[1])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _divisor(n: int, want: int) -> int:
    return max(d for d in range(1, max(1, min(n, want)) + 1) if n % d == 0)


def int8_gemm_kernel(m: int, k: int, n: int, mr: int = 4, nv: int = 2) -> tvm.tirx.PrimFunc:
    """``main(Q (M, K) i8, SX (M, K/32) f32, Wp (N/8, K/4, 32) i8, SW (K/32, N) u8, Y (M, N) f32)``.

    Register tile: ``mr`` rows × ``nv`` 8-column vectors; parallel over column tiles; K/32 blocks, 8 steps of 4.

    Raises:
        ValueError: ``K`` not a multiple of 32 or ``N`` not a multiple of 8.
    """
    if k % BLOCK or n % LANES:
        raise ValueError(f"int8 GEMM needs K % {BLOCK} == 0 and N % {LANES} == 0, got K={k}, N={n}")
    mr = _divisor(m, mr)
    nv = _divisor(n // LANES, nv)
    nb, k4s, steps = n // LANES, k // 4, BLOCK // 4
    tiles_n, tiles_m, blocks = nb // nv, m // mr, k // BLOCK

    def vec(t):  # the 8 lanes of register-tile slot t (row t // nv, column vector t % nv)
        return T.ramp(t * LANES, 1, LANES)

    @T.prim_func(s_tir=False)
    def main(q_h: T.handle, sx_h: T.handle, w_h: T.handle, sw_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        Q = T.match_buffer(q_h, (m, k), "int8")
        SX = T.match_buffer(sx_h, (m, blocks), "float32")
        W = T.match_buffer(w_h, (nb, k4s, 32), "int8")
        SW = T.match_buffer(sw_h, (blocks, n), "uint8")
        Y = T.match_buffer(y_h, (m, n), "float32")
        for jt in T.parallel(tiles_n):
            for it in range(tiles_m):
                # "global" scope: small constant allocations become LLVM stack allocas, promoted to registers
                # ("local" ones become heap workspaces in 0.27)
                acc = T.alloc_buffer((mr * nv * LANES,), "int32", scope="global")
                facc = T.alloc_buffer((mr * nv * LANES,), "float32", scope="global")
                wv = T.alloc_buffer((nv * 32,), "int8", scope="global")
                wa = T.alloc_buffer((nv * 32,), "uint8", scope="global")
                for t in T.unroll(mr * nv):
                    facc[vec(t)] = T.broadcast(T.float32(0), LANES)
                for b in range(blocks):
                    for t in T.unroll(mr * nv):
                        acc[vec(t)] = T.broadcast(T.int32(0), LANES)
                    for s in range(steps):
                        for v in T.unroll(nv):
                            wv[T.ramp(v * 32, 1, 32)] = W[jt * nv + v, b * steps + s, T.ramp(0, 1, 32)]
                            wa[T.ramp(v * 32, 1, 32)] = T.reinterpret("uint8x32", T.abs(wv[T.ramp(v * 32, 1, 32)]))
                        for t in T.unroll(mr * nv):
                            # 4 activation bytes of row t // nv, broadcast to the 8 column lanes
                            xb = T.reinterpret("int8x32", T.broadcast(T.reinterpret("int32", Q[
                                it * mr + t // nv, T.ramp(b * BLOCK + s * 4, 1, 4)]), LANES))
                            xs = T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xb,
                                                         wv[T.ramp((t % nv) * 32, 1, 32)])
                            pair = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                                           wa[T.ramp((t % nv) * 32, 1, 32)], xs)
                            acc[vec(t)] = acc[vec(t)] + T.call_llvm_pure_intrin(
                                "int32x8", "llvm.x86.avx2.pmadd.wd", pair, T.broadcast(T.int16(1), 16))
                    for t in T.unroll(mr * nv):
                        # 2^(e - 127) from the E8M0 code e (0 -> 0.0: all-zero block) times sx * 2^-6 (MXINT8 /64)
                        code = T.Cast("int32x8", SW[b, T.ramp(jt * nv * LANES + (t % nv) * LANES, 1, LANES)])
                        sw = T.reinterpret("float32x8", code << T.broadcast(T.int32(23), LANES))
                        scale = sw * T.broadcast(SX[it * mr + t // nv, b] * T.float32(1.0 / 64.0), LANES)
                        facc[vec(t)] = facc[vec(t)] + T.Cast("float32x8", acc[vec(t)]) * scale
                for t in T.unroll(mr * nv):
                    Y[it * mr + t // nv, T.ramp(jt * nv * LANES + (t % nv) * LANES, 1, LANES)] = facc[vec(t)]

    return main


def int8_compute_applies(fmt, block_size: int, act_fmt, act_block_size: int, k: int, n: int) -> bool:
    """Whether a ``BlockQuantMatMul`` fed by a ``BlockQDQ`` lowers to the integer kernels.

    Both MXINT8 with blocks of 32, ``K % 32 == 0``, ``N % 8 == 0`` and the current TVM target (the one
    ``effc.targets.cpu`` enters while importing) has AVX2; otherwise the fp32 decode-in-GEMM kernel is used.
    """
    return (fmt.name == act_fmt.name == "mxint8" and block_size == act_block_size == BLOCK and k % BLOCK == 0
            and n % LANES == 0 and supports_int8_gemm(tvm.target.Target.current(allow_none=True)))


# (input expr, rows, k) -> emitted (Q, SX): one activation quantization shared by the layers reading the same input
_ACT_CACHE: dict = {}


def builder_state(store: dict, bb: relax.BlockBuilder) -> dict:
    """The entries of ``store`` for the import that ``bb`` builds (emptied when ``bb`` is a new BlockBuilder).

    The Relax values kept there are only meaningful inside the import that emitted them.
    """
    if store.get("builder") is not bb:
        store.clear()
        store.update(builder=bb, values={})
    return store["values"]


def int8_matmul(bb: relax.BlockBuilder, x: relax.Expr, wq: np.ndarray, scales: np.ndarray, rows: int, k: int,
                n: int) -> relax.Expr:
    """Emit ``quantize(x)`` (shared per input) and the integer GEMM; returns ``Y (rows, N)`` float32.

    Args:
        bb: the frontend's block builder.
        x: the float activation ``(..., K)`` before its quantize-dequantize.
        wq: ONNX layout codes ``(N, K)`` uint8.
        scales: ``(N, K/32)`` uint8 E8M0.
        rows: GEMM rows (product of the leading dims of ``x``).
        k: reduction size.
        n: output columns.
    """
    cache = builder_state(_ACT_CACHE, bb)
    key = (x, rows, k)
    cached = next((v for kk, v in cache.items() if kk[0].same_as(x) and kk[1:] == (rows, k)), None)
    if cached is None:
        qfn = bb.add_func(quantize_act_kernel(rows, k).without_attr("global_symbol"), "effc_mxint8_quantize_act")
        x2 = bb.normalize(relax.op.reshape(x, (rows, k)))
        out = bb.emit(relax.call_tir(qfn, [x2], out_ty=[relax.TensorType((rows, k), "int8"),
                                                        relax.TensorType((rows, k // BLOCK), "float32")]))
        cached = cache[key] = (bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1)))
    wp, sw = pack_int8_weights(np.ascontiguousarray(wq.T), np.ascontiguousarray(scales.T))
    gfn = bb.add_func(int8_gemm_kernel(rows, k, n).without_attr("global_symbol"), "effc_mxint8_int8_gemm")
    y = relax.call_tir(gfn, [cached[0], cached[1], relax.const(wp), relax.const(sw)],
                       out_ty=relax.TensorType((rows, n), "float32"))
    return bb.normalize(y)
