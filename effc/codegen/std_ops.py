"""effc's own converters for standard ONNX ops that TVM 0.27's ONNX frontend lowers wrongly.

Each class subclasses TVM's converter and fixes one documented difference from the ONNX specification, found by
the ONNX backend node conformance runner (``benchmarks/onnx_conformance.py``); cases TVM gets right are handed to
TVM's own converter. Where effc cannot lower an attribute combination correctly it raises ``NotImplementedError``,
which :func:`effc.codegen.frontend.to_relax` turns into an :class:`~effc.errors.UnsupportedOpError` naming the node
— a refusal, never a wrong artifact. :func:`effc.codegen.frontend.to_relax` activates the table
:data:`STANDARD_OVERRIDES` (op type → converter class) for the duration of an import.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _tvm

#: Standard op type → effc converter class (TVM's ``OnnxOpConverter`` protocol), used instead of TVM's own.
STANDARD_OVERRIDES: dict[str, type] = {}


def _override(op_type: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        STANDARD_OVERRIDES[op_type] = cls
        return cls

    return register


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _const(value: float, like: relax.Expr) -> relax.Constant:
    return relax.const(value, _dtype(like))


def _is_float(expr: relax.Expr) -> bool:
    return _dtype(expr).startswith(("float", "bfloat"))



@_override("Relu")
class Relu(_tvm.Relu):
    """ONNX Relu keeps NaN; TVM's ``max(x, 0)`` becomes LLVM ``maxnum``, which returns 0 for NaN."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        return relax.op.where(relax.op.less(x, _const(0, x)), _const(0, x), x)


@_override("SpaceToDepth")
class SpaceToDepth(_tvm.SpaceToDepth):
    """``mode="CRD"`` (ONNX opset 25's column-row-depth order): TVM ignores the attribute and always uses DCR."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        mode = attr.get("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "DCR":
            return super()._impl_v1(bb, inputs, attr, params)
        if mode != "CRD":
            raise NotImplementedError(f"SpaceToDepth mode={mode!r} (ONNX defines DCR and CRD)")
        bs = int(attr["blocksize"])
        b, c, h, w = inputs[0].ty.shape
        x = relax.op.reshape(inputs[0], (b, c, h // bs, bs, w // bs, bs))
        x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])
        return relax.op.reshape(x, (b, c * bs * bs, h // bs, w // bs))


@_override("IsInf")
class IsInf(_tvm.IsInf):
    """``detect_negative=0`` / ``detect_positive=0`` restrict the test to one sign; TVM ignores both."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        out = relax.op.isinf(x)
        if not attr.get("detect_negative", 1):
            out = relax.op.logical_and(out, relax.op.greater(x, _const(0, x)))
        if not attr.get("detect_positive", 1):
            out = relax.op.logical_and(out, relax.op.less(x, _const(0, x)))
        return out


@_override("Mod")
class Mod(_tvm.Mod):
    """Mod of a finite dividend by an infinite divisor (TVM gives NaN).

    ``fmod=1`` returns the dividend (C ``fmod``); ``fmod=0`` (floor
    modulo, numpy's ``mod``) the dividend when both signs agree (or it is 0), else the divisor. TVM's
    ``x - trunc(x / y) * y`` / ``x - floor(x / y) * y`` give NaN there.
    """

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        out = super()._impl_v10(bb, inputs, attr, params)
        x, y = inputs[0], inputs[1]
        if not _is_float(x) or isinstance(out, tvm.ir.GenericConst):
            return out
        edge = relax.op.logical_and(relax.op.isinf(y), relax.op.isfinite(x))
        if attr.get("fmod", 0):
            return relax.op.where(edge, x, out)
        opposite = relax.op.less(relax.op.multiply(x, y), _const(0, x))  # 0 * inf is NaN: not < 0, keeps x
        return relax.op.where(edge, relax.op.where(opposite, y, x), out)


@_override("BitShift")
class BitShift(_tvm.BitShift):
    """BitShift by an amount out of range (negative, or at least the bit width).

    ONNX (and numpy) give the full-width result: 0, or -1 where an arithmetic right shift fills a negative value
    with its sign bit. LLVM leaves such shifts
    undefined (the hardware masks the count).
    """

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        out = super()._impl_v11(bb, inputs, attr, params)
        if isinstance(out, tvm.ir.GenericConst):
            return out
        x, y = inputs[0], inputs[1]
        dtype = np.dtype(_dtype(x))
        outside = relax.op.greater_equal(y, _const(dtype.itemsize * 8, y))
        if dtype.kind == "i":
            outside = relax.op.logical_or(outside, relax.op.less(y, _const(0, y)))
        full = _const(0, x)
        if dtype.kind == "i" and attr.get("direction", b"LEFT") == b"RIGHT":
            full = relax.op.where(relax.op.less(x, _const(0, x)), _const(-1, x), full)
        return relax.op.where(outside, full, out)


@_override("BatchNormalization")
class BatchNormalization(_tvm.BatchNormalization):
    """BatchNormalization with ``training_mode=1`` is refused.

    Normalizing with batch statistics and updating running ones: TVM's lowering of it differs from ONNX, and
    deployed models run in inference mode.
    """

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        if attr.get("training_mode", 0):
            raise NotImplementedError("BatchNormalization training_mode=1 is not supported: export the model in "
                                      "inference mode (torch: model.eval()), where running statistics are used")
        return super()._impl_v15(bb, inputs, attr, params)
