"""The NVIDIA GPU target: TVM CUDA codegen + DLight schedules, device code compiled by nvcc at build time.

Options: ``arch`` (``sm_80``, ``sm_86``, ``sm_89``, ``sm_90``; default ``sm_90``), ``gpu_precision`` (``fp32``
default: exact; ``fp16``: fp16 GEMM/conv inputs with fp32 accumulation on the tensor cores) and ``fallback``
(``dense``: effc operators without a CUDA lowering compile as their reference ONNX bodies; default: such an operator
is an error naming it). Which effc operators have a CUDA lowering: :data:`effc.codegen.cuda.ops.CUDA_LOWERINGS`
(block-quant weights decoded inside the GEMM/GEMV; ``DecodeAttention`` through its reference body). The artifact is
``model.so`` (host code + a fatbin for ``arch``); it builds on a machine without a GPU and runs where one is, with
TVM's runtime libraries only (:mod:`effc.runtime.vm`). Decoders get ``prefill``/``decode`` entry points plus the
in-place KV-cache writers of :mod:`effc.codegen.kv_write`, so their cache stays on the GPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
import onnx_ir as ir

from effc.errors import TargetError, UnsupportedOpError
from effc.targets.base import BuildResult, Runner, Target, register_target

_LIBRARY = "model.so"
FALLBACKS = ("none", "dense")


@dataclasses.dataclass(frozen=True)
class GpuArch:
    """Capability record of one NVIDIA architecture (per SM unless stated; CUDA C Programming Guide, Table 21).

    Attributes:
        name: ``sm_XY``.
        family: marketing name of the generation and a typical part.
        tensor_core_dtypes: input types the tensor cores (mma.sync) take.
        smem_per_sm: shared memory per SM, bytes.
        smem_per_block: the most shared memory one block may opt into, bytes (48 KiB without opt-in).
        registers_per_sm: 32-bit registers per SM.
        max_threads_per_block: threads per block.
        warp_size: threads per warp.
    """

    name: str
    family: str
    tensor_core_dtypes: tuple[str, ...]
    smem_per_sm: int
    smem_per_block: int
    registers_per_sm: int = 65536
    max_threads_per_block: int = 1024
    warp_size: int = 32

    def tvm_target(self) -> dict[str, Any]:
        """The TVM target dict (device limits as TVM's schedules read them; host: generic x86-64 LLVM)."""
        return {
            "kind": "cuda",
            "arch": self.name,
            "max_threads_per_block": self.max_threads_per_block,
            "max_shared_memory_per_block": 48 * 1024,  # without opt-in: what DLight's schedules may assume
            "thread_warp_size": self.warp_size,
            "registers_per_block": self.registers_per_sm,
            "host": {"kind": "llvm"},
        }


_AMPERE_TC = ("fp16", "bf16", "tf32", "int8")
ARCHS: Mapping[str, GpuArch] = {
    arch.name: arch
    for arch in (
        GpuArch("sm_80", "Ampere (A100)", _AMPERE_TC, 164 * 1024, 163 * 1024),
        GpuArch("sm_86", "Ampere (A10, RTX 30xx)", _AMPERE_TC, 100 * 1024, 99 * 1024),
        GpuArch("sm_89", "Ada (L4, L40, RTX 40xx)", (*_AMPERE_TC, "fp8"), 100 * 1024, 99 * 1024),
        GpuArch("sm_90", "Hopper (H100, H200)", (*_AMPERE_TC, "fp8"), 228 * 1024, 227 * 1024),
    )
}
DEFAULT_ARCH = "sm_90"


def check_arch(value: Any) -> GpuArch:
    """The architecture record for option ``arch`` (default ``sm_90``).

    Raises:
        TargetError: not one of :data:`ARCHS`.
    """
    name = str(value or DEFAULT_ARCH)
    if name not in ARCHS:
        raise TargetError(f"unknown CUDA arch {name!r}", f"use --arch with one of {', '.join(ARCHS)}")
    return ARCHS[name]


def effc_nodes(model: ir.Model) -> dict[str, list[str]]:
    """effc-domain operators in the main graph and its subgraphs: ``{op_type: [node names]}``."""
    from effc.ops.base import EFFC_DOMAIN

    found: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == EFFC_DOMAIN:
            found.setdefault(node.op_type, []).append(node.name or "?")
    return found


def _dense_bodies(model: ir.Model, op_types: set[str] | None = None) -> ir.Model:
    """A copy of ``model`` with the reference bodies (model-local functions) of effc operators inlined.

    Args:
        model: the model (not modified).
        op_types: the effc operators to inline; None: all of them.

    Constants are folded after inlining: the unpacking of stored weights (e.g. N:M's ScatterElements) becomes a dense
    initializer, which is what ``--fallback dense`` promises.
    """
    from effc.ir.canonicalize import canonicalize
    from effc.ops.base import EFFC_DOMAIN

    proto = ir.to_proto(model)
    if op_types is None:
        inlined = onnx.inliner.inline_local_functions(proto)
    else:
        inlined = onnx.inliner.inline_selected_functions(proto, [(EFFC_DOMAIN, op) for op in sorted(op_types)])
    return canonicalize(ir.from_proto(inlined))


def plan_effc_ops(model: ir.Model, fallback: str) -> tuple[ir.Model, dict[str, Any]]:
    """The model to import for cuda, and what happens to each effc operator (for the build info).

    Operators with a CUDA kernel (:data:`effc.codegen.cuda.ops.CUDA_LOWERINGS`) stay; those lowered through their
    reference body, and with ``fallback="dense"`` those without a CUDA lowering, are inlined.

    Returns:
        ``(model, info)``; info: ``effc_ops`` (``{op: {"nodes": n, "lowering": "kernel" | "reference" |
        "fallback_dense"}}``) and ``fallback_dense`` (``{op: n}``, only where ``--fallback dense`` applied).

    Raises:
        UnsupportedOpError: operators without a CUDA lowering and no ``fallback="dense"`` (all named).
    """
    from effc.codegen.cuda.ops import policy

    found = effc_nodes(model)
    if not found:
        return model, {}
    missing = {op: nodes for op, nodes in found.items() if policy(op) is None}
    if missing and fallback != "dense":
        raise UnsupportedOpError(
            missing, where="the cuda target (no CUDA kernel for these effc operators yet)",
            hint="compile for cpu, or add --fallback dense to run their reference ONNX bodies (no saving)",
        )
    lowering = {op: policy(op) or "fallback_dense" for op in found}
    inline = {op for op, how in lowering.items() if how != "kernel"}
    info: dict[str, Any] = {"effc_ops": {op: {"nodes": len(nodes), "lowering": lowering[op]}
                                         for op, nodes in sorted(found.items())}}
    if missing:
        info["fallback_dense"] = {op: len(nodes) for op, nodes in sorted(missing.items())}
    return (_dense_bodies(model, inline) if inline else model), info


@dataclasses.dataclass(frozen=True)
class CudaTarget(Target):
    """The cuda target: one name, the architecture chosen by option ``arch`` from :data:`ARCHS`."""

    archs: Mapping[str, GpuArch] = dataclasses.field(default_factory=lambda: dict(ARCHS))
    default_arch: str = DEFAULT_ARCH
    name: str = "cuda"
    summary: str = "NVIDIA GPU via TVM CUDA codegen + DLight; fatbin built here by nvcc, runs with TVM's runtime only"
    host_latency = False  # the artifact runs on a GPU; onnxruntime on the host CPU is no baseline for it

    def option_names(self) -> tuple[str, ...]:
        """``arch``, ``gpu_precision``, ``fallback``."""
        return ("arch", "gpu_precision", "fallback")

    def option_help(self) -> dict[str, str]:
        """One line per option, for ``effc targets``."""
        from effc.codegen.cuda import PRECISIONS

        ready = [name for name, passes in PRECISIONS.items() if passes is not None]
        return {
            "arch": f"{', '.join(f'{a.name} {a.family}' for a in self.archs.values())}; default {self.default_arch}",
            "gpu_precision": f"{' | '.join(ready)} (default fp32, exact; fp16: tensor cores, fp32 accumulation)",
            "fallback": "dense: effc operators without a CUDA lowering run their reference ONNX bodies (default: "
                        "error naming them; block-quant has CUDA kernels)",
        }

    def tvm_target(self, options: Mapping[str, Any]) -> Any:
        """The TVM target for ``options["arch"]``.

        Raises:
            TargetError: unknown arch.
        """
        import tvm

        return tvm.target.Target(check_arch(options.get("arch")).tvm_target())

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate ``arch``, ``gpu_precision`` and ``fallback``.

        Raises:
            TargetError: a value outside its domain (names the valid ones).
        """
        from effc.codegen import cuda as cuda_codegen

        check_arch(options.get("arch"))
        cuda_codegen.check_precision(options.get("gpu_precision"))
        fallback = str(options.get("fallback") or "none")
        if fallback not in FALLBACKS:
            raise TargetError(f"unknown fallback {fallback!r}", f"use --fallback with one of {', '.join(FALLBACKS)}")

    def build(self, model: ir.Model, workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Import, lower, compile (nvcc → fatbin) and export ``model`` to ``workdir/model.so``.

        Raises:
            UnsupportedOpError: effc operators without a CUDA lowering and without ``fallback=dense`` (all named),
                or operators TVM cannot import.
            TargetError: bad options, nvcc missing/failing, or TVM failing (the step is named).
        """
        return self._build({"main": model}, workdir, options)

    def build_entries(self, models: dict[str, ir.Model], workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Several graphs over the same weights in one ``model.so``, one function per entry point.

        A decoder (``prefill`` and ``decode``) also gets ``<entry>_kv_write`` per entry
        (:func:`effc.codegen.kv_write.kv_write_module`): the runtime keeps the KV cache on the GPU and writes
        each call's new keys and values into it there.

        Raises:
            UnsupportedOpError, TargetError: as :meth:`build`.
        """
        return self._build(models, workdir, options)

    def _build(self, models: dict[str, ir.Model], workdir: Path, options: dict[str, Any]) -> BuildResult:
        from effc.codegen import build as tvm_build
        from effc.codegen import cuda as cuda_codegen
        from effc.codegen.entries import merge_entry_modules
        from effc.codegen.frontend import to_relax
        from effc.codegen.kv_write import kv_write_module
        from effc.ir.decoder import is_decoder

        self.check_options(options)
        arch = check_arch(options.get("arch"))
        fallback = str(options.get("fallback") or "none")
        planned = {name: plan_effc_ops(model, fallback) for name, model in models.items()}
        tvm_target = self.tvm_target(options)
        start = time.perf_counter()
        with tvm_target:  # effc converters with a GPU lowering (effc.codegen.cuda.ops) read the target in scope
            modules = {name: to_relax(model) for name, (model, _) in planned.items()}
        if list(modules) == ["main"]:
            mod = modules["main"]
        else:
            mod = merge_entry_modules(modules)
            decoders = {name: model for name, model in models.items() if is_decoder(model)}
            for gvar, func in kv_write_module(decoders).functions_items():
                mod[gvar] = func
        import_seconds = time.perf_counter() - start
        executable, info = cuda_codegen.compile_cuda(mod, tvm_target, options)
        start = time.perf_counter()
        tvm_build.export_library(executable, Path(workdir) / _LIBRARY)
        facts = {
            "import_seconds": round(import_seconds, 3),
            "export_seconds": round(time.perf_counter() - start, 3),
            "tvm_target": str(tvm_target),
            "arch": arch.name,
            "capabilities": dataclasses.asdict(arch),
            **info,
        }
        if list(models) != ["main"]:
            facts["entries"] = list(models)
        for _, effc_info in planned.values():  # node counts summed over the entry points
            for op, how in effc_info.get("effc_ops", {}).items():
                entry = facts.setdefault("effc_ops", {}).setdefault(op, {**how, "nodes": 0})
                entry["nodes"] += how["nodes"]
            for op, nodes in effc_info.get("fallback_dense", {}).items():
                facts.setdefault("fallback_dense", {})[op] = facts.get("fallback_dense", {}).get(op, 0) + nodes
        return BuildResult(files=[_LIBRARY], info=facts)

    def can_run_here(self) -> bool:
        """Whether this machine has a CUDA device (a compile then checks the artifact against onnxruntime)."""
        from effc.runtime.vm import cuda_device_count

        return cuda_device_count() > 0

    def load(self, artifact_dir: Path, manifest: dict[str, Any]) -> Runner:
        """Load ``model.so`` on CUDA device 0 through TVM's runtime libraries only.

        Raises:
            ArtifactError: the manifest does not list ``model.so``.
            TargetError: no CUDA device here ("built for sm_90; no CUDA device found"), or the library fails to load.
        """
        from effc.runtime.vm import load_vm_runner

        return load_vm_runner(Path(artifact_dir), manifest)


register_target(CudaTarget())
