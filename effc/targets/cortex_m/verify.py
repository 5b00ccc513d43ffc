"""``effc verify out/`` for Cortex-M artifacts: build the firmware, run it in QEMU, compare with onnxruntime.

The firmware prints every output's raw bytes, so the comparison sees the exact IEEE-754 bits the core computed;
the reference is onnxruntime running the artifact's own ``model.onnx``. Instruction counts come from SysTick under
``-icount shift=0`` (see :mod:`effc.targets.cortex_m.firmware`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import ArtifactError, TargetError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyResult:
    """Firmware vs onnxruntime on the same inputs.

    Attributes:
        ok: every output of every sample is within ``atol``, or within one quantization step for outputs the
            model quantizes (``steps``).
        target: core name; machine: the QEMU board.
        samples: number of inferences run.
        max_abs: output name -> largest absolute difference over all samples.
        bit_exact: fraction of output elements whose bits equal onnxruntime's.
        instructions: instructions per inference, per sample (SysTick × 40, ±40).
        macs: multiply-accumulates per inference (from the ONNX model), or None when unknown.
        flash_bytes / ram_bytes: of the whole verification ELF (model + harness + newlib), from its sections.
        atol: the tolerance used.
        steps: output name -> one quantization step of that output when the model quantizes it (a
            ``DequantizeLinear`` output: its scale; a ``QuantizeLinear`` output: 1); such outputs may differ by it.
        one_step: output name -> number of elements differing by more than ``atol`` but at most one step.
        outputs: the firmware's outputs per sample (graph output order).
    """

    ok: bool
    target: str
    machine: str
    samples: int
    max_abs: dict[str, float]
    bit_exact: float
    instructions: list[int]
    macs: int | None
    flash_bytes: int
    ram_bytes: int
    atol: float
    steps: dict[str, float] = dataclasses.field(default_factory=dict)
    one_step: dict[str, int] = dataclasses.field(default_factory=dict)
    outputs: list[list[np.ndarray]] = dataclasses.field(repr=False, default_factory=list)

    @property
    def instructions_per_inference(self) -> float:
        return float(np.mean(self.instructions)) if self.instructions else 0.0

    @property
    def instructions_per_mac(self) -> float | None:
        return self.instructions_per_inference / self.macs if self.macs else None

    def summary(self) -> str:
        """One line for the CLI."""
        worst = max(self.max_abs.values(), default=0.0)
        per_mac = f", {self.instructions_per_mac:.2f}/MAC" if self.instructions_per_mac else ""
        if self.steps:
            off = sum(self.one_step.values())
            per_mac += f", {off} output(s) one quantization step off"
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"{verdict}: {self.target} on QEMU {self.machine}, {self.samples} sample(s), max |diff| {worst:.3g} "
            f"(atol {self.atol:g}), {100 * self.bit_exact:.1f}% bit-exact, "
            f"{self.instructions_per_inference:,.0f} instructions/inference{per_mac}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("outputs")
        data["instructions_per_inference"] = self.instructions_per_inference
        data["instructions_per_mac"] = self.instructions_per_mac
        return data


def _synthetic(specs: list[dict], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        sample = {}
        for s in specs:
            shape = [int(d) for d in s["shape"]]
            dtype = np.dtype(s["dtype"])
            if dtype.kind == "f":
                sample[s["name"]] = rng.standard_normal(shape).astype(dtype)
            else:
                sample[s["name"]] = np.zeros(shape, dtype=dtype)
        feeds.append(sample)
    return feeds


def _macs(model_path: Path) -> int | None:
    try:
        import onnx
        import onnx_ir as ir

        from effc.eval.cost import count_macs

        proto = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
        return int(count_macs(ir.from_proto(proto))["total"]) or None
    except Exception as exc:  # noqa: BLE001  (MAC counting is informative only)
        logger.debug("MAC count unavailable: %s", exc)
        return None


def quantization_steps(model_path: Path) -> dict[str, float]:
    """One quantization step of each graph output the model quantizes (int8 QDQ models).

    An output written by ``DequantizeLinear`` with a constant scalar scale may differ from onnxruntime by that scale
    (onnxruntime rounds a float conv result, the int8 kernel an exact int32 sum); one written by
    ``QuantizeLinear`` by 1. Other outputs are absent (they get the plain ``atol``).
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001  (no steps: plain atol)
        logger.debug("quantization steps unavailable: %s", exc)
        return {}
    inits = {t.name: t for t in graph.initializer}
    steps = {}
    for node in graph.node:
        for out in node.output:
            if out not in {v.name for v in graph.output}:
                continue
            if node.op_type == "QuantizeLinear":
                steps[out] = 1.0
            elif node.op_type == "DequantizeLinear" and node.input[1] in inits:
                scale = numpy_helper.to_array(inits[node.input[1]])
                if scale.size == 1:
                    steps[out] = float(scale.reshape(-1)[0])
    return steps


def reference_session(model_path: Path):
    """Onnxruntime (CPU, one thread) at ``ORT_ENABLE_BASIC``: the graph's own semantics.

    The extended level rewrites weight-only QDQ ``DequantizeLinear -> MatMul`` into kernels that quantize the
    activations (measured here: 0.03 off on the digits MLP logits), which is onnxruntime's approximation, not the
    model; basic-level folding keeps every operator exact.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _bit_equal(a: np.ndarray, b: np.ndarray) -> int:
    """Number of elements whose bytes are identical."""
    if a.size == 0:
        return 0
    ab = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, a.itemsize)
    bb = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, b.itemsize)
    return int(np.sum(np.all(ab == bb, axis=1)))


def verify_artifact(
    out_dir: Path | str,
    feeds_list: list[dict[str, np.ndarray]] | None = None,
    reference_outputs: list[list[np.ndarray]] | None = None,
    *,
    samples: int = 4,
    atol: float = 1e-5,
    seed: int = 0,
) -> VerifyResult:
    """Build the artifact's firmware, run it under QEMU and compare with onnxruntime.

    Args:
        out_dir: a Cortex-M artifact folder (``manifest.json``, ``model.onnx``, the C files).
        feeds_list: inputs, one dict per inference; default ``samples`` seeded standard-normal samples.
        reference_outputs: expected outputs per sample; default onnxruntime on ``out_dir/model.onnx``.
        samples: number of synthetic samples when ``feeds_list`` is None.
        atol: largest absolute difference accepted, in output units; outputs the model quantizes (see
            :func:`quantization_steps`) may also differ by one quantization step (counted in ``one_step``).
        seed: seed of the synthetic samples.

    Returns:
        The comparison, instruction counts and sizes; ``ok`` says whether every output matched.

    Raises:
        ArtifactError: the folder is not a Cortex-M artifact.
        TargetError: the toolchain or QEMU is missing, or the firmware failed to build or run.
    """
    from effc.targets.base import get_target
    from effc.targets.cortex_m import firmware
    from effc.targets.cortex_m.targets import CortexMTarget, QemuRunner

    out = Path(out_dir)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{out} has no readable manifest.json", "verify a folder written by effc compile") from exc
    tinfo = manifest.get("target")
    name = tinfo.get("name") if isinstance(tinfo, dict) else tinfo
    target = get_target(str(name))
    if not isinstance(target, CortexMTarget):
        raise ArtifactError(f"{out} is a {name} artifact, not a Cortex-M one", "use the target's own runner")
    feeds = feeds_list if feeds_list is not None else _synthetic(manifest["inputs"], samples, seed)
    if reference_outputs is None:
        if not (out / "model.onnx").exists():
            raise ArtifactError(f"{out} has no model.onnx to compare with", "recompile the artifact")
        session = reference_session(out / "model.onnx")
        names_in = [i.name for i in session.get_inputs()]
        reference_outputs = [session.run(None, {k: f[k] for k in names_in}) for f in feeds]

    runner = QemuRunner(target, out, manifest)
    got = runner.run_many(feeds)
    sections = firmware.elf_sections(runner._elf) if runner._elf is not None else {}
    flash = sum(v for k, v in sections.items() if k in (".isr_vector", ".text", ".rodata", ".data", ".ARM.exidx"))
    ram = sum(v for k, v in sections.items() if k in (".data", ".bss"))

    names = [o["name"] for o in manifest["outputs"]]
    steps = quantization_steps(out / "model.onnx") if (out / "model.onnx").exists() else {}
    max_abs = dict.fromkeys(names, 0.0)
    one_step = {n: 0 for n in names if n in steps}
    ok, same, total = True, 0, 0
    for ref_outs, fw_outs in zip(reference_outputs, got, strict=True):
        for name_k, r, g in zip(names, ref_outs, fw_outs, strict=True):
            r = np.asarray(r).reshape(g.shape).astype(g.dtype)
            wide = r.astype(np.float64) - g.astype(np.float64)
            err = np.abs(wide)
            diff = float(np.max(err, initial=0.0))
            # integers: equal unless atol admits whole steps; quantized outputs: within one step
            # (1.001: the float32 rounding of (q - zero_point) * scale; two steps stay far outside)
            allowed = max(atol, steps.get(name_k, 0.0) * 1.001)
            ok &= bool(diff <= allowed) and not np.isnan(diff)
            if name_k in steps:
                one_step[name_k] += int(np.sum((err > max(atol, steps[name_k] / 2)) & (err <= allowed)))
            max_abs[name_k] = max(max_abs[name_k], diff)
            same += _bit_equal(r, g)
            total += r.size
    result = VerifyResult(
        ok=ok,
        target=target.name,
        machine=target.qemu_machine,
        samples=len(feeds),
        max_abs=max_abs,
        bit_exact=same / total if total else 1.0,
        instructions=runner.last_instructions,
        macs=_macs(out / "model.onnx"),
        flash_bytes=flash,
        ram_bytes=ram,
        atol=atol,
        steps={k: v for k, v in steps.items() if k in names},
        one_step=one_step,
        outputs=got,
    )
    logger.info("%s", result.summary())
    if not result.ok:
        logger.warning("firmware outputs differ from onnxruntime: %s", result.max_abs)
    return result


__all__ = ["TargetError", "VerifyResult", "verify_artifact"]
