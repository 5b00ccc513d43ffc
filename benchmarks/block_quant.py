"""Block quantization on MiniLM-L6: effc MXINT8 / MXFP4 artifacts vs effc fp32, onnxruntime fp32, onnxruntime's
dynamic int8 quantization and its 4-bit ``MatMulNBits`` — latency, artifact bytes and embedding cosine, same run.

    python benchmarks/block_quant.py                 # all variants at 2 and 1 threads, writes the section (~4 min)
    python benchmarks/block_quant.py --rounds 5 --no-write --variants ort-fp32,effc-mxint8-w+a --threads 2
    python benchmarks/block_quant.py --kernels       # per-GEMM-shape kernel table (one process, interleaved)

Run at normal priority on a machine without other timing jobs. Every variant is built once in its own worker
process (no thread pool of one runtime competes with another's in the same process); the driver then alternates
over rounds: in each round, for each thread count, every worker in turn runs one untimed warm-up and ``--reps``
timed runs of the same real input (zoo eval split, seq 128, batch 1), so that all variants see the same load
drift. Median and min are over all ``rounds × reps`` samples; the load average is sampled every round. Cosine: mean
over the eval sentences of the cosine between the variant's and onnxruntime fp32's ``sentence_embedding``.
Artifact bytes: the file a deployment ships (``model.so`` for effc, the ``.onnx`` for onnxruntime variants).
onnxruntime keeps its default thread spinning (what a user gets); the driver pauses 20 ms between workers so that
spinning threads have parked before the next variant runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/block_quant.py` from anywhere
DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- block-quant:start -->", "<!-- block-quant:end -->"
RESULTS = ROOT / "benchmarks" / "results" / "block_quant.json"
# variant -> (kind, effc pipeline or ORT recipe)
VARIANTS = {
    "ort-fp32": ("ort", "fp32"),
    "ort-dynamic-int8": ("ort", "dynamic-int8"),
    "ort-matmulnbits-4bit": ("ort", "nbits4"),
    "ort-matmulnbits-8bit": ("ort", "nbits8"),
    "effc-fp32": ("effc", ""),
    "effc-mxint8": ("effc", "block-quant(format=mxint8)"),
    "effc-mxint8-w+a": ("effc", "block-quant(format=mxint8,mode=weight_act)"),
    "effc-mxfp4": ("effc", "channel-reorder,block-quant(format=mxfp4)"),
}


def _feeds(n: int):
    from effc import zoo

    return zoo.get("minilm-l6").samples("eval", n)


def _ort_model(recipe: str, work: Path) -> Path:
    import onnx_ir as ir

    from effc import zoo

    base = work / "fp32.onnx"
    ir.save(zoo.get("minilm-l6").load(), base)
    return base if recipe == "fp32" else _ort_quantized(base, recipe)


def _build(name: str, work: Path, threads: list[int]):
    """Build variant ``name`` in ``work``; returns ``({threads: run(feed) -> sentence_embedding}, artifact path)``."""
    kind, recipe = VARIANTS[name]
    if kind == "ort":
        import onnxruntime as ort

        path = _ort_model(recipe, work)
        runs = {}
        for t in threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = t
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            index = [o.name for o in sess.get_outputs()].index("sentence_embedding")
            runs[t] = (lambda f, sess=sess, index=index: sess.run(None, f)[index])
        return runs, path
    import tvm

    import effc.codegen.ops.block_quant  # noqa: F401  (registers the effc converters)
    from effc import zoo
    from effc.codegen import build
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.ir.calibration import Calibration
    from effc.passes import parse_pipeline
    from effc.targets.cpu import set_runtime_threads

    entry = zoo.get("minilm-l6")
    model = entry.load()
    if recipe:
        cal = Calibration(entry.samples("calibration", 16), entry.samples_description("calibration"))
        for p in parse_pipeline(recipe, calibration=cal):
            p(model)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": max(threads)})
    with target:  # as effc.targets.cpu: lets MXINT8 W+A lower to the AVX2 integer kernels
        mod = to_relax(model)
    ex, _ = compile_cpu(mod, target, {})
    artifact = work / "model.so"
    build.export_library(ex, artifact)
    set_runtime_threads(max(threads))
    vm = build.load_vm(artifact, tvm.cpu())
    order = [i.name for i in model.graph.inputs]

    def runner(t: int):
        def run(f):
            set_runtime_threads(t)  # a no-op unless the pool runs at another count
            return build.outputs_to_numpy(vm["main"](*[build.to_tvm_tensor(f[n], tvm.cpu()) for n in order]))[1]

        return run

    return {t: runner(t) for t in threads}, artifact


def _cosine(run, feeds) -> float:
    """Mean cosine of ``run``'s sentence embedding vs onnxruntime fp32 over ``feeds``."""
    import onnx_ir as ir
    import onnxruntime as ort

    from effc import zoo

    ref_sess = ort.InferenceSession(ir.to_proto(zoo.get("minilm-l6").load()).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    index = [o.name for o in ref_sess.get_outputs()].index("sentence_embedding")
    cos = []
    for f in feeds:
        a = ref_sess.run(None, f)[index].ravel()
        b = np.asarray(run(f)).ravel()
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return round(float(np.mean(cos)), 5)


def serve(name: str, work: Path, threads: list[int], n_eval: int) -> None:
    """Worker process: build ``name``, print one JSON line (cosine, bytes, build seconds), then answer each stdin
    line ``THREADS REPS`` with one untimed warm-up and ``REPS`` timed runs (JSON ``{"ms": [...]}``); ``quit`` ends."""
    feeds = _feeds(n_eval)
    start = time.perf_counter()
    runs, artifact = _build(name, work, threads)
    build_s = round(time.perf_counter() - start, 1)
    print(json.dumps({"variant": name, "recipe": VARIANTS[name][1], "cosine": _cosine(runs[max(threads)], feeds),
                      "artifact_bytes": os.path.getsize(artifact), "build_s": build_s}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        t, reps = (int(v) for v in line.split())
        runs[t](feeds[0])
        ms = []
        for _ in range(reps):
            tick = time.perf_counter()
            runs[t](feeds[0])
            ms.append(1e3 * (time.perf_counter() - tick))
        print(json.dumps({"ms": ms}), flush=True)


def _json_line(proc: subprocess.Popen) -> dict | None:
    """The next line of ``proc``'s stdout that is a JSON object (libraries may print other lines), or None at EOF."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    return None


def alternate(names: list[str], threads: list[int], rounds: int, reps: int, n_eval: int) -> dict[int, list[dict]]:
    """Per thread count, one row per variant: median/min over ``rounds × reps`` alternating samples (module doc)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:  # built one at a time: concurrent builds would double the peak memory
            work = Path(tmp) / name
            work.mkdir()
            cmd = [sys.executable, __file__, "--serve", name, "--work", str(work), "--eval", str(n_eval),
                   "--threads", ",".join(map(str, threads))]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            ready = _json_line(proc)
            if ready is None:
                print(f"{name} failed (exit {proc.wait()}); see its stderr above", file=sys.stderr)
                continue
            procs[name], info[name] = proc, ready
            print(json.dumps(ready), flush=True)
        samples = {(name, t): [] for name in procs for t in threads}
        loads = []
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for t in threads:
                for name, proc in procs.items():
                    proc.stdin.write(f"{t} {reps}\n")
                    proc.stdin.flush()
                    samples[name, t] += _json_line(proc)["ms"]
                    time.sleep(0.02)
        for proc in procs.values():
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait()
    results = {}
    for t in threads:
        results[t] = [{**info[name], "threads": t, "median_ms": round(float(np.median(samples[name, t])), 3),
                       "min_ms": round(min(samples[name, t]), 3), "samples": len(samples[name, t]),
                       "load_mean": round(float(np.mean(loads)), 2), "load_max": round(max(loads), 2)}
                      for name in procs]
        for row in results[t]:
            print(json.dumps(row), flush=True)
    return results


KERNEL_SHAPES = ((128, 384, 384), (128, 384, 1536), (128, 1536, 384), (1, 384, 1536))


def _matmul_model(m: int, k: int, n: int, seed: int = 0):
    """One-op ONNX model ``Y (M, N) = X (M, K) @ W (K, N)`` with MiniLM-like weights (std 0.04)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.04).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(w, "w")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def kernels(rounds: int, threads: int) -> list[dict]:
    """Per MiniLM GEMM shape, interleaved in one process (min and median over ``rounds`` rounds): effc fp32
    template, effc MXINT8 W+A integer kernels (activation quantization included), effc MXINT8 W+A through the fp32
    decode kernel, onnxruntime fp32, dynamic int8 (``MatMulInteger``) and ``MatMulNBits`` 8-bit accuracy level 4."""
    import onnx_ir as ir
    import onnxruntime as ort
    import tvm

    from effc.codegen import build
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.passes.block_quant import BlockQuantPass
    from effc.targets.cpu import set_runtime_threads

    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": threads})
    set_runtime_threads(threads)

    def effc_fn(model, x: np.ndarray, int8: bool):
        with target if int8 else contextlib.nullcontext():  # no target in scope: the fp32 decode kernel
            mod = to_relax(model)
        ex, _ = compile_cpu(mod, target, {})
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        xt = build.to_tvm_tensor(x, tvm.cpu())
        return lambda: vm["main"](xt)

    def ort_fn(path: Path, x: np.ndarray):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # do not starve TVM's pool
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"x": x})

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in KERNEL_SHAPES:
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            fns = {"effc-fp32": effc_fn(_matmul_model(m, k, n), x, False)}
            for label, int8 in (("effc-mxint8-w+a-int8", True), ("effc-mxint8-w+a-fp32dec", False)):
                model = _matmul_model(m, k, n)
                BlockQuantPass(format="mxint8", mode="weight_act")(model)
                fns[label] = effc_fn(model, x, int8)
            base = Path(tmp) / f"mm{m}x{k}x{n}.onnx"
            ir.save(_matmul_model(m, k, n), base)
            fns["ort-fp32"] = ort_fn(base, x)
            fns["ort-dynamic-int8"] = ort_fn(_ort_quantized(base, "dynamic-int8"), x)
            fns["ort-matmulnbits-8bit"] = ort_fn(_ort_quantized(base, "nbits8"), x)
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(rounds):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                row = {"shape": f"{m}x{k}x{n}", "kernel": name, "min_ms": round(1e3 * min(ts), 4),
                       "median_ms": round(1e3 * float(np.median(ts)), 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _ort_quantized(base: Path, recipe: str) -> Path:
    path = base.with_name(f"{base.stem}-{recipe}.onnx")
    if recipe == "dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(base), str(path), weight_type=QuantType.QInt8)
        return path
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quant = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=32, is_symmetric=True, accuracy_level=4,
                                 bits=4 if recipe == "nbits4" else 8)
    quant.process()
    quant.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


FIDELITY_START, FIDELITY_END = "<!-- block-quant-fidelity:start -->", "<!-- block-quant-fidelity:end -->"


def fidelity(n_eval: int, n_cal: int) -> list[dict]:
    """Per format, without and with ``channel-reorder``: per-layer weight SQNR (mean / min over the 37 quantized
    tensors), bits per weight and the onnxruntime embedding cosine (weights only, and weights + activations)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from effc import zoo
    from effc.ir.calibration import Calibration
    from effc.ops.block_formats import FORMATS
    from effc.passes.block_quant import BlockQuantPass
    from effc.passes.channel_reorder import ChannelReorderPass

    entry = zoo.get("minilm-l6")
    feeds = entry.samples("eval", n_eval)
    cal = Calibration(entry.samples("calibration", n_cal), entry.samples_description("calibration"))

    def embed(model):
        sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
        idx = [o.name for o in sess.get_outputs()].index("sentence_embedding")
        return [sess.run(None, f)[idx].ravel() for f in feeds]

    ref = embed(entry.load())
    rows = []
    for fmt in FORMATS:
        for reorder in (False, True):
            row = {"format": fmt, "reorder": reorder}
            for mode in ("weight", "weight_act"):
                model = entry.load()
                if reorder:
                    ChannelReorderPass(calibration=cal)(model)
                q = BlockQuantPass(format=fmt, mode=mode)
                q(model)
                out = embed(model)
                row[f"cosine_{mode}"] = round(float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                                                              for a, b in zip(ref, out, strict=True)])), 5)
                sq = [v["sqnr_db"] for v in q.stats["layers"].values()]
                row.update(sqnr_mean=round(float(np.mean(sq)), 2), sqnr_min=round(float(np.min(sq)), 2),
                           bits_per_weight=round(q.stats["bits_per_weight"], 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _write_fidelity(rows: list[dict], n_eval: int) -> None:
    lines = [FIDELITY_START, "### Block quantization: fidelity per format (MiniLM-L6)", "",
             f"Emulation in onnxruntime of the rewritten `model.onnx` (bit-exact with the TVM kernels), {n_eval} "
             "held-out sentences, blocks of 32 along the reduction axis. SQNR: per quantized weight tensor (36 "
             "linear layers + word embeddings). W+A: dynamic per-block activation quantization at every quantized "
             "layer's input (same format; int8/int4 use MXINT8 activations).", "",
             "| format | reorder | bits/weight | SQNR mean dB | SQNR min dB | cosine W | cosine W+A |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {'yes' if r['reorder'] else 'no'} | {r['bits_per_weight']} | "
                     f"{r['sqnr_mean']} | {r['sqnr_min']} | {r['cosine_weight']:.4f} | {r['cosine_weight_act']:.4f} |")
    lines += ["", FIDELITY_END]
    _replace_block(FIDELITY_START, FIDELITY_END, "\n".join(lines))


def _replace_block(start: str, end: str, block: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


KERNELS_START, KERNELS_END = "<!-- block-quant-kernels:start -->", "<!-- block-quant-kernels:end -->"


def _write_kernels(rows: list[dict], args) -> None:
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = [KERNELS_START, "### Block quantization: MXINT8 integer GEMM vs fp32 (MiniLM GEMM shapes)", "",
             f"`python benchmarks/block_quant.py --kernels --runs {args.runs} --threads {args.threads}`: one process, "
             f"{args.runs} interleaved rounds, min ms (median in parentheses), {args.threads} thread(s), "
             f"load average {os.getloadavg()[0]:.1f}. effc int8 includes the activation quantization kernel.", "",
             "| M×K×N | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cells = {r["kernel"]: f"{r['min_ms']:.3f} ({r['median_ms']:.3f})" for r in rows if r["shape"] == shape}
        lines.append(f"| {shape} | " + " | ".join(cells.get(n, "-") for n in names) + " |")
    lines += ["", KERNELS_END]
    _replace_block(KERNELS_START, KERNELS_END, "\n".join(lines))


def _write_doc(results: dict[int, list[dict]], args) -> None:
    first = next(iter(results.values()))
    lines = [START, "## Block quantization", "",
             f"MiniLM-L6 (seq 128, batch 1). `python benchmarks/block_quant.py --rounds {args.rounds} --reps "
             f"{args.reps} --threads {args.threads}`: each variant built once in its own process, then "
             f"{args.rounds} alternating rounds of {args.reps} timed runs per variant and thread count (median and "
             f"min over all {args.rounds * args.reps} samples); {platform.processor() or platform.machine()}, "
             f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, load average mean {first[0]['load_mean']} / max "
             f"{first[0]['load_max']} over the rounds. Cosine: mean over {args.eval} held-out sentences vs "
             "onnxruntime fp32. Bytes: the shipped file (effc `model.so`, onnxruntime `.onnx`)."]
    for t, rows in results.items():
        base = next((r for r in rows if r["variant"] == "ort-fp32"), None)
        fp32 = next((r for r in rows if r["variant"] == "effc-fp32"), None)
        lines += ["", f"{t} thread{'s' if t > 1 else ''}:", "",
                  "| variant | pipeline / recipe | median ms | min ms | vs ORT fp32 (median / min) | bytes | "
                  "vs effc fp32 | cosine |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            speed = (f"{r['median_ms'] / base['median_ms']:.2f}x / {r['min_ms'] / base['min_ms']:.2f}x" if base
                     else "-")
            size = f"{r['artifact_bytes'] / fp32['artifact_bytes']:.1%}" if fp32 else "-"
            lines.append(f"| {r['variant']} | `{r['recipe'] or 'fp32'}` | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{speed} | {r['artifact_bytes']:,} | {size} | {r['cosine']:.4f} |")
    lines += ["", END]
    _replace_block(START, END, "\n".join(lines))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({str(t): rows for t, rows in results.items()}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts (--kernels: the first)")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds (end to end)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per variant per round (end to end)")
    ap.add_argument("--runs", type=int, default=40, help="interleaved rounds (--kernels)")
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--fidelity", action="store_true", help="per-format SQNR/cosine table instead of latency")
    ap.add_argument("--kernels", action="store_true", help="per-GEMM-shape kernel timings (interleaved)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.fidelity:
        rows = fidelity(args.eval, 16)
        if not args.no_write:
            _write_fidelity(rows, args.eval)
        return
    if args.kernels:
        args.threads = threads[0]
        rows = kernels(args.runs, args.threads)
        if not args.no_write:
            _write_kernels(rows, args)
        return
    if args.serve:
        serve(args.serve, Path(args.work), threads, args.eval)
        return
    results = alternate(args.variants.split(","), threads, args.rounds, args.reps, args.eval)
    if not args.no_write and results and results[threads[0]]:
        _write_doc(results, args)


if __name__ == "__main__":
    main()
