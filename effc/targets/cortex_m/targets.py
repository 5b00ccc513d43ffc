"""The Cortex-M targets: one frozen capability record per core, with build (C artifact) and load (QEMU runner)."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from effc.errors import TargetError
from effc.targets.base import BuildResult, Runner, Target
from effc.targets.cortex_m import budget, firmware

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

logger = logging.getLogger(__name__)

_OPTIONS = ("flash", "ram", "name", "opt", "schedule")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CortexMTarget(Target):
    """A Cortex-M core and the emulated board that runs it.

    Attributes:
        name: CLI name (``cortex-m4``).
        summary: one line for ``--help``.
        cpu_flags: arm-none-eabi-gcc flags selecting core, FPU and float ABI.
        fpu: ``"fpv4-sp-d16"``-style single-precision FPU name, or None (soft float).
        dsp: the core has the DSP extension (SMLAD and friends: 2 int16 MACs per instruction).
        flash_bytes / ram_bytes: default budgets of a typical part with this core (bytes).
        qemu_machine: QEMU board (``mps2-an386``).
        flash_origin / ram_origin: addresses of code and data memory on that board.
        board_flash_bytes / board_ram_bytes: the board's memories (verification firmware links against these).
    """

    name: str
    summary: str
    cpu_flags: tuple[str, ...]
    fpu: str | None
    dsp: bool
    flash_bytes: int
    ram_bytes: int
    qemu_machine: str
    flash_origin: int = 0x00000000
    ram_origin: int = 0x20000000
    board_flash_bytes: int = 4 * 1024 * 1024
    board_ram_bytes: int = 4 * 1024 * 1024

    #: Latency measured on the host means nothing for a microcontroller: the report gives instruction counts.
    host_latency = False

    def option_names(self) -> Sequence[str]:
        return _OPTIONS

    def verify(self, artifact_dir: Path, feeds: list[dict[str, Any]], atol: float = 1e-5) -> dict[str, Any]:
        """Build the firmware, run it under QEMU on every feed and compare with onnxruntime (``effc verify``).

        Returns:
            ``VerifyResult.to_dict()``: ``ok``, ``max_abs``, ``bit_exact``, instructions per inference and per MAC.

        Raises:
            TargetError: the Arm toolchain or qemu-system-arm is missing, or the firmware fails to build/run.
        """
        from effc.targets.cortex_m.verify import verify_artifact

        return verify_artifact(artifact_dir, feeds_list=feeds, atol=atol).to_dict()

    def budgets(self, options: dict[str, Any]) -> tuple[int, int]:
        """``(flash, ram)`` bytes from ``options`` (``"1M"``, ``"256K"``, ints) or this core's defaults."""
        flash = budget.parse_bytes(options["flash"], "flash") if options.get("flash") else self.flash_bytes
        ram = budget.parse_bytes(options["ram"], "ram") if options.get("ram") else self.ram_bytes
        return flash, ram

    def build(self, model: ir.Model, workdir: Path, options: dict[str, Any]) -> BuildResult:
        """Compile ``model`` to C for this core and write the artifact (see ``docs/ARCHITECTURE.md``).

        Files: ``effc_model.h``, ``effc_model.c`` (kernels + runner), ``effc_weights.c``, ``effc_workspace.c``,
        ``main.c``, ``effc_startup.c``, ``effc_link.ld``, ``Makefile``.

        Raises:
            BudgetError: weights + code exceed ``flash`` or arena + scratch + stack exceed ``ram``; nothing written.
            TargetError: lowering or the size-measuring compile failed.
            UnsupportedOpError: an operator cannot be imported.
        """
        from effc.codegen.mcu import lower_to_c

        unknown = set(options) - set(_OPTIONS) - {"threads"}
        if unknown:
            raise TargetError(f"unknown option(s) for {self.name}: {sorted(unknown)}", f"use {list(_OPTIONS)}")
        flash, ram = self.budgets(options)
        opt = str(options.get("opt") or "-O2")
        program = lower_to_c(
            model,
            name=str(options.get("name") or "model"),
            schedule=str(options.get("schedule") or "acc"),
            dsp=self.dsp,
        )
        files = dict(program.sources)
        files["main.c"] = firmware.main_c(program)
        files["effc_startup.c"] = firmware.template("effc_startup.c")
        files["effc_link.ld"] = firmware.linker_script(self, flash, ram)
        files["Makefile"] = firmware.makefile(self, opt)

        measured = shutil_sizes(self, files, opt)
        code_bytes = measured.get("code_bytes", 0)
        stack_bytes = measured.get("stack_bytes", program.kernel_stack_bytes + 256)
        budget.check_budget(program, code_bytes, stack_bytes, flash, ram, self.name)

        for name, text in files.items():
            (Path(workdir) / name).write_text(text)
        info = {
            "core": self.name,
            "tvm_target": "c",
            "qemu_machine": self.qemu_machine,
            "entry": f"{program.prefix}run",
            "opt": opt,
            "schedule": str(options.get("schedule") or "acc"),
            "flash": {
                "budget_bytes": flash,
                "weight_bytes": program.weight_bytes,
                "code_bytes": code_bytes,
                "code_measured": "code_bytes" in measured,
                "total_bytes": program.weight_bytes + code_bytes,
            },
            "ram": {
                "budget_bytes": ram,
                "arena_bytes": program.arena_bytes,
                "scratch_bytes": program.scratch_bytes,
                "stack_bytes": stack_bytes,
                "total_bytes": program.arena_bytes + program.scratch_bytes + stack_bytes,
            },
            "kernels": program.kernels,
            "weights": [{"shape": list(c.shape), "dtype": str(c.dtype)} for c in program.plan.constants],
        }
        return BuildResult(files=sorted(files), info=info)

    def load(self, artifact_dir: Path, manifest: dict[str, Any]) -> Runner:
        """A runner that builds the firmware once and runs every inference under QEMU (slow, exact).

        Raises:
            TargetError: arm-none-eabi-gcc or qemu-system-arm is missing.
        """
        firmware.tool("arm-none-eabi-gcc")
        firmware.tool("qemu-system-arm")
        return QemuRunner(self, Path(artifact_dir), manifest)


def shutil_sizes(target: CortexMTarget, files: dict[str, str], opt: str) -> dict[str, int]:
    """Measure code bytes and stack depth by compiling the model C in a scratch folder (empty dict without gcc)."""
    if not firmware.have_toolchain():
        logger.warning("arm-none-eabi-gcc not found: flash code bytes and stack depth are not measured")
        return {}
    with tempfile.TemporaryDirectory(prefix="effc-mcu-size-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name, text in files.items():
            (src / name).write_text(text)
        return firmware.object_sizes(src, Path(tmp) / "obj", target, opt)


class QemuRunner(Runner):
    """Runs an MCU artifact from Python: firmware built once (the artifact's ``opt``), one QEMU process per run."""

    def __init__(self, target: CortexMTarget, artifact_dir: Path, manifest: dict[str, Any]) -> None:
        self.target = target
        self.artifact_dir = artifact_dir
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self._tmp = tempfile.TemporaryDirectory(prefix="effc-qemu-")
        self._elf: Path | None = None
        tinfo = manifest.get("target")
        info = tinfo.get("info", {}) if isinstance(tinfo, dict) else {}
        self.opt = str(info.get("opt") or "-O2")
        self.last_instructions: list[int] = []

    def run_many(self, feeds_list: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Run several samples in one QEMU process; instruction counts go to :attr:`last_instructions`."""
        import numpy as np

        if self._elf is None:
            self._elf = firmware.build_firmware(self.artifact_dir, Path(self._tmp.name), self.target, self.opt)
        blob = bytearray()
        for feeds in feeds_list:
            for spec in self.inputs:
                if spec["name"] not in feeds:
                    raise TargetError(
                        f"missing input {spec['name']!r}", f"give all of {[s['name'] for s in self.inputs]}"
                    )
                arr = np.ascontiguousarray(feeds[spec["name"]], dtype=np.dtype(spec["dtype"]))
                if list(arr.shape) != [int(d) for d in spec["shape"]]:
                    raise TargetError(f"input {spec['name']!r} has shape {list(arr.shape)}, expected {spec['shape']}")
                blob += arr.tobytes()
        result = firmware.run_qemu(self._elf, self.target, bytes(blob), Path(self._tmp.name) / "run")
        if len(result.outputs) != len(feeds_list) or any(result.status):
            raise TargetError(
                f"the firmware ran {len(result.outputs)} of {len(feeds_list)} samples (status {result.status})"
            )
        self.last_instructions = result.instructions
        return [firmware.decode_outputs(raw, self.outputs) for raw in result.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run_many([feeds])[0]
