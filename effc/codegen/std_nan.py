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
- Hardmax (TVM: ``one_hot(argmax)``) gave a row of zeros for a row of only ``-inf`` and passed NaN over.
  onnxruntime sets 1 at the first element equal to the row max that Eigen's 4-float packet reduction finds, in
  which a NaN either makes the max NaN (a row of zeros) or hides the elements sharing its accumulator, depending on
  its position and the row's alignment; effc computes that max from the position of each NaN
  (:class:`Hardmax`, :func:`_hardmax_tables`). The ONNX reference (numpy's ``argmax``) marks the first NaN instead.

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


#: Floats per SSE packet: onnxruntime's x86 build reduces each row with Eigen in 16-byte packets.
_PACKET = 4


def _hardmax_tables(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Where NaN decides onnxruntime's max of a row of ``d`` floats: ``(heads (4,), guards (4, d, 3))`` int32.

    Indexed by ``c``, how many floats past a 16-byte boundary the row starts (``c = i · d mod 4`` for row ``i`` of
    a 16-byte-aligned tensor). Eigen's ``maxCoeff`` (onnxruntime's ``math::RowwiseMax``) reduces whole packets from
    ``a0 = -c mod 4`` on into two accumulators of 4 lanes (alternating; a last odd packet joins the first), folds
    the second into the first, then the lanes as ``max(max(l0, l2), max(l1, l3))``, then takes the ``a0`` floats
    before and the ones after the packets one by one; a row with less than one packet past ``a0`` is scanned from
    element 0. Every step is ``std::max(acc, x)``: a NaN ``x`` is passed over, a NaN ``acc`` stays. So the max is
    NaN when the first element of lane 0 (``heads[c]``) is NaN; otherwise it is the max of the non-NaN elements
    but those whose accumulator started with NaN: element ``j`` is left out when ``x[guards[c, j, g]]`` is NaN for
    some ``g`` (the second accumulator's lane head; lane 2's head; lane 1's head for lanes 1 and 3; lane 3's head;
    unused entries repeat ``j``).
    """
    heads = np.zeros(_PACKET, np.int32)
    guards = np.tile(np.arange(d, dtype=np.int32)[None, :, None], (_PACKET, 1, 3))
    lane_heads = {0: [], 1: [1], 2: [2], 3: [1, 3]}
    for c in range(_PACKET):
        a0 = min(-c % _PACKET, d)
        packed, paired = (d - a0) // _PACKET * _PACKET, (d - a0) // (2 * _PACKET) * 2 * _PACKET
        if not packed:
            continue
        heads[c] = a0
        for j in range(a0, a0 + packed):
            lane, packet = (j - a0) % _PACKET, (j - a0) // _PACKET
            second = packed > _PACKET and j < a0 + paired and packet % 2 == 1
            g = ([a0 + _PACKET + lane] if second else []) + [a0 + h for h in lane_heads[lane]]
            guards[c, j, :len(g)] = g
    return heads, guards


def _hardmax_rows(x: te.Tensor, heads: te.Tensor, guards: te.Tensor) -> te.Tensor:
    """One-hot ``(n, d)`` of the first element equal to each row's onnxruntime max (:func:`_hardmax_tables`).

    The max is taken over integer order keys (:func:`_order_key`), so that a row of ``-inf`` has one and the
    reduction is a plain ``max`` that every target's schedules know.
    """
    n, d = (int(v) for v in x.shape)
    key = _order_key(x, "min")
    none = tirx.const(int(np.iinfo(str(key.dtype)).min), str(key.dtype))

    def offset(i):  # floats from the 16-byte boundary before row i to its start
        return (i % _PACKET) * (d % _PACKET) % _PACKET

    def kept(i, j):
        ok = tirx.Not(tirx.isnan(x[i, j]))
        for g in range(int(guards.shape[2])):
            ok = tirx.And(ok, tirx.Not(tirx.isnan(x[i, guards[offset(i), j, g]])))
        return ok

    j = te.reduce_axis((0, d), "j")
    rowmax = te.compute((n,), lambda i: te.max(tirx.Select(kept(i, j), key[i, j], none), axis=j), name="rowmax")
    index = "int64"  # the type of Relax shapes: positions in it, so that the min needs no cast
    k = te.reduce_axis((tirx.const(0, index), tirx.const(d, index)), "k")
    first = te.compute((n,), lambda i: te.min(tirx.Select(key[i, k] == rowmax[i], k.var, tirx.const(d, index)),
                                              axis=k), name="first")
    return te.compute((n, d), lambda i, col: tirx.Select(
        tirx.And(col == first[i], tirx.Not(tirx.isnan(x[i, heads[offset(i)]]))),
        tirx.const(1, "float32"), tirx.const(0, "float32")), name="hardmax")


@_override("Hardmax")
class Hardmax(_tvm.Hardmax):
    """Hardmax of float32 as onnxruntime computes it on x86, NaN included (TVM: ``one_hot(argmax)``).

    onnxruntime sets 1 at the first element equal to the row's max from Eigen's packet reduction, where NaN counts
    by its place in the packets (:func:`_hardmax_tables`): a NaN max gives a row of zeros, and a NaN can hide other
    elements. TVM's ``argmax`` passes NaN over and gave a row of zeros for a row of only ``-inf`` (onnxruntime: 1 at
    element 0). Rows are those onnxruntime reduces: the flattened ``(N, D)`` view before opset 13, the ``axis``
    swapped with the last one from opset 13 (onnxruntime transposes into a new buffer). Their placement assumes the
    tensor starts on a 16-byte boundary, as onnxruntime's own buffers do; a graph input given to onnxruntime from
    unaligned memory changes onnxruntime's answer for NaN rows, not effc's.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return cls._rows(bb, inputs, attr, params, "_impl_v1", int(attr.get("axis", 1)), legacy=True)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        return cls._rows(bb, inputs, attr, params, "_impl_v11", int(attr.get("axis", 1)), legacy=True)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        return cls._rows(bb, inputs, attr, params, "_impl_v13", int(attr.get("axis", -1)), legacy=False)

    @classmethod
    def _rows(cls, bb, inputs, attr, params, version: str, axis: int, legacy: bool) -> relax.Expr:
        x = inputs[0]
        shape = None if isinstance(x, tvm.ir.GenericConst) else getattr(x.ty, "shape", None)
        if (_dtype(x) != "float32" or not isinstance(shape, relax.ShapeExpr)
                or not all(isinstance(v, tirx.IntImm) for v in shape.values) or 0 in [int(v) for v in shape.values]):
            return getattr(super(), version)(bb, inputs, attr, params)
        dims = [int(v) for v in shape.values]
        axis = axis + len(dims) if axis < 0 else axis
        perm = list(range(len(dims)))
        if not legacy:  # the reduced axis last, the others in onnxruntime's order
            perm[axis], perm[-1] = perm[-1], perm[axis]
            x, dims, axis = relax.op.permute_dims(x, perm), [dims[p] for p in perm], len(dims) - 1
        d = int(np.prod(dims[axis:]))
        heads, guards = _hardmax_tables(d)
        rows = bb.emit_te(_hardmax_rows, bb.normalize(relax.op.reshape(x, [int(np.prod(dims[:axis])), d])),
                          relax.const(heads, "int32"), relax.const(guards, "int32"))
        y = relax.op.reshape(rows, dims)
        return y if perm == sorted(perm) else relax.op.permute_dims(y, perm)
