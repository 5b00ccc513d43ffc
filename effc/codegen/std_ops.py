"""effc's own converters for standard ONNX ops that TVM 0.27's ONNX frontend lowers wrongly.

Each class subclasses TVM's converter and fixes one documented difference from the ONNX specification, found by
the ONNX backend node conformance runner (``benchmarks/onnx_conformance.py``); cases TVM gets right are handed to
TVM's own converter. Where effc cannot lower an attribute combination correctly it raises ``NotImplementedError``,
which :func:`effc.codegen.frontend.to_relax` turns into an :class:`~effc.errors.UnsupportedOpError` naming the node
— a refusal, never a wrong artifact. :func:`effc.codegen.frontend.to_relax` activates the table
:data:`STANDARD_OVERRIDES` (op type → converter class) for the duration of an import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx
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


@dataclasses.dataclass(frozen=True)
class _Float8:
    """An OCP / FNUZ float8 format (ONNX Cast-19 / ml_dtypes).

    Mantissa bits, exponent bias, largest finite value, the smallest magnitude that overflows under
    round-to-nearest-even, the overflow value without saturation (inf where the format has one, else NaN), and
    whether it has a negative zero (the FNUZ formats spend that code on NaN).
    """

    mantissa: int
    bias: int
    top: float
    overflow: float
    special: float
    negative_zero: bool


_FLOAT8 = {
    "float8_e4m3fn": _Float8(3, 7, 448.0, 464.0, np.nan, True),
    "float8_e4m3fnuz": _Float8(3, 8, 240.0, 248.0, np.nan, False),
    "float8_e5m2": _Float8(2, 15, 57344.0, 61440.0, np.inf, True),
    "float8_e5m2fnuz": _Float8(2, 16, 57344.0, 61440.0, np.nan, False),
}
#: ONNX element type id → TVM dtype name of the 8-bit float types (Cast's ``to`` is an ONNX id).
_FLOAT8_IDS = {17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
               24: "float8_e8m0fnu"}
#: ONNX element type id → TVM dtype name of the integer types whose float conversion effc defines (_float_to_int).
_INT_IDS = {6: "int32", 7: "int64"}


def _code(value: float, dtype: str) -> int:
    return int(np.array(value, np.float32).astype(np.dtype(dtype)).view(np.uint8))


def _float8_encoder(fmt: _Float8, dtype: str, saturate: bool) -> Callable[[te.Tensor], te.Tensor]:
    """A TE compute: float32 ``x`` → ``dtype`` as ONNX Cast-19 converts (round to nearest even).

    With ``e = max(exponent(|x|), 1 - bias)`` and ``n = nearbyint(|x| / 2^(e - M))`` the code is
    ``((e + bias - 1) << M) + n``: for normals ``n`` carries the implicit leading one, for subnormals
    (``e = 1 - bias``) the exponent field is 0, and a rounding carry (``n = 2^(M+1)``) lands on the next binade.
    NaN gives the format's NaN; past ``±top`` the value saturates to ``±top`` (``saturate``) or becomes
    ``fmt.special``. Everything is integer work on the codes: TVM's own float8 conversions are not used.
    """
    m, emin = fmt.mantissa, 1 - fmt.bias
    nan, special = _code(np.nan, dtype), _code(fmt.special, dtype)
    negative_special = _code(-fmt.special, dtype)

    def encode_float8(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *i: tirx.reinterpret(dtype, encode(x(*i)).astype("uint8")),
                          name="encode_float8")

    def encode(v):
        def i32(value: int) -> tirx.PrimExpr:  # int32 constants (the bit patterns are int32)
            return tirx.const(value, "int32")

        negative = tirx.reinterpret("int32", v) < i32(0)
        mag = tirx.min(tirx.abs(v), tirx.const(fmt.top, "float32"))
        e = tirx.max((tirx.reinterpret("int32", mag) >> i32(23)) - i32(127), i32(emin))
        quantum = tirx.reinterpret("float32", (e + i32(127 - m)) << i32(23))
        code = ((e + i32(fmt.bias - 1)) << i32(m)) + tirx.nearbyint(mag / quantum).astype("int32")
        if not fmt.negative_zero:  # -0 is 0 (0x80 is NaN); |x| up to half the smallest subnormal rounds to 0
            negative = tirx.all(negative, mag > tirx.const(2.0 ** (emin - m - 1), "float32"))
        code = tirx.Select(negative, code + i32(128), code)
        if not saturate:
            over = tirx.abs(v) >= tirx.const(fmt.overflow, "float32")
            code = tirx.Select(over, tirx.Select(v < tirx.const(0.0, "float32"), i32(negative_special),
                                                 i32(special)), code)
        return tirx.Select(tirx.isnan(v), i32(nan), code)

    return encode_float8


def _decode_table(dtype: str) -> relax.Constant:
    """float32 value of each of the 256 codes of an 8-bit float ``dtype`` (ml_dtypes decodes them exactly)."""
    return relax.const(np.arange(256, dtype=np.uint8).view(np.dtype(dtype)).astype(np.float32), "float32")


def _decode_float8(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: table[tirx.reinterpret("uint8", x(*i))], name="decode_float8")


def _float_to_int(x: relax.Expr, to: str, cast: relax.Expr) -> relax.Expr:
    """``cast`` (float ``x`` → int32 / int64) with the integer minimum where the conversion is undefined.

    NaN, ±inf and values outside ``[-2^(b-1), 2^(b-1))`` have no integer value (C leaves the conversion undefined;
    LLVM's ``fptosi`` gives poison, which came out as 0: a NaN-derived Gather index read row 0). x86's
    ``cvttss2si`` gives the integer minimum, which is what onnxruntime returns on x86, and which lies outside
    every index range, so effc's index guard refuses it as onnxruntime's Gather does.
    """
    bits = int(to[3:]) - 1
    low, high = _const(-(2.0 ** bits), x), _const(2.0 ** bits, x)
    inside = relax.op.logical_and(relax.op.greater_equal(x, low), relax.op.less(x, high))  # false for NaN
    inside = relax.op.logical_and(inside, relax.op.isfinite(x))  # float16: 2^63 rounds to inf
    return relax.op.where(inside, cast, relax.const(int(np.iinfo(to).min), to))


@_override("Cast")
class Cast(_tvm.Cast):
    """Casts from and to the 8-bit float types, with ONNX's rounding and saturation (TVM's conversions are wrong).

    TVM wrapped on overflow (1e6 became -15 in E4M3FN), read FNUZ codes with the OCP bias (every value 2x off),
    kept E5M2's NaN codes as numbers and rounded subnormals differently. effc decodes with a 256-entry table of the
    exact values and encodes with round-to-nearest-even (:func:`_encode_float8`). ``saturate=1`` (the default)
    clamps to the largest finite value, ``saturate=0`` gives inf (E5M2) or NaN (the other formats) past it; NaN
    stays NaN. Casts to ``float8_e8m0`` (ONNX's ``round_mode``) are refused. Float to int32 / int64 gives the
    integer minimum where C leaves the value undefined (:func:`_float_to_int`).
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        to = attr.get("to")
        to = _FLOAT8_IDS.get(to, to) if isinstance(to, int) else str(to)
        if isinstance(x, tvm.ir.GenericConst) or not isinstance(getattr(x, "ty", None), relax.TensorType):
            return super()._impl_v13(bb, inputs, attr, params)
        source = _dtype(x)
        if source.startswith("float8"):
            wide = bb.emit_te(_decode_float8, x, _decode_table(source))
            return wide if to == "float32" else cls._impl_v13(bb, [wide], {**attr, "to": to}, params)
        if to == "float8_e8m0fnu":
            raise NotImplementedError("Cast to float8_e8m0 (ONNX round_mode) is not supported: cast to float32, "
                                      "or give the scale as float8_e8m0 data")
        if _INT_IDS.get(to, to) in ("int32", "int64") and _is_float(x):
            return _float_to_int(x, _INT_IDS.get(to, to), super()._impl_v13(bb, inputs, attr, params))
        fmt = _FLOAT8.get(to)
        if fmt is None or not _is_float(x):
            return super()._impl_v13(bb, inputs, attr, params)
        xf = x if source == "float32" else bb.normalize(relax.op.astype(x, "float32"))
        return bb.emit_te(_float8_encoder(fmt, to, bool(attr.get("saturate", 1))), xf)


@_override("CastLike")
class CastLike(_tvm.CastLike):
    """CastLike through effc's :class:`Cast` (TVM's calls its own Cast)."""

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        target = inputs[1]
        dtype = "int64" if isinstance(target, relax.ShapeExpr) else _dtype_of(target)
        if dtype is None:
            return super()._impl_v15(bb, inputs, attr, params)
        return Cast._impl_v13(bb, [inputs[0]], {**attr, "to": dtype}, params)


def _resize_on_all_axes(inputs: list, attr: dict) -> tuple[list, dict]:
    """Resize's ``axes`` attribute (opset 18) resolved: ``roi``, ``scales`` and ``sizes`` spelled out for every axis.

    Axes left out keep their size (scale 1, roi ``[0, 1]``); TVM's converter reads these inputs as full-rank.

    Raises:
        NotImplementedError: ``roi`` / ``scales`` / ``sizes`` is not a constant.
    """
    dims = [int(d) for d in inputs[0].ty.shape]
    rank = len(dims)
    axes = [int(a) % rank for a in attr["axes"]]
    inputs = list(inputs) + [None] * (4 - len(inputs))
    fulls = {1: np.array([0.0] * rank + [1.0] * rank, np.float32), 2: np.ones(rank, np.float32),
             3: np.array(dims, np.int64)}
    for k in (1, 2, 3):
        given = inputs[k]
        if given is None:
            continue
        if not isinstance(given, tvm.ir.GenericConst):
            raise NotImplementedError("Resize with 'axes' and a run-time roi/scales/sizes input: pass it as a "
                                      "constant")
        values = given.value.numpy()
        if values.size == 0:
            continue
        full = fulls[k].astype(values.dtype)
        for i, axis in enumerate(axes):
            full[axis] = values[i]
            if k == 1:  # roi: starts, then ends
                full[rank + axis] = values[len(axes) + i]
        inputs[k] = relax.const(full, str(values.dtype))
    while inputs[-1] is None:  # TVM reads len(inputs) > 3 as "sizes given"
        inputs.pop()
    return inputs, {key: value for key, value in attr.items() if key != "axes"}


def _resize_keeping_aspect(inputs: list, attr: dict) -> tuple[list, dict]:
    """Resize's ``keep_aspect_ratio_policy`` resolved into plain ``sizes`` (TVM ignores the attribute).

    ONNX Resize-18: one scale for the resized axes, the smallest (``not_larger``) or largest (``not_smaller``) of
    ``sizes / input dims``, and ``sizes = int(scale * dim + 0.5)``; the coordinates use that scale. TVM derives them
    from ``size / dim``, so a case where the two differ is refused.

    Raises:
        NotImplementedError: ``sizes`` is not a constant, or ``size / dim`` differs from the policy's scale.
    """
    policy = attr["keep_aspect_ratio_policy"].decode()
    sizes = inputs[3] if len(inputs) > 3 else None
    if not isinstance(sizes, tvm.ir.GenericConst):
        raise NotImplementedError(f"Resize keep_aspect_ratio_policy={policy!r} needs constant 'sizes'")
    dims = np.array([int(d) for d in inputs[0].ty.shape])
    axes = [int(a) % len(dims) for a in attr.get("axes") or range(len(dims))]
    wanted = sizes.value.numpy().astype(np.float64)
    ratios = wanted / dims[axes]
    scale = ratios.min() if policy == "not_larger" else ratios.max()
    outs = [int(scale * dims[a] + 0.5) for a in axes]
    if any(out != scale * dims[a] for out, a in zip(outs, axes, strict=True)):
        raise NotImplementedError(f"Resize keep_aspect_ratio_policy={policy!r} with sizes {wanted.astype(int).tolist()}"
                                  f" on dims {dims.tolist()}: the output size is not scale*dim exactly and TVM would "
                                  "interpolate at other positions; give the exact 'sizes' with policy 'stretch'")
    inputs = [*inputs[:3], relax.const(np.array(outs, np.int64), "int64"), *inputs[4:]]
    return inputs, {key: value for key, value in attr.items() if key != "keep_aspect_ratio_policy"}


@_override("Resize")
class Resize(_tvm.Resize):
    """Resize cases TVM computes differently from ONNX are refused (never a wrong artifact).

    * ``antialias=1`` when linear/cubic downsampling: TVM ignores the attribute;
    * ``scales`` whose output size ``floor(in * scale)`` is not ``in * scale`` exactly, for linear/cubic: TVM
      derives the coordinate transform from the sizes (``out / in``), ONNX from the given scale.
    """

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        if attr.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
            inputs, attr = _resize_keeping_aspect(inputs, attr)
        if attr.get("axes"):
            inputs, attr = _resize_on_all_axes(inputs, attr)
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


def _float16_in_float32(base: type) -> type:
    """``base``'s converter computing float16 inputs in float32 and rounding the result back to float16 once.

    ONNX's reference (and onnxruntime's CPU kernels) accumulate float16 products and sums in float32; TVM's float16
    kernels accumulate in float16, 1-3 ulps off after a few dozen terms (onnx cases ``*_fp16`` of Attention).
    """

    def make(version: str) -> classmethod:
        def impl(cls, bb, inputs, attr, params):
            convert = getattr(base, version).__func__
            if not any(x is not None and _dtype_of(x) == "float16" for x in inputs):
                return convert(cls, bb, inputs, attr, params)
            widened = [relax.op.astype(x, "float32") if x is not None and _dtype_of(x) == "float16" else x
                       for x in inputs]
            out = bb.normalize(convert(cls, bb, [bb.normalize(x) if x is not None else x for x in widened], attr,
                                       params))
            return relax.op.astype(out, "float16") if _dtype_of(out) == "float32" else out

        return classmethod(impl)

    versions = [name for name in dir(base) if name.startswith("_impl_v")]
    return type(base.__name__, (base,), {v: make(v) for v in versions})


def _dtype_of(expr: object) -> str | None:
    dtype = getattr(getattr(expr, "ty", None), "dtype", None)
    return None if dtype is None else str(dtype)


class ConvTranspose(_tvm.ConvTranspose):
    """``output_shape`` given: the pads that produce it (ONNX ConvTranspose spec); TVM ignores the attribute.

    ``total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - output_shape`` per spatial axis,
    split like the spec (the extra element at the end for ``SAME_UPPER``, else at the start); a negative total
    (a larger output) becomes ``output_padding``.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        wanted = attr.get("output_shape")
        if not wanted:
            return super()._impl_v1(bb, inputs, attr, params)
        spatial = [int(d) for d in inputs[0].ty.shape][2:]
        kernel = [int(d) for d in inputs[1].ty.shape][2:]
        wanted = list(wanted)[-len(spatial):]
        n = len(spatial)
        strides = list(attr.get("strides", [1] * n))
        dilations = list(attr.get("dilations", [1] * n))
        extra = list(attr.get("output_padding", [0] * n))
        upper = attr.get("auto_pad", b"NOTSET") == b"SAME_UPPER"
        begin, end = [0] * n, [0] * n
        for i in range(n):
            total = strides[i] * (spatial[i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1 - int(wanted[i])
            if total < 0:
                extra[i] -= total
            else:
                begin[i], end[i] = (total // 2, total - total // 2) if upper else (total - total // 2, total // 2)
        fixed = {k: v for k, v in attr.items() if k not in ("output_shape", "auto_pad")}
        fixed.update(pads=begin + end, output_padding=extra)
        return super()._impl_v1(bb, inputs, fixed, params)


for _op, _base in (("MatMul", _tvm.MatMul), ("Softmax", _tvm.Softmax), ("Gemm", _tvm.Gemm), ("Conv", _tvm.Conv),
                   ("ConvTranspose", ConvTranspose)):
    STANDARD_OVERRIDES[_op] = _float16_in_float32(_base)


def _ieee_extreme(base: type, largest: bool) -> type:
    """``base`` (ReduceMax / ReduceMin) with IEEE semantics for float inputs, and over bool (as uint8).

    TVM starts the reduction from the dtype's finite extreme (``-FLT_MAX`` for max) and LLVM's ``maxnum`` skips NaN:
    a row of ``-inf`` (a fully masked attention row) reduced to ``-3.4e38`` and NaN vanished. The same reduction
    over 0/1 indicators finds rows with a NaN (result NaN, as numpy and the ONNX reference give) and rows of only
    the start value's side of infinity (result ``∓inf``).
    """

    def make(version: str) -> classmethod:
        def impl(cls, bb, inputs, attr, params):
            convert = getattr(base, version).__func__
            x = inputs[0]
            if _dtype_of(x) == "bool":  # TVM has no bool extreme; over uint8 an empty max is 0, an empty min 255
                wide = convert(cls, bb, [bb.normalize(relax.op.astype(x, "uint8")), *inputs[1:]], attr, params)
                return relax.op.astype(wide, "bool")
            out = convert(cls, bb, inputs, attr, params)
            if not _is_float(x) or isinstance(x, tvm.ir.GenericConst):
                return out
            dtype = _dtype(x)

            def reduce(flags: relax.Expr) -> relax.Expr:  # the node's own axes/keepdims over a 0/1 indicator
                return bb.normalize(convert(cls, bb, [bb.normalize(relax.op.astype(flags, dtype)), *inputs[1:]],
                                            attr, params))

            inf = np.inf if largest else -np.inf
            if largest:  # any NaN: max(isnan) == 1; all -inf: max(x > -inf) == 0
                nan_any = relax.op.greater(reduce(relax.op.isnan(x)), _const(0, x))
                all_edge = relax.op.equal(reduce(relax.op.greater(x, _const(-inf, x))), _const(0, x))
            else:  # any NaN: min(not isnan) == 0; all +inf: min(x == +inf) == 1
                nan_any = relax.op.equal(reduce(relax.op.logical_not(relax.op.isnan(x))), _const(0, x))
                all_edge = relax.op.equal(reduce(relax.op.equal(x, _const(-inf, x))), _const(1, x))
            out = relax.op.where(all_edge, _const(-inf, x), out)
            return relax.op.where(nan_any, _const(np.nan, x), out)

        return classmethod(impl)

    versions = [name for name in dir(base) if name.startswith("_impl_v")]
    return type(base.__name__, (base,), {v: make(v) for v in versions})


STANDARD_OVERRIDES["ReduceMax"] = _ieee_extreme(_tvm.ReduceMax, largest=True)
STANDARD_OVERRIDES["ReduceMin"] = _ieee_extreme(_tvm.ReduceMin, largest=False)


@_override("Dropout")
class Dropout(_tvm.Dropout):
    """Dropout as ONNX defines it at inference: the identity and an all-true boolean mask (TVM's mask was float).

    ``training_mode`` true with a ratio above 0 draws random masks: refused (no compiled model can match a random
    reference); deployed models run with training_mode false.
    """

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        x = inputs[0]
        training = inputs[2] if len(inputs) > 2 else None
        ratio = inputs[1] if len(inputs) > 1 else None
        if training is not None:
            if not isinstance(training, tvm.ir.GenericConst):
                raise NotImplementedError("Dropout with a run-time training_mode input: pass it as a constant false")
            drops = not isinstance(ratio, tvm.ir.GenericConst) or float(ratio.value.numpy()) > 0
            if bool(training.value.numpy()) and drops:
                raise NotImplementedError("Dropout with training_mode=true draws random masks: export the model in "
                                          "inference mode (torch: model.eval())")
        mask = relax.op.full(x.ty.shape, relax.const(True, "bool"), "bool")
        return relax.Tuple([x, mask])

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return cls._impl_v12(bb, inputs[:1], attr, params)


def _nan_propagating(base: type) -> type:
    """``base`` (variadic Max / Min) returning NaN where any float input is NaN.

    ONNX does (onnxruntime, numpy's ``maximum``); LLVM's ``maxnum``/``minnum`` return the other operand. The
    inputs are folded pairwise (``maximum``/``minimum``): TVM's stack-and-reduce starts from the finite extreme,
    so the Max of ``-inf`` and ``-inf`` was ``-3.4e38``.
    """

    def make(version: str) -> classmethod:
        def impl(cls, bb, inputs, attr, params):
            if all(isinstance(x, tvm.ir.GenericConst) for x in inputs):
                return getattr(base, version).__func__(cls, bb, inputs, attr, params)
            out = base._impl_dynamic(bb, [x for x in inputs if x is not None])
            floats = [x for x in inputs if x is not None and _is_float(x) and not isinstance(x, tvm.ir.GenericConst)]
            if not floats:
                return out
            nan = relax.op.isnan(floats[0])
            for x in floats[1:]:
                nan = relax.op.logical_or(nan, relax.op.isnan(x))
            return relax.op.where(nan, _const(np.nan, floats[0]), out)

        return classmethod(impl)

    versions = [name for name in dir(base) if name.startswith("_impl_v")]
    return type(base.__name__, (base,), {v: make(v) for v in versions})


STANDARD_OVERRIDES["Max"] = _nan_propagating(_tvm.Max)
STANDARD_OVERRIDES["Min"] = _nan_propagating(_tvm.Min)


@_override("LayerNormalization")
class LayerNormalization(_tvm.LayerNormalization):
    """LayerNormalization's optional outputs ``Mean`` and ``InvStdDev`` (TVM returned scalar 0 placeholders).

    Both are reduced over axes ``axis..rank-1`` with kept dims, in float32 (``stash_type=1``, the default);
    ``InvStdDev = 1 / sqrt(var + epsilon)`` with the biased variance (ONNX LayerNormalization-17).
    """

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        out = super()._impl_v17(bb, inputs, attr, params)
        x = inputs[0]
        rank = len(x.ty.shape)
        axis = attr.get("axis", -1)
        axes = list(range(axis % rank, rank))
        xf = relax.op.astype(x, "float32") if _dtype(x) != "float32" else x
        mean = bb.normalize(relax.op.mean(xf, axes, keepdims=True))
        var = relax.op.mean(relax.op.square(relax.op.subtract(xf, mean)), axes, keepdims=True)
        eps = relax.const(float(attr.get("epsilon", 1e-5)), "float32")
        inv_std = relax.op.rsqrt(relax.op.add(var, eps))
        return relax.Tuple([out[0], mean, inv_std])


@_override("RMSNormalization")
class RMSNormalization(_tvm.RMSNormalization):
    """RMSNormalization over every axis (``axis=0``) as plain ops: TVM's ``rms_norm`` fails to legalize then.

    ``y = x / sqrt(mean(x^2 over axes) + epsilon) * scale`` (ONNX RMSNormalization-23), in float32 for
    ``stash_type=1``; other axes go to TVM's fused ``rms_norm``.
    """

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, scale = inputs[0], inputs[1]
        rank = len(x.ty.shape)
        if attr.get("axis", -1) % rank != 0:
            return super()._impl_v23(bb, inputs, attr, params)
        dtype = _dtype(x)
        wide = "float32" if attr.get("stash_type", 1) == 1 else dtype
        xs, ws = relax.op.astype(x, wide), relax.op.astype(scale, wide)
        mean = relax.op.mean(relax.op.multiply(xs, xs), list(range(rank)), keepdims=True)
        eps = relax.const(float(attr.get("epsilon", 1e-5)), wide)
        out = relax.op.multiply(relax.op.multiply(xs, relax.op.rsqrt(relax.op.add(mean, eps))), ws)
        return relax.op.astype(out, dtype)


@_override("OneHot")
class OneHot(_tvm.OneHot):
    """OneHot as ``where(expand_dims(indices, axis) == arange(depth), on, off)`` (ONNX OneHot-11).

    TVM's converter needs constant ``values`` and an integer ``depth``; here ``values`` may be computed at run
    time and ``depth`` (the output size, so a constant) may be float. Negative indices count from ``depth``;
    indices out of ``[-depth, depth)`` give an all-``off`` row, as in the spec.
    """

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        indices, depth, values = inputs
        if not isinstance(depth, tvm.ir.GenericConst):
            raise NotImplementedError("OneHot with a run-time depth (it sets the output shape): make it a constant")
        size = int(depth.value.numpy().reshape(-1)[0])
        rank = len(indices.ty.shape) + 1
        axis = int(attr.get("axis", -1)) % rank
        idx = bb.normalize(relax.op.astype(indices, "int64"))
        idx = relax.op.where(relax.op.less(idx, relax.const(0, "int64")), relax.op.add(idx, relax.const(size, "int64")),
                             idx)
        positions = np.arange(size, dtype=np.int64).reshape([size if k == axis else 1 for k in range(rank)])
        hit = relax.op.equal(relax.op.expand_dims(idx, axis), relax.const(positions, "int64"))
        off = relax.op.take(values, relax.const(0, "int64"), axis=0)
        on = relax.op.take(values, relax.const(1, "int64"), axis=0)
        return relax.op.where(hit, on, off)


@_override("Pow")
class Pow(_tvm.Pow):
    """Pow with operands of different types, or of integer type (ONNX Pow-15: the result has the base's type).

    TVM's power needs one float type on both sides. A float base raises to the exponent cast to its type; an
    integer base is computed in float64 and cast back (exact while ``|result| < 2**53``).
    """

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        x, y = inputs
        both_constant = isinstance(x, tvm.ir.GenericConst) and isinstance(y, tvm.ir.GenericConst)
        if both_constant or _dtype_of(x) is None or _dtype_of(y) is None:
            return super()._impl_v7(bb, inputs, attr, params)
        base = _dtype(x)
        if _is_float(x):
            return relax.op.power(x, y if _dtype(y) == base else relax.op.astype(y, base))
        wide = relax.op.power(relax.op.astype(x, "float64"), relax.op.astype(y, "float64"))
        return relax.op.astype(wide, base)  # truncates toward zero, as numpy's astype in the ONNX reference


@_override("NonMaxSuppression")
class NonMaxSuppression(_tvm.NonMaxSuppression):
    """NonMaxSuppression with run-time thresholds is refused.

    TVM's converter silently used its defaults (0, 0.5, 0.0) for a ``max_output_boxes_per_class`` /
    ``iou_threshold`` / ``score_threshold`` that is not a constant (onnx case
    ``test_nonmaxsuppression_suppress_by_IOU_and_scores``: 3 boxes selected instead of 2). TVM suppresses at
    ``IoU >= threshold``, ONNX at ``IoU > threshold``: the threshold is passed as the next float32 above it.
    """

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        names = ("max_output_boxes_per_class", "iou_threshold", "score_threshold")
        dynamic = [name for name, value in zip(names, inputs[2:5], strict=False)
                   if value is not None and not isinstance(value, tvm.ir.GenericConst)]
        if dynamic:
            raise NotImplementedError(f"NonMaxSuppression with run-time {', '.join(dynamic)}: give them as "
                                      "constants (initializers), as exporters write them")
        if len(inputs) > 3 and inputs[3] is not None:  # ONNX suppresses IoU > threshold, TVM IoU >= threshold
            threshold = inputs[3].value.numpy().astype(np.float32)
            inputs = [*inputs[:3], relax.const(np.nextafter(threshold, np.float32(np.inf)), "float32"), *inputs[4:]]
        return super()._impl_v10(bb, inputs, attr, params)


def _take_tiled(x: relax.Expr, axis: int, repeats: int) -> relax.Expr:
    """``x`` repeated ``repeats`` times along ``axis`` as a ``take`` of a constant index vector.

    The indices (``arange(repeats * n) % n``) are computed here in numpy, so the kernel holds no modulo of its
    own: LLVM 22's loop vectorizer drops the ``% n`` of TVM's tile index arithmetic on AVX-512 targets (mcpu
    znver4, skylake-avx512: reads past the input).
    """
    size = int(x.ty.shape[axis])
    index = np.arange(repeats * size, dtype=np.int64) % max(size, 1)
    return relax.op.take(x, relax.const(index, "int64"), axis=axis)


@_override("Tile")
class Tile(_tvm.Tile):
    """Tile with constant ``repeats`` as one ``take`` per tiled axis (ONNX Tile-13, output ``shape * repeats``).

    TVM's ``topi.tile`` is miscompiled by LLVM 22 on AVX-512 CPUs (onnx case ``test_tile``: 720 of 960 values
    wrong); see :func:`_take_tiled`. Run-time ``repeats`` and inputs of unknown static shape keep TVM's converter.
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x, repeats = inputs
        shape = getattr(x.ty, "shape", None)
        static = shape is not None and all(isinstance(d, tirx.IntImm) for d in getattr(shape, "values", []))
        if not isinstance(repeats, tvm.ir.GenericConst) or not static:
            return super()._impl_v13(bb, inputs, attr, params)
        out = x
        for axis, count in enumerate(repeats.value.numpy().reshape(-1).tolist()):
            if count != 1:
                out = bb.normalize(_take_tiled(out, axis, int(count)))
        return out


@_override("Pad")
class Pad(_tvm.Pad):
    """Pad (``mode="constant"``) with a ``constant_value`` computed at run time (ONNX Pad-11 onwards).

    TVM's converter needs the value as a constant. Here ``x`` is padded with 0 and the padded positions, found by
    padding a ones tensor the same way, take the value: ``where(pad(ones) != 0, pad(x), value)``.
    """

    @classmethod
    def _lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        value = inputs[2] if len(inputs) > 2 else None
        mode = attr.get("mode", b"constant").decode("utf-8")
        if value is None or isinstance(value, tvm.ir.GenericConst) or mode != "constant":
            return super()._lower_pad(bb, inputs, attr, params, allowed_modes)
        x = inputs[0]
        rest = [*inputs[:2], None, *inputs[3:]]
        padded = bb.normalize(super()._lower_pad(bb, rest, attr, params, allowed_modes))
        ones = bb.normalize(relax.op.ones_like(x, "int8"))
        inside = bb.normalize(super()._lower_pad(bb, [ones, *rest[1:]], attr, params, allowed_modes))
        fill = relax.op.reshape(value if _dtype(value) == _dtype(x) else relax.op.astype(value, _dtype(x)), ())
        return relax.op.where(relax.op.not_equal(inside, relax.const(0, "int8")), padded, fill)


@_override("Split")
class Split(_tvm.Split):
    """Split with zero-size parts (ONNX Split-13: ``split`` may hold 0): one ``strided_slice`` per output.

    TVM's ``split`` needs strictly increasing indices and fails to legalize on repeated ones.
    """

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        sizes = inputs[1] if len(inputs) > 1 else None
        if not isinstance(sizes, tvm.ir.GenericConst) or sizes.ty.ndim == 0:
            return super()._impl_v13(bb, inputs, attr, params)
        sizes = [int(s) for s in sizes.value.numpy().reshape(-1)]
        if all(sizes):
            return super()._impl_v13(bb, inputs, attr, params)
        axis, ends = int(attr.get("axis", 0)), np.cumsum(sizes).tolist()
        return relax.Tuple([bb.normalize(relax.op.strided_slice(inputs[0], [axis], [end - size], [end]))
                            for size, end in zip(sizes, ends, strict=True)])
