"""Firmware around the generated model: example ``main.c``, startup, linker script, Makefile; build and run in QEMU.

``main.c`` reads input samples from ``effc_inputs.bin`` over semihosting (zeros when the file is absent), runs
``effc_<model>_run`` per sample and prints each output's raw bytes in hex (exact IEEE-754 bits) plus the SysTick
count around the call. Under ``qemu-system-arm -icount shift=0`` SysTick (CPU clock source) advances once every 40
instructions on MPS2 boards, so ``ticks * 40`` is the instruction count (±40), not a cycle count.

Source: ``../shared/notes/mcu.md`` (toolchain, QEMU flags, SysTick measurement).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from effc.errors import TargetError

if TYPE_CHECKING:
    from effc.codegen.mcu import McuProgram
    from effc.targets.cortex_m.targets import CortexMTarget

logger = logging.getLogger(__name__)

#: Instructions per SysTick tick under ``-icount shift=0`` on MPS2 (25 MHz SysTick reference, 1 insn/ns).
INSTRUCTIONS_PER_TICK = 40
#: Stack reserved by the linker script for the firmware (bytes).
FIRMWARE_STACK_BYTES = 16 * 1024
MODEL_SOURCES = ("effc_model.c", "effc_weights.c", "effc_workspace.c")
FIRMWARE_SOURCES = ("main.c", "effc_startup.c")
INPUT_FILE = "effc_inputs.bin"
WARNINGS = ("-std=c99", "-Wall", "-Wextra")


def template(name: str) -> str:
    """Text of a C template shipped as package data under ``effc/targets/cortex_m/templates``."""
    return resources.files("effc.targets.cortex_m").joinpath("templates", name).read_text()


def tool(name: str) -> str:
    """Absolute path of a toolchain program.

    Raises:
        TargetError: not installed (names the Debian packages).
    """
    path = shutil.which(name)
    if path is None:
        raise TargetError(
            f"{name} is not installed",
            "apt-get install -y gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm",
        )
    return path


def have_toolchain() -> bool:
    """True when arm-none-eabi-gcc and qemu-system-arm are both on PATH."""
    return shutil.which("arm-none-eabi-gcc") is not None and shutil.which("qemu-system-arm") is not None


def linker_script(target: CortexMTarget, flash: int, ram: int) -> str:
    text = template("effc_mps2.ld")
    values = {
        "FLASH_ORIGIN": hex(target.flash_origin),
        "RAM_ORIGIN": hex(target.ram_origin),
        "FLASH_BYTES": str(flash),
        "RAM_BYTES": str(ram),
        "STACK_BYTES": str(FIRMWARE_STACK_BYTES),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _hex_printer() -> str:
    return r"""static void effc_print_hex(const char* tag, const void* data, size_t n) {
  static const char digits[] = "0123456789abcdef";
  char line[129];
  const uint8_t* b = (const uint8_t*)data;
  size_t i = 0;
  fputs(tag, stdout);
  while (i < n) {
    size_t k = 0;
    for (; k < 64 && i < n; ++k, ++i) {
      line[2 * k] = digits[b[i] >> 4];
      line[2 * k + 1] = digits[b[i] & 15u];
    }
    line[2 * k] = '\0';
    fputs(line, stdout);
  }
  fputs("\n", stdout);
}
"""


def main_c(program: McuProgram) -> str:
    """The example/verification ``main.c`` for this model (see the module docstring for its protocol)."""
    from effc.codegen.mcu.emit_c import c_type

    m, p = program.macro, program.prefix
    lines = [
        "/* Example firmware for the effc model: reads samples from effc_inputs.bin over semihosting (zeros when",
        "   absent), runs the model, prints outputs as raw hex bytes and SysTick ticks (x40 = instructions). */",
        "#include <stdint.h>",
        "#include <stdio.h>",
        '#include "effc_model.h"',
        "",
        "#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)",
        "#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)",
        "#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)",
        "extern volatile uint32_t effc_systick_wraps;",
        "",
    ]
    for k, (_, t) in enumerate(program.plan.inputs):
        lines.append(f"static {c_type(t.dtype)} in{k}[{m}INPUT{k}_SIZE];")
    for k, t in enumerate(program.plan.outputs):
        lines.append(f"static {c_type(t.dtype)} out{k}[{m}OUTPUT{k}_SIZE];")
    lines += [
        "",
        "static uint64_t effc_ticks(void) {",
        "  uint32_t wraps, value;",
        "  do {",
        "    wraps = effc_systick_wraps;",
        "    value = SYST_CVR;",
        "  } while (wraps != effc_systick_wraps);",
        "  return ((uint64_t)wraps << 24) + (0xFFFFFFu - value);",
        "}",
        "",
        _hex_printer(),
        "int main(void) {",
        f'  FILE* f = fopen("{INPUT_FILE}", "rb");',
        "  unsigned long sample = 0;",
        "  SYST_RVR = 0xFFFFFFu;",
        "  SYST_CVR = 0u;",
        "  SYST_CSR = 7u; /* enable, interrupt on wrap, CPU clock */",
        "  for (;;) {",
        "    uint64_t t0, t1;",
        "    int rc;",
    ]
    for k in range(len(program.plan.inputs)):
        lines.append(f"    if (f != NULL && fread(in{k}, 1, sizeof(in{k}), f) != sizeof(in{k})) break;")
    args = [f"in{k}" for k in range(len(program.plan.inputs))] + [f"out{k}" for k in range(len(program.plan.outputs))]
    lines += [
        "    t0 = effc_ticks();",
        f"    rc = {p}run({', '.join(args)});",
        "    t1 = effc_ticks();",
        '    printf("RUN %lu %d %lu\\n", sample, rc, (unsigned long)(t1 - t0));',
    ]
    for k in range(len(program.plan.outputs)):
        lines.append(f'    effc_print_hex("OUT{k} ", out{k}, sizeof(out{k}));')
    lines += [
        "    ++sample;",
        "    if (f == NULL) break;",
        "  }",
        '  printf("EFFC_DONE %lu\\n", sample);',
        "  if (f != NULL) fclose(f);",
        "  return 0;",
        "}",
        "",
    ]
    return "\n".join(lines)


def makefile(target: CortexMTarget, opt: str = "-O2") -> str:
    """A Makefile for arm-none-eabi-gcc (``make``, ``make run`` under QEMU, ``make size``)."""
    srcs = " ".join(MODEL_SOURCES + FIRMWARE_SOURCES)
    return f"""# Generated by effc for {target.name}: `make` builds fw.elf, `make run` runs it in QEMU, `make size`.
CC = arm-none-eabi-gcc
SIZE = arm-none-eabi-size
CPUFLAGS = {" ".join(target.cpu_flags)}
OPT ?= {opt}
CFLAGS = $(CPUFLAGS) $(OPT) {" ".join(WARNINGS)} -ffunction-sections -fdata-sections
LDFLAGS = $(CPUFLAGS) -T effc_link.ld --specs=rdimon.specs -nostartfiles -Wl,--gc-sections
SRCS = {srcs}

fw.elf: $(SRCS) effc_model.h effc_link.ld
\t$(CC) $(CFLAGS) $(SRCS) $(LDFLAGS) -lm -o $@

run: fw.elf
\t{" ".join(qemu_command(target, "fw.elf"))}

size: fw.elf
\t$(SIZE) -A fw.elf

clean:
\trm -f fw.elf

.PHONY: run size clean
"""


def qemu_command(target: CortexMTarget, elf: str) -> list[str]:
    return [
        "qemu-system-arm", "-M", target.qemu_machine, "-nographic", "-monitor", "none",
        "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", elf,
    ]  # fmt: skip


def build_firmware(
    src_dir: Path, build_dir: Path, target: CortexMTarget, opt: str = "-O2", board_memory: bool = True
) -> Path:
    """Compile the artifact's C (model + ``main.c`` + startup) into ``build_dir/fw.elf``.

    Args:
        src_dir: the artifact folder.
        build_dir: where the ELF (and a board linker script) go.
        target: the core.
        opt: gcc optimization flag.
        board_memory: link for the emulated board's full memories (verification: the harness's stdio heap and
            I/O buffers are not the model's); False uses the artifact's ``effc_link.ld`` (the budgets).

    Raises:
        TargetError: toolchain missing, a compiler warning/error (names the step, shows gcc's first lines), or the
            firmware does not fit the linker script's flash/RAM (the budget).
    """
    gcc = tool("arm-none-eabi-gcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    srcs = [str(src_dir / s) for s in MODEL_SOURCES + FIRMWARE_SOURCES]
    elf = build_dir / "fw.elf"
    ld = src_dir / "effc_link.ld"
    if board_memory:
        ld = build_dir / "effc_board.ld"
        ld.write_text(linker_script(target, target.board_flash_bytes, target.board_ram_bytes))
    cmd = [
        gcc, *target.cpu_flags, opt, *WARNINGS, "-Werror", "-ffunction-sections", "-fdata-sections",
        f"-I{src_dir}", *srcs, "-T", str(ld), "--specs=rdimon.specs", "-nostartfiles",
        "-Wl,--gc-sections", "-lm", "-o", str(elf),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TargetError(
            f"arm-none-eabi-gcc failed building the {target.name} firmware: {proc.stderr.strip()[:1500]}",
            "check --flash/--ram (the linker enforces them) or open an issue with the artifact",
        )
    return elf


def elf_sections(elf: Path) -> dict[str, int]:
    """Section name -> bytes (``arm-none-eabi-size -A``)."""
    out = subprocess.run([tool("arm-none-eabi-size"), "-A", str(elf)], capture_output=True, text=True, check=True)
    sizes = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def object_sizes(src_dir: Path, build_dir: Path, target: CortexMTarget, opt: str = "-O2") -> dict[str, int]:
    """Code bytes of the model (kernels + runner + shim, weights excluded) and its worst stack depth estimate.

    Compiles ``effc_model.c`` and ``effc_workspace.c`` alone with ``-fstack-usage``; stack = ``run`` frame +
    largest kernel frame (the runner calls kernels one at a time; kernels call only libm/the shim) + 64 bytes.

    Returns:
        ``{"code_bytes", "stack_bytes"}``.
    """
    gcc = tool("arm-none-eabi-gcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    code = 0
    frames: dict[str, int] = {}
    for name in ("effc_model.c", "effc_workspace.c"):
        obj = build_dir / (name[:-2] + ".o")
        cmd = [gcc, *target.cpu_flags, opt, *WARNINGS, "-ffunction-sections", "-fstack-usage", f"-I{src_dir}",
               "-c", str(src_dir / name), "-o", str(obj)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TargetError(f"arm-none-eabi-gcc failed on {name}: {proc.stderr.strip()[:1500]}")
        sizes = subprocess.run([tool("arm-none-eabi-size"), "-A", str(obj)], capture_output=True, text=True).stdout
        code += sum(int(m.group(1)) for m in re.finditer(r"^\.text\S*\s+(\d+)", sizes, re.M))
        su = obj.with_suffix(".su")
        if su.exists():
            for line in su.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].isdigit():
                    frames[parts[0].rsplit(":", 1)[-1]] = int(parts[1])
    run_frame = max((v for k, v in frames.items() if k.endswith("_run")), default=0)
    kernel_frame = max((v for k, v in frames.items() if not k.endswith("_run")), default=0)
    return {"code_bytes": code, "stack_bytes": run_frame + kernel_frame + 64}


@dataclasses.dataclass
class QemuRun:
    """What one QEMU run printed.

    Attributes:
        outputs: per sample, per output, the raw bytes.
        instructions: per sample, instructions per inference (SysTick ticks × 40).
        status: per sample, the return code of ``run``.
    """

    outputs: list[list[bytes]]
    instructions: list[int]
    status: list[int]


def run_qemu(elf: Path, target: CortexMTarget, inputs: bytes | None, work: Path, timeout: float = 300) -> QemuRun:
    """Run ``elf`` under QEMU with ``inputs`` (concatenated raw samples) as ``effc_inputs.bin``.

    Raises:
        TargetError: QEMU missing, timed out, or the firmware did not finish its protocol.
    """
    tool("qemu-system-arm")
    work.mkdir(parents=True, exist_ok=True)
    input_path = work / INPUT_FILE
    if inputs is None:
        input_path.unlink(missing_ok=True)
    else:
        input_path.write_bytes(inputs)
    try:
        proc = subprocess.run(
            qemu_command(target, str(elf)), cwd=work, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"QEMU ({target.qemu_machine}) ran over {timeout:.0f} s", "try fewer samples") from exc
    text = proc.stdout.decode(errors="replace")
    if "EFFC_DONE" not in text:
        raise TargetError(
            f"the firmware did not finish under QEMU {target.qemu_machine} (exit {proc.returncode}): "
            f"{text[-500:]!r} {proc.stderr.decode(errors='replace')[-500:]!r}",
            "check that the machine matches the core; run `make run` in the artifact to see the output",
        )
    result = QemuRun([], [], [])
    for line in text.splitlines():
        if line.startswith("RUN "):
            _, _, rc, ticks = line.split()
            result.status.append(int(rc))
            result.instructions.append(int(ticks) * INSTRUCTIONS_PER_TICK)
            result.outputs.append([])
        elif line.startswith("OUT") and result.outputs:
            result.outputs[-1].append(bytes.fromhex(line.split(" ", 1)[1].strip()))
    return result


def decode_outputs(raw: list[bytes], specs: list[dict]) -> list[np.ndarray]:
    """Raw output bytes -> arrays with the manifest's shapes/dtypes."""
    return [
        np.frombuffer(b, dtype=np.dtype(s["dtype"])).reshape([int(d) for d in s["shape"]]).copy()
        for b, s in zip(raw, specs, strict=True)
    ]
