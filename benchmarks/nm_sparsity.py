"""N:M sparsity on MiniLM-L6: per-layer kernel times, end-to-end latency vs onnxruntime, and an embedding-cosine table.

Run (from the repository root; results go to benchmarks/results/nm_sparsity.json, progressively)::

    TVM_NUM_THREADS=2 python benchmarks/nm_sparsity.py [--sections kernels,e2e] [--calib 32] [--recon-calib 64]

The default sections (``kernels,e2e``) take about 2 minutes on a quiet machine; ``--sections cosine`` (fidelity, which
does not depend on machine load; SparseGPT and the permutation search dominate) takes about 40 minutes.

Sections:
* ``kernels`` — each distinct MiniLM linear shape (seq 128, and a GEMV row): the dense GEMM template vs the packed
  N:M kernel (2:4, vector 16 and 8 — two AVX2 registers or one per index — and element-wise), min ms.
* ``cosine`` — mean cosine of ``sentence_embedding`` vs the original on 20 held-out sentences: element-wise vs
  vector-wise 2:4 × magnitude vs Wanda × with/without permutation, plus SparseGPT reconstruction (FFN layers).
* ``e2e`` — whole model: onnxruntime fp32 vs TVM dense vs TVM with vector-wise 2:4 (packed forced / measured choice),
  interleaved rounds (min and median). The packed kernels carry their fused epilogue (bias, GELU, residual add).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effc import zoo  # noqa: E402
from effc.ir.calibration import Calibration  # noqa: E402
from effc.ir.reference import Reference  # noqa: E402
from effc.passes.nm_sparsity import NMSparsityPass  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "nm_sparsity.json"
log = logging.getLogger("bench.nm")


def _save(results: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1, default=float))


def kernels(results: dict) -> None:
    from effc.codegen.ops import nm_sparse as ns

    rows = []
    for shape in [(128, 384, 384), (128, 384, 1536), (128, 1536, 384), (1, 384, 1536)]:
        for vector in (16, 8, 1):
            t = ns.time_layer(*shape, 2, 4, vector, repeat=20)
            rows.append({"shape": list(shape), "pattern": "2:4", "vector": vector, **t})
            log.info("kernel %s v%d: dense %.3f ms packed %.3f ms (%.2fx)", shape, vector, t["dense_ms"],
                     t["packed_ms"], t["speedup"])
    results["kernels"] = {"threads": os.environ.get("TVM_NUM_THREADS", "all"), "load_average": os.getloadavg(),
                          "rows": rows}


def _embedder(model, held_out):
    ref = Reference(model)
    idx = ref.output_names.index("sentence_embedding")
    return [ref.run(f)[idx][0] for f in held_out]


def cosine(results: dict, base, cal, recon_cal, held_out) -> None:
    reference = _embedder(base, held_out)

    def cos(m):
        return float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                              for a, b in zip(_embedder(m, held_out), reference, strict=True)]))

    configs = []
    for layers in ("all", "ffn"):
        for vector in (1, 16):
            for method in ("magnitude", "wanda"):
                configs.append({"layers": layers, "vector": vector, "method": method, "permute": False})
            configs.append({"layers": layers, "vector": vector, "method": "wanda", "permute": True})
    configs += [{"layers": "ffn", "vector": 1, "method": "wanda", "permute": False, "reconstruct": True},
                {"layers": "ffn", "vector": 1, "method": "wanda", "permute": False, "reconstruct": True,
                 "min_cosine": 0.95},
                {"layers": "ffn", "vector": 16, "method": "wanda", "permute": True, "reconstruct": True},
                {"layers": "all", "vector": 1, "method": "wanda", "permute": False, "reconstruct": True},
                {"layers": "all", "vector": 16, "method": "wanda", "permute": True, "reconstruct": True}]
    rows = results.setdefault("cosine", {"held_out": len(held_out), "rows": []})["rows"]
    for c in configs:
        model = ir.from_proto(ir.to_proto(base))
        start = time.perf_counter()
        recon = c.get("reconstruct", False)
        p = NMSparsityPass(n=2, m=4, reconstruct=recon, calibration=recon_cal if recon else cal,
                           **{k: v for k, v in c.items() if k != "reconstruct"})
        p(model)
        gains = [r["permutation_gain"] for r in p.stats["layers"] if r.get("permutation_gain")]
        chosen = p.stats.get("sensitivity", {}).get("chosen")
        row = {**c, "reconstruct": recon, "cosine": cos(model), "seconds": time.perf_counter() - start,
               "layers_pruned": len(p.stats["layers"]) if chosen is None else len(chosen),
               "calibration": len(recon_cal if recon else cal),
               "kept_score_gain_by_permutation": float(np.mean(gains)) if gains else None,
               "weight_bytes_before": p.stats["weight_bytes_before"],
               "weight_bytes_after": p.stats["weight_bytes_after"]}
        rows.append(row)
        log.info("cosine %s: %.4f (%.0f s)", c, row["cosine"], row["seconds"])
        _save(results)


def e2e(results: dict, base, cal, held_out, repeat: int = 40) -> None:
    import tvm

    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.codegen.ops import nm_sparse as ns
    from effc.eval.latency import measure_interleaved, ort_session

    threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": threads})
    feed = held_out[0]
    session = ort_session(base, threads)
    runs = {"onnxruntime fp32": (lambda f: session.run(None, f), feed)}
    rows = {"onnxruntime fp32": {}}
    sparse = ir.from_proto(ir.to_proto(base))
    p = NMSparsityPass(n=2, m=4, vector=16, method="wanda", reconstruct=False, calibration=cal)
    p(sparse)
    reference = _embedder(base, [feed])[0]
    for label, model, policy in (("TVM dense", base, "dense"), ("TVM 2:4 v16 packed (forced)", sparse, "packed"),
                                 ("TVM 2:4 v16 measured choice", sparse, "measure")):
        ns.LOWERING_LOG.clear()
        start = time.perf_counter()
        with ns.lowering_policy(policy), target:
            exe, info = compile_cpu(to_relax(model), target, {})
        vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
        args = [tvm.runtime.tensor(feed[n]) for n in Reference(model).input_names]
        emb = vm["main"](*args)[1].numpy()[0]
        runs[label] = (lambda _f, fn=vm["main"], a=args: fn(*a), feed)
        forms = [e["form"] for e in ns.LOWERING_LOG]
        rows[label] = {"compile_s": time.perf_counter() - start,
                       "cosine_vs_original": float(emb @ reference / np.linalg.norm(emb) / np.linalg.norm(reference)),
                       "layers_packed": forms.count("packed"), "layers_dense": forms.count("dense"),
                       "fused_nm_kernels": sorted(k for k, t in info["kernels"].items() if t == "nm_sparse"),
                       "choices": [{k: e.get(k) for k in ("shape", "form", "reason")} for e in ns.LOWERING_LOG]}
    timed = measure_interleaved(runs, warmup=3, repeat=repeat)  # alternating rounds: every variant sees the same load
    out = [{"variant": label, **timed[label], **rows[label]} for label in runs]
    for row in out:
        log.info("e2e %s: median %.2f ms min %.2f ms", row["variant"], row["median_ms"], row["min_ms"])
    ort_min, ort_med = out[0]["min_ms"], out[0]["median_ms"]
    for row in out:
        row["speedup_vs_ort_min"], row["speedup_vs_ort_median"] = ort_min / row["min_ms"], ort_med / row["median_ms"]
    results["e2e"] = {"threads": threads, "repeat": repeat, "load_average": os.getloadavg(), "rows": out}
    _save(results)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="kernels,e2e", help="comma-separated: kernels, e2e, cosine")
    ap.add_argument("--calib", type=int, default=32, help="calibration sentences for masks (Wanda)")
    ap.add_argument("--recon-calib", type=int, default=64, help="calibration sentences for SparseGPT")
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=40, help="interleaved timing rounds (e2e)")
    ap.add_argument("--out", default=None, help="results JSON (read, updated, written back)")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else OUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    sections = args.sections.split(",")
    if "kernels" in sections:
        kernels(results)
        _save(results)
    if {"cosine", "e2e"} & set(sections):
        entry = zoo.get("minilm-l6")
        base = entry.load()
        cal = Calibration(entry.samples("calibration", args.calib), source=entry.samples_description("calibration"))
        held_out = entry.samples("eval", args.held_out)
        if "e2e" in sections:
            e2e(results, base, cal, held_out, args.repeat)
        if "cosine" in sections:
            recon = Calibration(entry.samples("calibration", args.recon_calib), source="recon")
            results.pop("cosine", None)
            cosine(results, base, cal, recon, held_out)
    _save(results)


if __name__ == "__main__":
    main()
