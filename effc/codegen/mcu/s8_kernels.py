"""Lowering of effc's int8 layers (``effc.McuS8Conv`` / ``effc.McuS8MatMul``) to the hand-written C micro-kernels.

Each node becomes a ``call_tir`` of an opaque PrimFunc whose body is one ``call_extern`` into ``s8_kernels.c``
(``effc_s8_conv2d`` / ``effc_s8_matmul``), so Relax plans its int8 input/output and the conv's im2col columns
(2 x K int8) in the static arena like any other kernel, and the runner calls it in program order. The C library
is prepended to the generated kernels with ``EFFC_S8_DSP`` taken from the target's capability record: the
Cortex-M4 DSP SIMD path (``SXTB16`` + ``SMLAD``) or the portable C loop (Cortex-M3).

Source: Arm ACLE §9.5 (SIMD32 intrinsics); the layout and arithmetic are documented in ``s8_kernels.c``.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
from tvm import relax, te, tirx

from effc.codegen.frontend import register_converter
from effc.codegen.mcu.s8_rewrite import OP_CONV, OP_DWCONV, OP_MATMUL


def library_c(dsp: bool, ops: set[str]) -> str:
    """The C text of the int8 micro-kernels.

    Args:
        dsp: the core has the DSP extension (SXTB16/SMLAD path), else the portable loop.
        ops: the effc op types the model uses (``McuS8Conv``, ``McuS8DwConv``, ``McuS8MatMul``): only their entry
            points are compiled.
    """
    body = resources.files("effc.codegen.mcu").joinpath("s8_kernels.c").read_text()
    flags = {
        "EFFC_S8_DSP": dsp,
        "EFFC_S8_CONV": OP_CONV in ops,
        "EFFC_S8_MATMUL": OP_MATMUL in ops,
        "EFFC_S8_DWCONV": OP_DWCONV in ops,
    }
    return "".join(f"#define {k} {int(bool(v))}\n" for k, v in flags.items()) + body


def _i32(v: int) -> tirx.IntImm:
    return tirx.IntImm("int32", int(v))


def _extern(bb, name: str, inputs: list, out_shapes: list[tuple[int, ...]], ints: list[int], hint: str):
    """``call_te`` of a ``te.extern`` calling C function ``name(inputs..., outputs..., ints...)`` (int8 outputs)."""

    def fn(*tensors):
        return te.extern(
            out_shapes,
            list(tensors),
            lambda ins, outs: tirx.call_extern(
                "int32", name, *[t.data for t in ins], *[o.data for o in outs], *[_i32(v) for v in ints]
            ),
            dtype=["int8"] * len(out_shapes),
            name=f"{hint}_out",
        )

    return bb.emit_te(fn, *inputs, primfunc_name_hint=hint)


def _conv(bb, inputs, attr, name: str, im2col: bool):
    """``name(x, w, bias, mult, shift, geom | y[, cols] | N, zy, lo)``: the conv entry points' shared call."""
    geom = [int(v) for v in attr["geom"]]
    n, zy, lo = int(attr["n"]), int(attr["zy"]), int(attr["lo"])
    outs = [(1, n, geom[11], geom[12])]
    if im2col:  # two im2col columns of K = C*KH*KW int8, planned in the arena
        outs.append((2 * geom[0] * geom[3] * geom[4],))
    g = relax.const(np.array(geom, dtype=np.int32))
    out = _extern(bb, name, [*inputs, g], outs, [n, zy, lo], name)
    return relax.TupleGetItem(out, 0) if im2col else out


class _ConvConverter:
    """Converter of an int8 conv layer ``(xq, w, bias, mult, shift)``: one call of the C entry point ``entry``."""

    entry: str
    im2col: bool  # the entry point takes two im2col columns of scratch

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        return _conv(bb, inputs, attr, cls.entry, im2col=cls.im2col)


@register_converter(OP_CONV)
class McuS8ConvConverter(_ConvConverter):
    """``effc.McuS8Conv(xq, w, bias, mult, shift)`` → ``effc_s8_conv2d`` (NCHW, one image, groups 1)."""

    entry, im2col = "effc_s8_conv2d", True


@register_converter(OP_DWCONV)
class McuS8DwConvConverter(_ConvConverter):
    """``effc.McuS8DwConv(xq, w, bias, mult, shift)`` → ``effc_s8_dwconv2d`` (depthwise, NCHW, one image)."""

    entry, im2col = "effc_s8_dwconv2d", False


@register_converter(OP_MATMUL)
class McuS8MatMulConverter:
    """``effc.McuS8MatMul(xq, w, bias, mult, shift)`` → ``effc_s8_matmul`` (x (M, K) int8 → y (M, N) int8)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        del params
        mm, k, n = int(attr["m"]), int(attr["k"]), int(attr["n"])
        zy, lo = int(attr["zy"]), int(attr["lo"])
        x, w, b, m, s = inputs
        # C order: x, w, bias, mult, shift | y | M, N, K, zy, lo
        return _extern(bb, "effc_s8_matmul", [x, w, b, m, s], [(mm, n)], [mm, n, k, zy, lo], "effc_s8_matmul")
