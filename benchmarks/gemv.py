"""Batch-1 fp32 matmuls (GEMV, ``x[1, K] · W[K, N]``, W constant): effc vs onnxruntime vs numpy, in GB/s of weights.

    python benchmarks/gemv.py                                  # threads 1 and 2, 5 rounds (20 min at load 12)
    python benchmarks/gemv.py --threads 2 --rounds 9 --cases lm-head --json out.json

Decoding one token at batch 1 reads every weight once, so a GEMV's speed is the rate at which it streams its
weight matrix from memory. Each case is one ONNX graph of ``copies`` independent nodes ``y_i = x · W_i`` with
distinct weights (summing to ``--mb`` MB, default 128 = 4× this machine's 32 MiB L3), so every call streams its
weights from DRAM as in a 538 MB decoder; time per GEMV = call time / copies. Shapes are SmolLM2-135M's
(hidden 576, KV 192, FFN 1536, vocabulary 49,152); ``gemm`` is an ONNX ``Gemm`` with ``transB=1`` and a bias,
``swiglu`` is ``silu(x·Wg) ⊙ (x·Wu)``.

Runtimes, each in its own process, driven in alternating rounds (the order rotates every round so that load changes
hit all alike): ``read`` (a STREAM-like read kernel: ``torch.sum`` over a 256 MB fp32 array, the bandwidth the
GEMVs chase), ``effc`` (the ONNX graph through effc's frontend and CPU codegen: fast-math, schedule templates),
``ort`` (onnxruntime CPU, ``intra_op_num_threads``), ``numpy`` (OpenBLAS ``x @ W`` per weight). A round is
``--calls`` timed calls after one warm-up call. The table shows min and median ms per GEMV and GB/s at each.
With transparent huge pages in ``madvise`` mode (as here) only numpy and torch ask for them; ``--hugepages`` gives
every runtime huge pages through glibc's malloc tunable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("read", "effc", "ort", "numpy")
READ_BYTES = 256 * 2**20
HUGEPAGES = [False]  # set by --hugepages

# name -> (K, N, kind): SmolLM2-135M's q/o projections, k/v projections, FFN up/gate and down, LM head
CASES: dict[str, tuple[int, int, str]] = {
    "qo": (576, 576, "matmul"),
    "kv": (576, 192, "matmul"),
    "up": (576, 1536, "matmul"),
    "down": (1536, 576, "matmul"),
    "gemm": (576, 1536, "gemm"),
    "swiglu": (576, 1536, "swiglu"),
    "lm-head": (576, 49152, "matmul"),
}


def case_graph(name: str, mb: float):
    """The ONNX model of case ``name`` with enough distinct weight copies for ``mb`` MB; ``(model, copies)``."""
    from onnx import TensorProto, helper, numpy_helper

    k, n, kind = CASES[name]
    mats = 2 if kind == "swiglu" else 1
    copies = max(1, round(mb * 1e6 / (k * n * 4 * mats)))
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for i in range(copies):
        ws = [(rng.standard_normal((k, n), dtype=np.float32) * k**-0.5) for _ in range(mats)]
        if kind == "gemm":
            inits += [numpy_helper.from_array(np.ascontiguousarray(ws[0].T), f"w{i}"),
                      numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        elif kind == "swiglu":
            inits += [numpy_helper.from_array(ws[0], f"wg{i}"), numpy_helper.from_array(ws[1], f"wu{i}")]
            nodes += [helper.make_node("MatMul", ["x", f"wg{i}"], [f"g{i}"]),
                      helper.make_node("Sigmoid", [f"g{i}"], [f"s{i}"]),
                      helper.make_node("Mul", [f"g{i}", f"s{i}"], [f"a{i}"]),
                      helper.make_node("MatMul", ["x", f"wu{i}"], [f"u{i}"]),
                      helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"y{i}"])]
        else:
            inits.append(numpy_helper.from_array(ws[0], f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(copies)]
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), copies


def _effc_runner(model, threads: int):
    import onnx_ir as ir
    import tvm
    from tvm import relax

    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax

    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": threads})
    executable, info = compile_cpu(to_relax(ir.from_proto(model)), target, {"fast_math": True})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    fn = vm["main"]

    def call(x):
        out = fn(tvm.runtime.tensor(x))
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    return (lambda x, arg=None: fn(arg)), call, sorted(set(info["kernels"].values())), tvm.runtime.tensor


def _ort_runner(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return (lambda x, arg=None: sess.run(None, {"x": x})), (lambda x: sess.run(None, {"x": x})), [], None


def _numpy_runner(model, threads: int):
    from onnx import numpy_helper
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if model.graph.node[0].op_type == "Gemm":  # keep the (N, K) layout ORT and effc get: x @ W.T reads it row by row
        pairs = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(len(model.graph.output))]

        def call(x):
            return [x @ w.T + b for w, b in pairs]
    elif "wg0" in weights:
        pairs = [(weights[f"wg{i}"], weights[f"wu{i}"]) for i in range(len(model.graph.output))]

        def call(x):
            out = []
            for wg, wu in pairs:
                g = x @ wg
                out.append(g / (1 + np.exp(-g)) * (x @ wu))
            return out
    else:
        mats = [weights[f"w{i}"] for i in range(len(model.graph.output))]

        def call(x):
            return [x @ w for w in mats]

    return (lambda x, arg=None: call(x)), call, [], None


def _read_runner(threads: int):
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(READ_BYTES // 4, dtype=torch.float32)
    return lambda x, arg=None: data.sum()


def worker(runtime: str, case: str, threads: int, mb: float) -> None:
    """Serve timing rounds over stdin/stdout: build, print ``ready``, then answer each ``run N`` with N times (s)."""
    model, copies = case_graph(case, mb)
    k = CASES[case][0]
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    info: dict = {"copies": copies}
    if runtime == "read":
        timed, arg = _read_runner(threads), None
        info["bytes"] = READ_BYTES
    else:
        make = {"effc": _effc_runner, "ort": _ort_runner, "numpy": _numpy_runner}[runtime]
        timed, call, templates, to_arg = make(model, threads)
        import onnx_ir as ir

        from effc.ir.reference import Reference  # ORT's outputs of the same graph are the reference

        expected = Reference(ir.from_proto(model), threads=1).run({"x": x})
        got = call(x)
        info["max_abs_diff"] = float(max(np.abs(np.asarray(g) - e).max() for g, e in zip(got, expected, strict=True)))
        info["templates"] = templates
        info["bytes"] = sum(t.dims[0] * t.dims[1] * 4 for t in model.graph.initializer if len(t.dims) == 2)
        arg = to_arg(x) if to_arg else None
    print("ready " + json.dumps(info), flush=True)
    for line in sys.stdin:
        calls = int(line.split()[1])
        timed(x, arg)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            timed(x, arg)
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def _start(runtime: str, case: str, threads: int, mb: float) -> tuple[subprocess.Popen, dict]:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if HUGEPAGES[0]:  # glibc ≥ 2.35: malloc madvises its mmap'd chunks for transparent huge pages
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    proc = subprocess.Popen([sys.executable, __file__, "--worker", runtime, case, str(threads), str(mb)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"{runtime} worker for {case!r} at {threads} threads failed to start")
    return proc, json.loads(line[len("ready "):])


def measure_case(case: str, threads: int, mb: float, rounds: int, calls: int, runtimes: tuple[str, ...]) -> dict:
    """All runtimes on one case at ``threads`` threads, in alternating rounds; per runtime min/median ms per GEMV."""
    procs = {rt: _start(rt, case, threads, mb) for rt in runtimes}
    times: dict[str, list[float]] = {rt: [] for rt in runtimes}
    try:
        for r in range(rounds):
            order = runtimes[r % len(runtimes):] + runtimes[: r % len(runtimes)]
            for rt in order:
                proc = procs[rt][0]
                proc.stdin.write(f"run {calls}\n")
                proc.stdin.flush()
                times[rt] += json.loads(proc.stdout.readline())
    finally:
        for proc, _ in procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    row = {"case": case, "threads": threads, "load": os.getloadavg()[0]}
    for rt in runtimes:
        info = procs[rt][1]
        per = 1 if rt == "read" else info["copies"]
        t = np.array(times[rt]) / per
        gb = info["bytes"] / per / 1e9
        row[rt] = {"min_ms": float(t.min() * 1e3), "median_ms": float(np.median(t) * 1e3),
                   "gbs_min": float(gb / t.min()), "gbs_median": float(gb / np.median(t)), "copies": per,
                   **{k: v for k, v in info.items() if k in ("max_abs_diff", "templates")}}
    return row


def to_markdown(rows: list[dict], runtimes: tuple[str, ...]) -> str:
    gemv = [rt for rt in runtimes if rt != "read"]
    head = "| case | threads | load | read GB/s | " + " | ".join(f"{rt} ms" for rt in gemv) + " | " + \
        " | ".join(f"{rt} GB/s" for rt in gemv) + " | effc/ort | effc % of read |"
    lines = ["min (median) ms per GEMV; GB/s of weights streamed at the min (median); read = torch.sum, same run",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        read = r.get("read")
        k, n, kind = CASES[r["case"]]
        cells = [f"{r['case']} {k}→{'2×' if kind == 'swiglu' else ''}{n}", str(r["threads"]), f"{r['load']:.1f}",
                 f"{read['gbs_min']:.1f} ({read['gbs_median']:.1f})" if read else "–"]
        cells += [f"{r[rt]['min_ms']:.4f} ({r[rt]['median_ms']:.4f})" for rt in gemv]
        cells += [f"{r[rt]['gbs_min']:.1f} ({r[rt]['gbs_median']:.1f})" for rt in gemv]
        ratio = r["effc"]["min_ms"] / r["ort"]["min_ms"] if "effc" in r and "ort" in r else float("nan")
        share = r["effc"]["gbs_median"] / read["gbs_median"] if read and "effc" in r else float("nan")
        lines.append("| " + " | ".join(cells) + f" | {ratio:.2f} | {share:.0%} |")
    templates = {r["case"]: r["effc"].get("templates") for r in rows if "effc" in r}
    lines += ["", "effc templates: " + "; ".join(f"{c}: {', '.join(t)}" for c, t in templates.items())]
    diffs = [r[rt]["max_abs_diff"] for r in rows for rt in gemv if rt in r]
    lines.append(f"max abs diff vs onnxruntime (1 thread) over all cases and runtimes: {max(diffs):.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], int(argv[3]), float(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round")
    parser.add_argument("--mb", type=float, default=128.0, help="weight MB per case (0: one copy, cache-hot)")
    parser.add_argument("--hugepages", action="store_true",
                        help="start every worker with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (THP for malloc'd memory)")
    parser.add_argument("--json", type=Path, help="also save the raw rows here")
    args = parser.parse_args(argv)
    HUGEPAGES[0] = args.hugepages
    cases = args.cases
    runtimes = tuple(args.runtimes)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_mode = thp.read_text().strip() if thp.exists() else "unknown"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_cpu()}; load {os.getloadavg()[0]:.1f}; "
          f"THP {thp_mode}{', glibc.malloc.hugetlb=1' if args.hugepages else ''}", flush=True)
    rows = []
    for threads in args.threads:
        for case in cases:
            rows.append(measure_case(case, threads, args.mb, args.rounds, args.calls, runtimes))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(to_markdown(rows, runtimes))
    return 0


def _cpu() -> str:
    import tvm

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores, LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}"


if __name__ == "__main__":
    raise SystemExit(main())
