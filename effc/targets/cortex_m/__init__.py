"""Cortex-M targets (plain C, no TVM runtime; verified under QEMU): registers cortex-m3/m4/m7/m33."""

from effc.targets.base import register_target
from effc.targets.cortex_m.targets import CortexMTarget

_HARD_SP = ("-mthumb", "-mfloat-abi=hard")

CORES = (
    CortexMTarget(
        name="cortex-m3",
        summary="Arm Cortex-M3, soft float (C artifact; QEMU mps2-an385)",
        cpu_flags=("-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"),
        fpu=None,
        dsp=False,
        flash_bytes=512 * 1024,
        ram_bytes=128 * 1024,
        qemu_machine="mps2-an385",
    ),
    CortexMTarget(
        name="cortex-m4",
        summary="Arm Cortex-M4F, single-precision FPU + DSP (C artifact; QEMU mps2-an386)",
        cpu_flags=("-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", *_HARD_SP),
        fpu="fpv4-sp-d16",
        dsp=True,
        flash_bytes=1024 * 1024,
        ram_bytes=256 * 1024,
        qemu_machine="mps2-an386",
    ),
    CortexMTarget(
        name="cortex-m7",
        summary="Arm Cortex-M7F, single-precision FPU + DSP (C artifact; QEMU mps2-an500)",
        cpu_flags=("-mcpu=cortex-m7", "-mfpu=fpv5-sp-d16", *_HARD_SP),
        fpu="fpv5-sp-d16",
        dsp=True,
        flash_bytes=2 * 1024 * 1024,
        ram_bytes=512 * 1024,
        qemu_machine="mps2-an500",
    ),
    CortexMTarget(
        name="cortex-m33",
        summary="Arm Cortex-M33 (Armv8-M), FPU + DSP (C artifact; QEMU mps2-an505)",
        cpu_flags=("-mcpu=cortex-m33", "-mfpu=fpv5-sp-d16", *_HARD_SP),
        fpu="fpv5-sp-d16",
        dsp=True,
        flash_bytes=1024 * 1024,
        ram_bytes=256 * 1024,
        qemu_machine="mps2-an505",
        flash_origin=0x10000000,
        ram_origin=0x38000000,
        board_ram_bytes=2 * 1024 * 1024,
    ),
)

for _core in CORES:
    register_target(_core)

__all__ = ["CORES", "CortexMTarget"]
