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
``vpsignb``/``vpaddd``/scale overhead. Measured here (1 thread, min, quantization included): 128×384×1536 in
1.50 ms (50 GMAC/s; fp32 template 2.27 ms), 128×384×384 in 0.35 ms (fp32 0.53 ms).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

__all__ = [
    "builder_state",
    "current_tile_config",
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


def current_tile_config():
    """The :mod:`effc.codegen.schedules.tiles` row of the LLVM target in scope (the AVX2 row without one)."""
    from effc.codegen.schedules.tiles import TILE_TABLE, tile_config

    target = tvm.target.Target.current(allow_none=True)
    return tile_config(target) if target is not None and target.kind.name == "llvm" else TILE_TABLE[8]


def _loop_kind(work: int, field: str):
    """``T.parallel`` when ``work`` reaches the target's parallel threshold ``field``, else ``T.serial``.

    Waking the thread pool costs more than a small kernel saves (effc/codegen/schedules/tiles.py).
    """
    return T.parallel if work >= getattr(current_tile_config(), field) else T.serial


def quantize_act_kernel(m: int, k: int) -> tvm.tirx.PrimFunc:
    """``main(X (M, K) f32, Q (M, K) i8, SX (M, K/32) f32)``: dynamic MXINT8 activation blocks (OCP MX v1.0 6.3).

    ``ex = clamp(floor(log2 amax), -126, 127)``, ``Q = nearbyint(clamp(X / 2^ex, ±127/64) * 64)``,
    ``SX = 2^ex / 64`` — the same float operations as the MXINT8 quantize-dequantize kernel, so the codes match it
    bit for bit. One pass per row: each block of 32 is loaded as four 8-lane vectors, reduced to its max ``|x|``,
    divided by its power-of-two scale and rounded; rows in parallel only when ``M * K`` reaches the target's
    ``min_parallel_elems``.

    Raises:
        ValueError: ``K`` not a multiple of 32.
    """
    if k % BLOCK:
        raise ValueError(f"MXINT8 activation blocks need K % {BLOCK} == 0, got K={k}")
    blocks, parts = k // BLOCK, BLOCK // LANES
    rows = _loop_kind(m * k, "min_parallel_elems")
    lim = 127.0 / 64.0

    def part(x, i, b, u):  # lanes 8u..8u+7 of block b of row i
        return x[i, T.ramp(b * BLOCK + u * LANES, 1, LANES)]

    def pow2(e):  # 2^e as float32 bits, e in [-126, 127]
        return T.reinterpret("float32", T.shift_left(e + 127, 23))

    def exponent(amax):  # clamp(floor(log2 max(amax, 2^-126)), -126, 127) from the float32 exponent field
        bits = T.reinterpret("int32", T.max(amax, T.float32(2.0**-126)))
        return T.max(T.min(T.bitwise_and(T.shift_right(bits, 23), 255) - 127, 127), -126)

    @T.prim_func(s_tir=True)  # a root block: Relax's reshape-pattern analysis requires one for one-input kernels
    def main(x_h: T.handle, q_h: T.handle, sx_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x_h, (m, k), "float32")
        Q = T.match_buffer(q_h, (m, k), "int8")
        SX = T.match_buffer(sx_h, (m, blocks), "float32")
        with T.sblock("root"):
            for i in rows(m):
                vmax = T.alloc_buffer((LANES,), "float32", scope="global")  # a stack alloca (see int8_gemm_kernel)
                amax = T.alloc_buffer((1,), "float32", scope="global")
                for b in range(blocks):
                    vmax[T.ramp(0, 1, LANES)] = T.max(T.max(T.abs(part(X, i, b, 0)), T.abs(part(X, i, b, 1))),
                                                      T.max(T.abs(part(X, i, b, 2)), T.abs(part(X, i, b, 3))))
                    amax[0] = vmax[0]
                    for lane in T.unroll(1, LANES):
                        amax[0] = T.max(amax[0], vmax[lane])
                    SX[i, b] = pow2(exponent(amax[0])) * T.float32(1.0 / 64.0)
                    for u in T.unroll(parts):
                        Q[i, T.ramp(b * BLOCK + u * LANES, 1, LANES)] = T.Cast("int8x8", T.nearbyint(T.max(T.min(
                            part(X, i, b, u) / T.broadcast(pow2(exponent(amax[0])), LANES),
                            T.broadcast(T.float32(lim), LANES)), T.broadcast(T.float32(-lim), LANES))
                            * T.broadcast(T.float32(64.0), LANES)))

    return main


def _divisor(n: int, want: int) -> int:
    return max(d for d in range(1, max(1, min(n, want)) + 1) if n % d == 0)


def _dot4(xq, w):
    """int32x8 partial sums of 8 columns: ``sum_kk xq[kk] * w[4*jj + kk]``.

    ``xq``: 4 int8 as one int32; ``w``: int8x32. ``vpmaddubsw(|w|, sign(x, w))`` then ``vpmaddwd(·, 1)``. The
    expression is built here and inlined in the kernel: a value bound to a name inside TVMScript becomes a buffer,
    stored to memory at every use (two 32-byte stores per 32 MACs made the first version store-bound, 1.5x slower).
    """
    xb = T.reinterpret("int8x32", T.broadcast(xq, LANES))
    pair = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", T.reinterpret("uint8x32", T.abs(w)),
                                   T.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xb, w))
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pair, T.broadcast(T.int16(1), 16))


def int8_gemm_kernel(m: int, k: int, n: int, mr: int = 4, nv: int = 2) -> tvm.tirx.PrimFunc:
    """``main(Q (M, K) i8, SX (M, K/32) f32, Wp (N/8, K/4, 32) i8, SW (K/32, N) u8, Y (M, N) f32)``.

    Register tile: ``mr`` rows × ``nv`` 8-column vectors (``mr * nv`` int32 accumulators); K/32 blocks of 8 steps
    of 4. Column tiles run in parallel (each thread keeps its ``(K, 8 nv)`` weight panel in L1 and streams the
    rows) when ``M * K * N`` reaches the target's ``min_parallel_macs``, else on the calling thread.

    Raises:
        ValueError: ``K`` not a multiple of 32 or ``N`` not a multiple of 8.
    """
    if k % BLOCK or n % LANES:
        raise ValueError(f"int8 GEMM needs K % {BLOCK} == 0 and N % {LANES} == 0, got K={k}, N={n}")
    mr = _divisor(m, mr)
    nv = _divisor(n // LANES, nv)
    nb, k4s, steps = n // LANES, k // 4, BLOCK // 4
    tiles_n, tiles_m, blocks = nb // nv, m // mr, k // BLOCK
    cols = _loop_kind(m * k * n, "min_parallel_macs")

    def vec(t):  # the 8 lanes of register-tile slot t (row t // nv, column vector t % nv)
        return T.ramp(t * LANES, 1, LANES)

    def col(jt, t):  # the 8 output columns of slot t in column tile jt
        return T.ramp(jt * nv * LANES + (t % nv) * LANES, 1, LANES)

    def block_scale(sw_code, sx):  # 2^(e - 127) from the E8M0 code e (0 -> 0.0: all-zero block) * sx * 2^-6
        return T.reinterpret("float32x8", T.shift_left(T.Cast("int32x8", sw_code), T.broadcast(T.int32(23), LANES))
                             ) * T.broadcast(sx * T.float32(1.0 / 64.0), LANES)

    @T.prim_func(s_tir=False)
    def main(q_h: T.handle, sx_h: T.handle, w_h: T.handle, sw_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True, "tir.is_scheduled": True})
        Q = T.match_buffer(q_h, (m, k), "int8")
        SX = T.match_buffer(sx_h, (m, blocks), "float32")
        W = T.match_buffer(w_h, (nb, k4s, 32), "int8")
        SW = T.match_buffer(sw_h, (blocks, n), "uint8")
        Y = T.match_buffer(y_h, (m, n), "float32")
        for jt in cols(tiles_n):
            for it in range(tiles_m):
                # "global" scope: small constant allocations become LLVM stack allocas, promoted to registers
                # ("local" ones become heap workspaces in 0.27)
                acc = T.alloc_buffer((mr * nv * LANES,), "int32", scope="global")
                facc = T.alloc_buffer((mr * nv * LANES,), "float32", scope="global")
                for t in T.unroll(mr * nv):
                    facc[vec(t)] = T.broadcast(T.float32(0), LANES)
                for b in range(blocks):
                    for t in T.unroll(mr * nv):
                        acc[vec(t)] = T.broadcast(T.int32(0), LANES)
                    for s in range(steps):
                        for t in T.unroll(mr * nv):
                            # 4 activation bytes of row t // nv (broadcast to the 8 lanes) · 8 columns × 4 k
                            acc[vec(t)] = acc[vec(t)] + _dot4(
                                T.reinterpret("int32", Q[it * mr + t // nv, T.ramp(b * BLOCK + s * 4, 1, 4)]),
                                W[jt * nv + t % nv, b * steps + s, T.ramp(0, 1, 32)])
                    for t in T.unroll(mr * nv):
                        facc[vec(t)] = facc[vec(t)] + T.Cast("float32x8", acc[vec(t)]) * block_scale(
                            SW[b, col(jt, t)], SX[it * mr + t // nv, b])
                for t in T.unroll(mr * nv):
                    Y[it * mr + t // nv, col(jt, t)] = facc[vec(t)]

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
