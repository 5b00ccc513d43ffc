"""TVM lowering of ``effc.BlockQuantMatMul``: weights stay packed in the artifact and are decoded in the GEMM.

Compile-time layout (the converter re-packs the ONNX initializers, same bytes):
:func:`effc.codegen.ops.block_quant_gemv.kernel_rows`, one row per output channel with its codes along K (4-bit
codes in 64-weight lane-nibble chunks), and the ONNX scales ``S`` ``(N, K / block_size)`` (E8M0 uint8 for MX,
float16/float32 for int blocks). The embedding lookup and both decoder entry points read the same two constants, so a
tied embedding and a weight used by prefill and decode are stored once. The kernel computes
``Y (M, N) = X (M, K) @ W`` where::

    W[k, j] = element(code(Wr, j, k)) * scale(S[j, k // block_size])  (+ M[j, k // block_size], int4_asym)

Element decoding is arithmetic (vectorizable, no table): FP codes ``s|E|M`` give
``(-1)^s * 2^(max(E,1) - bias) * ((E > 0) + M / 2^m)``; MXINT8 codes are int8 / 64; int4/int8 are two's complement;
int4_asym codes are unsigned, with the block minimum ``M`` (float16/float32, the ONNX input of that name) added.
An E8M0 scale ``s`` is the float32 with exponent bits ``s`` (``2^(s - 127)``; ``s = 0`` reads as 0, which only
all-zero blocks use). OCP MX v1.0 sections 5.3 and 6.

Schedule (``M > 1``, prefill): parallel over tiles of ``nr`` output columns; each tile's ``(K, nr)`` weights are
decoded once into a local buffer (``compute_at``; rows of the tile in turn, vectorized along K) and reused by every
``mr``-row register block of the GEMM (vectorized over ``nr``), so no fp32 copy of the whole weight exists and
constant folding cannot widen it (the decode depends on the tile loop, not only on constants). ``M = 1`` (decode):
the decode-in-GEMV kernel of :mod:`effc.codegen.ops.block_quant_gemv` where it applies.

Integer path: an MXINT8 ``BlockQuantMatMul`` whose input is an MXINT8 ``BlockQDQ`` (``mode=weight_act``) lowers,
when the TVM target in scope has AVX2, to :mod:`effc.codegen.ops.block_quant_int8` (int8 activations quantized
once per input, int8·int8 block dot products in int32, block scales after each block); the QDQ kernel it replaces
becomes dead code. An ``int4_asym`` / ``int4`` / ``int8`` ``BlockQuantMatMul`` of one row fed by an int8
``BlockQDQ`` (``act_format=int8``) lowers, when the target has AVX-512 VNNI, to
:mod:`effc.codegen.ops.block_quant_vnni` (int8 activation codes once per input, ``vpdpbusd`` block dot products);
more rows of ``int4_asym`` to the VNNI GEMM of :mod:`effc.codegen.ops.block_quant_vnni_gemm` (weights decoded once
per column panel into the ``vpdpbusd`` layout, 16 output columns per vector), other formats to the float
decode-in-GEMM kernel on the quantize-dequantized activation. ``LOWERING_LOG`` entries say which kernel each layer
got (``"kernel": "int8" | "vnni" | "vnni_gemm" | "gemv" | "fp32"``).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from effc.codegen.frontend import constant_input, register_converter
from effc.codegen.ops.block_quant_gemv import (
    gemv_applies,
    gemv_kernel,
    kernel_minimums,
    kernel_rows,
    row_code,
    row_minimum,
)
from effc.codegen.ops.block_quant_int8 import builder_state, current_tile_config, int8_compute_applies, int8_matmul
from effc.codegen.ops.block_quant_vnni import vnni_applies, vnni_gemv
from effc.codegen.ops.block_quant_vnni_gemm import vnni_gemm, vnni_gemm_applies
from effc.ops.block_formats import BlockFormat, get_format

__all__ = [
    "BlockQDQConverter",
    "BlockQuantGatherConverter",
    "BlockQuantMatMulConverter",
    "block_quant_kernel",
    "schedule_block_quant",
]

logger = logging.getLogger(__name__)


def _element(code, fmt: BlockFormat):
    """float32 value of an element code (before the block scale)."""
    if fmt.kind == "mxint":
        return ((code ^ 128) - 128).astype("float32") * tirx.const(1.0 / 64.0, "float32")
    if fmt.kind == "asym":
        return code.astype("float32")
    if fmt.kind == "int":
        half = 1 << (fmt.bits - 1)
        return ((code ^ half) - half).astype("float32")
    import ml_dtypes

    info = ml_dtypes.finfo(fmt.element_dtype)
    m = int(info.nmant)
    e_bits = fmt.bits - 1 - m
    bias = 1 - int(info.minexp)
    exp = (code >> m) & ((1 << e_bits) - 1)
    man = code & ((1 << m) - 1)
    # 2^(max(E,1) - bias) as float32 bits; (E > 0) + M / 2^m is the significand (subnormal when E == 0).
    pow2 = tirx.reinterpret("float32", (tirx.max(exp, 1) - bias + 127) << 23)
    sig = tirx.Select(exp > 0, tirx.const(1.0, "float32"), tirx.const(0.0, "float32")) + man.astype(
        "float32") * tirx.const(2.0**-m, "float32")
    mag = pow2 * sig
    return tirx.Select(((code >> (fmt.bits - 1)) & 1) == 1, -mag, mag)


def _scale(s: te.Tensor, row, kb, fmt: BlockFormat):
    """float32 scale of block ``kb`` of row ``row`` (E8M0: the float32 with exponent bits ``s``)."""
    if fmt.is_mx:
        return tirx.reinterpret("float32", s[row, kb].astype("int32") << 23)
    return s[row, kb].astype("float32")


def _decoded(t: te.Tensor, s: te.Tensor, low: te.Tensor | None, row, c, k: int, block_size: int, fmt: BlockFormat):
    """float32 weight ``c`` of kernel row ``row``: element × block scale (+ block minimum when ``low`` is given).

    ``low`` is in the :func:`~effc.codegen.ops.block_quant_gemv.kernel_minimums` layout.
    """
    value = _element(row_code(t, row, c, fmt.bits, k), fmt) * _scale(s, row, c // block_size, fmt)
    return value if low is None else value + row_minimum(low, row, c // block_size)


def block_quant_kernel(m: int, k: int, n: int, fmt: BlockFormat | str, block_size: int = 32,
                       scale_dtype: str = "uint8") -> tvm.tirx.PrimFunc:
    """Unscheduled PrimFunc ``main(X (M, K) f32, Wr (N, row bytes) u8, S (N, K/B), [Mk,] Y (M, N) f32)``.

    ``Wr`` is :func:`~effc.codegen.ops.block_quant_gemv.kernel_rows` of the ONNX codes, ``S`` the ONNX scales,
    ``Mk`` :func:`~effc.codegen.ops.block_quant_gemv.kernel_minimums` of the ONNX block minimums (asymmetric formats
    only, ``scale_dtype``).
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    row_bytes = k * fmt.bits // 8 + (1 if fmt.bits == 6 else 0)
    x = te.placeholder((m, k), "float32", "X")
    wr = te.placeholder((n, row_bytes), "uint8", "Wr")
    s = te.placeholder((n, k // block_size), "uint8" if fmt.is_mx else scale_dtype, "S")
    low = te.placeholder(kernel_minimums(np.zeros((n, k // block_size), "float16")).shape, scale_dtype, "M") if (
        fmt.has_minimum) else None
    w = te.compute((k, n), lambda kk, j: _decoded(wr, s, low, j, kk, k, block_size, fmt), name="W")
    r = te.reduce_axis((0, k), "r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="Y")
    args = [x, wr, s, *([low] if low is not None else []), y]
    return te.create_prim_func(args).with_attr("global_symbol", "main")


def _divisor(n: int, want: int) -> int:
    return max(d for d in range(1, max(1, min(n, want)) + 1) if n % d == 0)


def schedule_block_quant(func: tvm.tirx.PrimFunc, mr: int | None = None, nr: int | None = None,
                         lanes: int | None = None) -> tvm.tirx.PrimFunc:
    """Tile-decode + register-blocked GEMM schedule (module docstring); marks ``tir.is_scheduled``.

    ``mr`` rows × ``nr`` columns per register tile in vectors of ``lanes``; by default the fp32 GEMM template's
    tile for the target in scope (:mod:`effc.codegen.schedules.tiles`; AVX2: 4 × 24 in 8 lanes). Zen 3, 1 thread:
    MXINT8 128×384×1536 4.59 → 2.08 ms and 128×1536×384 8.57 → 1.95 ms against the former fixed 4 × 32 in 16
    lanes (two ymm per vector op), i.e. about the fp32 template's speed (2.27 ms).
    """
    cfg = current_tile_config()
    default_mr, candidates, default_lanes = cfg.gemm_mr, cfg.gemm_nr, cfg.lanes
    sch = s_tir.Schedule(func)
    yb, wb = sch.get_sblock("Y"), sch.get_sblock("W")
    i, j, r = sch.get_loops(yb)
    rows, cols = (int(sch.get(loop).extent) for loop in (i, j))
    nr = _divisor(cols, nr or next((c for c in candidates if cols % c == 0), candidates[-1]))
    lanes = _divisor(nr, lanes or default_lanes)
    mr = _divisor(rows, mr or default_mr)
    jo, ji = sch.split(j, [None, nr])
    io, ii = sch.split(i, [None, mr])
    jv, jl = sch.split(ji, [None, lanes])
    sch.reorder(jo, io, r, ii, jv, jl)
    sch.compute_at(wb, jo)
    sch.set_scope(wb, 0, "local")  # one (K, nr) tile per thread after buffer compaction
    acc = sch.cache_write(yb, 0, "local")
    sch.reverse_compute_at(acc, io)
    sch.parallel(jo)
    sch.vectorize(jl)
    sch.unroll(jv)
    sch.unroll(ii)
    wk, wj = sch.get_loops(wb)[-2:]
    sch.reorder(wj, wk)  # one weight row after the other: contiguous codes, vectorized along K
    sch.vectorize(sch.split(wk, [None, _divisor(int(sch.get(wk).extent), 8)])[1])
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.decompose_reduction(yb, r)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)



LOWERING_LOG: list[dict] = []
# Output var of an effc.BlockQDQ -> (its input, format, block size), for the integer MXINT8 path.
_QDQ_SOURCES: dict = {}


def _minimums(extra: list, params, what: str) -> list[np.ndarray]:
    """``[kernel minimums]`` of an asymmetric format's node (its fourth input, an initializer), ``[]`` without one.

    In the :func:`~effc.codegen.ops.block_quant_gemv.kernel_minimums` layout.
    """
    return [kernel_minimums(constant_input(extra[0], params, what))] if extra and extra[0] is not None else []


def _format_attrs(attr: dict) -> tuple:
    """``(BlockFormat, block_size)`` from a node's ``format`` (bytes or str) and ``block_size`` attributes."""
    raw = attr["format"]
    return get_format(raw.decode() if isinstance(raw, bytes) else str(raw)), int(attr.get("block_size", 32))


@register_converter("BlockQuantMatMul")
class BlockQuantMatMulConverter:
    """``effc.BlockQuantMatMul(X, Wq, S)`` → ``call_tir`` of the decode-in-GEMM kernel with packed constants."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, wq_e, s_e = inputs[:3]
        fmt, bs = _format_attrs(attr)
        what = "BlockQuantMatMul packed weights, scales and minimums"
        wq, scales = constant_input(wq_e, params, what), constant_input(s_e, params, what)
        lows = _minimums(inputs[3:], params, what)
        n = wq.shape[0]
        k = scales.shape[1] * bs
        x = bb.normalize(x)
        shape = [int(d) for d in x.ty.shape.values]
        rows = int(np.prod(shape[:-1]))
        src = builder_state(_QDQ_SOURCES, bb).get(x) if isinstance(x, relax.Var) else None
        if src is not None and int8_compute_applies(fmt, bs, src[1], src[2], k, n):
            LOWERING_LOG.append({"format": fmt.name, "shape": [rows, k, n], "kernel": "int8",
                                 "weight_bytes": int(wq.nbytes + scales.nbytes)})
            y = int8_matmul(bb, src[0], wq, scales, rows, k, n)
            return relax.op.reshape(y, [*shape[:-1], n])
        wr = kernel_rows(wq, fmt, k)
        if src is not None and rows == 1 and vnni_applies(fmt, bs, src[1], src[2], k, n):
            LOWERING_LOG.append({"format": fmt.name, "shape": [rows, k, n], "kernel": "vnni",
                                 "weight_bytes": int(wr.nbytes + scales.nbytes + sum(v.nbytes for v in lows))})
            return relax.op.reshape(vnni_gemv(bb, src[0], [wr, scales, *lows], fmt, k, n), [*shape[:-1], n])
        if src is not None and rows > 1 and vnni_gemm_applies(fmt, bs, src[1], src[2], k, n):
            LOWERING_LOG.append({"format": fmt.name, "shape": [rows, k, n], "kernel": "vnni_gemm",
                                 "weight_bytes": int(wr.nbytes + scales.nbytes + sum(v.nbytes for v in lows))})
            y = vnni_gemm(bb, src[0], [wr, scales, *lows], fmt, rows, k, n)
            return relax.op.reshape(y, [*shape[:-1], n])
        consts = [relax.const(wr), relax.const(scales), *(relax.const(v) for v in lows)]
        if rows == 1 and gemv_applies(fmt, bs, k, n):
            kernel, name, func = "gemv", "gemv", gemv_kernel(k, n, fmt, str(scales.dtype))
            consts += [relax.const(fmt.code_table())] if fmt.bits == 4 else []
        else:
            func = schedule_block_quant(block_quant_kernel(rows, k, n, fmt, bs, str(scales.dtype)))
            kernel, name = "fp32", "matmul"
        gv = bb.add_func(func.without_attr("global_symbol"), f"effc_block_quant_{name}_{fmt.name}")
        x2 = bb.normalize(relax.op.reshape(x, (rows, k)))
        y = relax.call_tir(gv, [x2, *consts], out_ty=relax.TensorType((rows, n), "float32"))
        LOWERING_LOG.append({"format": fmt.name, "shape": [rows, k, n], "kernel": kernel,
                             "weight_bytes": int(wr.nbytes + scales.nbytes + sum(v.nbytes for v in lows))})
        return relax.op.reshape(bb.normalize(y), [*shape[:-1], n])


@register_converter("BlockQuantGather")
class BlockQuantGatherConverter:
    """``effc.BlockQuantGather(Tq, S, I)`` → a kernel that decodes only the gathered rows of the packed table."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        tq_e, s_e, ids = inputs[:3]
        fmt, bs = _format_attrs(attr)
        what = "BlockQuantGather packed table, scales and minimums"
        tq, scales = constant_input(tq_e, params, what), constant_input(s_e, params, what)
        lows = _minimums(inputs[3:], params, what)
        vocab, d = scales.shape[0], scales.shape[1] * bs
        tq = kernel_rows(tq, fmt, d)  # the layout of the matmul kernels: a tied output projection shares it
        ids = bb.normalize(ids)
        shape = [int(v) for v in ids.ty.shape.values]
        count = int(np.prod(shape)) if shape else 1
        t = te.placeholder(tq.shape, "uint8", "Tq")
        s = te.placeholder(scales.shape, str(scales.dtype), "S")
        idx = te.placeholder((count,), str(ids.ty.dtype), "I")
        low = [te.placeholder(v.shape, str(v.dtype), "M") for v in lows]

        def row(p):
            raw = idx[p].astype("int32")
            return tirx.Select(raw < 0, raw + vocab, raw)  # ONNX Gather: negative indices count from the end

        out = te.compute((count, d), lambda p, c: _decoded(t, s, low[0] if low else None, row(p), c, d, bs, fmt),
                         name="Y")
        func = te.create_prim_func([t, s, idx, *low, out])
        gv = bb.add_func(func.without_attr("global_symbol"), f"effc_block_quant_gather_{fmt.name}")
        flat = bb.normalize(relax.op.reshape(ids, (count,)))
        y = relax.call_tir(gv, [relax.const(tq), relax.const(scales), flat, *(relax.const(v) for v in lows)],
                           out_ty=relax.TensorType((count, d), "float32"))
        return relax.op.reshape(bb.normalize(y), [*shape, d])


def _qdq_kernel(shape: list[int], fmt: BlockFormat, bs: int) -> tvm.tirx.PrimFunc:
    """Dynamic MX (exact exponent arithmetic on float32 bits) or int8 quantize-dequantize along the last axis."""
    rows, k = int(np.prod(shape[:-1])), shape[-1]
    x = te.placeholder((rows, k), "float32", "X")
    r = te.reduce_axis((0, bs), "r")
    amax = te.compute((rows, k // bs), lambda i, b: te.max(tirx.abs(x[i, b * bs + r]), axis=r), name="amax")

    def floor_log2(v):  # exponent field of a normal float32 (amax below 2^-126 counts as 2^-126)
        return ((tirx.reinterpret("int32", tirx.max(v, tirx.const(2.0**-126, "float32"))) >> 23) & 255) - 127

    def qdq_int(i, c):  # symmetric int blocks, float32 scale amax / qmax (1 for an all-zero block)
        raw = amax[i, c // bs] / tirx.const(float(fmt.qmax), "float32")
        scale = tirx.Select(raw > tirx.const(0.0, "float32"), raw, tirx.const(1.0, "float32"))
        lim = tirx.const(float(fmt.qmax), "float32")
        return tirx.nearbyint(tirx.max(tirx.min(x[i, c] / scale, lim), -lim)) * scale

    def qdq(i, c):
        shared = tirx.max(tirx.min(floor_log2(amax[i, c // bs]) - fmt.emax, 127), -126)
        scale = tirx.reinterpret("float32", (shared + 127) << 23)
        lim = tirx.const(fmt.max_value, "float32")
        v = tirx.max(tirx.min(x[i, c] / scale, lim), -lim)
        if fmt.kind == "mxint":
            q = tirx.nearbyint(v * tirx.const(64.0, "float32")) * tirx.const(1.0 / 64.0, "float32")
        else:
            import ml_dtypes

            info = ml_dtypes.finfo(fmt.element_dtype)
            e = tirx.max(floor_log2(tirx.abs(v)), int(info.minexp))
            quantum = tirx.reinterpret("float32", (e - int(info.nmant) + 127) << 23)
            q = tirx.nearbyint(v / quantum) * quantum
        return q * scale

    y = te.compute((rows, k), qdq if fmt.is_mx else qdq_int, name="Y")
    return te.create_prim_func([x, y])


@register_converter("BlockQDQ")
class BlockQDQConverter:
    """``effc.BlockQDQ(X)`` → elementwise kernel with a per-block max (activation / KV quantize-dequantize).

    Blocks with ``amax < 2^-126 * 2^emax`` use the scale ``2^-126`` instead of the E8M0 value (the reference body
    computes the same through ``Max(amax, 2^-126)``).
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        fmt, bs = _format_attrs(attr)
        x = bb.normalize(inputs[0])
        shape = [int(v) for v in x.ty.shape.values]
        rows = int(np.prod(shape[:-1]))
        gv = bb.add_func(_qdq_kernel(shape, fmt, bs).without_attr("global_symbol"), f"effc_block_qdq_{fmt.name}")
        x2 = bb.normalize(relax.op.reshape(x, (rows, shape[-1])))
        y = relax.call_tir(gv, [x2], out_ty=relax.TensorType((rows, shape[-1]), "float32"))
        out = bb.emit(relax.op.reshape(bb.normalize(y), shape))
        builder_state(_QDQ_SOURCES, bb)[out] = (x, fmt, bs)  # an MXINT8 consumer may quantize x itself (int8 GEMM)
        return out
