"""effc CPU codegen vs onnxruntime on every zoo model; writes the "CPU codegen" section of docs/BENCHMARKS.md.

    python benchmarks/cpu_vs_ort.py                      # all models, threads 1 and 2, 20 runs
    python benchmarks/cpu_vs_ort.py --models ppocr-cls --runs 30 --no-write

Each measurement runs in its own fresh process (compile, ORT at t threads, effc at t threads), all on the same
real inputs (the zoo's eval split): warm-up, then median and min of ``--runs`` runs. The effc artifact is the
shared object from ``effc.codegen.cpu.compile_cpu`` (templates + fast-math, the product default), exported and
reloaded like ``effc.runtime`` does. Per-kernel times come from the Relax VM instrument hook (2 threads).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: effc need not be installed

from effc.eval.latency import measure  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
START, END = "<!-- cpu-codegen:start -->", "<!-- cpu-codegen:end -->"
MODELS = ["minilm-l6", "ppocr-det", "ppocr-rec", "ppocr-cls", "magika"]


# ----------------------------------------------------------------------------- workers (one process each)
def worker_compile(model_name: str, work: Path) -> dict:
    import onnx_ir as ir
    import tvm

    from effc import zoo
    from effc.codegen import build
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax

    entry = zoo.get(model_name)
    model = entry.load()
    ir.save(model, work / "model.onnx")
    feeds = entry.samples("eval", 1)[0]
    np.savez(work / "feeds.npz", **feeds)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": 2})
    start = time.perf_counter()
    mod = to_relax(model)
    executable, info = compile_cpu(mod, target, {"fast_math": True})
    build.export_library(executable, work / "model.so")
    info["total_compile_seconds"] = time.perf_counter() - start
    info["input_names"] = [v.name for v in model.graph.inputs]
    return info


def worker_ort(work: Path, threads: int, warmup: int, runs: int) -> dict:
    import onnxruntime as ort

    feeds = dict(np.load(work / "feeds.npz"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(work / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    np.savez(work / f"ort_out_{threads}.npz", *outs)
    return measure(lambda f: sess.run(None, f), feeds, warmup, runs)


def worker_effc(work: Path, threads: int, warmup: int, runs: int, profile: bool) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm

    from effc.codegen import build

    info = json.loads((work / "compile.json").read_text())
    feeds = dict(np.load(work / "feeds.npz"))
    vm = build.load_vm(work / "model.so", tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in info["input_names"]]
    outs = build.outputs_to_numpy(vm["main"](*args))
    np.savez(work / f"effc_out_{threads}.npz", *outs)
    result = measure(lambda _: vm["main"](*args), {}, warmup, runs)
    if profile:
        acc: dict[str, float] = {}
        calls: dict[str, int] = {}
        started: dict[str, float] = {}

        def instrument(func, name, before_run, ret_value, *rest):
            if before_run:
                started[name] = time.perf_counter()
            else:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - started[name]
                calls[name] = calls.get(name, 0) + 1
            return 0

        vm.set_instrument(instrument)
        reps = 5
        for _ in range(reps):
            vm["main"](*args)
        top = sorted(acc.items(), key=lambda kv: -kv[1])[:10]
        result["kernels"] = [
            {"name": k, "ms": v / reps * 1e3, "calls": calls[k] // reps, "template": info["kernels"].get(k, "-")}
            for k, v in top
        ]
        result["instrumented_total_ms"] = sum(acc.values()) / reps * 1e3
    return result


# ----------------------------------------------------------------------------- driver
def _spawn(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(work: Path, threads: int) -> float:
    ort = np.load(work / f"ort_out_{threads}.npz")
    eff = np.load(work / f"effc_out_{threads}.npz")
    return max(float(np.abs(ort[k] - eff[k]).max()) for k in ort.files)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(models: list[str], threads: list[int], warmup: int, runs: int) -> dict:
    results = {}
    for name in models:
        with tempfile.TemporaryDirectory(prefix=f"effc-bench-{name}-") as tmp:
            work = Path(tmp)
            info = _spawn("compile", name, str(work))
            (work / "compile.json").write_text(json.dumps(info))
            row = {"compile_s": info["total_compile_seconds"], "templates": info["kernels"], "by_threads": {}}
            for t in threads:
                ort = _spawn("ort", str(work), str(t), str(warmup), str(runs))
                eff = _spawn("effc", str(work), str(t), str(warmup), str(runs), "1" if t == max(threads) else "0")
                row["by_threads"][t] = {"ort": ort, "effc": eff, "max_abs_diff": _max_diff(work, t)}
                print(f"{name} t={t}: ort {ort['median_ms']:.2f} ms, effc {eff['median_ms']:.2f} ms "
                      f"(ratio {eff['median_ms'] / ort['median_ms']:.2f})", file=sys.stderr)
            results[name] = row
    return results


def to_markdown(results: dict, threads: list[int], runs: int) -> str:
    import tvm

    lines = [
        START,
        "## CPU codegen",
        "",
        f"Generated by `python benchmarks/cpu_vs_ort.py` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. "
        f"CPU: {_cpu_model()} (LLVM mcpu `{tvm.target.codegen.llvm_get_system_cpu()}`), {os.cpu_count()} "
        f"logical cores; threads as listed. Each number: its own process, warm-up then median (min) of {runs} runs "
        "on the same real input (zoo eval split). effc = templates + fast-math, no tuning. Ratio = effc / ORT "
        f"median (< 1: effc faster). Load average when measuring: {os.getloadavg()[0]:.1f} (the box is a shared VM: "
        "treat ±10 % as noise). Single GEMM kernels vs ORT in GFLOP/s: `python benchmarks/gemm_kernels.py`.",
        "",
        "| model | threads | ORT ms | effc ms | ratio | max abs diff | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        for t in threads:
            r = row["by_threads"][t]
            o, e = r["ort"], r["effc"]
            lines.append(
                f"| {name} | {t} | {o['median_ms']:.2f} ({o['min_ms']:.2f}) | {e['median_ms']:.2f} "
                f"({e['min_ms']:.2f}) | {e['median_ms'] / o['median_ms']:.2f} | {r['max_abs_diff']:.1e} | "
                f"{row['compile_s']:.1f} |"
            )
    lines += ["", f"### Top kernels of the effc artifact ({max(threads)} threads, VM instrument, ms per inference)", ""]
    for name, row in results.items():
        eff = row["by_threads"][max(threads)]["effc"]
        counts: dict[str, int] = {}
        for tmpl in row["templates"].values():
            counts[tmpl] = counts.get(tmpl, 0) + 1
        lines.append(f"**{name}** — templates: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines.append("")
        lines.append("| kernel | template | calls | ms |")
        lines.append("|---|---|---|---|")
        for k in eff.get("kernels", []):
            lines.append(f"| `{k['name']}` | {k['template']} | {k['calls']} | {k['ms']:.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_section(markdown: str, path: Path = DOC) -> None:
    """Replace (or append) the CPU codegen section of docs/BENCHMARKS.md, leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[: text.index(START)] + markdown + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + markdown + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        kind, *rest = argv[1:]
        if kind == "compile":
            out = worker_compile(rest[0], Path(rest[1]))
        elif kind == "ort":
            out = worker_ort(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            out = worker_effc(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4] == "1")
        print(json.dumps(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print the Markdown instead of updating the doc")
    parser.add_argument("--json", type=Path, help="also save the raw results here")
    args = parser.parse_args(argv)
    results = run(args.models, args.threads, args.warmup, args.runs)
    markdown = to_markdown(results, args.threads, args.runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.no_write:
        print(markdown)
    else:
        write_section(markdown)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
