"""CPU lowering: Relax module → executable with TVM's default Relax pipeline (first, untuned version).

Schedule templates and fast-math rewrites plug in here later; :func:`compile_cpu` keeps its signature.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import tvm

from effc.errors import TargetError

logger = logging.getLogger(__name__)


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR PrimFuncs (kernels) in ``mod``, sorted."""
    return sorted(gv.name_hint for gv, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc))


def compile_cpu(mod: tvm.IRModule, tvm_target: tvm.target.Target, options: dict[str, Any]) -> tuple[Any, dict]:
    """Compile a Relax module for an LLVM CPU target.

    Args:
        mod: the Relax module from :func:`effc.codegen.frontend.to_relax` (function ``main``).
        tvm_target: an ``llvm`` target (``mcpu``, ``num-cores`` set by the CPU target).
        options: target options (unused by this first version; later: schedules, fast-math).

    Returns:
        ``(executable, info)``: a ``tvm.relax.Executable`` and ``{"kernels": {name: template},
        "compile_seconds": float}`` where every kernel's template is ``"default"`` here.

    Raises:
        TargetError: TVM failed to lower or build the module (message names the step).
    """
    del options  # no option changes the default pipeline yet
    start = time.perf_counter()
    try:
        with tvm.target.Target(tvm_target):
            lowered = tvm.relax.get_pipeline("default")(mod)
        executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
    except Exception as exc:  # noqa: BLE001  (TVM raises many error types; never let its traceback escape)
        raise TargetError(
            f"TVM failed to compile the Relax module for {tvm_target}: {type(exc).__name__}: {str(exc)[:500]}",
            "check the model imports (effc inspect) or report the failing op with the model attached",
        ) from exc
    seconds = time.perf_counter() - start
    kernels = {name: "default" for name in _kernel_names(lowered)}
    logger.info("compiled %d kernels for %s in %.2f s", len(kernels), tvm_target, seconds)
    return executable, {"kernels": kernels, "compile_seconds": round(seconds, 3)}
