"""CUDA lowering: Relax module → (mixed precision) → fused kernels → guarded DLight schedules → executable + fatbin.

Pipeline: TVM 0.27's CUDA pipeline (``relax/backend/cuda/pipeline.py``) with effc's pieces plugged in:

1. precision (option ``gpu_precision``, :data:`PRECISIONS`): ``fp32`` (default) leaves the model exact;
   ``fp16`` runs TVM's ``ToMixedPrecision`` (matmul/conv inputs in fp16, fp32 accumulation), so DLight's ``Matmul``
   rule tensorizes GEMMs with M, N, K > 64 on the tensor cores (wmma), and stores constant lookup tables (``take``,
   e.g. word embeddings) in fp16;
2. TVM's library dispatch + ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``, ``FuseOps``, ``FuseTIR``;
3. DLight's rules, each guarded by :func:`effc.codegen.cuda.rules.schedule_pass` (a crashing rule declines);
4. TVM's dataflow-lowering and finalize passes; ``tvm.compile`` with the device code compiled by nvcc at build
   time (:mod:`effc.codegen.cuda.nvcc`), so ``model.so`` embeds a fatbin, not CUDA source.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor
from tvm.relax.backend.cuda import pipeline as cuda_pipeline

from effc.codegen import build as tvm_build
from effc.codegen.cuda import nvcc, rules
from effc.errors import TargetError

logger = logging.getLogger(__name__)

def _constant(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant (``GenericConst.value`` in TVM 0.27), else None."""
    if type(expr).__name__ not in ("GenericConst", "Constant"):
        return None
    value = getattr(expr, "value", None) if hasattr(expr, "value") else getattr(expr, "data", None)
    return value.numpy() if hasattr(value, "numpy") else None


@expr_functor.mutator
class _HalfTables(PyExprMutator):
    """``take(fp32 constant table, ids)`` → ``astype(take(fp16 table, ids), fp32)``: embedding tables in fp16."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.take":
            return call
        table = _constant(call.args[0])
        if table is None or table.dtype != np.float32:
            return call
        half = relax.const(table.astype(np.float16), "float16")
        return relax.op.astype(relax.op.take(half, call.args[1], axis=call.attrs.axis), "float32")


@tvm.transform.module_pass(opt_level=0, name="effc.HalfTables")
def half_tables(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
    """Store constant lookup tables (``take``) in fp16 and widen the rows taken; halves MiniLM's word embedding."""
    mutator = _HalfTables(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


#: ``gpu_precision`` → the Relax passes that realize it (None: not implemented yet; asking for it is an error).
PRECISIONS: dict[str, list[Any] | None] = {
    "fp32": [],
    "fp16": [relax.transform.ToMixedPrecision(out_dtype="float32"), half_tables],
    "tf32": None,
    "bf16": None,
}


def check_precision(value: Any) -> str:
    """The ``gpu_precision`` option (default ``fp32``).

    Raises:
        TargetError: unknown, or not implemented yet.
    """
    precision = str(value or "fp32")
    if precision not in PRECISIONS:
        raise TargetError(f"unknown gpu_precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if PRECISIONS[precision] is None:
        implemented = [name for name, passes in PRECISIONS.items() if passes is not None]
        raise TargetError(f"gpu_precision={precision} is not implemented yet for the cuda target",
                          f"use one of {', '.join(implemented)} (default fp32: exact)")
    return precision


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    return sorted(gv.name_hint for gv, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc))


def lower(mod: tvm.IRModule, tvm_target: tvm.target.Target, precision: str, log: rules.RuleLog) -> tvm.IRModule:
    """Steps 1-4 up to (not including) code generation: the scheduled, VM-ready Relax module.

    Raises:
        TargetError: a kernel was left unscheduled by every rule (names it).
    """
    with tvm_target:
        mod = tvm.transform.Sequential([
            *PRECISIONS[precision],
            *cuda_pipeline.library_dispatch_passes(tvm_target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            rules.schedule_pass(log),
        ])(mod)
        left = rules.unscheduled(mod)
        if left:
            raise TargetError(f"no GPU schedule rule applies to kernel(s) {left[:5]}", "report the model")
        return tvm.transform.Sequential(
            cuda_pipeline.dataflow_lower_passes(tvm_target) + cuda_pipeline.finalize_passes(tvm_target)
        )(mod)


def compile_cuda(mod: tvm.IRModule, tvm_target: tvm.target.Target, options: dict[str, Any]) -> tuple[Any, dict]:
    """Lower and compile ``mod`` for ``tvm_target`` (a ``cuda`` target with ``arch``).

    Args:
        mod: Relax module from :func:`effc.codegen.frontend.to_relax`.
        tvm_target: the CUDA target (host: generic LLVM).
        options: ``gpu_precision`` (``fp32`` default, ``fp16``).

    Returns:
        ``(executable, info)``; info: ``gpu_precision``, ``kernels`` (PrimFunc → DLight rule), ``rule_counts``,
        ``rule_crashes``, ``device_kernels`` (``__global__`` names in the fatbin), ``fatbin_bytes``,
        ``nvcc_seconds``, ``lower_seconds``.

    Raises:
        TargetError: bad option, nvcc missing or failing, or TVM failing (the step is named).
    """
    precision = check_precision(options.get("gpu_precision"))
    arch = str(tvm_target.attrs["arch"])
    log, device = rules.RuleLog(), nvcc.DeviceLog()
    start = time.perf_counter()
    try:
        lowered = lower(mod, tvm_target, precision, log)
    except TargetError:
        raise
    except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
        raise TargetError(f"CUDA lowering failed: {type(exc).__name__}: {str(exc)[:400]}", "report the model") from exc
    lower_seconds = time.perf_counter() - start
    with nvcc.device_compiler(arch, device):
        try:
            executable = tvm_build.compile_relax(lowered, tvm_target, relax_pipeline=None)
        except TargetError:
            if device.error is not None:
                raise device.error from None
            raise
    if not device.modules:
        raise TargetError("TVM produced no CUDA device code", "report the model")
    info = {
        "gpu_precision": precision,
        "kernels": dict(sorted(log.chosen.items())),
        "rule_counts": log.counts(),
        "rule_crashes": log.crashed,
        "device_kernels": sorted({k for m in device.modules for k in m.kernels}),
        "fatbin_bytes": sum(len(m.fatbin) for m in device.modules),
        "nvcc_seconds": round(sum(m.seconds for m in device.modules), 3),
        "lower_seconds": round(lower_seconds, 3),
    }
    logger.info("cuda %s: %d kernels %s, %d crash(es) declined", arch, len(log.chosen), info["rule_counts"],
                len(log.crashed))
    return executable, info
