"""TVM lowering of ``effc.KVBlockEncode`` / ``effc.KVBlockDecode`` (KV-cache rows, :mod:`effc.ops.kv_blocks`).

Both are element-wise kernels over ``(*lead, D)``. Encode: per block of ``block_size``
entries the largest magnitude, its exponent read from the float32 bits (exact ``floor(log2)``), the E8M0 scale, and
each element's code by exponent arithmetic (FP) or ``round(64 v)`` (MXINT8), written as one row of ``D`` codes then
``D / block_size`` scale bytes; equal to the ONNX body code for code. Decode: the element value from its code
(:func:`element_vector` for 8 codes at a time, the scalar form of :mod:`effc.codegen.ops.block_quant` here) times the
block's ``2^(s - 127)``. The decode-attention kernel (:mod:`effc.codegen.ops.decode_attention_mx`) decodes rows the
same way inside its slot walk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

from effc.codegen.frontend import register_converter
from effc.codegen.ops.block_quant import _element, _format_attrs
from effc.ops.block_formats import E8M0_BIAS, BlockFormat
from effc.ops.block_quant import _fp_info
from effc.ops.kv_blocks import row_bytes, row_head_dim

__all__ = ["decode_kernel", "e8m0", "element_vector", "encode_kernel"]

LANES = 8


def e8m0(byte):
    """float32 value ``2^(s - 127)`` of an E8M0 scale byte (``s = 0``: ``2^-127``, a float32 subnormal)."""
    bits = tirx.reinterpret("float32", tirx.Cast("int32", byte) << 23)
    return tirx.Select(byte == 0, tirx.const(2.0**-E8M0_BIAS, "float32"), bits)


def element_vector(codes, fmt: BlockFormat):
    """float32x8 element values (before the block scale) of 8 one-byte codes ``codes`` (a uint8x8 expression).

    FP codes ``s|E|M`` are moved into the float32 bit positions (``E`` and ``M`` under float32's exponent and
    mantissa fields, the sign on bit 31: the sign-extended code shifted left by ``23 - m`` and masked) and multiplied
    by ``2^(127 - bias)``: exact for normals and, through a float32 subnormal, for the format's subnormals (4 vector
    instructions per 8 codes). MXINT8 codes are two's complement ``k / 64``.
    """
    signed = T.Cast("int32x8", T.Cast("int8x8", codes))
    if fmt.kind == "mxint":
        return T.Cast("float32x8", signed) * T.broadcast(T.float32(1.0 / 64.0), LANES)
    emin, mant = _fp_info(fmt)
    mask = int(np.int32(np.uint32(0x80000000 | (0x7F << (23 - mant)))))
    bits = T.bitwise_and(T.shift_left(signed, T.broadcast(T.int32(23 - mant), LANES)),
                         T.broadcast(T.int32(mask), LANES))
    return T.reinterpret("float32x8", bits) * T.broadcast(T.float32(2.0 ** (126 + emin)), LANES)


def _floor_log2(v):
    """``floor(log2 v)`` of a float32 ``v >= 2^-126`` (its exponent field); -127 for smaller ``v``."""
    return ((tirx.reinterpret("int32", v) >> 23) & 255) - 127


def _i64(shape) -> list:
    """Shape with int64 extents, as Relax's own kernels have (buffers of fused kernels must agree)."""
    return [tirx.IntImm("int64", int(v)) for v in shape]


def encode_kernel(shape: tuple[int, ...], fmt: BlockFormat, block_size: int) -> tvm.tirx.PrimFunc:
    """``main(X (*lead, D) float32, R (*lead, W) uint8)``: the rows of ``X`` (see the module docstring)."""
    *lead, d = shape
    nb, w = d // block_size, row_bytes(d, block_size)
    x = te.placeholder(_i64(shape), "float32", "X")
    r = te.reduce_axis((0, block_size), "r")
    amax = te.compute(_i64((*lead, nb)), lambda *i: te.max(tirx.abs(x[(*i[:-1], i[-1] * block_size + r)]), axis=r),
                      name="amax")

    def shared(*i):
        a = amax[i]
        e = tirx.max(tirx.min(_floor_log2(tirx.max(a, tirx.const(2.0**-126, "float32"))) - fmt.emax, 127), -127)
        return tirx.Select(a > tirx.const(0.0, "float32"), e, -127)

    sh = te.compute(_i64((*lead, nb)), shared, name="shared")

    def code(i, c):
        s = sh[(*i, c // block_size)]
        scale = tirx.Select(s == -127, tirx.const(2.0**-127, "float32"),
                            tirx.reinterpret("float32", (s + 127) << 23))
        lim = tirx.const(fmt.max_value, "float32")
        v = tirx.max(tirx.min(x[(*i, c)] / scale, lim), -lim)
        if fmt.kind == "mxint":
            return (tirx.nearbyint(v * tirx.const(64.0, "float32")).astype("int32") + 256) & 255
        emin, mant = _fp_info(fmt)
        a = tirx.abs(v)
        e = tirx.max(_floor_log2(a), emin)
        quantum = tirx.reinterpret("float32", (e - mant + 127) << 23)
        mag = (e - emin) * (1 << mant) + tirx.nearbyint(a / quantum).astype("int32")
        return mag + tirx.Select(v < tirx.const(0.0, "float32"), 128, 0)

    out = te.compute(_i64((*lead, w)), lambda *i: tirx.if_then_else(
        i[-1] < d, code(i[:-1], tirx.min(i[-1], d - 1)), sh[(*i[:-1], tirx.max(i[-1] - d, 0))] + E8M0_BIAS
    ).astype("uint8"), name="R")
    return te.create_prim_func([x, out]).without_attr("global_symbol")


def decode_kernel(shape: tuple[int, ...], fmt: BlockFormat, block_size: int) -> tvm.tirx.PrimFunc:
    """``main(R (*lead, W) uint8, X (*lead, D) float32)``: the values of the rows."""
    *lead, w = shape
    d = row_head_dim(w, block_size)
    r = te.placeholder(_i64(shape), "uint8", "R")
    x = te.compute(_i64((*lead, d)), lambda *i: _element(r[i].astype("int32"), fmt) * e8m0(
        r[(*i[:-1], d + i[-1] // block_size)]), name="X")
    return te.create_prim_func([r, x]).without_attr("global_symbol")


class _RowsConverter:
    """Converter of an element-wise row operator: ``kernel(shape, fmt, bs)`` on ``(*lead, n)`` → ``(*lead, width)``."""

    kernel: Callable[[tuple[int, ...], BlockFormat, int], tvm.tirx.PrimFunc]
    width: Callable[[int, int], int]  # ``width(n, block_size)``
    dtype: str
    name: str

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        fmt, bs = _format_attrs(attr)
        x = bb.normalize(inputs[0])
        shape = tuple(int(v) for v in x.ty.shape.values)
        gv = bb.add_func(cls.kernel(shape, fmt, bs), f"{cls.name}_{fmt.name}")
        return relax.call_tir(gv, [x], out_ty=relax.TensorType([*shape[:-1], cls.width(shape[-1], bs)], cls.dtype))


@register_converter("KVBlockEncode")
class KVBlockEncodeConverter(_RowsConverter):
    """``effc.KVBlockEncode(X)`` → :func:`encode_kernel`."""

    kernel, width, dtype, name = staticmethod(encode_kernel), staticmethod(row_bytes), "uint8", "effc_kv_encode"


@register_converter("KVBlockDecode")
class KVBlockDecodeConverter(_RowsConverter):
    """``effc.KVBlockDecode(R)`` → :func:`decode_kernel`."""

    kernel, width, dtype, name = staticmethod(decode_kernel), staticmethod(row_head_dim), "float32", "effc_kv_decode"
