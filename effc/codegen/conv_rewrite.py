"""Relax-level conv rewrites that turn slow conv forms into ones the direct-conv template runs at full width.

Three rules, applied before ``LegalizeOps`` (:func:`rewrite_convs`):

* **Non-overlapping transposed conv → 1×1 conv + depth-to-space.** A ``conv2d_transpose`` whose kernel equals
  its stride (``k == s``, no padding, no output padding, dilation 1, groups 1, constant ``IOHW`` weight) writes
  every output pixel from exactly one input pixel: ``out[n, co, h*kh + a, w*kw + b] = sum_ci x[n, ci, h, w] *
  W[ci, co, a, b]``. That is a 1×1 conv to ``Cout*kh*kw`` channels with the weight repacked at compile time to
  ``(Cout*kh*kw, Cin, 1, 1)``, followed by ``reshape (N, Cout, kh, kw, H, W) → permute (0, 1, 4, 2, 5, 3) →
  reshape (N, Cout, H*kh, W*kw)`` (the pixel shuffle of Shi et al., "Real-Time Single Image and Video
  Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network", CVPR 2016, read backwards).
  TOPI lowers the transposed conv as a conv over a zero-dilated input, spending 3/4 of its MACs (for ``s = 2``)
  on zeros, with a 1-channel output axis that leaves no register blocking.
* **Output length padded to the vector tile.** A stride-1 ``conv2d`` whose vectorized output axis (the width, or
  the height of a ``(N, C, L, 1)`` 1-D conv) is at least 4 tiles long but no multiple of ``2 * lanes`` gets its
  input zero-padded on the far side so that the output axis becomes a multiple of the tile, then sliced back:
  the template's inner loop vectorizes ``2 * lanes`` wide (``3 * lanes`` for a 1-D conv with several taps)
  instead of by the largest power-of-two divisor (Magika's 508-long 1-D conv: 4 wide; now 528 = 22 × 24).
* **Pointwise conv over a narrow image → 1-D conv over its pixels.** A 1×1, stride-1, unpadded conv whose width is
  no multiple of the tile (PP-OCR det's 20×20 and 10×10 maps: 4 lanes wide) is run on the input viewed as
  ``(N, C, H*W, 1)`` (a free reshape) and reshaped back; when ``H*W`` is no tile multiple either, the previous
  rule pads it. The conv epilogue (bias, activation) then runs as its own injective kernel after the reshape.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

from effc.codegen.schedules.conv import one_d_tile

logger = logging.getLogger(__name__)


def _const_array(expr: relax.Expr, mutator: PyExprMutator) -> np.ndarray | None:
    """The numpy value of a Relax constant (or a variable bound to one), else None."""
    from effc.codegen.cpu import _const_value  # deferred: cpu imports this module

    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        expr = bound if bound is not None else expr
    return _const_value(expr)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _out_dtype(attrs) -> str | None:
    """The call's ``out_dtype`` attribute, None when unset (prints as ``""``, ``"None"`` or ``"void"``)."""
    text = str(attrs.out_dtype)
    return None if text in ("", "None", "void") else text


def _static_shape(expr: relax.Expr) -> list[int] | None:
    """Static shape of ``expr``'s tensor type, None when unknown or symbolic."""
    from effc.codegen.cpu import _out_shape  # deferred: cpu imports this module

    return _out_shape(expr)


def _transpose_as_conv(call: relax.Call, mutator: PyExprMutator) -> tuple[relax.Expr | None, str]:
    """Rewrite a non-overlapping ``conv2d_transpose`` as 1×1 conv + depth-to-space.

    Returns:
        ``(replacement, "")`` or ``(None, reason it does not apply)``.
    """
    attrs = call.attrs
    x, weight = call.args[0], call.args[1]
    w = _const_array(weight, mutator)
    x_shape = _static_shape(x)
    if w is None or x_shape is None or len(x_shape) != 4 or w.ndim != 4:
        return None, "weight not constant or shapes not static 4-D"
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "IOHW", "NCHW"):
        return None, "layout is not NCHW/IOHW"
    strides, kernel = _ints(attrs.strides), list(w.shape[2:])
    if int(attrs.groups) != 1 or strides != kernel or any(_ints(attrs.padding)) or any(_ints(attrs.output_padding)):
        return None, f"kernel {kernel} != strides {strides}, or padding/groups"
    if any(d != 1 for d in _ints(attrs.dilation)):
        return None, "dilated"
    n, _, h, wd = x_shape
    cin, cout, kh, kw = w.shape
    packed = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(cout * kh * kw, cin, 1, 1))
    bb = mutator.builder_
    y = bb.emit(relax.op.nn.conv2d(x, relax.const(packed, str(packed.dtype)), out_dtype=_out_dtype(attrs)))
    y = bb.emit(relax.op.reshape(y, (n, cout, kh, kw, h, wd)))
    y = bb.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(y, (n, cout, h * kh, wd * kw)), ""


def _padded_length(length: int, tile: int) -> int:
    return -(-length // tile) * tile


def _pad_conv_output(call: relax.Call, mutator: PyExprMutator, lanes: int) -> tuple[relax.Expr | None, str]:
    """Pad a stride-1 conv's vectorized output axis up to a multiple of the template's tile; slice it back.

    The tile is ``2 * lanes``, or :func:`~effc.codegen.schedules.conv.one_d_tile` for a 1-D conv.

    Returns:
        ``(replacement, "")`` or ``(None, reason it does not apply)``.
    """
    attrs = call.attrs
    tile = 2 * lanes
    x_shape, out_shape = _static_shape(call.args[0]), _static_shape(call)
    if x_shape is None or out_shape is None or len(out_shape) != 4:
        return None, "shapes not static 4-D"
    if (str(attrs.data_layout), str(attrs.out_layout)) != ("NCHW", "NCHW"):
        return None, "layout is not NCHW"
    if any(s != 1 for s in _ints(attrs.strides)) or any(d != 1 for d in _ints(attrs.dilation)):
        return None, "strided or dilated"
    _, _, oh, ow = out_shape
    axis = 2 if ow == 1 and oh > 1 else 3  # the axis the conv template vectorizes
    length = out_shape[axis]
    w_shape = _static_shape(call.args[1])
    if axis == 2 and w_shape is not None and len(w_shape) == 4:
        tile = one_d_tile(w_shape[2], lanes)
    if length % tile == 0 or length < 4 * tile:
        return None, f"output length {length} is a multiple of {tile} or shorter than 4 tiles"
    extra = _padded_length(length, tile) - length
    pad = _ints(attrs.padding)  # (top, left, bottom, right)
    pad[axis] += extra  # bottom (axis 2) or right (axis 3)
    conv = relax.op.nn.conv2d(
        call.args[0], call.args[1], strides=_ints(attrs.strides), padding=pad, dilation=_ints(attrs.dilation),
        groups=int(attrs.groups), data_layout="NCHW", kernel_layout=str(attrs.kernel_layout), out_layout="NCHW",
        out_dtype=_out_dtype(attrs),
    )
    y = mutator.builder_.emit(conv)
    return relax.op.strided_slice(y, axes=[axis], begin=[0], end=[length]), ""


def _pointwise_as_1d(call: relax.Call, mutator: PyExprMutator, lanes: int) -> tuple[relax.Expr | None, str]:
    """A 1×1 stride-1 unpadded conv over a narrow image as a 1-D conv over the flattened ``H*W`` pixels.

    Returns:
        ``(replacement, "")`` or ``(None, reason it does not apply)``.
    """
    attrs = call.attrs
    x_shape, w_shape = _static_shape(call.args[0]), _static_shape(call.args[1])
    if x_shape is None or w_shape is None or len(x_shape) != 4 or w_shape[2:] != [1, 1]:
        return None, "not a static 1x1 conv"
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None, "layout is not NCHW/OIHW"
    if any(_ints(attrs.padding)) or any(s != 1 for s in _ints(attrs.strides)) or int(attrs.groups) != 1:
        return None, "padded, strided or grouped"
    n, c, h, w = x_shape
    tile = 2 * lanes
    if h == 1 or w % tile == 0 or ((h * w) % tile and h * w < 4 * tile):
        return None, f"width {w} already a tile multiple, or {h}x{w} pixels fewer than 4 tiles"
    bb = mutator.builder_
    x = bb.emit(relax.op.reshape(call.args[0], (n, c, h * w, 1)))
    conv = bb.normalize(relax.op.nn.conv2d(x, call.args[1], out_dtype=_out_dtype(attrs)))
    padded, _ = _pad_conv_output(conv, mutator, lanes)  # H*W not a tile multiple: pad the 1-D output too
    y = bb.emit(padded if padded is not None else conv)
    return relax.op.reshape(y, (n, w_shape[0], h, w)), ""


@expr_functor.mutator
class _ConvRewriter(PyExprMutator):
    """Applies the rules of this module to every conv call; counts what it rewrote."""

    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.counts: dict[str, int] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op):
            return call
        if op.name == "relax.nn.conv2d_transpose":
            rule, (new, reason) = "transpose_as_conv", _transpose_as_conv(call, self)
        elif op.name == "relax.nn.conv2d":
            rule, (new, reason) = "pointwise_as_1d", _pointwise_as_1d(call, self, self.lanes)
            if new is None:
                rule, (new, reason) = "pad_output_to_tile", _pad_conv_output(call, self, self.lanes)
        else:
            return call
        if new is None:
            logger.debug("%s: %s not applied: %s", op.name, rule, reason)
            return call
        self.counts[rule] = self.counts.get(rule, 0) + 1
        return new


def rewrite_convs(mod: tvm.IRModule, lanes: int) -> tuple[tvm.IRModule, dict[str, int]]:
    """Apply the conv rewrites of this module to every Relax function of ``mod``.

    Args:
        mod: a Relax module before ``LegalizeOps`` (NCHW convs with constant weights).
        lanes: fp32 SIMD lanes of the target (8 on AVX2); the output-padding rule pads to ``2 * lanes``
            (``3 * lanes`` for a 1-D conv with several taps).

    Returns:
        ``(new_mod, counts)`` with ``counts`` mapping a rule name to the number of convs it rewrote.
    """
    rewriter = _ConvRewriter(mod, lanes)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    if rewriter.counts:
        logger.info("conv rewrites: %s", rewriter.counts)
    return rewriter.builder_.get(), rewriter.counts
