"""Where `effc verify`'s quantization-aware bound comes from: compiled MiniLM-L6 vs onnxruntime on its model.onnx.

    python benchmarks/verify_criterion.py              # 5 variants, 4 synthetic + 32 real samples (~4 min, 2 cores)
    python benchmarks/verify_criterion.py --variants mxint8-w+a,mxint8-w --n-real 16

For every variant the script compiles ``zoo:minilm-l6`` (CPU target, no latency) and measures, per output, over the
4 synthetic feeds `effc verify` uses without ``--data`` and over real eval sentences: max abs diff, worst-sample
cosine and relative L2 error ``||ort - x|| / ||ort||`` between onnxruntime running the artifact's own
``model.onnx`` (``ort``) and a candidate ``x``; ``quant`` is the same error for onnxruntime on ``model.onnx`` with
its activation quantizers bypassed (what the activation quantization itself changes) and ``ratio`` = rel L2 /
quant. `effc verify` accepts ``ratio <= effc.api.QUANT_ERROR_FACTOR`` (or max abs diff <= 1e-4). Candidates:

* ``compiled``: the artifact (correct; must pass);
* ``no-act-quant``: onnxruntime on the model with the quantizers bypassed — an artifact that skipped them (ratio 1
  by construction, inside the bound: a correct artifact whose flips cascaded through many layers may reach ~1.41);
* ``scale-bug``: onnxruntime on ``model.onnx`` with the E8M0 exponent of every 8th weight block of one middle
  layer raised by one (those weights doubled) — a kernel that reads a wrong scale (caught where it outweighs the
  activation quantization's own noise);
* ``fp32``: onnxruntime on the unmodified model (an artifact that skipped every quantization).

Results: printed as Markdown (every row, then a summary per variant and candidate) and written to
``benchmarks/results/verify_criterion.json``. Timing plays no part: run it under ``nice``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/verify_criterion.py` from anywhere
RESULTS = ROOT / "benchmarks" / "results" / "verify_criterion.json"
VARIANTS = {
    "mxint8-w+a": "block-quant(format=mxint8,mode=weight_act)",
    "mxfp8-e4m3-w+a": "block-quant(format=mxfp8_e4m3,mode=weight_act)",
    "mxfp4-w+a": "block-quant(format=mxfp4,mode=weight_act)",
    "mxint8-kv": "block-quant(format=mxint8,mode=kv)",
    "mxint8-w": "block-quant(format=mxint8)",
}


def _scale_bug(model):
    """A copy of ``model`` whose middle ``BlockQuantMatMul`` reads every 8th E8M0 block exponent one too high."""
    import onnx_ir as ir

    copy = ir.from_proto(ir.to_proto(model))
    layers = [n for n in copy.graph if n.op_type == "BlockQuantMatMul" and n.inputs[2].dtype == ir.DataType.UINT8]
    if not layers:
        return None
    scale = layers[len(layers) // 2].inputs[2]
    exps = scale.const_value.numpy().copy()
    exps.reshape(-1)[::8] += 1
    scale.const_value = ir.Tensor(exps, name=scale.name)
    return copy


def _rows(candidates: dict, model, runner, names: list[str], feed_sets: dict[str, list]) -> list[dict]:
    from effc.api import DEFAULT_ATOL, QUANT_ERROR_FACTOR, compare_outputs, without_dynamic_quant
    from effc.ir.reference import Reference

    ref, bypassed = Reference(model), Reference(without_dynamic_quant(model))
    sessions = {label: Reference(m) for label, m in candidates.items() if m is not None}
    rows = []
    for feeds_name, feeds in feed_sets.items():
        expected = [ref.run(f) for f in feeds]
        unquantized = [bypassed.run(f) for f in feeds]
        outputs = {"compiled": [runner.run(f) for f in feeds], "no-act-quant": unquantized}
        outputs.update({label: [s.run(f) for f in feeds] for label, s in sessions.items()})
        for label, got in outputs.items():
            quant = compare_outputs(expected, got, names, DEFAULT_ATOL, unquantized)
            plain = compare_outputs(expected, got, names, DEFAULT_ATOL)
            for name in names:
                q = quant[name]
                ratio = q["rel_l2"] / q["quant_rel_l2"] if q["quant_rel_l2"] else float("nan")
                rows.append({"candidate": label, "feeds": feeds_name, "output": name, "max_abs": q["max_abs"],
                             "cosine": q["cosine"], "rel_l2": q["rel_l2"], "quant_rel_l2": q["quant_rel_l2"],
                             "ratio": ratio, "bound": QUANT_ERROR_FACTOR, "pass_quantized": q["ok"],
                             "pass_atol": plain[name]["ok"]})
    return rows


def measure(name: str, work: Path, n_real: int, reuse: bool = False) -> list[dict]:
    """Compile one variant (``reuse``: keep an artifact already in ``work``) and compare the candidates."""
    import effc
    from effc import runtime, zoo
    from effc.api import dynamic_quant_nodes
    from effc.ir.data import synthetic_feeds
    from effc.ir.model import load

    out = work / name
    if not (reuse and (out / "manifest.json").is_file()):
        effc.compile("zoo:minilm-l6", passes=VARIANTS[name], out_dir=out, force=True, measure_latency=False,
                     eval_samples=1)
    compiled = runtime.load(out)
    model = load(out / "model.onnx")
    names = [o["name"] for o in compiled.outputs]
    feed_sets = {"synthetic": synthetic_feeds(model, 4, seed=3), "real": zoo.get("minilm-l6").samples("eval", n_real)}
    candidates = {"scale-bug": _scale_bug(model), "fp32": zoo.get("minilm-l6").load()}
    rows = _rows(candidates, model, compiled, names, feed_sets)
    n_quant = len(dynamic_quant_nodes(model))
    return [{"variant": name, "dynamic_quant_nodes": n_quant, **r} for r in rows]


def markdown(rows: list[dict]) -> str:
    """The results as one Markdown table (``verify`` = the check effc verify applies to that variant)."""
    lines = ["| variant | candidate | feeds | output | max abs | cosine (min) | rel L2 | quant rel L2 | ratio | "
             "verify |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quantized = r["dynamic_quant_nodes"] > 0
        verdict = r["pass_quantized"] if quantized else r["pass_atol"]
        check = "quant" if quantized else "atol"
        lines.append(f"| {r['variant']} | {r['candidate']} | {r['feeds']} | {r['output']} | {r['max_abs']:.3g} | "
                     f"{r['cosine']:.6f} | {r['rel_l2']:.3g} | {r['quant_rel_l2']:.3g} | {r['ratio']:.2f} | "
                     f"{check} {'pass' if verdict else 'FAIL'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One Markdown row per (variant, candidate): ranges over outputs and feed sets, and how many verify passes."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["candidate"]), []).append(r)
    lines = ["| variant | candidate | rel L2 / quant rel L2 | max rel L2 | max abs | min cosine | verify passes |",
             "|---|---|---|---|---|---|---|"]
    for (variant, candidate), rs in groups.items():
        quantized = rs[0]["dynamic_quant_nodes"] > 0
        ratio = f"{min(r['ratio'] for r in rs):.2f}–{max(r['ratio'] for r in rs):.2f}" if quantized else "–"
        passes = sum(r["pass_quantized"] if quantized else r["pass_atol"] for r in rs)
        lines.append(f"| {variant} | {candidate} | {ratio} | {max(r['rel_l2'] for r in rs):.3g} | "
                     f"{max(r['max_abs'] for r in rs):.3g} | {min(r['cosine'] for r in rs):.4f} | "
                     f"{passes}/{len(rs)} ({'quant' if quantized else 'atol'}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--n-real", type=int, default=32, help="real eval sentences per variant")
    parser.add_argument("--work", type=Path, default=None, help="folder for the artifacts (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="keep artifacts already compiled in --work")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: use {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory(prefix="verify-criterion-") as tmp:
        work = args.work or Path(tmp)
        rows = [r for name in names for r in measure(name, work, args.n_real, args.reuse)]
    print(markdown(rows))
    print()
    print(summary(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "load": os.getloadavg(),
            "n_real": args.n_real}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
