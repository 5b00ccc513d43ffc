"""TIR kernels → plain C with no TVM runtime: effc's TIR pipeline and the pass that replaces ``MakePackedAPI``.

The pipeline is TVM 0.27's ``s_tir`` pass list (``tvm/s_tir/pipeline.py``) with four changes: no GPU-only passes,
no FP8/BF16 storage legalization, no ``AnnotateEntryFunc`` (a one-kernel module would get a packed
``__tvm_ffi_main__`` wrapper), and :func:`unpacked_api` instead of ``MakePackedAPI`` — buffer parameters become
raw pointer parameters (``float* x``), the body sits in ``device_id``/``device_type`` attributes (which
``LowerTVMBuiltin`` needs to place workspace calls) and ``return 0`` follows that scope, so workspace is freed
before returning. ``finalize_host_passes`` and ``target.build.c`` then print ``int32_t effc_<model>_<kernel>(...)``.
The kernels may call only ``TVMBackendAllocWorkspace``/``TVMBackendFreeWorkspace`` (satisfied by the LIFO shim in
the artifact) and libm.

Source: ``../shared/notes/mcu.md``; TVM ``src/tirx/transforms/make_packed_api.cc`` (what it does, not its code).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir.pipeline import finalize_host_passes
from tvm.tirx import compilation_pipeline
from tvm.tirx.buffer import buffer_data_pointer_type

from effc.errors import TargetError

logger = logging.getLogger(__name__)

#: Name of effc's TIR pipeline in TVM's pipeline registry.
PIPELINE_NAME = "effc_mcu"
#: Bytes of bookkeeping/alignment the workspace shim adds per allocation (it rounds every request up to 16).
WORKSPACE_ALIGN = 16


def unpacked_api(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Rewrite one PrimFunc to the unpacked C convention ``int32_t f(T* a, T* b, ...)`` returning 0.

    Args:
        func: a lowered PrimFunc whose parameters are buffer variables.

    Returns:
        The same kernel with pointer parameters and an ``int32`` return type.
    """
    params, decls = [], []
    for param in func.params:
        ptr = tvm.ir.Var(param.name, buffer_data_pointer_type(param))
        params.append(ptr)
        decls.append(tirx.DeclBuffer(param, data=ptr))
    zero = tirx.const(0, "int32")
    body = tirx.AttrStmt(zero, "device_id", zero, func.body)
    body = tirx.AttrStmt(zero, "device_type", tirx.const(1, "int32"), body)
    body = tirx.SeqStmt([*decls, body, tirx.Return(zero)])
    return tirx.PrimFunc(params, body, ret_type=tvm.ir.PrimType("int32"), attrs=func.attrs)


@tvm.transform.module_pass(opt_level=0, name="effc.UnpackedAPI")
def _unpacked_api_pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return tvm.IRModule({gv: unpacked_api(f) for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)})


def mcu_tir_pipeline():
    """Effc's copy of the ``s_tir`` pipeline for microcontrollers (registered as ``effc_mcu``)."""

    @tvm.transform.module_pass(opt_level=0, name="effc.McuTIRPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        passes = [
            s_tir.transform.CanonicalizeLoop(),
            s_tir.transform.LowerCrossThreadReduction(),
            s_tir.transform.LowerInitBlock(),
            s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
            s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.CompactBufferAllocation(),
            s_tir.transform.LowerMatchBuffer(),
            s_tir.transform.StmtSimplify(),
            s_tir.transform.LowerOpaqueBlock(),
            tirx.transform.FlattenBuffer(),
            tirx.transform.NarrowDataType(32),
            s_tir.transform.LoopPartition(),
            tirx.transform.VectorizeLoop(False),
            tirx.transform.StorageRewrite(),
            s_tir.transform.HoistIfThenElse(),
            tirx.transform.UnrollLoop(),
            s_tir.transform.RenormalizeSplitPattern(),
            tirx.transform.StmtSimplify(),
            tirx.transform.RemoveNoOp(),
            s_tir.transform.RewriteUnsafeSelect(),
            tirx.transform.CommonSubexprElim(),
            tirx.transform.VerifyMemory(),
            _unpacked_api_pass,
        ]
        return tvm.ir.transform.Sequential(passes)(mod)

    return _pipeline, finalize_host_passes, finalize_host_passes


compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, mcu_tir_pipeline)


@dataclasses.dataclass
class KernelMemory:
    """Kernel-internal memory found in the final TIR (not in Relax's plan).

    Attributes:
        workspace: bytes of each ``TVMBackendAllocWorkspace`` request, in program order (LIFO).
        stack: bytes of each buffer left on the C stack (below TVM's stack-allocation threshold).
    """

    workspace: list[int]
    stack: list[int]

    @property
    def workspace_bytes(self) -> int:
        """Peak bytes this kernel needs from the workspace pool (requests nest, each rounded up to 16)."""
        return sum((n + WORKSPACE_ALIGN - 1) // WORKSPACE_ALIGN * WORKSPACE_ALIGN for n in self.workspace)


def _kernel_memory(func: tirx.PrimFunc) -> KernelMemory:
    workspace: list[int] = []
    stack: list[int] = []

    def visit(node) -> None:
        if isinstance(node, tvm.ir.Call) and isinstance(node.op, tvm.ir.Op):
            if node.op.name == "tirx.TVMBackendAllocWorkspace":
                workspace.append(int(node.args[2]))
        elif isinstance(node, tirx.AllocBuffer):
            buf = node.buffer
            elems = int(np.prod([int(s) for s in buf.shape], dtype=np.int64))
            stack.append(elems * tvm.DataType(str(buf.dtype)).bits // 8)

    _walk(func.body, visit)
    return KernelMemory(workspace, stack)


#: Fields through which statements and expressions nest in TVM 0.27 TIR (no Python visitor is exported).
_CHILD_FIELDS = ("seq", "body", "then_case", "else_case", "value", "condition", "args", "a", "b", "extent")


def _walk(node, visit) -> None:
    """Pre-order walk over a TIR statement/expression tree, calling ``visit`` on every node."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur is None:
            continue
        if isinstance(cur, list | tuple | tvm.ir.Array):
            stack.extend(cur)
            continue
        if not isinstance(cur, tvm.runtime.Object):
            continue
        visit(cur)
        for field in _CHILD_FIELDS:
            try:
                child = getattr(cur, field)
            except AttributeError:
                continue
            if isinstance(child, tvm.runtime.Object | list | tuple):
                stack.append(child)
        if isinstance(cur, tirx.DeclBuffer):  # workspace pointers live in the declared buffer's data expression
            stack.append(cur.data)


_PRELUDE = """#include <stdint.h>
#include <stdbool.h>
#include <math.h>
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits);
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr);
"""
_DROP = re.compile(r'^(#define TVM_EXPORTS|#include "tvm/.*"|void\* __tvm_ffi__library_ctx = NULL;)\s*$')


def _clean_c(source: str) -> str:
    """Replace TVM's runtime includes with the plain prelude; kernels become ``static``-free C99."""
    lines = [line for line in source.splitlines() if not _DROP.match(line)]
    text = "\n".join(lines).replace("TVM_DLL ", "")
    return _PRELUDE + text.split("\n", 1)[1] if text.startswith("//") else _PRELUDE + text


def build_kernels(
    kernels: dict[str, tirx.PrimFunc], prefix: str, schedule: str = "acc"
) -> tuple[str, dict[str, str], dict[str, KernelMemory], dict[str, str]]:
    """Lower TIR kernels to one C source.

    Args:
        kernels: Relax kernel name -> PrimFunc (as left by ``FuseTIR``).
        prefix: C symbol prefix, e.g. ``effc_model_`` (each kernel becomes ``<prefix><name>``).
        schedule: ``"acc"`` (effc's register-accumulation schedule, :mod:`effc.codegen.mcu.schedule`) or
            ``"naive"`` (TVM's legalized loops as they are).

    Returns:
        ``(c_source, symbols, memory, schedules)``: the C text, kernel name -> C symbol, kernel name -> its internal
        memory, kernel name -> schedule applied (``"effc-acc"`` or ``"naive"``).

    Raises:
        TargetError: TIR lowering or C printing failed.
    """
    from effc.codegen.mcu.int8 import DEQUANT_STAGE, inline_dequant
    from effc.codegen.mcu.schedule import SCHEDULE_NAME, schedule_acc

    if schedule not in ("acc", "naive"):
        raise TargetError(f"unknown schedule {schedule!r}", "use schedule=acc or schedule=naive")
    kernels = {k: inline_dequant(f) if DEQUANT_STAGE in f.script() else f for k, f in kernels.items()}
    naive = dict(kernels)
    applied = dict.fromkeys(kernels, "naive")
    if schedule == "acc":
        for name, func in kernels.items():
            kernels[name], ok = schedule_acc(func)
            applied[name] = SCHEDULE_NAME if ok else "naive"
    target = tvm.target.Target("c")
    symbols = {name: f"{prefix}{name}" for name in kernels}
    try:
        source, memory = _lower(kernels, symbols, target)
    except TargetError:
        # A scheduled kernel TVM cannot lower (e.g. a long QDQ epilogue chain): find it, keep it naive, retry.
        bad = [k for k in kernels if applied[k] != "naive" and not _lowers({k: kernels[k]}, symbols, target)]
        if not bad:
            raise
        for name in bad:
            logger.warning("schedule %s does not lower for %s: kept naive", applied[name], name)
            kernels[name], applied[name] = naive[name], "naive"
        source, memory = _lower(kernels, symbols, target)
    return _clean_c(source), symbols, memory, applied


def _lower(kernels: dict[str, tirx.PrimFunc], symbols: dict[str, str], target) -> tuple[str, dict[str, KernelMemory]]:
    """Run effc's TIR pipeline and print C: ``(source, kernel name -> internal memory)``.

    Raises:
        TargetError: TIR lowering or C printing failed.
    """
    mod = tvm.IRModule(
        {
            name: func.with_attr("global_symbol", symbols[name]).with_attr("target", target)
            for name, func in kernels.items()
        }
    )
    pipeline, finalize, _ = compilation_pipeline.PIPELINE_MAP[PIPELINE_NAME]()
    try:
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            mod = pipeline(mod)
            mod = finalize()(mod)
        memory = {gv.name_hint: _kernel_memory(f) for gv, f in mod.functions.items()}
        source = tvm.get_global_func("target.build.c")(mod, target).inspect_source()
    except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
        raise TargetError(
            f"TIR lowering to C failed: {type(exc).__name__}: {str(exc)[:400]}", "open an issue with the model"
        ) from exc
    return source, memory


def _lowers(kernels: dict[str, tirx.PrimFunc], symbols: dict[str, str], target) -> bool:
    """True when these kernels go through :func:`_lower`."""
    try:
        _lower(kernels, symbols, target)
    except TargetError:
        return False
    return True
