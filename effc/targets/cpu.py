"""The host CPU target: LLVM codegen for the detected ``mcpu``, artifact ``model.so`` run by TVM's Relax VM.

Options: ``threads`` (worker threads at compile time for ``num-cores`` and at run time; default: the cores this
process may use), ``mcpu`` (an LLVM CPU name, default: the host's, e.g. ``znver3``), and those of
:func:`effc.codegen.cpu.compile_cpu` (``fast_math``, ``schedule``, ``tune``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import tvm

from effc.codegen import build as tvm_build
from effc.codegen import cpu as cpu_codegen
from effc.codegen.build import set_runtime_threads, usable_cores
from effc.codegen.frontend import last_lowering_log, to_relax
from effc.codegen.tvm_output import tvm_output_to_log
from effc.errors import ArtifactError, TargetError
from effc.runtime.index_check import guard_error, register_guard_function
from effc.targets.base import BuildResult, Runner, Target, register_target

logger = logging.getLogger(__name__)

_LIBRARY = "model.so"
_OPTIONS = ("threads", "mcpu")
# Options read by effc.codegen.cpu.compile_cpu (schedules, fast-math, tuning), if it does not list them itself.
_CODEGEN_OPTIONS = ("fast_math", "schedule", "tune")
# Widest SIMD extension first: LLVM feature name → vector register width in bits.
_VECTOR_FEATURES = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sse2", 128), ("neon", 128), ("sve", 128))


def _vector_bits(tvm_target: tvm.target.Target) -> int:
    features = tvm.target.codegen.llvm_get_cpu_features(tvm_target)
    return next((bits for name, bits in _VECTOR_FEATURES if name in features), 0)


def _naming_the_node(exc: TargetError, model: ir.Model, tvm_target: tvm.target.Target,
                     options: dict[str, Any]) -> TargetError:
    """``exc`` (TVM failed inside lowering/build, naming no node) with the ONNX node that makes it fail."""
    if exc.__cause__ is None or isinstance(exc.__cause__, TargetError):  # a bad option: nothing to locate
        return exc
    from effc.codegen.locate import first_failing_node

    def attempt(prefix: ir.Model) -> None:
        with tvm_target, tvm_output_to_log():
            cpu_codegen.compile_cpu(to_relax(prefix), tvm_target, options)

    node = first_failing_node(model, attempt, exc)
    if node is None:
        return exc
    types = {str(v.dtype).lower() for v in [*node.inputs, *node.outputs] if v is not None and v.dtype is not None}
    cast = "compute it in float32 (Cast its bfloat16 inputs and output), " if "bfloat16" in types else ""
    if any(v is not None and (v.shape is None or not v.shape.is_static()) for v in node.outputs):
        cast += "give the inputs that set its output size as constants (its shape depends on run-time values), "
    return TargetError(f"TVM cannot compile {node.op_type} node {node.name or '<unnamed>'!r} "
                       f"({', '.join(sorted(types))}): {exc.message}",
                       f"{cast}rewrite or remove this {node.op_type} node, or run the model with onnxruntime; "
                       "if schedule='none' and fast_math=False build it, report the model")


@dataclasses.dataclass(frozen=True)
class CpuTarget(Target):
    """Capability record of a CPU and how to build/run for it.

    Attributes:
        mcpu: LLVM CPU name (``znver3``, ``skylake-avx512``, ``neoverse-n1``, ...).
        triple: LLVM target triple of the host.
        vector_bits: SIMD register width in bits from the CPU features (avx512f → 512, avx2 → 256, 0 unknown).
        num_cores: cores this process may use (the default thread count).
    """

    mcpu: str
    triple: str
    vector_bits: int
    num_cores: int
    name: str = "cpu"
    summary: str = "host CPU via LLVM (mcpu detected); artifact model.so run by TVM's Relax VM"

    @classmethod
    def detect_host(cls) -> CpuTarget:
        """The record of the machine this process runs on."""
        mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        return cls(
            mcpu=mcpu,
            triple=str(tvm.target.codegen.llvm_get_system_triple()),
            vector_bits=_vector_bits(target),
            num_cores=usable_cores(),
        )

    def option_names(self) -> tuple[str, ...]:
        """``threads``, ``mcpu`` and the options of :func:`effc.codegen.cpu.compile_cpu`."""
        return _OPTIONS + tuple(getattr(cpu_codegen, "OPTION_NAMES", _CODEGEN_OPTIONS))

    def threads(self, options: dict[str, Any]) -> int:
        """The thread count from ``options["threads"]`` (default: :attr:`num_cores`).

        Raises:
            TargetError: not a positive integer.
        """
        value = options.get("threads")
        if value is None:
            return self.num_cores
        try:
            threads = int(value)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1 or str(value).strip() != str(threads):
            raise TargetError(f"option threads={value!r} is not a positive integer", "e.g. --threads 2")
        return threads

    def tvm_target(self, options: dict[str, Any]) -> tvm.target.Target:
        """The LLVM target for ``options`` (``mcpu`` overrides the host CPU, ``threads`` sets ``num-cores``).

        Raises:
            TargetError: ``mcpu`` is not a CPU LLVM knows for this triple, or ``threads`` is invalid.
        """
        mcpu = str(options.get("mcpu") or self.mcpu)
        if not tvm.target.codegen.llvm_is_valid_cpu(mcpu, self.triple):
            raise TargetError(
                f"option mcpu={mcpu!r} is not a CPU LLVM knows for {self.triple}",
                f"omit mcpu to use the host CPU ({self.mcpu}), or pick a name from `llc -mcpu=help`",
            )
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": self.threads(options)})

    def build(self, model: ir.Model, workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Import, compile and export ``model`` to ``workdir/model.so``.

        Raises:
            UnsupportedOpError: operators TVM cannot import (all listed).
            TargetError: bad options, or TVM failed to import/compile/export (the step is named, and the node,
                found by :func:`effc.codegen.locate.first_failing_node`).
        """
        tvm_target = self.tvm_target(options)
        start = time.perf_counter()
        with tvm_target:  # converters that pick target-specific kernels (the MXINT8 AVX2 int8 GEMM) read it
            mod = to_relax(model)
        import_seconds = time.perf_counter() - start
        try:
            with tvm_output_to_log():
                executable, info = cpu_codegen.compile_cpu(mod, tvm_target, options)
        except TargetError as exc:
            raise _naming_the_node(exc, model, tvm_target, options) from exc.__cause__
        start = time.perf_counter()
        with tvm_output_to_log():
            tvm_build.export_library(executable, Path(workdir) / _LIBRARY)  # LLVM emits machine code here
        facts = {
            "import_seconds": round(import_seconds, 3),
            "export_seconds": round(time.perf_counter() - start, 3),
            "tvm_target": str(tvm_target),
            "mcpu": str(tvm_target.attrs["mcpu"]),
            "vector_bits": _vector_bits(tvm_target),
            "threads": self.threads(options),
            **info,
        }
        if effc_ops := last_lowering_log():
            facts["effc_ops"] = effc_ops
        return BuildResult(files=[_LIBRARY], info=facts)

    def build_entries(self, models: dict[str, ir.Model], workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Compile several graphs over the same weights into one ``model.so`` with one function per entry point.

        Each graph is imported on its own and the modules are merged (:mod:`effc.codegen.entries`); the Relax VM
        stores a constant used by several functions once. A decoder's ``prefill`` and ``decode`` are built so.

        Raises:
            UnsupportedOpError, TargetError: as :meth:`build`.
        """
        from effc.codegen.entries import merge_entry_modules

        tvm_target = self.tvm_target(options)
        start = time.perf_counter()
        with tvm_target:
            mod = merge_entry_modules({name: to_relax(model) for name, model in models.items()})
        import_seconds = time.perf_counter() - start
        executable, info = cpu_codegen.compile_cpu(mod, tvm_target, options)
        start = time.perf_counter()
        tvm_build.export_library(executable, Path(workdir) / _LIBRARY)
        facts = {"import_seconds": round(import_seconds, 3), "export_seconds": round(time.perf_counter() - start, 3),
                 "tvm_target": str(tvm_target), "mcpu": str(tvm_target.attrs["mcpu"]), "entries": list(models),
                 "vector_bits": _vector_bits(tvm_target), "threads": self.threads(options), **info}
        return BuildResult(files=[_LIBRARY], info=facts)

    def load(self, artifact_dir: Path, manifest: dict[str, Any]) -> Runner:
        """Load ``model.so`` into a Relax VM on the host CPU; threads from the manifest's target options.

        Raises:
            ArtifactError: the manifest does not list ``model.so`` (so its hash was never checked).
            TargetError: the library cannot be loaded here.
        """
        if _LIBRARY not in (manifest.get("files") or {}):  # an unlisted library would load without a hash check
            raise ArtifactError(
                f"{_LIBRARY} is not listed with a sha256 in {Path(artifact_dir) / 'manifest.json'}",
                "recompile the model; never edit files of an artifact folder",
            )
        target = manifest.get("target", {})
        threads = self.threads(target.get("options") or {})
        input_names = [spec["name"] for spec in manifest.get("inputs", [])]
        vm = tvm_build.load_vm(Path(artifact_dir) / _LIBRARY, tvm.cpu())
        entry = "prefill" if manifest.get("decoder") else "main"  # a decoder's run() is one prefill call
        return CpuRunner(vm, input_names, threads, entry)


class CpuRunner(Runner):
    """A loaded ``model.so``: ``run(feeds)`` calls ``main`` with the inputs in manifest order.

    Attributes:
        threads: the requested worker thread count (TVM clamps it to its pool size; see :func:`set_runtime_threads`).
    """

    def __init__(self, vm: Any, input_names: list[str], threads: int, entry: str = "main"):
        self._vm = vm
        self._entry = entry
        self._input_names = list(input_names)
        self.threads = threads
        self._device = tvm.cpu()
        register_guard_function()  # the in-graph index checks of effc.codegen.index_guard call it

    def call(self, function: str, args: list[Any]) -> list[np.ndarray]:
        """Call entry point ``function`` with positional ``args`` (numpy arrays, or TVM tensors that stay put).

        Raises:
            DataError: an index the model computes is out of range (:mod:`effc.codegen.index_guard`).
            TargetError: the library has no such function, or TVM failed at run time.
        """
        set_runtime_threads(self.threads)
        try:
            tensors = [a if isinstance(a, tvm.runtime.Tensor) else
                       tvm_build.to_tvm_tensor(np.asarray(a, order="C"), self._device) for a in args]
            return tvm_build.outputs_to_numpy(self._vm[function](*tensors))
        except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
            if guard_error(exc) is not None:
                raise guard_error(exc) from None
            raise TargetError(f"calling {function!r} of model.so failed: {type(exc).__name__}: {str(exc)[:400]}",
                              "recompile the model; check the arguments match the manifest's entry points") from exc

    def shared_tensor(self, array: np.ndarray) -> Any:
        """A TVM tensor that shares memory with the C-contiguous ``array`` (writes to one show in the other)."""
        return tvm.runtime.from_dlpack(array)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference (feeds already validated by :class:`effc.runtime.CompiledModel`).

        Raises:
            DataError: an index the model computes is out of range (:mod:`effc.codegen.index_guard`).
            TargetError: an input is missing or TVM failed at run time.
        """
        set_runtime_threads(self.threads)
        missing = [name for name in self._input_names if name not in feeds]
        if missing:
            raise TargetError(f"inputs {missing} missing from the feeds", f"pass all of {self._input_names}")
        try:  # np.asarray keeps 0-d inputs 0-d (np.ascontiguousarray makes them 1-d)
            args = [tvm_build.to_tvm_tensor(np.asarray(feeds[n], order="C"), self._device) for n in self._input_names]
            result = self._vm[self._entry](*args)
            return tvm_build.outputs_to_numpy(result)
        except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
            if guard_error(exc) is not None:
                raise guard_error(exc) from None
            raise TargetError(
                f"running model.so failed: {type(exc).__name__}: {str(exc)[:400]}",
                "check the feeds match the manifest's inputs (dtype, shape), or recompile",
            ) from exc


register_target(CpuTarget.detect_host())
