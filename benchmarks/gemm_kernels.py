"""Single GEMM kernels of MiniLM-L6 (seq 128): effc's GEMM template vs onnxruntime (MLAS), in GFLOP/s.

    python benchmarks/gemm_kernels.py                    # threads 1 and 2, 30 runs each (~1 min)
    python benchmarks/gemm_kernels.py --threads 1 --runs 50 --json out.json

Shapes (M×K×N, fp32): the three dense layers of a MiniLM block with their bias (Q/K/V/out projection
128×384×384, FFN up 128×384×1536, FFN down 128×1536×384; B is a constant weight, so ORT may pre-pack it) and the
two attention batch-matmuls (12 heads × 128×32×128 for Q·Kᵀ, 12 × 128×128×32 for P·V; both operands are inputs).
effc compiles each as a one-op Relax module through :func:`effc.codegen.cpu.compile_cpu` (the product path:
fast-math, schedule templates). Each thread count runs in its own process (``TVM_NUM_THREADS`` is read once per
process); within it effc and ORT alternate, warm-up then ``--runs`` timed calls, and the table shows the min
(median) in ms and GFLOP/s = 2·M·K·N·batch / min time. Peak of one Zen 3 core: 32 FLOP/cycle (2 FMA pipes × 8
fp32 lanes × 2) × clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name, batch (0 = dense with a constant weight and bias), M, K, N
SHAPES: list[tuple[str, int, int, int, int]] = [
    ("qkv/out proj", 0, 128, 384, 384),
    ("ffn up", 0, 128, 384, 1536),
    ("ffn down", 0, 128, 1536, 384),
    ("attn Q·Kᵀ", 12, 128, 32, 128),
    ("attn P·V", 12, 128, 128, 32),
]


def _inputs(batch: int, m: int, k: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if batch:
        return {"a": rng.standard_normal((1, batch, m, k), dtype=np.float32),
                "b": rng.standard_normal((1, batch, k, n), dtype=np.float32)}
    return {"a": rng.standard_normal((1, m, k), dtype=np.float32),
            "w": (rng.standard_normal((k, n), dtype=np.float32) * 0.05),
            "bias": rng.standard_normal((n,), dtype=np.float32)}


def _effc_runner(batch: int, m: int, k: int, n: int, data: dict[str, np.ndarray]):
    """Compile the kernel with effc's CPU path; return (call, output_fn, template names)."""
    import tvm
    from tvm import relax

    from effc.codegen.cpu import compile_cpu

    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(data["a"].shape, "float32"))
    params = [a]
    if batch:
        params.append(relax.Var("b", relax.TensorType(data["b"].shape, "float32")))
    with bb.function("main", params):
        with bb.dataflow():
            if batch:
                out = bb.emit(relax.op.matmul(a, params[1]))
            else:
                out = bb.emit(relax.op.add(relax.op.matmul(a, relax.const(data["w"])), relax.const(data["bias"])))
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": 2})
    executable, info = compile_cpu(bb.get(), target, {"fast_math": True})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(data["a"])] + ([tvm.runtime.tensor(data["b"])] if batch else [])
    return (lambda _: vm["main"](*args)), (lambda: vm["main"](*args).numpy()), sorted(set(info["kernels"].values()))


def _ort_runner(batch: int, data: dict[str, np.ndarray], threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if batch:
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(data[n].shape)) for n in ("a", "b")]
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g", inputs, [out])
        feeds = {"a": data["a"], "b": data["b"]}
    else:
        inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(data["a"].shape))]
        inits = [numpy_helper.from_array(data["w"], "w"), numpy_helper.from_array(data["bias"], "bias")]
        nodes = [helper.make_node("MatMul", ["a", "w"], ["t"]), helper.make_node("Add", ["t", "bias"], ["y"])]
        graph = helper.make_graph(nodes, "g", inputs, [out], inits)
        feeds = {"a": data["a"]}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return (lambda _: sess.run(None, feeds)), (lambda: sess.run(None, feeds)[0])


def worker(threads: int, warmup: int, runs: int) -> list[dict]:
    """Time every shape with effc and ORT at ``threads`` threads (this process only)."""
    from effc.eval.latency import measure

    rows = []
    for name, batch, m, k, n in SHAPES:
        data = _inputs(batch, m, k, n)
        effc_call, effc_out, templates = _effc_runner(batch, m, k, n, data)
        ort_call, ort_out = _ort_runner(batch, data, threads)
        diff = float(np.abs(effc_out() - ort_out()).max())
        # Alternate the two runtimes in rounds so that load changes hit both alike; keep every round's times.
        times: dict[str, list[dict]] = {"effc": [], "ort": []}
        for _ in range(3):
            times["effc"].append(measure(effc_call, {}, warmup, max(1, runs // 3)))
            times["ort"].append(measure(ort_call, {}, warmup, max(1, runs // 3)))
        flop = 2.0 * m * k * n * max(batch, 1)
        row = {"name": name, "shape": f"{max(batch, 1)}×{m}×{k}×{n}", "templates": templates, "max_abs_diff": diff}
        for side, rounds in times.items():
            best = min(r["min_ms"] for r in rounds)
            row[side] = {"min_ms": best, "median_ms": float(np.median([r["median_ms"] for r in rounds])),
                         "gflops": flop / best / 1e6}
        rows.append(row)
    return rows


def to_markdown(results: dict[int, list[dict]]) -> str:
    lines = [
        f"GEMM kernels, fp32, min (median) ms and GFLOP/s at the min; load average {os.getloadavg()[0]:.1f}.",
        "",
        "| kernel | batch×M×K×N | threads | ORT ms | effc ms | ORT GFLOP/s | effc GFLOP/s | effc/ORT | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for threads, rows in results.items():
        for r in rows:
            o, e = r["ort"], r["effc"]
            lines.append(
                f"| {r['name']} | {r['shape']} | {threads} | {o['min_ms']:.3f} ({o['median_ms']:.3f}) | "
                f"{e['min_ms']:.3f} ({e['median_ms']:.3f}) | {o['gflops']:.1f} | {e['gflops']:.1f} | "
                f"{e['min_ms'] / o['min_ms']:.2f} | {r['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        print(json.dumps(worker(int(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    args = parser.parse_args(argv)
    results = {}
    for threads in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(threads), str(args.warmup), str(args.runs)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"worker for {threads} threads failed:\n{proc.stderr[-3000:]}")
        results[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
