"""CPU lowering: Relax module → fast-math rewrites → fused kernels → schedule templates → executable.

Pipeline (TVM 0.27's CPU pipeline, ``relax/backend/cpu_generic/pipeline.py``, with two effc stages inserted):

1. :func:`effc.codegen.fastmath.apply_fast_math` (option ``fast_math``, default on);
2. TVM's library dispatch + legalize passes (``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``,
   ``FuseOps``, ``FuseTIR``);
3. :func:`effc.codegen.schedules.apply_templates` (option ``schedule``: ``"templates"`` default, ``"none"``);
4. TVM's dataflow-lowering and finalize passes, then ``tvm.compile`` of the scheduled module.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

from effc.codegen.conv_rewrite import rewrite_convs
from effc.codegen.fastmath import apply_fast_math
from effc.codegen.prepack import pad_constant_weights
from effc.codegen.schedules import apply_templates, tile_config, vector_lanes
from effc.codegen.tune import BUILD_TIMEOUT_S, check_build_timeout, check_trials, tune_module
from effc.errors import TargetError

logger = logging.getLogger(__name__)

SCHEDULE_MODES = ("templates", "none")
OPTION_NAMES = ("fast_math", "schedule", "tune", "tune_build_timeout")  # the options compile_cpu reads


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR PrimFuncs (kernels) in ``mod``, sorted."""
    return sorted(gv.name_hint for gv, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc))


def _check_options(options: dict[str, Any]) -> tuple[bool, str, int]:
    """Validate the options this module reads: ``fast_math``, ``schedule``, ``tune``.

    Raises:
        TargetError: an option has a value outside its domain.
    """
    fast_math = options.get("fast_math", True)
    if fast_math is None:
        fast_math = True
    schedule = options.get("schedule", "templates") or "templates"
    if schedule not in SCHEDULE_MODES:
        raise TargetError(f"unknown CPU schedule mode {schedule!r}", f"use one of {', '.join(SCHEDULE_MODES)}")
    tune = check_trials(options.get("tune"))
    if tune and schedule != "templates":
        raise TargetError(f"tune={tune} needs schedule=templates (the fallback for untuned kernels)",
                          "drop -O schedule=none, or drop --tune")
    if tune:
        check_build_timeout(options.get("tune_build_timeout", BUILD_TIMEOUT_S))
    return bool(fast_math), schedule, tune


def _const_value(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant (``GenericConst.value`` in TVM 0.27), else None."""
    if type(expr).__name__ not in ("GenericConst", "Constant"):
        return None
    value = getattr(expr, "value", None)
    if value is None:
        value = getattr(expr, "data", None)
    return value.numpy() if hasattr(value, "numpy") else None


def _out_shape(call: relax.Call) -> list[int] | None:
    shape = getattr(call.ty, "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


# Relax op -> numpy evaluation on constant arguments (call, values) -> array. Shape-only ops use the output type.
_NUMPY_FOLD: dict[str, Any] = {
    "relax.reshape": lambda call, v: v[0].reshape(_out_shape(call)),
    "relax.expand_dims": lambda call, v: v[0].reshape(_out_shape(call)),
    "relax.squeeze": lambda call, v: v[0].reshape(_out_shape(call)),
    "relax.isnan": lambda call, v: np.isnan(v[0]),
    "relax.permute_dims": lambda call, v: np.transpose(
        v[0], None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
    ),
    "relax.astype": lambda call, v: v[0].astype(str(call.attrs.dtype)),
    "relax.add": lambda call, v: (v[0] + v[1]).astype(v[0].dtype),
    "relax.subtract": lambda call, v: (v[0] - v[1]).astype(v[0].dtype),
    "relax.multiply": lambda call, v: (v[0] * v[1]).astype(v[0].dtype),
    "relax.divide": lambda call, v: (v[0] / v[1]).astype(v[0].dtype),
    "relax.sqrt": lambda call, v: np.sqrt(v[0]),
    "relax.rsqrt": lambda call, v: (1.0 / np.sqrt(v[0])).astype(v[0].dtype),
}


def _fold_where(call: relax.Call, folder: Any) -> relax.Expr | None:
    """``where(c, x, y)`` with a constant, uniform condition → the chosen branch when its shape is the output's."""
    cond = folder.constant_of(call.args[0])
    if cond is None or cond.size == 0 or not (cond.all() or not cond.any()):
        return None
    branch = call.args[1] if bool(cond.flat[0]) else call.args[2]
    ty = branch.ty
    if getattr(ty, "shape", None) is None or _out_shape(call) is None:
        return None
    try:
        same = [int(d) for d in ty.shape] == _out_shape(call) and ty.dtype == call.ty.dtype
    except (TypeError, ValueError):
        return None
    return branch if same else None


@expr_functor.mutator
class _NumpyConstantFolder(PyExprMutator):
    """Folds cheap ops on constants with numpy (TVM's FoldConstant builds one LLVM module per call: 0.3 s each)."""

    def constant_of(self, expr: relax.Expr) -> np.ndarray | None:
        """The numpy value of ``expr`` when it is a constant or a variable bound to one."""
        value = _const_value(expr)
        if value is None and isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            value = None if bound is None else _const_value(bound)
        return value

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        if isinstance(op, tvm.ir.Op) and op.name == "relax.where":
            folded = _fold_where(call, self)
            return call if folded is None else folded
        if not isinstance(op, tvm.ir.Op) or op.name not in _NUMPY_FOLD:
            return call
        tensor_args = [a for a in call.args if type(a).__name__ != "ShapeExpr"]
        values = [self.constant_of(a) for a in tensor_args]
        if not values or any(v is None for v in values) or _out_shape(call) is None:
            return call
        try:
            folded = _NUMPY_FOLD[op.name](call, values)
        except (ValueError, TypeError):
            return call
        if list(folded.shape) != _out_shape(call):
            return call
        return relax.const(folded, str(folded.dtype) if folded.dtype != np.bool_ else "bool")


def fold_constants_numpy(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold reshape/transpose/cast/isnan/elementwise calls whose inputs are all constants, with numpy."""
    folder = _NumpyConstantFolder(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gv, folder.visit_expr(func))
    return folder.builder_.get()


def legalize_and_fuse(mod: tvm.IRModule, tvm_target: tvm.target.Target, fast_math: bool) -> tuple[tvm.IRModule, dict]:
    """Fast-math rewrites (optional), then TVM's dispatch, legalize and fusion passes.

    Returns:
        ``(fused_module, fast_math_counts)`` where the counts map a Relax op name to rewritten calls.
    """
    counts: dict[str, int] = {}
    # batch_norm → elementwise ops with constant per-channel factors (folded next), which fuse into conv epilogues.
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = fold_constants_numpy(mod)
    if fast_math:
        mod, counts = apply_fast_math(mod)
    mod, _ = rewrite_convs(mod, vector_lanes(tvm_target))
    mod, _ = pad_constant_weights(mod, vector_lanes(tvm_target), max(tile_config(tvm_target).gemm_nr))
    with tvm.target.Target(tvm_target):
        # TVM's FoldConstant is left out: it builds one LLVM module per constant call (0.2-0.4 s each, 17 s on
        # PP-OCR cls); the ONNX canonicalization and fold_constants_numpy already folded what matters.
        seq = tvm.transform.Sequential(
            cpu_pipeline.library_dispatch_passes(tvm_target)
            + [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )
        mod = seq(mod)
    return mod, counts


def _lowering_pipeline(tvm_target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CPU passes that follow scheduling (dataflow lowering, memory planning, VM lowering)."""
    return tvm.transform.Sequential(
        cpu_pipeline.dataflow_lower_passes(tvm_target) + cpu_pipeline.finalize_passes(tvm_target)
    )


def compile_cpu(mod: tvm.IRModule, tvm_target: tvm.target.Target, options: dict[str, Any]) -> tuple[Any, dict]:
    """Compile a Relax module for an LLVM CPU target with effc's fast-math rewrites and schedule templates.

    Args:
        mod: the Relax module from :func:`effc.codegen.frontend.to_relax` (function ``main``).
        tvm_target: an ``llvm`` target (``mcpu``, ``num-cores`` set by the CPU target); its vector width picks
            the tile table row (:mod:`effc.codegen.schedules.tiles`).
        options: ``fast_math`` (bool, default True), ``schedule`` (``"templates"`` default | ``"none"``),
            ``tune`` (MetaSchedule trial budget, 0 = off; :mod:`effc.codegen.tune`), ``tune_build_timeout``
            (seconds per tuning candidate build, default 60), ``threads`` (measuring threads when tuning).

    Returns:
        ``(executable, info)``: a ``tvm.relax.Executable`` and ``{"kernels": {name: template},
        "fast_math": bool, "fast_math_rewrites": {relax op: count}, "schedule": str, "compile_seconds": float}``,
        plus ``"tuning"`` (:func:`~effc.codegen.tune.tune_module`) when ``tune > 0``; kernels whose tuned schedule
        won are listed with template ``"tuned"``.

    Raises:
        TargetError: a bad option, or TVM failed to lower or build the module (message names the step).
    """
    fast_math, schedule, tune = _check_options(options)
    tuning = None
    start = time.perf_counter()
    step = "legalize/fuse"
    try:
        fused, counts = legalize_and_fuse(mod, tvm_target, fast_math)
        if tune and schedule == "templates":
            step = "MetaSchedule tuning"
            threads = int(options.get("threads") or tvm_target.attrs.get("num-cores", 1))
            timeout = options.get("tune_build_timeout", BUILD_TIMEOUT_S)
            fused, tuning = tune_module(fused, tvm_target, tune, threads, timeout)
        step = "schedule templates"
        if schedule == "templates":
            fused, kernels = apply_templates(fused, tvm_target)
        else:
            kernels = {name: "none" for name in _kernel_names(fused)}
        step = "lower and build"
        with tvm.target.Target(tvm_target):
            lowered = _lowering_pipeline(tvm_target)(fused)
        executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
    except TargetError:
        raise
    except Exception as exc:  # noqa: BLE001  (TVM raises many error types; never let its traceback escape)
        raise TargetError(
            f"TVM failed at step '{step}' for {tvm_target}: {type(exc).__name__}: {str(exc)[:500]}",
            "retry with schedule='none' or fast_math=False to isolate it, and report the model",
        ) from exc
    seconds = time.perf_counter() - start
    if tuning:
        kernels.update({k: "tuned" for k, v in tuning["kernels"].items() if v["choice"] == "tuned"})
    missing = sorted(k for k, t in kernels.items() if t == "none")
    if missing and schedule == "templates":
        logger.warning("%d kernel(s) got no schedule template: %s", len(missing), ", ".join(missing))
    logger.info("compiled %d kernels for %s in %.2f s", len(kernels), tvm_target, seconds)
    info = {
        "kernels": kernels,
        "fast_math": fast_math,
        "fast_math_rewrites": counts,
        "schedule": schedule,
        "compile_seconds": round(seconds, 3),
    }
    if tuning:
        info["tuning"] = tuning
    return executable, info
