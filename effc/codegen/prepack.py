"""Compile-time weight pre-packing for the GEMM template: constant B matrices stored in the micro-kernel's layout.

The GEMM template (:mod:`effc.codegen.schedules.gemm`) reads B in column panels of ``nr`` floats: ``K×nr``
contiguous values per panel. When B is a runtime tensor, every call copies each panel into a scratch buffer
first. When every call of a kernel passes a constant weight for B, the template instead changes that parameter's
layout (``transform_layout``) to ``Bp[N/nr, K, nr]`` with ``Bp[jo, k, ji] = B[k, jo*nr + ji]`` — the packed panel
layout of Goto & van de Geijn ("Anatomy of High-Performance Matrix Multiplication", ACM TOMS 2008) — and this
module repacks the constants once, at compile time, so the kernel streams B sequentially with no copy.

Two steps around the scheduling of a fused module (both called by :func:`effc.codegen.schedules.apply_templates`):

1. :func:`mark_constant_params` tags each PrimFunc with the parameter positions that receive a Relax constant in
   every ``call_tir`` (attribute :data:`CONST_PARAMS_ATTR`); templates may re-layout only those.
2. :func:`pack_constant_args` finds the parameters whose shape a template changed from ``(K, N)`` to
   ``(N/nr, K, nr)`` and replaces the constant argument of every call with its packed copy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor

logger = logging.getLogger(__name__)

CONST_PARAMS_ATTR = "effc.const_params"


def _is_constant(expr: Any) -> bool:
    return type(expr).__name__ in ("GenericConst", "Constant")


def _const_numpy(expr: Any) -> np.ndarray:
    value = getattr(expr, "value", None)
    if value is None:
        value = expr.data
    return value.numpy()


def _tir_calls(func: relax.Function) -> list[relax.Call]:
    """Every ``call_tir`` in ``func``."""
    calls: list[relax.Call] = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            calls.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return calls


def _call_args(call: relax.Call) -> list[Any]:
    """The tensor arguments of a ``call_tir`` (its second operand, a tuple)."""
    args = call.args[1]
    return list(args.fields) if isinstance(args, relax.Tuple) else [args]


def mark_constant_params(mod: tvm.IRModule) -> tvm.IRModule:
    """Tag each PrimFunc with the parameters that receive a constant in every call.

    Args:
        mod: fused module (Relax functions calling PrimFuncs through ``call_tir``).

    Returns:
        The module with attribute :data:`CONST_PARAMS_ATTR` (list of parameter indices) on every PrimFunc that is
        called at least once with a constant argument.
    """
    consts: dict[str, set[int]] = {}
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for call in _tir_calls(func):
            name = call.args[0].name_hint
            here = {i for i, arg in enumerate(_call_args(call)) if _is_constant(arg)}
            consts[name] = here if name not in consts else consts[name] & here
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and consts.get(gv.name_hint):
            updates[gv] = func.with_attr(CONST_PARAMS_ATTR, sorted(consts[gv.name_hint]))
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def constant_param_names(func: tvm.tirx.PrimFunc) -> set[str]:
    """Names of the parameters of ``func`` marked constant by :func:`mark_constant_params`."""
    attrs = func.attrs
    if not attrs or CONST_PARAMS_ATTR not in attrs:
        return set()
    return {func.params[int(i)].name for i in attrs[CONST_PARAMS_ATTR]}


def _param_shape(param: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in param.ty.shape)


def packed_params(before: tvm.tirx.PrimFunc, after: tvm.tirx.PrimFunc) -> dict[int, int]:
    """``{parameter index: nr}`` for each marked parameter that scheduling re-laid out ``(K, N) → (N/nr, K, nr)``."""
    marked = constant_param_names(before)
    out = {}
    for i, (p0, p1) in enumerate(zip(before.params, after.params, strict=True)):
        if p0.name not in marked:
            continue
        s0, s1 = _param_shape(p0), _param_shape(p1)
        if s0 == s1:
            continue
        if len(s0) == 2 and len(s1) == 3 and s1[0] * s1[2] == s0[1] and s1[1] == s0[0]:
            out[i] = s1[2]
        else:
            raise ValueError(f"parameter {p0.name}: unsupported layout change {s0} -> {s1}")
    return out


def pack_panels(weight: np.ndarray, nr: int) -> np.ndarray:
    """``(K, N)`` → ``(N/nr, K, nr)`` with ``out[jo, k, ji] = weight[k, jo*nr + ji]`` (contiguous copy)."""
    k, n = weight.shape
    return np.ascontiguousarray(weight.reshape(k, n // nr, nr).transpose(1, 0, 2))


def _rewrite_relax_functions(mod: tvm.IRModule, mutator: PyExprMutator) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod`` (its builder's module is the result)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


@expr_functor.mutator
class _ArgPacker(PyExprMutator):
    """Points calls at the re-laid-out kernels and replaces their constant arguments with packed copies."""

    def __init__(self, mod: tvm.IRModule, packed: dict[str, dict[int, int]], kernels: dict[str, Any]) -> None:
        super().__init__(mod)
        self.packed = packed
        self.kernels = kernels
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(self.call_tir) or call.args[0].name_hint not in self.packed:
            return call
        name = call.args[0].name_hint
        args = _call_args(call)
        for index, nr in self.packed[name].items():
            args[index] = relax.const(pack_panels(_const_numpy(args[index]), nr))
            self.count += 1
        return relax.Call(call.op, [self.kernels[name], relax.Tuple(args), *call.args[2:]], call.attrs, call.ty_args)


def pack_constant_args(mod: tvm.IRModule, packed: dict[str, dict[int, int]]) -> tvm.IRModule:
    """Pack the constant arguments of the kernels in ``packed`` (``{kernel name: {param index: nr}}``).

    Every call of those kernels passes a constant at each listed index (guaranteed by
    :func:`mark_constant_params`); each gets a packed copy (:func:`pack_panels`). The re-laid-out kernels get new
    ``GlobalVar``s (same names): a ``GlobalVar`` keeps the parameter types it was created with.
    """
    if not packed:
        return mod
    fresh_builder = relax.BlockBuilder()
    kernels = {name: fresh_builder.add_func(mod[name], name) for name in packed}
    functions = {gv: func for gv, func in mod.functions_items() if gv.name_hint not in packed}
    functions.update({kernels[name]: mod[name] for name in packed})
    mod = tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)
    packer = _ArgPacker(mod, packed, kernels)
    mod = _rewrite_relax_functions(mod, packer)
    logger.info("pre-packed %d constant GEMM weights of %d kernels", packer.count, len(packed))
    return mod


@expr_functor.mutator
class _WeightPadder(PyExprMutator):
    """``matmul(x, W)`` with a constant ``W (K, N)``, N no multiple of ``lanes`` → ``matmul(x, W_pad)[..., :N]``."""

    def __init__(self, mod: tvm.IRModule, lanes: int, nr: int) -> None:
        super().__init__(mod)
        self.lanes = lanes
        self.nr = nr
        self.matmul = tvm.ir.Op.get("relax.matmul")
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not call.op.same_as(self.matmul) or not _is_constant(call.args[1]):
            return call
        weight = _const_numpy(call.args[1])
        if weight.ndim != 2 or weight.shape[1] % self.lanes == 0 or weight.shape[1] < 4 * self.lanes:
            return call
        k, n = weight.shape
        wide_n = -(-n // self.nr) * self.nr
        if wide_n - n > 0.05 * n:  # the widest tile would waste > 5 % of the work: whole vectors only
            wide_n = -(-n // self.lanes) * self.lanes
        padded = np.zeros((k, wide_n), weight.dtype)
        padded[:, :n] = weight
        self.count += 1
        wide = self.builder_.emit(relax.op.matmul(call.args[0], relax.const(padded), out_dtype=call.attrs.out_dtype))
        return relax.op.strided_slice(wide, axes=[-1], begin=[0], end=[n])


def pad_constant_weights(mod: tvm.IRModule, lanes: int, nr: int) -> tuple[tvm.IRModule, int]:
    """Zero-pad the N axis of constant GEMM weights to whole vector tiles, at compile time.

    A GEMM whose N is no multiple of the vector tile otherwise pads B by a copy on every call (template
    ``gemm_padded``: PP-OCR rec's 120×6625 classifier, 3.2 MB per call) and cannot use the pre-packed layout. The
    padded product is sliced back to N columns; the slice fuses into the GEMM's epilogue. PP-OCR rec's classifier
    (40×120×6625, 1 thread): 2.86 → 1.08 ms.

    Args:
        mod: Relax module before ``LegalizeOps``.
        lanes: fp32 vector lanes; weights with N a multiple of it, or N < 4 lanes (as the GEMM template), stay.
        nr: the widest GEMM tile; N is padded to a multiple of it when that adds ≤ 5 % columns, else of ``lanes``.

    Returns:
        ``(module, number of padded weights)``.
    """
    padder = _WeightPadder(mod, lanes, nr)
    mod = _rewrite_relax_functions(mod, padder)
    if padder.count:
        logger.info("padded the N axis of %d constant GEMM weights to whole vector tiles", padder.count)
    return mod, padder.count
