"""N:M sparsity on MiniLM-L6: per-layer kernel times, end-to-end latency vs onnxruntime, and an embedding-cosine table.

Run (from the repository root, at normal priority: the timing workers inherit it; results go to
benchmarks/results/nm_sparsity.json, progressively)::

    python benchmarks/nm_sparsity.py [--sections kernels,e2e] [--threads 2,1] [--rounds 5] [--runs 20] [--markdown]

``--markdown`` prints the kernel and end-to-end tables for docs/BENCHMARKS.md (``--sections none --markdown`` only
renders the saved JSON).

The default sections (``kernels,e2e``) take about 4 minutes on a quiet machine; ``--sections cosine`` (fidelity, which
does not depend on machine load; SparseGPT and the permutation search dominate) takes about 40 minutes.

Sections:
* ``kernels`` — each distinct MiniLM linear shape (seq 128, and a GEMV row): the dense GEMM template vs the packed
  N:M kernel (2:4, vector 16 and 8 — two AVX2 registers or one per index — and element-wise), min ms over
  ``--kernel-repeat`` interleaved dense/packed rounds, one process per thread count of ``--threads``.
* ``cosine`` — mean cosine of ``sentence_embedding`` vs the original on 20 held-out sentences: element-wise vs
  vector-wise 2:4 × magnitude vs Wanda × with/without permutation, plus SparseGPT reconstruction (FFN layers).
* ``e2e`` — whole model: onnxruntime fp32 (original model) vs effc dense vs effc with vector-wise 2:4 on all 36 linear
  layers (packed kernels with fused epilogue). Every measurement runs in its own fresh process (one thread pool per
  process: ORT and TVM never contend), alternating ORT, dense, packed over ``--rounds`` rounds at each thread count;
  min and median over all samples, per-round ratios, load average, a per-kernel profile of the packed artifact,
  and the packed artifact's max abs difference from onnxruntime on the same rewritten model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
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


def worker_kernels(threads: int, repeat: int) -> list[dict]:
    """Dense GEMM template vs packed N:M kernel per MiniLM linear shape, in this (fresh) process at ``threads``."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    from effc.codegen.ops import nm_sparse as ns

    rows = []
    for shape in [(128, 384, 384), (128, 384, 1536), (128, 1536, 384), (1, 384, 1536)]:
        for vector in (16, 8, 1):
            t = ns.time_layer(*shape, 2, 4, vector, repeat=repeat)
            rows.append({"shape": list(shape), "pattern": "2:4", "vector": vector, **t})
            log.info("kernel t=%d %s v%d: dense %.3f ms packed %.3f ms (%.2fx)", threads, shape, vector,
                     t["dense_ms"], t["packed_ms"], t["speedup"])
    return rows


def kernels(results: dict, threads: list[int], repeat: int = 20) -> None:
    """Per-layer kernel table at each thread count (one process per thread count; min ms of interleaved rounds)."""
    by_threads = {}
    for t in threads:
        rows = _spawn("kernels", str(t), str(repeat))
        for r in rows:
            log.info("kernel t=%d %s v%d: dense %.3f ms packed %.3f ms (%.2fx)", t, r["shape"], r["vector"],
                     r["dense_ms"], r["packed_ms"], r["speedup"])
        by_threads[str(t)] = {"rows": rows, "load_average": os.getloadavg(),
                              "utc": time.strftime("%H:%M", time.gmtime())}
    results["kernels"] = {"repeat": repeat, "by_threads": by_threads}


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


# ----------------------------------------------------------------------------- e2e: one process per measurement
VARIANTS = {"ort": "onnxruntime fp32", "dense": "effc dense", "packed": "effc 2:4 v16 packed"}


def worker_compile(work: Path) -> dict:
    """Compile ``base.onnx`` (dense) and ``sparse.onnx`` (packed, forced) to ``dense.so`` / ``packed.so``."""
    import tvm

    from effc.codegen import build
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.codegen.ops import nm_sparse as ns

    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": 2})
    info = {}
    for name, onnx_file in (("dense", "base.onnx"), ("packed", "sparse.onnx")):
        start = time.perf_counter()
        with ns.lowering_policy("packed"), target:
            exe, kinfo = compile_cpu(to_relax(ir.load(work / onnx_file)), target, {})
        build.export_library(exe, work / f"{name}.so")
        info[name] = {"compile_s": time.perf_counter() - start, "kernels": kinfo["kernels"]}
    return info


def worker_time(variant: str, work: Path, threads: int, warmup: int, runs: int, profile: bool) -> dict:
    """Warm-up, then ``runs`` timed inferences of one variant in this (fresh) process; raw times in ms."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    feeds = dict(np.load(work / "feeds.npz"))
    if variant == "ort":
        from effc.eval.latency import ort_session

        sess = ort_session(str(work / "base.onnx"), threads)
        fn = lambda: sess.run(None, feeds)  # noqa: E731
        outs = fn()
    else:
        import tvm

        from effc.codegen import build

        vm = build.load_vm(work / f"{variant}.so", tvm.cpu())
        names = json.loads((work / "inputs.json").read_text())
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in names]
        fn = lambda: vm["main"](*args)  # noqa: E731
        outs = build.outputs_to_numpy(fn())
    np.savez(work / f"out_{variant}.npz", *outs)
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    result = {"times_ms": times, "cpu_ms": cpu}
    if profile and variant != "ort":
        result["kernels"] = build.kernel_profile(vm, args, reps=10)
    return result


def _spawn(*args: str) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stats(times: list[float]) -> dict:
    return {"min_ms": min(times), "median_ms": float(np.median(times)), "runs": len(times)}


def _max_diff(work: Path, a: str, b: str) -> float:
    x, y = np.load(work / f"out_{a}.npz"), np.load(work / f"out_{b}.npz")
    return max(float(np.abs(x[k] - y[k]).max()) for k in x.files)


def e2e(results: dict, base, cal, held_out, threads: list[int], rounds: int, warmup: int, runs: int) -> None:
    """ORT fp32 vs effc dense vs effc 2:4 v16 packed, each timed in its own process, alternating over rounds.

    Round ``r`` runs one process per variant (ORT, dense, packed, in that order); each process warms up then times
    ``runs`` inferences on the same real input. Reported: min and median over all samples of a variant, and per
    round the ORT/variant ratio of the per-process medians (the spread shows how much load moved).
    """
    import onnxruntime as ort

    sparse = ir.from_proto(ir.to_proto(base))
    NMSparsityPass(n=2, m=4, vector=16, method="wanda", reconstruct=False, calibration=cal)(sparse)
    feed = held_out[0]
    with tempfile.TemporaryDirectory(prefix="effc-nm-e2e-") as tmp:
        work = Path(tmp)
        ir.save(base, work / "base.onnx")
        ir.save(sparse, work / "sparse.onnx")
        names = [v.name for v in base.graph.inputs]
        (work / "inputs.json").write_text(json.dumps(names))
        np.savez(work / "feeds.npz", **{n: feed[n] for n in names})
        compiled = _spawn("compile", str(work))
        # Correctness: the packed artifact vs onnxruntime on the same rewritten model, dense vs the original.
        sparse_ref = ort.InferenceSession(str(work / "sparse.onnx"), providers=["CPUExecutionProvider"])
        np.savez(work / "out_ort_sparse.npz", *sparse_ref.run(None, {n: feed[n] for n in names}))
        reference = Reference(base).run(feed)
        emb_idx = Reference(base).output_names.index("sentence_embedding")
        out = {"rounds": rounds, "warmup": warmup, "runs_per_process": runs, "by_threads": {},
               "compile": compiled, "load_average_start": os.getloadavg()}
        for t in threads:
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
            per_round = []
            for r in range(rounds):
                medians = {}
                for v in VARIANTS:
                    res = _spawn("time", v, str(work), str(t), str(warmup), str(runs),
                                 "1" if (v == "packed" and r == 0 and t == max(threads)) else "0")
                    samples[v] += res["times_ms"]
                    cpu[v] += res["cpu_ms"]
                    medians[v] = float(np.median(res["times_ms"]))
                    if "kernels" in res:
                        out["packed_kernels"] = [{**k, "template": compiled["packed"]["kernels"].get(k["name"], "-")}
                                                 for k in res["kernels"]]
                per_round.append({"load1": os.getloadavg()[0], **{f"{v}_median_ms": m for v, m in medians.items()},
                                  **{f"ort/{v}": medians["ort"] / medians[v] for v in ("dense", "packed")}})
                log.info("e2e t=%d round %d: %s", t, r, {k: round(x, 2) for k, x in per_round[-1].items()})
            stats = {v: _stats(s) for v, s in samples.items()}
            if t == 1:  # one thread: process CPU time excludes time the process waited for a core (load-robust)
                for v in VARIANTS:
                    stats[v]["cpu_min_ms"], stats[v]["cpu_median_ms"] = min(cpu[v]), float(np.median(cpu[v]))
            for v in VARIANTS:
                stats[v]["speedup_vs_ort_min"] = stats["ort"]["min_ms"] / stats[v]["min_ms"]
                stats[v]["speedup_vs_ort_median"] = stats["ort"]["median_ms"] / stats[v]["median_ms"]
            out["by_threads"][str(t)] = {"variants": stats, "rounds": per_round, "load_average": os.getloadavg(),
                                         "utc": time.strftime("%H:%M", time.gmtime())}
        emb = np.load(work / "out_packed.npz")[f"arr_{emb_idx}"][0]
        ref_emb = reference[emb_idx][0]
        out["packed_vs_ort_same_model_max_abs"] = _max_diff(work, "packed", "ort_sparse")
        out["dense_vs_ort_max_abs"] = _max_diff(work, "dense", "ort")
        out["packed_cosine_vs_original"] = float(emb @ ref_emb / np.linalg.norm(emb) / np.linalg.norm(ref_emb))
    results["e2e"] = out
    _save(results)


def markdown(results: dict) -> str:
    """The kernel and end-to-end tables of docs/BENCHMARKS.md ("Pruning and N:M") from the results JSON."""
    lines = []
    for t, entry in results.get("kernels", {}).get("by_threads", {}).items():
        reps = results["kernels"].get("repeat", "?")
        lines += [f"### Per-layer kernel time, dense GEMM template vs packed 2:4 kernel ({t} thread{'s' * (t != '1')}, "
                  "min ms)", "", f"Min over {reps} interleaved dense/packed rounds of 10 single calls; "
                  f"{entry.get('utc', '?')} UTC, load average {entry['load_average'][0]:.1f}.", "",
                  "| M×K×N | V | dense | packed | dense/packed |", "|---|---|---|---|---|"]
        lines += [f"| {'×'.join(map(str, r['shape']))} | {r['vector']} | {r['dense_ms']:.3f} | {r['packed_ms']:.3f} | "
                  f"{r['speedup']:.2f}× |" for r in entry["rows"]]
        lines.append("")
    e2e = results.get("e2e")
    if e2e and "by_threads" in e2e:
        lines += ["### MiniLM-L6 end to end, seq 128 (each variant in its own process, ms)", "",
                  f"{e2e['rounds']} rounds × {e2e['runs_per_process']} runs per process (after {e2e['warmup']} "
                  f"warm-up); packed vs onnxruntime on the same rewritten model: max abs diff "
                  f"{e2e['packed_vs_ort_same_model_max_abs']:.1e}; embedding cosine vs the original "
                  f"{e2e['packed_cosine_vs_original']:.3f} (Wanda masks, no reconstruction).", "",
                  "| threads | variant | min | median | ORT / variant (min, median) | per-round ORT / variant | "
                  "CPU ms (min, median) | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
        for t, entry in e2e["by_threads"].items():
            for v, label in VARIANTS.items():
                st = entry["variants"][v]
                ratios = [r[f"ort/{v}"] for r in entry["rounds"]] if v != "ort" else []
                spread = f"{min(ratios):.2f}–{max(ratios):.2f}×" if ratios else "–"
                cpu = f"{st['cpu_min_ms']:.1f}, {st['cpu_median_ms']:.1f}" if "cpu_min_ms" in st else "–"
                vs_ort = f"{st['speedup_vs_ort_min']:.2f}×, {st['speedup_vs_ort_median']:.2f}×"
                loads = [r["load1"] for r in entry["rounds"]]
                lines.append(f"| {t} | {label} | {st['min_ms']:.1f} | {st['median_ms']:.1f} | {vs_ort} | {spread} | "
                             f"{cpu} | {min(loads):.1f}–{max(loads):.1f} |")
        if e2e.get("packed_kernels"):
            lines += ["", "Top kernels of the packed artifact (2 threads, VM instrument, ms per inference):", "",
                      "| kernel | template | calls | ms |", "|---|---|---|---|"]
            lines += [f"| `{k['name']}` | {k['template']} | {k['calls']} | {k['ms']:.3f} |"
                      for k in e2e["packed_kernels"][:10]]
    return "\n".join(lines)


def main() -> None:
    global OUT
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "compile":
            res = worker_compile(Path(rest[0]))
        elif kind == "kernels":
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
            res = worker_kernels(int(rest[0]), int(rest[1]))
        else:
            res = worker_time(rest[0], Path(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), rest[5] == "1")
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="kernels,e2e", help="comma-separated: kernels, e2e, cosine")
    ap.add_argument("--calib", type=int, default=32, help="calibration sentences for masks (Wanda)")
    ap.add_argument("--recon-calib", type=int, default=64, help="calibration sentences for SparseGPT")
    ap.add_argument("--held-out", type=int, default=20)
    ap.add_argument("--threads", default="2,1", help="thread counts (kernels and e2e), comma-separated")
    ap.add_argument("--rounds", type=int, default=5, help="e2e rounds (one process per variant per round)")
    ap.add_argument("--runs", type=int, default=20, help="e2e timed inferences per process (after 5 warm-up)")
    ap.add_argument("--kernel-repeat", type=int, default=20, help="interleaved dense/packed rounds per kernel")
    ap.add_argument("--out", default=None, help="results JSON (read, updated, written back)")
    ap.add_argument("--markdown", action="store_true", help="print the kernel and e2e tables (Markdown) at the end")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else OUT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    sections = args.sections.split(",")
    if "kernels" in sections:
        kernels(results, [int(t) for t in args.threads.split(",")], args.kernel_repeat)
        _save(results)
    if {"cosine", "e2e"} & set(sections):
        entry = zoo.get("minilm-l6")
        base = entry.load()
        cal = Calibration(entry.samples("calibration", args.calib), source=entry.samples_description("calibration"))
        held_out = entry.samples("eval", args.held_out)
        if "e2e" in sections:
            e2e(results, base, cal, held_out, [int(t) for t in args.threads.split(",")], args.rounds, 5, args.runs)
        if "cosine" in sections:
            recon = Calibration(entry.samples("calibration", args.recon_calib), source="recon")
            results.pop("cosine", None)
            cosine(results, base, cal, recon, held_out)
    _save(results)
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
