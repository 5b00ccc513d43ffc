"""ONNX IR → the C sources of a microcontroller artifact (kernels, runner, weights, workspace shim).

Flow: :func:`effc.codegen.frontend.to_relax` → :func:`relax_plan.relax_to_planned` → :func:`relax_plan.read_plan`
→ :func:`tir_c.build_kernels` → :mod:`emit_c`. No file is written here: the target decides where the text goes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from effc.codegen.mcu import emit_c, int8, relax_plan, s8_kernels, s8_rewrite, tir_c

if TYPE_CHECKING:
    import onnx_ir as ir
    import tvm

logger = logging.getLogger(__name__)

HEADER = "effc_model.h"


@dataclasses.dataclass
class McuProgram:
    """The generated C and the facts about it.

    Attributes:
        sources: file name -> C text (``effc_model.h``, ``effc_model.c``, ``effc_weights.c``, ``effc_workspace.c``).
        plan: the static memory plan.
        prefix: C symbol prefix (``effc_<name>_``); the entry point is ``<prefix>run``.
        macro: macro prefix (``EFFC_<NAME>_``).
        input_names / output_names: C identifiers of the run() parameters, graph order.
        weight_bytes: bytes of all constants as stored in flash.
        arena_bytes: bytes of the static activation arena.
        scratch_bytes: bytes of the workspace pool (peak kernel-internal scratch above the stack threshold).
        kernel_stack_bytes: largest kernel-internal stack buffer total of any kernel.
        kernels: one record per kernel (name, C symbol, calls, workspace and stack bytes).
    """

    sources: dict[str, str]
    plan: relax_plan.Plan
    prefix: str
    macro: str
    input_names: list[str]
    output_names: list[str]
    weight_bytes: int
    arena_bytes: int
    scratch_bytes: int
    kernel_stack_bytes: int
    kernels: list[dict[str, Any]]


def c_identifier(name: str, taken: set[str]) -> str:
    """A unique C identifier for an ONNX value name (``input.1`` -> ``input_1``)."""
    ident = re.sub(r"\W", "_", name) or "v"
    if ident[0].isdigit():
        ident = f"v_{ident}"
    base, k = ident, 1
    while ident in taken:
        ident, k = f"{base}_{k}", k + 1
    taken.add(ident)
    return ident


def model_to_relax(model: ir.Model) -> tvm.IRModule:
    """Import through effc's frontend (effc operators included).

    ReLU keeps TVM's ``max(x, 0)`` here (NaN becomes 0 on Cortex-M): effc's NaN-keeping form
    ``where(x < 0, 0, x)`` would stop the fused conv/matmul epilogue from taking the ``effc-acc`` schedule and
    store its zeros as constants in flash. The in-graph index range checks are left out: they call a function of
    effc's Python runtime, which the plain-C firmware does not have (its C API trusts its index inputs).
    """
    from effc.codegen.frontend import to_relax

    return to_relax(model, keep_tvm=frozenset({"Relu"}), index_guards=False)


def lower_to_c(
    model: ir.Model,
    name: str = "model",
    relax_mod: tvm.IRModule | None = None,
    schedule: str = "acc",
    dsp: bool = False,
) -> McuProgram:
    """Compile a canonical model to the C sources of a microcontroller artifact.

    Args:
        model: canonical ONNX IR model (static shapes).
        name: C name of the model: symbols are ``effc_<name>_*``, the entry point ``effc_<name>_run``.
        relax_mod: an already imported Relax module (skips the frontend).
        schedule: ``"acc"`` (register accumulation + fused epilogue) or ``"naive"`` (TVM's legalized loops).
        dsp: the core has the DSP extension: int8-activation layers use the SXTB16/SMLAD micro-kernel (else the
            portable C loop).

    Returns:
        The sources and the memory facts.

    Raises:
        UnsupportedOpError: an operator has no converter.
        TargetError: lowering failed.
    """
    cname = re.sub(r"\W", "_", name).lower()
    prefix, macro = f"effc_{cname}_", f"EFFC_{cname.upper()}_"
    s8_layers: list = []
    if relax_mod is None:
        model, s8_layers = s8_rewrite.rewrite_s8_layers(model)
    mod = relax_mod if relax_mod is not None else model_to_relax(model)
    mod, n_int8 = int8.fuse_dequantize(mod)
    planned = relax_plan.relax_to_planned(mod)
    plan = relax_plan.read_plan(planned)
    kernels = relax_plan.called_kernels(planned, plan)
    kernels_c, symbols, memory, applied = tir_c.build_kernels(kernels, prefix, schedule)
    if s8_layers:
        kernels_c = s8_kernels.library_c(dsp, {layer.op for layer in s8_layers}) + kernels_c
        for k in kernels:  # the depthwise kernel is plain C on every core
            if k.startswith("effc_s8_"):
                applied[k] = "effc-s8-dsp" if dsp and not k.startswith("effc_s8_dwconv") else "effc-s8-c"

    taken: set[str] = {"arena"}
    input_names = [c_identifier(v.name, taken) for v in model.graph.inputs]
    output_names = [c_identifier(v.name, taken) for v in model.graph.outputs]

    scratch = max((m.workspace_bytes for m in memory.values()), default=0)
    stack = max((sum(m.stack) for m in memory.values()), default=0)
    weight_bytes = int(sum(int(c.nbytes) for c in plan.constants))
    sizes = {
        "ARENA_BYTES": max(plan.arena_bytes, 16),
        "SCRATCH_BYTES": max(scratch, 16),
        "WEIGHT_BYTES": weight_bytes,
    }
    sources = {
        HEADER: emit_c.emit_header(plan, prefix, macro, input_names, output_names, sizes),
        "effc_model.c": emit_c.emit_runner(plan, kernels_c, symbols, prefix, macro, HEADER, input_names, output_names),
        "effc_weights.c": emit_c.emit_weights(plan, prefix, HEADER),
        "effc_workspace.c": emit_c.emit_workspace(HEADER, macro),
    }
    calls: dict[str, int] = {}
    for call in plan.calls:
        calls[call.kernel] = calls.get(call.kernel, 0) + 1
    records = [
        {
            "name": k,
            "symbol": symbols[k],
            "calls": calls[k],
            "schedule": applied[k],
            "workspace_bytes": memory[k].workspace_bytes,
            "stack_bytes": int(sum(memory[k].stack)),
        }
        for k in kernels
    ]
    logger.info(
        "mcu lowering: %d kernels, weights %d B, arena %d B, scratch %d B",
        len(kernels),
        weight_bytes,
        plan.arena_bytes,
        scratch,
    )
    return McuProgram(
        sources=sources,
        plan=plan,
        prefix=prefix,
        macro=macro,
        input_names=input_names,
        output_names=output_names,
        weight_bytes=weight_bytes,
        arena_bytes=plan.arena_bytes,
        scratch_bytes=scratch,
        kernel_stack_bytes=stack,
        kernels=records,
    )


def largest_constants(program: McuProgram, n: int = 5) -> list[tuple[int, tuple[int, ...], str, int]]:
    """The ``n`` largest weights: ``(index, shape, dtype, bytes)``, largest first."""
    rows = [(i, tuple(c.shape), str(c.dtype), int(c.nbytes)) for i, c in enumerate(program.plan.constants)]
    return sorted(rows, key=lambda r: -r[3])[:n]


def largest_activations(program: McuProgram, n: int = 5) -> list[tuple[str, tuple[int, ...], int]]:
    """The ``n`` largest kernel outputs kept in the arena: ``(kernel, shape, bytes)``, largest first."""
    rows = []
    for call in program.plan.calls:
        out = call.args[-1]
        if out.loc.kind == "arena":
            rows.append((call.kernel, out.shape, int(np.prod(out.shape)) * np.dtype(out.dtype).itemsize))
    return sorted(rows, key=lambda r: -r[2])[:n]
