"""GPU schedule rules for the cuda target: TVM's DLight rules, each guarded so that a crash means "not applicable".

DLight tries its rules in order and keeps the first schedule one returns. A rule that *raises* aborts the whole
build instead of letting the next rule try: ``dl.gpu.Reduction`` fails on some chained reductions with "Check
failed: block_realize == old_block_realize_" (apache/tvm #20061, open), which ``dl.gpu.GeneralReduction``
schedules. :func:`schedule_pass` turns such a crash into "declined" and records it, so the report names the kernel,
the rule that crashed and the rule that took it.

Every DLight name used by effc sits in this module (pinned to apache-tvm 0.27: ``tvm.s_tir.dlight``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RuleLog:
    """What the rules did to each kernel of one build.

    Attributes:
        chosen: kernel (PrimFunc) name → the rule that scheduled it.
        crashed: kernel name → ``["Rule: error line", ...]`` for rules that raised and were skipped.
    """

    chosen: dict[str, str] = dataclasses.field(default_factory=dict)
    crashed: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Kernels per rule, e.g. ``{"Matmul": 6, "Fallback": 4}``."""
        counts: dict[str, int] = {}
        for rule in self.chosen.values():
            counts[rule] = counts.get(rule, 0) + 1
        return dict(sorted(counts.items()))


def _apply_first(func: tirx.PrimFunc, kernel: str, target: Any, rules: list[dl.ScheduleRule], log: RuleLog) -> Any:
    """The schedule of the first rule that returns one; a rule that raises counts as declining (logged)."""
    for rule in rules:
        name = type(rule).__name__
        try:
            space = rule.apply(func, target, False)
        except Exception as exc:  # noqa: BLE001  (a crashing rule declines; the next rule tries)
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            log.crashed.setdefault(kernel, []).append(f"{name}: {line}")
            logger.info("DLight %s crashed on %s (%s); trying the next rule", name, kernel, line)
            continue
        if space is not None:
            log.chosen[kernel] = name
            return space[0] if isinstance(space, list) else space
    return None


def default_rules() -> list[dl.ScheduleRule]:
    """DLight's GPU rules in TVM's CUDA pipeline order.

    Matmul (tensor cores for fp16/int8 inputs), GEMV, Reduction, GeneralReduction, Fallback.
    """
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_pass(log: RuleLog, rules: list[dl.ScheduleRule] | None = None) -> tvm.transform.Pass:
    """A module pass like DLight's ``ApplyDefaultSchedule`` over every unscheduled PrimFunc, each rule guarded.

    An exception inside a rule means "not applicable" and the next rule tries. Outcomes land in ``log``.
    """
    chosen_rules = rules or default_rules()

    @tvm.transform.module_pass(opt_level=0, name="effc.GuardedDLight")
    def apply(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        target = tvm.target.Target.current(allow_none=False)
        updated = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                sch = _apply_first(func, gvar.name_hint, target, chosen_rules, log)
                if sch is not None:
                    updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return apply


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))


def unscheduled(mod: Any) -> list[str]:
    """Kernels no rule scheduled (they would fail CUDA's thread-binding check), sorted."""
    return sorted(
        gv.name_hint
        for gv, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func)
    )
