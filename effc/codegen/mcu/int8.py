"""Keep int8 QDQ weights int8 down to the C kernels: dequantize inside the consuming conv/matmul.

TVM's ONNX frontend turns ``DequantizeLinear(int8 const, scale, zp)`` into ``R.dequantize``; left alone,
``FoldConstant`` widens it to an fp32 constant (4x the flash), and without folding ``FuseOps`` does not fuse the
dequantize into the conv/matmul that consumes it (a full fp32 weight copy lands in RAM). :func:`fuse_dequantize`
rewrites ``conv2d(x, dequantize(Wq))`` / ``matmul(x, [permute_dims](dequantize(Wq)))`` into one TE kernel whose
weight operand is the int8 constant, with the dequantize as a separate TE stage named ``effc_dequant``;
:func:`inline_dequant` then inlines that stage into the reduction (``compute_inline``) so each weight is read
as ``(float)Wq[...] * scale[c]`` in the inner loop. Bias/ReLU still fuse after it as usual.

Source: ONNX ``DequantizeLinear`` (y = (x - zero_point) * scale, per-axis scales); ``../shared/notes/mcu.md``.
"""

from __future__ import annotations

import logging
import re

import tvm
from tvm import relax, s_tir, te, tirx, topi

logger = logging.getLogger(__name__)

#: Name prefix of the TE stage that dequantizes a weight (inlined by :func:`inline_dequant`).
DEQUANT_STAGE = "effc_dequant"
_DQ = tvm.ir.Op.get("relax.dequantize")
_CONV = tvm.ir.Op.get("relax.nn.conv2d")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_CONST = tvm.ir.expr.GenericConst


def _is_zero_const(expr) -> bool:
    return isinstance(expr, _CONST) and not expr.value.numpy().any()


def _dequant_te(wq: te.Tensor, scale: te.Tensor, axis: int, transpose: bool) -> te.Tensor:
    """``float(wq) * scale[axis]`` (optionally transposed 2-D), as the stage ``effc_dequant``."""
    per_axis = len(scale.shape) == 1 and int(scale.shape[0]) > 1
    ndim = len(wq.shape)
    axis = axis % ndim

    def value(*idx):
        s = scale[idx[axis]] if per_axis else (scale[0] if len(scale.shape) == 1 else scale())
        return wq(*idx).astype("float32") * s

    if transpose:
        shape = (wq.shape[1], wq.shape[0])
        return te.compute(shape, lambda i, j: value(j, i), name=DEQUANT_STAGE)
    return te.compute(wq.shape, value, name=DEQUANT_STAGE)


@relax.expr_functor.mutator
class _FuseDequantize(relax.PyExprMutator):
    """Replace conv2d/matmul on a dequantized int8 constant by one TE kernel taking the int8 constant."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def _dequant_source(self, expr):
        """``(wq_const, scale_const, axis, transpose)`` when ``expr`` is a (transposed) int8 dequantize, else None."""
        transpose = False
        binding = self.lookup_binding(expr) if isinstance(expr, tvm.ir.Var) else None
        if isinstance(binding, relax.Call) and binding.op.same_as(_PERMUTE):
            axes = binding.attrs.axes
            if axes is None or [int(a) for a in axes] != [1, 0]:
                return None
            transpose = True
            binding = self.lookup_binding(binding.args[0]) if isinstance(binding.args[0], tvm.ir.Var) else None
        if not (isinstance(binding, relax.Call) and binding.op.same_as(_DQ)):
            return None
        wq, scale = binding.args[0], binding.args[1]
        zero_point = binding.args[2] if len(binding.args) > 2 else None
        if not (isinstance(wq, _CONST) and isinstance(scale, _CONST) and str(wq.ty.dtype) in ("int8", "uint8")):
            return None
        if zero_point is not None and not _is_zero_const(zero_point):
            return None
        return wq, scale, int(binding.attrs.axis), transpose

    def visit_call_(self, call):  # noqa: D102
        call = super().visit_call_(call)
        if call.op.same_as(_CONV):
            src = self._dequant_source(call.args[1])
            attrs = call.attrs
            if src is None or src[3] or attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
                return call
            wq, scale, axis, _ = src
            strides, padding = [int(v) for v in attrs.strides], [int(v) for v in attrs.padding]
            dilation, groups = [int(v) for v in attrs.dilation], int(attrs.groups)

            def conv(x, w8, s):
                w = _dequant_te(w8, s, axis, False)
                if groups == 1:
                    return topi.nn.conv2d_nchw(x, w, strides, padding, dilation, out_dtype="float32")
                return topi.nn.group_conv2d_nchw(x, w, strides, padding, dilation, groups, out_dtype="float32")

            self.count += 1
            return self.builder_.call_te(conv, call.args[0], wq, scale, primfunc_name_hint="effc_qconv2d")
        if call.op.same_as(_MATMUL):
            src = self._dequant_source(call.args[1])
            x_ty = call.args[0].ty
            if src is None or x_ty.ndim != 2 or len(src[0].ty.shape) != 2:
                return call
            wq, scale, axis, transpose = src

            def matmul(x, w8, s):
                w = _dequant_te(w8, s, axis, transpose)
                k = te.reduce_axis((0, x.shape[1]), name="k")
                return te.compute(
                    (x.shape[0], w.shape[1]), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="matmul"
                )

            self.count += 1
            return self.builder_.call_te(matmul, call.args[0], wq, scale, primfunc_name_hint="effc_qmatmul")
        return call


def fuse_dequantize(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """Rewrite conv2d/matmul on int8 QDQ weights in ``main`` (before ``LegalizeOps``).

    Returns:
        The module and the number of kernels rewritten (0: nothing int8 found, module unchanged in effect).
    """
    mutator = _FuseDequantize(mod)
    func = mutator.visit_expr(mod["main"])
    if mutator.count == 0:
        return mod, 0
    new_mod = mutator.builder_.get()
    new_mod["main"] = func
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    logger.info("int8: %d conv/matmul kernel(s) read int8 weights directly", mutator.count)
    return new_mod, mutator.count


def inline_dequant(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Inline every ``effc_dequant`` block of a (FuseTIR-merged) PrimFunc into its consumer."""
    names = re.findall(r'T\.sblock\("(' + DEQUANT_STAGE + r'[^"]*)"\)', func.script())
    if not names:
        return func
    sch = s_tir.Schedule(func)
    for name in names:
        sch.compute_inline(sch.get_sblock(name))
    return sch.mod["main"]
