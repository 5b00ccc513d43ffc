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
    dtype = getattr(getattr(expr, "ty", None), "dtype", None)  # ShapeExpr / tuples carry none
    return dtype is not None and str(dtype).startswith(("float", "bfloat"))



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


#: ONNX float8 type id → (largest finite value, smallest magnitude that overflows under round-to-nearest-even,
#: the overflow value without saturation: inf where the format has one, else NaN).
_FLOAT8 = {17: (448.0, 464.0, np.nan), 18: (240.0, 248.0, np.nan), 19: (57344.0, 61440.0, np.inf),
           20: (57344.0, 61440.0, np.nan)}


@_override("Cast")
class Cast(_tvm.Cast):
    """Cast to a float8 type, with ONNX's saturation (TVM's conversion wraps: 1e6 became -15 in E4M3FN).

    ``saturate=1`` (the default) clamps to the largest finite value, ``saturate=0`` gives inf (E5M2) or NaN (the
    other formats) past it; NaN stays NaN. TVM converts only the clamped values; the special values are selected
    in float8 afterwards (TVM's conversion of NaN and inf is wrong too).
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        spec = _FLOAT8.get(attr.get("to"))
        if spec is None or isinstance(x, tvm.ir.GenericConst) or not _is_float(x):
            return super()._impl_v13(bb, inputs, attr, params)
        top, overflow, special = spec
        out = bb.normalize(super()._impl_v13(bb, [bb.normalize(relax.op.clip(x, -top, top)), *inputs[1:]], attr,
                                             params))
        dtype = _dtype(out)

        def f8(value: float) -> relax.Constant:
            return relax.const(np.array(value).astype(dtype), dtype)

        if not attr.get("saturate", 1):
            low = -special if np.isinf(special) else special
            out = relax.op.where(relax.op.greater_equal(x, _const(overflow, x)), f8(special), out)
            out = relax.op.where(relax.op.less_equal(x, _const(-overflow, x)), f8(low), out)
        return relax.op.where(relax.op.isnan(x), f8(np.nan), out)


@_override("Resize")
class Resize(_tvm.Resize):
    """Resize cases TVM computes differently from ONNX are refused (never a wrong artifact).

    * ``antialias=1`` when linear/cubic downsampling: TVM ignores the attribute;
    * ``scales`` whose output size ``floor(in * scale)`` is not ``in * scale`` exactly, for linear/cubic: TVM
      derives the coordinate transform from the sizes (``out / in``), ONNX from the given scale.
    """

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        x = inputs[0]
        mode = attr.get("mode", b"nearest").decode()
        spatial = [int(d) for d in x.ty.shape][2:] if all(isinstance(d, tvm.tirx.IntImm | int)
                                                             for d in x.ty.shape) else None
        scales = inputs[2] if len(inputs) > 2 else None
        sizes = inputs[3] if len(inputs) > 3 else None
        if mode != "nearest" and spatial is not None:
            if isinstance(scales, tvm.ir.GenericConst) and scales.value.numpy().size:
                factors = scales.value.numpy().astype(np.float64)[2:]
                outs = [int(np.floor(f * n)) for f, n in zip(factors, spatial, strict=True)]
                if any(o != f * n for o, f, n in zip(outs, factors, spatial, strict=True)):
                    raise NotImplementedError(
                        f"Resize mode={mode!r} with scales {factors.tolist()} on spatial dims {spatial}: the output "
                        "size is not in*scale exactly and TVM would interpolate at other positions; give 'sizes' "
                        "instead of 'scales' (or scales with integral in*scale)")
            elif isinstance(sizes, tvm.ir.GenericConst):
                outs = sizes.value.numpy().astype(np.int64).tolist()[2:]
            else:
                outs = spatial
            if attr.get("antialias", 0) and any(o < n for o, n in zip(outs, spatial, strict=False)):
                raise NotImplementedError(f"Resize antialias=1 when downsampling ({spatial} -> {outs}, mode "
                                          f"{mode!r}): TVM has no antialiasing filter; use antialias=0")
        return super()._impl_v18(bb, inputs, attr, params)
