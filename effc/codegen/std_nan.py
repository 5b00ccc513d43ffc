"""NaN and infinity in standard ops as onnxruntime computes them, where TVM 0.27's lowering differs.

Found by running compiled models on inputs their compile never saw (NaN, ±inf), compiled vs onnxruntime: the
agreement gate checks only the compile's own samples, so these differences were silent. LLVM's ``maxnum`` /
``minnum`` (TVM's ``maximum`` / ``minimum``) return the other operand for NaN, and TVM's arg-reductions start from
``(-1, lowest)``:

- ArgMax / ArgMin: a row of only ``-inf`` gave index -1 and NaN was ignored anywhere. onnxruntime scans each row
  once, starting from element 0 and replacing the best on a strict ``>`` (``>=`` with ``select_last_index``), so a
  NaN in front wins and a NaN elsewhere never does. The ONNX reference (numpy's ``argmax``) returns the first NaN
  instead; effc follows onnxruntime, the runtime its agreement gate compares with.
- Clip, HardSigmoid, Elu, Selu, Sign, Erf turned NaN into a number (Clip: its lower bound); they keep NaN now. A
  missing Clip bound is the type's finite extreme (ONNX Clip-13: ``numeric_limits::lowest()`` / ``max()``), so
  ``±inf`` is clipped to it as onnxruntime does.
- ThresholdedRelu computed ``x * (x > alpha)``: ``-inf`` and NaN gave NaN where ONNX (``x > alpha ? x : 0``) gives 0.

The casts of NaN / ±inf / out-of-range floats to int32 / int64 are in :class:`effc.codegen.std_ops.Cast`.
Importing this module registers the converters in :data:`effc.codegen.std_ops.STANDARD_OVERRIDES`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

from effc.codegen.std_ops import STANDARD_OVERRIDES, _const, _dtype, _is_float, _override

#: Float dtype → the signed integer type of the same width (its bit patterns order like the floats, see _order_key).
_KEY_TYPE = {"float16": "int16", "bfloat16": "int16", "float32": "int32", "float64": "int64"}


def _order_key(x: te.Tensor, nan_key: str) -> te.Tensor:
    """An integer per float that orders like the float, ``-0`` equal to ``+0``, NaN at ``nan_key``'s end.

    Non-negative floats' bit patterns order as integers; negative ones order backwards, which flipping all but
    the sign bit undoes. NaN gets the integer type's ``min`` (``nan_key="min"``) or ``max``.
    """
    dtype = str(x.dtype)
    key_type = _KEY_TYPE[dtype]
    info = np.iinfo(key_type)
    low, top = tirx.const(int(info.min), key_type), tirx.const(int(info.max), key_type)

    def key(v: tirx.PrimExpr) -> tirx.PrimExpr:
        bits = tirx.reinterpret(key_type, v)
        ordered = tirx.Select(bits < tirx.const(0, key_type), tirx.bitwise_xor(bits, top), bits)
        ordered = tirx.Select(v == tirx.const(0, dtype), tirx.const(0, key_type), ordered)  # -0 == +0
        return tirx.Select(tirx.isnan(v), low if nan_key == "min" else top, ordered)

    return te.compute(x.shape, lambda *i: key(x(*i)), name="order_key")


def _arg_extreme(base: type, largest: bool) -> type:
    """``base`` (ArgMax / ArgMin) as onnxruntime computes it, NaN and all-infinite rows included.

    The extreme of an integer key of each element (NaN never the extreme), the elements equal to it, and of those
    the first (last with ``select_last_index``) position; a NaN at position 0 gives 0 (onnxruntime's scan keeps
    it, no comparison with NaN being true). The reduced axis must have a static size (else TVM's lowering).
    """

    def make(version: str) -> classmethod:
        def impl(cls, bb, inputs, attr, params):
            x = inputs[0]
            if isinstance(x, tvm.ir.GenericConst) or not isinstance(x.ty.shape[_axis(x, attr)], tirx.IntImm):
                return getattr(base, version).__func__(cls, bb, inputs, attr, params)
            return _arg_index(bb, x, _axis(x, attr), largest, bool(attr.get("keepdims", 1)),
                              bool(attr.get("select_last_index", 0)))

        return classmethod(impl)

    versions = [name for name in dir(base) if name.startswith("_impl_v")]
    return type(base.__name__, (base,), {v: make(v) for v in versions})


def _axis(x: relax.Expr, attr: dict) -> int:
    axis = int(attr.get("axis", 0))
    return axis + len(x.ty.shape) if axis < 0 else axis


def _arg_index(bb: relax.BlockBuilder, x: relax.Expr, axis: int, largest: bool, keepdims: bool,
               last: bool) -> relax.Expr:
    """The int64 index of ``x``'s extreme along ``axis`` (static size), as :func:`_arg_extreme` describes."""
    shape = x.ty.shape
    rank = len(shape)
    size = int(shape[axis])
    floating = _is_float(x)
    key = bb.normalize(bb.emit_te(_order_key, x, "min" if largest else "max")) if floating else x
    extreme = (relax.op.max if largest else relax.op.min)(key, axis=[axis], keepdims=True)
    hit = relax.op.equal(key, extreme)
    if floating:
        hit = relax.op.logical_and(hit, relax.op.logical_not(relax.op.isnan(x)))
    position = relax.const(np.arange(size, dtype=np.int64).reshape([size] + [1] * (rank - axis - 1)), "int64")
    miss = relax.const(-1 if last else size, "int64")
    index = (relax.op.max if last else relax.op.min)(relax.op.where(hit, position, miss), axis=[axis],
                                                      keepdims=True)
    if floating:  # a NaN in front: onnxruntime's scan never replaces it
        front = relax.op.strided_slice(x, axes=[axis], begin=[0], end=[1])
        index = relax.op.where(relax.op.isnan(front), relax.const(0, "int64"), index)
    return index if keepdims else relax.op.squeeze(index, axis=[axis])


STANDARD_OVERRIDES["ArgMax"] = _arg_extreme(_tvm.ArgMax, largest=True)
STANDARD_OVERRIDES["ArgMin"] = _arg_extreme(_tvm.ArgMin, largest=False)


def _keeps_nan(base: type) -> type:
    """``base`` (an elementwise float op of one input) returning its input where that is NaN."""

    def make(version: str) -> classmethod:
        def impl(cls, bb, inputs, attr, params):
            out = getattr(base, version).__func__(cls, bb, inputs, attr, params)
            x = inputs[0]
            if not _is_float(x) or isinstance(x, tvm.ir.GenericConst):
                return out
            return relax.op.where(relax.op.isnan(x), x, out)

        return classmethod(impl)

    versions = [name for name in dir(base) if name.startswith("_impl_v")]
    return type(base.__name__, (base,), {v: make(v) for v in versions})


for _op in ("HardSigmoid", "Elu", "Selu", "Sign", "Erf"):
    STANDARD_OVERRIDES[_op] = _keeps_nan(getattr(_tvm, _op))


class _BoundedClip(_tvm.Clip):
    """Clip with a missing bound as the type's finite extreme (ONNX: ``numeric_limits::lowest()`` / ``max()``)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        if not _is_float(x):
            return super()._impl_v1(bb, inputs, attr, params)
        info = np.finfo(np.float32 if _dtype(x) == "bfloat16" else np.dtype(_dtype(x)))
        bounds = {"min": float(info.min), "max": float(info.max), **attr}
        return super()._impl_v1(bb, inputs, bounds, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        inputs = [*inputs, None, None][:3]
        if _is_float(x) and _dtype(x) != "bfloat16":
            info = np.finfo(np.dtype(_dtype(x)))
            inputs = [x, _const(info.min, x) if inputs[1] is None else inputs[1],
                      _const(info.max, x) if inputs[2] is None else inputs[2]]
        return super()._impl_v13(bb, inputs, attr, params)


STANDARD_OVERRIDES["Clip"] = _keeps_nan(_BoundedClip)


@_override("ThresholdedRelu")
class ThresholdedRelu(_tvm.ThresholdedRelu):
    """``x > alpha ? x : 0`` as a select (TVM's ``x * (x > alpha)`` gave NaN for ``-inf`` and NaN, ONNX 0)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        alpha = float(attr.get("alpha", 1.0))
        return relax.op.where(relax.op.greater(x, _const(alpha, x)), x, _const(0, x))
