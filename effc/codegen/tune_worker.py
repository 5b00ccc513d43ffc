"""Functions that MetaSchedule's builder and runner worker processes call during ``--tune`` (see :mod:`.tune`).

They live in their own small module because the workers unpickle them by reference: importing this module must stay
cheap (TVM only). TVM's default builder function imports ``tvm.s_tir.tensor_intrin`` in every fresh worker, which
took 27 s to 3 min on the 2-core machines measured here, longer than the build timeout, so every candidate failed
silently (``../shared/notes/cpu.md``, "MetaSchedule pitfalls"). :func:`build_candidate` skips that import: effc's
tuned mode uses no tensorization intrinsics (no ``MultiLevelTilingWithIntrin`` rule on the targets it tunes for).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

_INTRIN_PACKAGE = "tvm.s_tir.tensor_intrin"


def import_cpu_intrinsics() -> None:
    """Register TVM's x86 and Arm tensor intrinsics without importing the whole ``tensor_intrin`` package.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` also registers the CUDA, ROCm,
    Hexagon and RISC-V intrinsics: 27 s to 4 min on the 2-core machines measured here. The CPU schedule rules
    only look up the x86 (VNNI, AVX-512) and Arm (dot product, SVE) intrinsics, so this registers an empty
    package object with the real folder as its path and imports only those two submodules (2 s). Does nothing
    when the package is already imported.
    """
    if _INTRIN_PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(_INTRIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(_INTRIN_PACKAGE, "CPU tensor intrinsics only (effc.codegen.tune_worker)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__package__ = _INTRIN_PACKAGE
    sys.modules[_INTRIN_PACKAGE] = package
    import tvm.s_tir

    tvm.s_tir.tensor_intrin = package
    for name in ("x86", "arm_cpu"):
        importlib.import_module(f"{_INTRIN_PACKAGE}.{name}")


def build_candidate(mod: Any, target: Any, params: Any) -> Any:
    """Build one MetaSchedule candidate (the ``f_build`` of ``LocalBuilder``).

    Args:
        mod: the scheduled TIR ``IRModule`` of one kernel (function ``main``).
        target: the LLVM ``tvm.target.Target``.
        params: must be None (kernels are tuned without bound parameters).

    Returns:
        The built ``tvm.runtime.Module``.
    """
    del params
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def set_worker_threads(threads: int) -> None:
    """Runner-worker initializer: TVM's thread pool in the measuring process gets ``threads`` workers.

    Called before the worker runs anything, so ``TVM_NUM_THREADS`` is read when the pool is first created.
    """
    os.environ["TVM_NUM_THREADS"] = str(threads)
