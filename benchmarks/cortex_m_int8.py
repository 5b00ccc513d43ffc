"""Cortex-M int8: instructions per MAC of the int8 micro-kernel per layer kind, and whole digits models.

Run (from the repository root; ~2 min, needs arm-none-eabi-gcc and qemu-system-arm; results also go to
benchmarks/results/cortex_m_int8.json)::

    python benchmarks/cortex_m_int8.py [--samples 360] [--sections layers,models,ppocr]

Instruction counts come from QEMU ``-icount shift=0`` (SysTick ticks x 40, ±40 per inference): they do not depend on
the host's load, so one run is enough.

Sections:
* ``layers`` — one int8 QDQ layer with int8 input/output (``examples/digits_mcu.py::int8_layer``: the micro-kernel
  alone): conv 3x3 and Gemm at two sizes, M4 (DSP path) at -O2/-O3 and M3 (plain C) at -O2.
* ``models`` — digits MLP and CNN: fp32, weight-only int8 (fp32 activations) and int8 activations
  (``int8_static``: onnxruntime ``quantize_static``), flash/RAM, instructions, accuracy firmware vs onnxruntime on
  the held-out split, and how many logits differ from onnxruntime by exactly one output quantization step.
* ``ppocr`` (not in the default; ~2 min more) — PP-OCR cls (``zoo:ppocr-cls``) weight-only int8 vs int8 activations,
  M7 artifact (2 MB flash/RAM) run on the M7 and M4F boards, 2 eval images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effc.runtime.manifest import write_manifest  # noqa: E402
from effc.targets import get_target  # noqa: E402
from effc.targets.cortex_m.verify import reference_session, verify_artifact  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cortex_m_int8.json"
log = logging.getLogger("bench.cortex_m_int8")
LAYERS = [
    ("conv3x3 16->32, 8x8", "Conv", [1, 16, 8, 8], 32),
    ("conv3x3 32->64, 6x6", "Conv", [1, 32, 6, 6], 64),
    ("gemm 1x256 -> 64", "Gemm", [1, 256], 64),
    ("gemm 2x256 -> 64", "Gemm", [2, 256], 64),
]
CONFIGS = [("cortex-m4", "-O2"), ("cortex-m4", "-O3"), ("cortex-m3", "-O2")]


def _digits():
    spec = importlib.util.spec_from_file_location("digits_mcu", ROOT / "examples" / "digits_mcu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _artifact(model: ir.Model, target: str, out: Path, opt: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = get_target(target).build(model, out, {"opt": opt})
    ir.save(model, out / "model.onnx")

    def spec(v):
        return {"name": v.name, "shape": [int(d) for d in v.shape.numpy()], "dtype": v.dtype.numpy().name}

    io = {"inputs": [spec(v) for v in model.graph.inputs], "outputs": [spec(v) for v in model.graph.outputs]}
    write_manifest(out, {"target": {"name": target, "options": {"opt": opt}, "info": result.info}, **io})
    return result.info


def _row(info: dict, check) -> dict:
    return {
        "code_bytes": info["flash"]["code_bytes"],
        "weight_bytes": info["flash"]["weight_bytes"],
        "arena_bytes": info["ram"]["arena_bytes"],
        "scratch_bytes": info["ram"]["scratch_bytes"],
        "stack_bytes": info["ram"]["stack_bytes"],
        "instructions": round(check.instructions_per_inference),
        "macs": check.macs,
        "instructions_per_mac": round(check.instructions_per_mac, 3) if check.macs else None,
        "bit_exact": round(check.bit_exact, 4),
        "ok": check.ok,
    }


def bench_layers(digits, tmp: Path) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    for label, op, shape, n in LAYERS:
        model = digits.int8_layer(op, shape, n)
        feeds = [{"xq": rng.integers(-128, 128, size=shape, dtype=np.int8)} for _ in range(3)]
        for target, opt in CONFIGS:
            out = tmp / f"{op}{n}{shape[0]}{target}{opt}"
            info = _artifact(model, target, out, opt)
            check = verify_artifact(out, feeds_list=feeds)  # int8 output: within one step
            rows.append({"layer": label, "target": target, "opt": opt, **_row(info, check),
                         "max_steps": max(check.max_abs.values())})  # fmt: skip
            log.info("%s %s %s: %.3f instr/MAC", label, target, opt, rows[-1]["instructions_per_mac"])
    return rows


def bench_models(digits, tmp: Path, samples: int) -> list[dict]:
    x_train, x_test, y_train, y_test = digits.digits_split()
    rows = []
    for kind in ("mlp", "cnn"):
        fp32 = digits.train_mlp(x_train, y_train) if kind == "mlp" else digits.train_cnn(x_train, y_train)
        variants = {
            "fp32": fp32,
            "int8 weight-only": digits.int8_weights(fp32),
            "int8 activations": digits.int8_static(fp32, x_train[:200]),
        }
        shape = [int(d) for d in fp32.graph.inputs[0].shape.numpy()]
        feeds = [{"pixels": x.reshape(shape)} for x in x_test[:samples]]
        for variant, model in variants.items():
            step = None
            if variant == "int8 activations":
                dq = next(nd for nd in model.graph if nd.outputs[0].name == "logits")
                step = float(dq.inputs[1].const_value.numpy())
            for target, opt in CONFIGS:
                out = tmp / f"{kind}{variant[:6]}{target}{opt}"
                info = _artifact(model, target, out, opt)
                check = verify_artifact(out, feeds_list=feeds)  # QDQ logits: within one step
                ort = reference_session(out / "model.onnx")
                ref = np.stack([ort.run(None, f)[0].reshape(-1) for f in feeds])
                got = np.stack([o[0].reshape(-1) for o in check.outputs])
                row = {"model": kind, "variant": variant, "target": target, "opt": opt, **_row(info, check),
                       "max_abs": float(np.abs(ref - got).max()),
                       "acc_ort": float((ref.argmax(1) == y_test[:samples]).mean()),
                       "acc_firmware": float((got.argmax(1) == y_test[:samples]).mean()),
                       "same_class": float((ref.argmax(1) == got.argmax(1)).mean())}  # fmt: skip
                if step:
                    steps = np.round(np.abs(ref.astype(np.float64) - got) / step)
                    row.update(step=step, logits=int(steps.size), one_step=int((steps == 1).sum()),
                               more=int((steps > 1).sum()))  # fmt: skip
                rows.append(row)
                log.info("%s %s %s %s: %s", kind, variant, target, opt, check.summary())
    return rows


def bench_ppocr(digits, tmp: Path) -> list[dict]:
    from effc import zoo
    from effc.ir.canonicalize import canonicalize

    entry = zoo.get("ppocr-cls")
    fp32 = canonicalize(ir.load(str(entry.path())), input_shapes=entry.input_shapes)
    feeds = entry.samples("eval", 2)
    rows = []
    variants = {
        "int8 weight-only": digits.int8_weights(fp32),
        "int8 activations": digits.int8_static(fp32, entry.samples("calibration", 16)),
    }
    for variant, model in variants.items():
        out = tmp / f"ppocr{variant[:6]}"
        out.mkdir(parents=True)
        options = {"flash": "2M", "ram": "2M"}
        result = get_target("cortex-m7").build(model, out, options)
        ir.save(model, out / "model.onnx")
        for core in ("cortex-m7", "cortex-m4"):
            io = {"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}],
                  "outputs": [{"name": v.name, "shape": [int(d) for d in v.shape.numpy()], "dtype": "float32"}
                              for v in model.graph.outputs]}  # fmt: skip
            write_manifest(out, {"target": {"name": core, "options": options, "info": result.info}, **io})
            check = verify_artifact(out, feeds_list=feeds)
            rows.append({"model": "ppocr-cls", "variant": variant, "target": core, "opt": "-O2",
                         **_row(result.info, check)})  # fmt: skip
            log.info("ppocr %s %s: %s", variant, core, check.summary())
    return rows


def _table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(k):,}" if isinstance(r.get(k), int) else str(r.get(k)) for k in keys)
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=360)
    parser.add_argument("--sections", default="layers,models")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("effc", "onnxruntime", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    digits = _digits()
    results: dict = json.loads(OUT.read_text()) if OUT.exists() else {}  # sections not run keep their last results
    with tempfile.TemporaryDirectory(prefix="bench-cm-int8-") as tmp:
        if "layers" in args.sections:
            results["layers"] = bench_layers(digits, Path(tmp))
            print(_table(results["layers"], ["layer", "target", "opt", "code_bytes", "weight_bytes", "instructions",
                                             "macs", "instructions_per_mac", "bit_exact", "max_steps"]))  # fmt: skip
        if "models" in args.sections:
            results["models"] = bench_models(digits, Path(tmp), args.samples)
            print(_table(results["models"], ["model", "variant", "target", "opt", "code_bytes", "weight_bytes",
                                             "arena_bytes", "scratch_bytes", "stack_bytes", "instructions",
                                             "instructions_per_mac", "max_abs", "one_step", "logits", "acc_ort",
                                             "acc_firmware"]))  # fmt: skip
        if "ppocr" in args.sections:
            results["ppocr"] = bench_ppocr(digits, Path(tmp))
            print(_table(results["ppocr"], ["model", "variant", "target", "code_bytes", "weight_bytes", "arena_bytes",
                                            "scratch_bytes", "stack_bytes", "instructions", "instructions_per_mac",
                                            "bit_exact", "ok"]))  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
