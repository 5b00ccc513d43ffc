"""CPU schedule templates applied to fused PrimFuncs by pattern, with a per-target tile table.

:func:`apply_templates` tries the templates of :data:`TEMPLATES` in order on each kernel (a fresh schedule per
try, so a template that gives up leaves nothing behind) and keeps the first that applies. Every kernel gets one:
``fallback`` takes anything; ``none`` only appears when even that raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tvm
from tvm import s_tir

from effc.codegen import prepack
from effc.codegen.schedules.conv import apply_conv
from effc.codegen.schedules.gemm import NotApplicable, apply_gemm
from effc.codegen.schedules.injective import apply_fallback, apply_injective
from effc.codegen.schedules.reduction import apply_reduce_spatial
from effc.codegen.schedules.rowwise import apply_row_reduce, apply_rowwise
from effc.codegen.schedules.tiles import TILE_TABLE, TileConfig, tile_config, vector_lanes

logger = logging.getLogger(__name__)

Template = Callable[[s_tir.Schedule, TileConfig], str]


def apply_prescheduled(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Claims kernels that an effc converter already scheduled (PrimFunc attribute ``tir.is_scheduled``)."""
    del tiles
    attrs = sch.mod["main"].attrs
    if not attrs or not bool(attrs.get("tir.is_scheduled", False)):
        raise NotApplicable("not pre-scheduled")
    return "prescheduled"


# Tried in order; the first that does not raise NotApplicable/ScheduleError wins.
TEMPLATES: list[tuple[str, Template]] = [
    ("prescheduled", apply_prescheduled),
    ("gemm", apply_gemm),
    ("conv", apply_conv),
    ("rowwise", apply_rowwise),
    ("reduce_spatial", apply_reduce_spatial),
    ("row_reduce", apply_row_reduce),
    ("injective", apply_injective),
    ("fallback", apply_fallback),
]

__all__ = ["TEMPLATES", "TILE_TABLE", "TileConfig", "apply_templates", "schedule_kernel", "tile_config",
           "vector_lanes"]


def schedule_kernel(func: tvm.tirx.PrimFunc, tiles: TileConfig) -> tuple[tvm.tirx.PrimFunc, str]:
    """Schedule one PrimFunc with the first template that applies.

    Args:
        func: a fused, unscheduled PrimFunc.
        tiles: the target's tile table row.

    Returns:
        ``(scheduled_func, template_name)``; ``(func, "none")`` when every template refused.
    """
    reasons = []
    for name, template in TEMPLATES:
        sch = s_tir.Schedule(func)
        try:
            taken = template(sch, tiles)
        except Exception as exc:  # noqa: BLE001  (NotApplicable, ScheduleError, or any TVM error: try the next)
            reasons.append(f"{name}: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
            continue
        if reasons:
            logger.debug("template %s after refusals: %s", taken, "; ".join(reasons))
        return sch.mod["main"], taken
    logger.warning("no schedule template applies: %s", "; ".join(reasons))
    return func, "none"


def apply_templates(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, dict[str, str]]:
    """Schedule every PrimFunc of a fused Relax module.

    Args:
        mod: module after ``LegalizeOps``/``FuseOps``/``FuseTIR`` (PrimFuncs not yet scheduled).
        target: the LLVM target (its vector width picks the tile table row).

    Returns:
        ``(new_mod, kernels)``: the module with scheduled PrimFuncs and ``{kernel name: template name}``; GEMM
        weights that templates re-laid out are repacked constants in the Relax functions (:mod:`..prepack`).
    """
    tiles = tile_config(target)
    kernels: dict[str, str] = {}
    updates = {}
    mod = prepack.mark_constant_params(mod.clone() if hasattr(mod, "clone") else mod)
    packed = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        scheduled, name = schedule_kernel(func, tiles)
        kernels[gv.name_hint] = name
        updates[gv] = scheduled
        packed[gv.name_hint] = prepack.packed_params(func, scheduled)
    for gv, func in updates.items():
        mod[gv] = func
    mod = prepack.pack_constant_args(mod, {k: v for k, v in packed.items() if v})
    logger.info("templates: %s", {t: list(kernels.values()).count(t) for t in set(kernels.values())})
    return mod, kernels
