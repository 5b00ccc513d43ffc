"""Microcontroller code generation: Relax memory plan → plain C runner, TIR kernels without the TVM runtime."""

from effc.codegen.mcu.lower import McuProgram, lower_to_c

__all__ = ["McuProgram", "lower_to_c"]
