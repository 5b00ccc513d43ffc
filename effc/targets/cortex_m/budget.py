"""Flash/RAM budgets: parse ``--flash 1M --ram 256K`` and check the compiled model against them before writing."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from effc.errors import BudgetError, TargetError

if TYPE_CHECKING:
    from effc.codegen.mcu import McuProgram

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}


def parse_bytes(value: Any, option: str) -> int:
    """Bytes from ``"1M"``, ``"256K"``, ``"1.5MB"``, ``"4096"`` or an int (K/M are binary: 1K = 1024 bytes).

    Raises:
        TargetError: the value is not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise TargetError(f"--{option} {value!r} is not a size", f"write bytes or K/M, e.g. --{option} 256K")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_budget(program: McuProgram, code_bytes: int, stack_bytes: int, flash: int, ram: int, target: str) -> None:
    """Raise :class:`BudgetError` when the model does not fit ``flash``/``ram`` bytes.

    Flash = weights + kernel/runner code; RAM = arena + scratch pool + stack estimate. The message lists the largest
    weights and activations and suggests passes that shrink them.

    Raises:
        BudgetError: over budget (nothing has been written yet at that point).
    """
    from effc.codegen.mcu.lower import largest_activations, largest_constants

    need_flash = program.weight_bytes + code_bytes
    need_ram = program.arena_bytes + program.scratch_bytes + stack_bytes
    problems = []
    if need_flash > flash:
        weights = ", ".join(f"w{i} {shape} {dtype} {human(b)}" for i, shape, dtype, b in largest_constants(program))
        problems.append(
            f"flash needs {human(need_flash)} (weights {human(program.weight_bytes)} + code {human(code_bytes)}) "
            f"> budget {human(flash)}; largest weights: {weights}"
        )
    if need_ram > ram:
        acts = ", ".join(f"{k} -> {shape} {human(b)}" for k, shape, b in largest_activations(program))
        problems.append(
            f"RAM needs {human(need_ram)} (arena {human(program.arena_bytes)} + scratch "
            f"{human(program.scratch_bytes)} + stack {human(stack_bytes)}) > budget {human(ram)}; "
            f"largest activations: {acts}"
        )
    if problems:
        hint = (
            "quantize it to int8 (weights and activations, QDQ, e.g. onnxruntime.quantization.quantize_static as in "
            "examples/digits_mcu.py --int8-act: 4x smaller weights and arena, int8 kernels), shrink it with passes "
            "('prune-structured' for fewer channels and smaller activations, 'block-quant(format=int8)' for "
            "MatMul/Gemm and conv weights whose Cin*kh*kw is a multiple of 32), or raise --flash/--ram"
        )
        raise BudgetError(f"model does not fit {target}: " + "; ".join(problems), hint)
