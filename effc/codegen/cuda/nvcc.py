"""Device code for the cuda target, compiled at build time: TVM's CUDA codegen → nvcc → fatbin in ``model.so``.

TVM 0.27 turns a CUDA device module into a binary only when its CUDA runtime library
(``libtvm_runtime_cuda.so``) has registered the factory ``ffi.Module.create.cuda`` in the process; the factory
then calls the global ``tvm_callback_cuda_compile`` with the generated source and stores what it returns. Without
it (no NVIDIA driver on the build machine) TVM keeps the *source*, which the GPU machine would have to compile with
NVRTC or nvcc when it loads the artifact. So, for the duration of a build:

1. :func:`load_cuda_runtime` loads ``libtvm_runtime_cuda.so``; when this machine has no ``libcuda.so.1`` it first
   loads a stand-in driver built here (every call answers ``CUDA_ERROR_NO_DEVICE``; building never calls it);
2. :func:`device_compiler` points ``tvm_callback_cuda_compile`` at nvcc for the chosen architecture: a fatbin with
   the SASS of that architecture and its PTX (for newer GPUs), **without** ``--use_fast_math`` (exact fp32 division,
   square root and denormals, as the default precision promises).

The module serializes as TVM's own CUDA module (format, function table, binary), so any TVM runtime with CUDA loads
it. Every TVM internal this needs sits in this module (pinned to apache-tvm 0.27).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from effc.errors import TargetError

logger = logging.getLogger(__name__)

CALLBACK = "tvm_callback_cuda_compile"
#: nvcc flags besides the architecture: optimized, exact math (no --use_fast_math), warnings of generated code off.
NVCC_FLAGS = ("-O3", "-w")
NVCC_TIMEOUT_S = 1800
#: Driver entry points libtvm_runtime_cuda.so imports (``nm -D --undefined-only``, apache-tvm 0.27.0.post1).
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuLaunchKernelEx", "cuModuleGetFunction",
                   "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(")
_loaded = False


@dataclasses.dataclass
class DeviceModule:
    """One device module compiled by nvcc during a build.

    Attributes:
        kernels: names of the ``__global__`` functions in its source (TVM names them ``<fused function>_kernel``).
        fatbin: the binary that ``model.so`` embeds (SASS for the arch + PTX).
        seconds: nvcc wall time.
    """

    kernels: list[str]
    fatbin: bytes
    seconds: float


def find_nvcc() -> str:
    """The nvcc executable (``$CUDA_HOME/bin/nvcc`` or on PATH).

    Raises:
        TargetError: nvcc is not installed.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [str(Path(home) / "bin" / "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise TargetError(
        "nvcc not found: the cuda target compiles device code at build time",
        "install the CUDA toolkit (12.x or 13.x) and put its bin/ on PATH, or set CUDA_HOME",
    )


def _driver_stub() -> None:
    """Load a ``libcuda.so.1`` stand-in whose entry points all return CUDA_ERROR_NO_DEVICE (100)."""
    body = "\n".join(f"int {name}(void) {{ return 100; }}" for name in _DRIVER_SYMBOLS)
    body += "\nint cuGetErrorName(int e, const char **s) { *s = \"CUDA_ERROR_NO_DEVICE\"; return 0; }"
    body += "\nint cuGetErrorString(int e, const char **s) { *s = \"no NVIDIA driver (build machine)\"; return 0; }\n"
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise TargetError("no C compiler to build the cuda target's driver stand-in", "install gcc or clang")
    with tempfile.TemporaryDirectory(prefix="effc-cuda-") as tmp:
        source, lib = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        source.write_text(body)
        subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(source)],
                       check=True, capture_output=True)
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # stays mapped after the file is removed


def load_cuda_runtime() -> None:
    """Register TVM's CUDA module factory and loader in this process (idempotent).

    Raises:
        TargetError: the library is missing from the TVM install or cannot be loaded.
    """
    global _loaded
    if _loaded:
        return
    import tvm

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        logger.info("no NVIDIA driver here: loading a stand-in libcuda.so.1 to build CUDA artifacts")
        _driver_stub()
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise TargetError(f"cannot load {lib}: {exc}",
                          "reinstall apache-tvm (its wheel ships the CUDA runtime)") from exc
    _loaded = True


def gencode(arch: str) -> list[str]:
    """The nvcc ``-gencode`` flags for ``sm_XY``: its SASS plus ``compute_XY`` PTX (newer GPUs JIT the PTX)."""
    number = arch.removeprefix("sm_")
    return ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"]


def compile_source(code: str, arch: str, workdir: Path) -> DeviceModule:
    """Compile CUDA source to a fatbin for ``arch`` with nvcc.

    Raises:
        TargetError: nvcc is missing, failed (its first error lines are quoted) or timed out.
    """
    nvcc = find_nvcc()
    source, out = workdir / "kernels.cu", workdir / "kernels.fatbin"
    source.write_text(code)
    cmd = [nvcc, "--fatbin", *NVCC_FLAGS, *gencode(arch), "-o", str(out), str(source)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"nvcc ran past {NVCC_TIMEOUT_S} s on the device code", "report the model") from exc
    if proc.returncode != 0:
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line][:3]
        raise TargetError(f"nvcc failed for {arch}: {' | '.join(errors)[:500]}",
                          "check the CUDA toolkit supports this arch (nvcc --list-gpu-arch)")
    return DeviceModule(_KERNEL.findall(code), out.read_bytes(), time.perf_counter() - start)


@dataclasses.dataclass
class DeviceLog:
    """What :func:`device_compiler` compiled: the modules, or the error that stopped nvcc (TVM wraps it)."""

    modules: list[DeviceModule] = dataclasses.field(default_factory=list)
    error: TargetError | None = None


@contextlib.contextmanager
def device_compiler(arch: str, log: DeviceLog) -> Iterator[None]:
    """Within the block, TVM's CUDA codegen compiles device code with nvcc for ``arch``; modules land in ``log``.

    Raises:
        TargetError: see :func:`load_cuda_runtime` and :func:`compile_source` (nvcc is looked up first).
    """
    import tvm_ffi

    find_nvcc()
    load_cuda_runtime()
    previous = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
    workdir = Path(tempfile.mkdtemp(prefix="effc-nvcc-"))

    def compile_cuda(code: str) -> bytes:
        try:
            module = compile_source(code, arch, workdir)
        except TargetError as exc:
            log.error = exc
            raise
        log.modules.append(module)
        return module.fatbin

    tvm_ffi.register_global_func(CALLBACK, compile_cuda, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(CALLBACK, previous, override=True)
        shutil.rmtree(workdir, ignore_errors=True)
