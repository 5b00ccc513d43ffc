"""effc CPU codegen vs onnxruntime on every zoo model; writes the "CPU codegen" section of docs/BENCHMARKS.md.

    python benchmarks/cpu_vs_ort.py                                  # all models, threads 1 and 2 (~8 min)
    python benchmarks/cpu_vs_ort.py --models det,rec,magika --threads 2
    python benchmarks/cpu_vs_ort.py --models cls --rounds 4 --no-write

Per model: one process compiles the effc artifact (``effc.codegen.cpu.compile_cpu``: templates + fast-math, the
product default; exported and reloaded like ``effc.runtime`` does). Then, per thread count, two long-lived worker
processes hold an onnxruntime session and the effc VM on the same real input (the zoo's eval split) and take
turns, ``--rounds`` times: ORT runs ``--warmup`` + ``--runs`` inferences, then effc does, then ORT again, ...
(a short pause between turns lets the other side's spinning threads go idle). A shared VM whose neighbours
come and go shifts both sides alike within a round, so the per-round ratio (effc round median / ORT round median)
is robust; the table gives median and min over all samples, the ratio of the overall medians, and the range of
the per-round ratios. Per-kernel times come from the Relax VM instrument hook (at the largest thread count).

Results merge into ``benchmarks/results/cpu_vs_ort.json`` (a subset run replaces only its own rows), and the
section is regenerated from that file, each row stating when and under which load average it was measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: effc need not be installed

DOC = ROOT / "docs" / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results" / "cpu_vs_ort.json"
START, END = "<!-- cpu-codegen:start -->", "<!-- cpu-codegen:end -->"
MODELS = ["minilm-l6", "ppocr-det", "ppocr-rec", "ppocr-cls", "magika"]
ALIASES = {"minilm": "minilm-l6", "det": "ppocr-det", "rec": "ppocr-rec", "cls": "ppocr-cls"}
REPLY = "@@"  # worker replies start with this; anything else on stdout (library chatter) is skipped
PAUSE_S = 0.1  # between turns: onnxruntime's and TVM's pool threads spin a little after their last job


# ----------------------------------------------------------------------------- workers (one process each)
def worker_compile(model_name: str, work: Path) -> dict:
    """Save the model and one eval feed under ``work``, compile and export the effc artifact; returns its info."""
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


def _ort_runner(work: Path, threads: int):
    import onnxruntime as ort

    feeds = dict(np.load(work / "feeds.npz"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(work / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    np.savez(work / f"ort_out_{threads}.npz", *sess.run(None, feeds))
    return lambda: sess.run(None, feeds), None


def _effc_runner(work: Path, threads: int):
    os.environ["TVM_NUM_THREADS"] = str(threads)  # read when TVM's thread pool starts
    import tvm

    from effc.codegen import build

    info = json.loads((work / "compile.json").read_text())
    feeds = dict(np.load(work / "feeds.npz"))
    vm = build.load_vm(work / "model.so", tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in info["input_names"]]
    np.savez(work / f"effc_out_{threads}.npz", *build.outputs_to_numpy(vm["main"](*args)))
    return lambda: vm["main"](*args), lambda: _profile(vm, args, info["kernels"])


def _profile(vm, args, templates: dict[str, str], reps: int = 5) -> dict:
    """Per-kernel wall time (VM instrument hook), top 10, ms per inference."""
    from effc.codegen.build import kernel_profile

    kernels = kernel_profile(vm, args, reps)
    return {
        "kernels": [{**k, "template": templates.get(k["name"], "-")} for k in kernels[:10]],
        "instrumented_total_ms": sum(k["ms"] for k in kernels),
    }


def serve(kind: str, work: Path, threads: int) -> None:
    """Worker loop: ``run WARMUP N`` -> the N times in ms; ``profile`` -> kernel table; ``quit``."""
    run_once, profile = (_ort_runner if kind == "ort" else _effc_runner)(work, threads)
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            for _ in range(int(cmd[1])):
                run_once()
            times = []
            for _ in range(int(cmd[2])):
                start = time.perf_counter()
                run_once()
                times.append((time.perf_counter() - start) * 1e3)
            print(REPLY + json.dumps({"times_ms": times}), flush=True)
        elif cmd[0] == "profile":
            print(REPLY + json.dumps(profile() if profile else {}), flush=True)


# ----------------------------------------------------------------------------- driver
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Worker:
    """A long-lived ``serve`` process (stdin commands, ``@@``-prefixed JSON replies on stdout)."""

    def __init__(self, kind: str, work: Path, threads: int) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, str(work), str(threads)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
        )
        self.reply()

    def reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"{self.kind} worker exited with {self.proc.wait()} (run it with --serve to see why)")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def _compile(name: str, work: Path) -> dict:
    """Compile ``name`` in its own process (``--worker-compile``); returns the compile info."""
    proc = subprocess.run([sys.executable, __file__, "--worker-compile", name, str(work)], capture_output=True,
                          text=True, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diff(work: Path, threads: int) -> float:
    ort = np.load(work / f"ort_out_{threads}.npz")
    eff = np.load(work / f"effc_out_{threads}.npz")
    return max(float(np.abs(ort[k] - eff[k]).max()) for k in ort.files)


def summarize(ort_rounds: list[list[float]], effc_rounds: list[list[float]]) -> dict:
    """Median/min over all samples of each side, ratio of the medians, and the per-round ratios.

    Args:
        ort_rounds: per round, onnxruntime's times (ms).
        effc_rounds: per round, effc's times (ms), same number of rounds.

    Returns:
        ``{"ort": {...}, "effc": {...}, "ratio": float, "round_ratios": [float]}`` where each side has
        ``median_ms``, ``min_ms``, ``runs``.
    """
    def side(rounds):
        flat = [t for r in rounds for t in r]
        return {"median_ms": statistics.median(flat), "min_ms": min(flat), "runs": len(flat)}

    ort, eff = side(ort_rounds), side(effc_rounds)
    return {
        "ort": ort,
        "effc": eff,
        "ratio": eff["median_ms"] / ort["median_ms"],
        "round_ratios": [statistics.median(e) / statistics.median(o) for o, e in zip(ort_rounds, effc_rounds,
                                                                                    strict=True)],
    }


def measure_pair(work: Path, threads: int, rounds: int, warmup: int, runs: int, profile: bool) -> dict:
    """Alternate ORT and effc turns in two long-lived processes; see the module docstring."""
    ort, eff = Worker("ort", work, threads), Worker("effc", work, threads)
    load = [os.getloadavg()[0]]
    ort_rounds, effc_rounds = [], []
    try:
        for _ in range(rounds):
            ort_rounds.append(ort.ask(f"run {warmup} {runs}")["times_ms"])
            time.sleep(PAUSE_S)
            effc_rounds.append(eff.ask(f"run {warmup} {runs}")["times_ms"])
            time.sleep(PAUSE_S)
        load.append(os.getloadavg()[0])
        row = summarize(ort_rounds, effc_rounds)
        if profile:
            row["effc"].update(eff.ask("profile"))
    finally:
        ort.close()
        eff.close()
    row["load"] = max(load)
    row["max_abs_diff"] = _max_diff(work, threads)
    row["when"] = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}"
    return row


def run(models: list[str], threads: list[int], rounds: int, warmup: int, runs: int) -> dict:
    results = {}
    for name in models:
        with tempfile.TemporaryDirectory(prefix=f"effc-bench-{name}-") as tmp:
            work = Path(tmp)
            info = _compile(name, work)
            (work / "compile.json").write_text(json.dumps(info))
            row = {"compile_s": info["total_compile_seconds"], "templates": info["kernels"], "by_threads": {}}
            for t in threads:
                r = measure_pair(work, t, rounds, warmup, runs, profile=t == max(threads))
                row["by_threads"][str(t)] = r
                lo, hi = min(r["round_ratios"]), max(r["round_ratios"])
                print(f"{name} t={t}: ort {r['ort']['median_ms']:.2f} ms, effc {r['effc']['median_ms']:.2f} ms, "
                      f"ratio {r['ratio']:.2f} (rounds {lo:.2f}-{hi:.2f}, load {r['load']:.1f})", file=sys.stderr)
            results[name] = row
    return results


def merge(old: dict, new: dict) -> dict:
    """``old`` results with ``new``'s (model, threads) rows replacing theirs: a subset run keeps the other rows.

    Rows of the old format (no per-round ratios) are dropped. Compile time and templates come from the newest run.
    """
    merged = {}
    for name in MODELS + sorted((set(old) | set(new)) - set(MODELS)):
        if name not in old and name not in new:
            continue
        kept = {t: r for t, r in old.get(name, {}).get("by_threads", {}).items() if "round_ratios" in r}
        base = new.get(name, old.get(name))
        rows = {**kept, **new.get(name, {}).get("by_threads", {})}
        if rows:
            merged[name] = {**base, "by_threads": dict(sorted(rows.items()))}
    return merged


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_markdown(results: dict, rounds: int, runs: int) -> str:
    import tvm

    rows = [(name, t, r) for name, row in results.items() for t, r in sorted(row["by_threads"].items())
            if "round_ratios" in r]
    whens = sorted(r["when"] for _, _, r in rows)
    lines = [
        START,
        "## CPU codegen",
        "",
        f"Generated by `python benchmarks/cpu_vs_ort.py` ({whens[0]} – {whens[-1]} UTC). CPU: {_cpu_model()} "
        f"(LLVM mcpu `{tvm.target.codegen.llvm_get_system_cpu()}`), {os.cpu_count()} logical cores; threads as "
        f"listed. onnxruntime and effc each run in their own long-lived process, on the same real input (zoo eval "
        f"split), taking turns: {rounds} rounds of (ORT: warm-up + {runs} runs, then effc: warm-up + {runs} runs). "
        "ms = median (min) over all samples; ratio = effc median / ORT median (< 1: effc faster); rounds = range of "
        "the per-round ratios (each round's effc median / ORT median: both sides of a round see the same "
        "neighbours on this shared VM); load = 1-min load average while measuring. effc = templates + fast-math, "
        "no tuning. Single kernels vs ORT: `python benchmarks/conv_kernels.py`, `python benchmarks/gemm_kernels.py`.",
        "",
        "| model | threads | ORT ms | effc ms | ratio | rounds | max abs diff | compile s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t, r in rows:
        o, e, rr = r["ort"], r["effc"], r["round_ratios"]
        lines.append(
            f"| {name} | {t} | {o['median_ms']:.2f} ({o['min_ms']:.2f}) | {e['median_ms']:.2f} ({e['min_ms']:.2f}) "
            f"| {r['ratio']:.2f} | {min(rr):.2f}–{max(rr):.2f} | {r['max_abs_diff']:.1e} | "
            f"{results[name]['compile_s']:.1f} | {r['load']:.1f} |"
        )
    lines += ["", "### Top kernels of the effc artifact (largest thread count measured, VM instrument, ms per "
              "inference)", ""]
    for name, row in results.items():
        prof = [r for _, r in sorted(row["by_threads"].items()) if r.get("effc", {}).get("kernels")]
        counts: dict[str, int] = {}
        for tmpl in row["templates"].values():
            counts[tmpl] = counts.get(tmpl, 0) + 1
        lines += [f"**{name}** — templates: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), "",
                  "| kernel | template | calls | ms |", "|---|---|---|---|"]
        for k in prof[-1]["effc"]["kernels"] if prof else []:
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


def _names(values: list[str], known: list[str] | None = None) -> list[str]:
    """Comma- or space-separated names, with the short model aliases expanded."""
    out = [ALIASES.get(v, v) for item in values for v in item.split(",") if v]
    for v in out:
        if known is not None and v not in known:
            raise SystemExit(f"unknown model {v!r}: use {', '.join(known)} (or {', '.join(ALIASES)})")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker-compile":
        print(json.dumps(worker_compile(argv[1], Path(argv[2]))))
        return 0
    if argv and argv[0] == "--serve":
        serve(argv[1], Path(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="e.g. det,rec,magika (aliases: minilm det rec "
                        "cls)")
    parser.add_argument("--threads", nargs="+", default=["1", "2"], help="e.g. 2 or 1,2")
    parser.add_argument("--rounds", type=int, default=6, help="alternating ORT/effc turns per model and thread count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs at the start of every turn")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per turn")
    parser.add_argument("--no-write", action="store_true", help="print the Markdown; leave the doc and json alone")
    args = parser.parse_args(argv)
    models = _names(args.models, MODELS)
    threads = [int(t) for t in _names(args.threads)]
    results = run(models, threads, args.rounds, args.warmup, args.runs)
    if args.no_write:
        print(to_markdown(results, args.rounds, args.runs))
        return 0
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = merge(old, results)
    RESULTS.write_text(json.dumps(merged, indent=1))
    write_section(to_markdown(merged, args.rounds, args.runs))
    print(f"wrote {DOC} and {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
