"""Run a TVM artifact (``model.so``, targets ``cpu`` and ``cuda``) with TVM's runtime libraries only.

Loading goes through ``tvm_ffi`` and ``libtvm_runtime.so`` (plus ``libtvm_runtime_cuda.so`` for a GPU); this module
never imports the ``tvm`` Python package, so the 260 MB ``libtvm_compiler.so`` stays out of the process. The
libraries are looked up in ``$EFFC_TVM_LIB_DIR`` (a runtime bundle, see ``benchmarks/gpu_check.sh``), else in the
installed ``tvm`` package's ``lib/`` folder (found without importing it).

The Relax VM is driven through its module functions (``vm_load_executable``, ``vm_initialization``, ``main``) as
``tvm.runtime.vm.VirtualMachine`` does (apache-tvm 0.27). Inputs are copied into tensors TVM allocated (aligned, on
the device) once per call, outputs copied back to numpy once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import ArtifactError, TargetError
from effc.runtime.index_check import guard_error, register_guard_function
from effc.runtime.sort import register_sort_functions

logger = logging.getLogger(__name__)

LIBRARY = "model.so"
_POOLED_ALLOCATOR = 2
_CPU = 1
_loaded: set[str] = set()


def lib_dir() -> Path:
    """The folder holding ``libtvm_runtime*.so``.

    Raises:
        TargetError: neither ``$EFFC_TVM_LIB_DIR`` nor an installed ``tvm`` package provides it.
    """
    env = os.environ.get("EFFC_TVM_LIB_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it (no compiler library)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError("TVM's runtime libraries are not installed",
                          "pip install apache-tvm, or set EFFC_TVM_LIB_DIR to a folder with libtvm_runtime.so")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _load(name: str) -> None:
    if name in _loaded:
        return
    path = lib_dir() / name
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise TargetError(f"cannot load TVM runtime library {path}: {exc}",
                          "install apache-tvm or point EFFC_TVM_LIB_DIR at the runtime bundle") from exc
    _loaded.add(name)


def cuda_device_count() -> int:
    """CUDA devices the driver reports (0 without a driver, without a GPU, or under a build-time stand-in)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


@dataclasses.dataclass(frozen=True)
class Device:
    """How to run a target's ``model.so``.

    Attributes:
        label: the device in messages (``CPU``, ``CUDA``).
        dlpack_type: DLPack device type (kDLCPU = 1, kDLCUDA = 2).
        libraries: TVM runtime libraries it needs beyond ``libtvm_runtime.so``.
        present: whether this machine has such a device.
    """

    label: str
    dlpack_type: int
    libraries: tuple[str, ...]
    present: Callable[[], bool]


#: target name (manifest) → its device; targets not listed here load through ``effc.targets``.
DEVICES: dict[str, Device] = {
    "cpu": Device("CPU", _CPU, (), lambda: True),
    "cuda": Device("CUDA", 2, ("libtvm_runtime_cuda.so",), lambda: cuda_device_count() > 0),
}


def _tensor_functions() -> tuple[Any, Any, Any]:
    import tvm_ffi

    return tuple(tvm_ffi.get_global_func(f"runtime.TVMTensor{name}") for name in
                 ("AllocWithScope", "CopyFromBytes", "CopyToBytes"))


class VmRunner:
    """A loaded ``model.so`` on one device: ``run(feeds)`` calls the VM's ``main`` with the inputs in manifest order.

    Args:
        path: the ``.so`` file (hash already checked).
        target: ``cpu`` or ``cuda`` (:data:`DEVICES`).
        input_names: the ``main`` parameters in order.
        threads: CPU worker threads (cpu target; None leaves TVM's default).
        entry: the function :meth:`run` calls (``main``; a decoder's ``prefill``).

    Raises:
        TargetError: the library does not load here.
    """

    def __init__(self, path: Path, target: str, input_names: list[str], threads: int | None = None,
                 entry: str = "main"):
        import tvm_ffi

        device = DEVICES[target]
        device_type = device.dlpack_type
        for name in ("libtvm_runtime.so", *device.libraries):
            _load(name)
        if threads is not None:
            os.environ.setdefault("TVM_NUM_THREADS", str(threads))
            tvm_ffi.get_global_func("runtime.config_threadpool")(1, threads)  # 1 = kBig: all cores
        register_guard_function()  # the in-graph index checks of effc.codegen.index_guard call it
        register_sort_functions()  # TVM's CPU sort/topk kernels call them (registered by its compiler library)
        self._device = tvm_ffi.device(target, 0)
        self._input_names = list(input_names)
        self._alloc, self._copy_in, self._copy_out = _tensor_functions()
        try:
            self._vm = tvm_ffi.load_module(os.fspath(path))["vm_load_executable"]()
            init = [device_type, 0, _POOLED_ALLOCATOR] + ([] if device_type == _CPU else [_CPU, 0, _POOLED_ALLOCATOR])
            self._vm["vm_initialization"](*init)
            self._main = self._vm[entry]
        except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
            raise TargetError(f"cannot load {path}: {type(exc).__name__}: {str(exc)[:400]}",
                              "recompile the model with this effc/TVM version") from exc

    def _to_device(self, array: np.ndarray) -> Any:
        import tvm_ffi

        array = np.asarray(array, order="C")  # np.ascontiguousarray makes 0-d inputs 1-d
        tensor = self._alloc(tvm_ffi.Shape(array.shape), tvm_ffi.dtype(str(array.dtype)), self._device, None)
        self._copy_in(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
        return tensor

    def _to_numpy(self, result: Any) -> list[np.ndarray]:
        if hasattr(result, "shape") and hasattr(result, "dtype"):
            out = np.empty(tuple(result.shape), dtype=str(result.dtype))
            self._copy_out(result, ctypes.c_void_p(out.ctypes.data), out.nbytes)
            return [out]
        return [array for item in result for array in self._to_numpy(item)]

    def to_device(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """The inputs copied to the device, in ``main``'s order (for :meth:`call`; timing without copies).

        Raises:
            TargetError: an input is missing.
        """
        missing = [name for name in self._input_names if name not in feeds]
        if missing:
            raise TargetError(f"inputs {missing} missing from the feeds", f"pass all of {self._input_names}")
        return [self._to_device(feeds[name]) for name in self._input_names]

    def call(self, args: list[Any]) -> Any:
        """``main`` on device-resident inputs; the outputs stay on the device (asynchronous on a GPU)."""
        return self._main(*args)

    def function(self, name: str) -> Any:
        """The VM function ``name`` (a decoder's ``prefill``, ``decode``, ``<entry>_kv_write``).

        Raises:
            TargetError: the library has no such function.
        """
        try:
            return self._vm[name]
        except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
            raise TargetError(f"{LIBRARY} has no function {name!r}", "recompile the model with this effc") from exc

    def to_device_arrays(self, arrays: list[np.ndarray]) -> list[Any]:
        """``arrays`` copied into new tensors on this runner's device (one copy each)."""
        return [self._to_device(array) for array in arrays]

    def to_numpy(self, result: Any) -> list[np.ndarray]:
        """Device tensors (one, or a nested tuple) copied back to numpy, flattened in order."""
        return self._to_numpy(result)

    def decoder_backend(self) -> Any:
        """The decoder backend over this runner (:class:`effc.runtime.decoder.DeviceCacheBackend`).

        The KV cache stays on the runner's device.
        """
        from effc.runtime.decoder import DeviceCacheBackend

        return DeviceCacheBackend(self)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference; outputs as numpy arrays in graph output order.

        Raises:
            DataError: an index the model computes from its inputs is out of range (the in-graph check of
                :mod:`effc.codegen.index_guard`).
            TargetError: an input is missing, or TVM failed at run time.
        """
        args = self.to_device(feeds)
        try:
            return self._to_numpy(self.call(args))
        except Exception as exc:  # noqa: BLE001
            error = guard_error(exc)
            if error is not None:
                raise error from None
            raise TargetError(f"running {LIBRARY} failed: {type(exc).__name__}: {str(exc)[:400]}",
                              "check the feeds match the manifest's inputs (dtype, shape), or recompile") from exc


def load_vm_runner(artifact_dir: Path, manifest: dict[str, Any]) -> VmRunner:
    """A :class:`VmRunner` for the artifact's ``model.so`` on the device of its target.

    Raises:
        ArtifactError: the manifest does not list ``model.so`` (its hash was never checked).
        TargetError: a cuda artifact on a machine without a CUDA device ("built for sm_90; no CUDA device found"),
            or the library fails to load.
    """
    if LIBRARY not in (manifest.get("files") or {}):
        raise ArtifactError(f"{LIBRARY} is not listed with a sha256 in {Path(artifact_dir) / 'manifest.json'}",
                            "recompile the model; never edit files of an artifact folder")
    target = manifest.get("target") or {}
    name = target.get("name")
    options = target.get("options") or {}
    device = DEVICES[name]
    if not device.present():
        built_for = (target.get("info") or {}).get("arch") or name
        raise TargetError(f"built for {built_for}; no {device.label} device found",
                          "run it on a machine with an NVIDIA GPU and its driver, or compile for --target cpu")
    threads = options.get("threads") if device.dlpack_type == _CPU else None
    names = [spec["name"] for spec in manifest.get("inputs", [])]
    entry = "prefill" if manifest.get("decoder") else "main"  # a decoder's run() is one prefill call
    return VmRunner(Path(artifact_dir) / LIBRARY, name, names, int(threads) if threads else None, entry)
