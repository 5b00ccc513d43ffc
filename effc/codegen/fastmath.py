"""Fast-math rewrites on a Relax graph: transcendental ops to vectorizable polynomial forms.

TVM lowers ``erf``, ``exp``, ``tanh`` and ``sigmoid`` to scalar libm calls (``erff``, ``expf``, ...) that LLVM
cannot vectorize; on MiniLM the exact GELU alone cost ~6 ms of a 24 ms run (shared/notes/cpu.md). This pass
replaces each such Relax call by a ``call_te`` of the same math written with TOPI's polynomial/rational
approximations, which lower to plain FMAs, a ``floor`` and a bit reinterpretation — all vectorizable:

- ``erf`` and the exact ``gelu`` (``x * (0.5 + 0.5 * erf(x / sqrt 2))``): ``topi.fast_erf`` (rational
  approximation on [-4, 4], Eigen's ``generic_fast_erf_float``);
- ``exp`` and ``softmax``: ``topi.fast_exp`` (Cephes range reduction ``2^n * p(r)``, degree-5 polynomial);
- ``tanh``: ``topi.fast_tanh`` (rational approximation on [-9, 9]); ``sigmoid`` = ``1 / (1 + fast_exp(-x))``.

Only float32 calls are rewritten (other dtypes keep TVM's lowering). Measured extra error on the effc zoo stays
below 1e-5 absolute on every output (tests/codegen/test_fastmath.py, tests/codegen/test_cpu_zoo.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax import Call, Expr, PyExprMutator, expr_functor


def _fast_gelu(x: te.Tensor) -> te.Tensor:
    """Exact-form GELU with the fast erf: ``x * (0.5 + 0.5 * erf(x / sqrt(2)))`` (Hendrycks & Gimpel 2016)."""
    half = tirx.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tirx.const(1.0 / math.sqrt(2.0), x.dtype)))
    return topi.multiply(x, topi.add(half, topi.multiply(erf, half)))


def _fast_sigmoid(x: te.Tensor) -> te.Tensor:
    """``1 / (1 + exp(-x))`` with the fast exp; exp(-x) saturates cleanly to inf/0 at the clamps."""
    one = tirx.const(1.0, x.dtype)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def _fast_silu(x: te.Tensor) -> te.Tensor:
    """``x * sigmoid(x)`` (SiLU / swish) with the fast sigmoid."""
    return topi.multiply(x, _fast_sigmoid(x))


def _fast_softmax(x: te.Tensor, axis: int) -> te.Tensor:
    """Softmax along ``axis``: max-subtract, fast exp, sum, divide (TOPI's softmax blocks, no keepdims axes)."""
    axis = axis % len(x.shape)

    def drop(idx):
        return [i for d, i in enumerate(idx) if d != axis]

    maxelem = topi.max(x, axis=axis)
    exp = topi.fast_exp(te.compute(x.shape, lambda *i: x(*i) - maxelem(*drop(i)), name="T_softmax_shift"))
    expsum = topi.sum(exp, axis=axis)
    return te.compute(x.shape, lambda *i: exp(*i) / expsum(*drop(i)), name="T_softmax_norm")


# Relax op name -> (TE builder taking the call, PrimFunc name hint). Data, not an if-chain.
_REWRITES: dict[str, tuple[Callable[[Call], Callable[..., te.Tensor]], str]] = {
    "relax.erf": (lambda call: topi.fast_erf, "fast_erf"),
    "relax.exp": (lambda call: topi.fast_exp, "fast_exp"),
    "relax.tanh": (lambda call: topi.fast_tanh, "fast_tanh"),
    "relax.sigmoid": (lambda call: _fast_sigmoid, "fast_sigmoid"),
    "relax.nn.gelu": (lambda call: _fast_gelu, "fast_gelu"),
    "relax.nn.silu": (lambda call: _fast_silu, "fast_silu"),
    "relax.nn.softmax": (lambda call: (lambda x: _fast_softmax(x, int(call.attrs.axis))), "fast_softmax"),
}


def rewritable_ops() -> list[str]:
    """Relax op names that :class:`FastMath` rewrites (for reports and tests)."""
    return sorted(_REWRITES)


@expr_functor.mutator
class _FastMathMutator(PyExprMutator):
    """Replaces float32 transcendental Relax calls by ``call_te`` of their fast forms; counts what it did."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.counts: dict[str, int] = {}

    def visit_call_(self, call: Call) -> Expr:
        call = super().visit_call_(call)
        op = call.op
        if not isinstance(op, tvm.ir.Op) or op.name not in _REWRITES:
            return call
        ty = call.args[0].ty
        if not isinstance(ty, relax.TensorType) or ty.dtype != "float32":
            return call
        make, hint = _REWRITES[op.name]
        self.counts[op.name] = self.counts.get(op.name, 0) + 1
        return self.builder_.call_te(make(call), call.args[0], primfunc_name_hint=hint)


def apply_fast_math(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, int]]:
    """Rewrite every Relax function of ``mod`` with the fast forms.

    Args:
        mod: a Relax module before legalization (TVM's ``LegalizeOps`` has not run yet).

    Returns:
        ``(new_mod, counts)`` where ``counts`` maps each rewritten Relax op name to how many calls changed.
    """
    mutator = _FastMathMutator(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get(), dict(mutator.counts)
