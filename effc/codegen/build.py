"""TVM build helpers shared by the TVM-based targets (cpu, cuda): export and reload of executables.

Every call here wraps TVM failures in :class:`~effc.errors.TargetError` naming the step and the file.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from effc.errors import TargetError

logger = logging.getLogger(__name__)


def compile_relax(mod: tvm.IRModule, tvm_target: tvm.target.Target, relax_pipeline: Any = "default") -> Any:
    """Compile a Relax module with ``tvm.compile`` (used by targets without their own lowering).

    Args:
        mod: Relax module with a ``main`` function.
        tvm_target: the TVM target.
        relax_pipeline: a pipeline name, a pass, or None when ``mod`` is already lowered.

    Returns:
        The ``tvm.runtime.Executable``.

    Raises:
        TargetError: TVM failed (message carries TVM's reason, shortened).
    """
    start = time.perf_counter()
    try:
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline)
    except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
        raise TargetError(
            f"tvm.compile failed for target {tvm_target}: {type(exc).__name__}: {str(exc)[:500]}",
            "report the model and target; try another target option",
        ) from exc
    logger.info("tvm.compile for %s took %.2f s", tvm_target, time.perf_counter() - start)
    return executable


def export_library(executable: Any, path: Path) -> Path:
    """Write ``executable`` as a shared object (``.so``) that :func:`load_vm` reads back.

    Args:
        executable: the result of ``tvm.compile``.
        path: destination file (parent folder must exist).

    Returns:
        ``path``.

    Raises:
        TargetError: linking failed (e.g. no C compiler on PATH).
    """
    try:
        executable.export_library(os.fspath(path))
    except Exception as exc:  # noqa: BLE001
        raise TargetError(
            f"exporting the compiled model to {path} failed: {type(exc).__name__}: {str(exc)[:400]}",
            "install a C compiler (gcc or clang) on PATH; TVM links the shared object with it",
        ) from exc
    return Path(path)


def load_vm(path: Path, device: Any) -> relax.VirtualMachine:
    """Load an exported shared object into a Relax virtual machine on ``device``.

    Args:
        path: the ``.so`` written by :func:`export_library`.
        device: a TVM device, e.g. ``tvm.cpu()``.

    Returns:
        The ``relax.VirtualMachine``.

    Raises:
        TargetError: the file cannot be loaded (wrong architecture, missing runtime symbols, ...).
    """
    from effc.runtime.index_check import register_guard_function

    register_guard_function()  # the in-graph index checks of effc.codegen.index_guard call it
    try:
        module = tvm.runtime.load_module(os.fspath(path))
        return relax.VirtualMachine(module, device)
    except Exception as exc:  # noqa: BLE001
        raise TargetError(
            f"cannot load {path}: {type(exc).__name__}: {str(exc)[:400]}",
            "recompile the model on this machine (the artifact was built for another CPU or TVM version)",
        ) from exc


def to_tvm_tensor(array: Any, device: Any) -> Any:
    """Convert a numpy array to a ``tvm.runtime.Tensor`` on ``device``."""
    return tvm.runtime.tensor(array, device)


def outputs_to_numpy(result: Any) -> list:
    """A VM result (one tensor or a possibly nested tuple of tensors) → flat list of numpy arrays."""
    if isinstance(result, tvm.runtime.Tensor):
        return [result.numpy()]
    flat: list = []
    for item in result:
        flat.extend(outputs_to_numpy(item))
    return flat


def kernel_profile(vm: relax.VirtualMachine, args: list, reps: int = 5, entry: str = "main") -> list[dict[str, Any]]:
    """Per-kernel wall time of ``vm[entry](*args)`` through the Relax VM instrument hook.

    Args:
        vm: a loaded VM (:func:`load_vm`); its instrument hook is replaced.
        args: the inputs, already ``tvm.runtime.Tensor``.
        reps: inferences profiled (times are averaged over them).
        entry: the function run (a decoder's ``prefill``/``decode``).

    Returns:
        ``[{"name", "ms", "calls"}]`` per kernel or VM builtin, slowest first; ``ms`` and ``calls`` per inference.
    """
    spans: dict[str, list[float]] = {}  # name -> [total seconds, calls, start of the running call]

    def hook(func, name, before_run, *_rest):
        span = spans.setdefault(name, [0.0, 0, 0.0])
        if before_run:
            span[2] = time.perf_counter()
        else:
            span[0], span[1] = span[0] + time.perf_counter() - span[2], span[1] + 1
        return 0

    vm.set_instrument(hook)
    for _ in range(reps):
        vm[entry](*args)
    ranked = sorted(spans.items(), key=lambda kv: -kv[1][0])
    return [{"name": k, "ms": total / reps * 1e3, "calls": int(n) // reps} for k, (total, n, _) in ranked]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask on Linux, else all logical CPUs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_runtime_threads(threads: int) -> int:
    """Make TVM's thread pool (of the calling thread) use ``threads`` workers; returns the count now in use.

    TVM sizes its pool from ``TVM_NUM_THREADS`` when the pool is first created (default: half the logical CPUs),
    and ``runtime.config_threadpool`` can then only choose up to that many. So the variable is set to all usable
    cores when the user has not set it, before the first TVM call that creates the pool.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads, usable_cores())))
    if tvm.runtime.num_threads() != threads:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1 = kBig: all cores on a homogeneous CPU
    return int(tvm.runtime.num_threads())
