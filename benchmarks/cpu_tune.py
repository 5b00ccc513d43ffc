"""Tuned CPU mode (``--tune N``) vs the default templates on one zoo model: tuning time, per-kernel and end-to-end.

    python benchmarks/cpu_tune.py                          # zoo:magika, 64 trials, 2 threads, fresh cache
    python benchmarks/cpu_tune.py --model ppocr-cls --trials 128 --rounds 10

Compiles the model twice with ``effc.compile`` (templates only, then ``tune=N`` into a fresh MetaSchedule cache
folder, so the tuning time is that of a first compile), then loads both artifacts in this process and times them
on the same real eval input, interleaved: ``--rounds`` times, ``--runs`` inferences of one then of the other.
Prints min and median per artifact, the tuning table (per tuned kernel: template ms vs tuned ms, which was kept)
and the load average, and writes ``benchmarks/results/cpu_tune.json``. Start it at normal priority when the
timing matters: compiles and tuning run at ``--nice`` (default 15), the timed part at the starting priority.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: effc need not be installed
RESULTS = ROOT / "benchmarks" / "results" / "cpu_tune.json"


def _time_runs(model, feed: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="magika", help="zoo model name (default magika)")
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trial budget N (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (default 8)")
    parser.add_argument("--runs", type=int, default=20, help="inferences per artifact per round (default 20)")
    parser.add_argument("--cache", type=Path, default=None, help="reuse this cache folder (default: a fresh one)")
    parser.add_argument("--nice", type=int, default=15, help="niceness while compiling/tuning, undone for timing")
    args = parser.parse_args()
    os.nice(args.nice)  # tuning eats every core: let other people's timings go first

    import numpy as np

    import effc
    import effc.runtime
    from effc import zoo

    work = Path(tempfile.mkdtemp(prefix="effc-tune-bench-"))
    os.environ["EFFC_CACHE_DIR"] = str(args.cache or work / "cache")
    name = f"zoo:{args.model}"
    common = {"threads": args.threads, "measure_latency": False, "force": True}
    start = time.perf_counter()
    effc.compile(name, out_dir=work / "templates", **common)
    template_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned = effc.compile(name, out_dir=work / "tuned", tune=args.trials, **common)
    tuned_s = time.perf_counter() - start
    tuning = tuned.manifest["target"]["info"]["tuning"]

    try:
        os.nice(-args.nice)  # timing at the priority the script was started with (lowering niceness needs root)
    except PermissionError:
        print(f"note: timing at niceness +{args.nice} (cannot lower it back without root)")
    models = {"templates": effc.runtime.load(work / "templates"), "tuned": effc.runtime.load(work / "tuned")}
    feed = zoo.get(args.model).samples("eval", 1)[0]
    outs = {k: m.run(feed) for k, m in models.items()}
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outs["templates"], outs["tuned"], strict=True))
    samples: dict[str, list[float]] = {k: [] for k in models}
    for model in models.values():
        _time_runs(model, feed, 5)  # warm-up
    for _ in range(args.rounds):
        for key, model in models.items():
            samples[key] += _time_runs(model, feed, args.runs)
    load = os.getloadavg()
    result = {
        "model": args.model, "trials": args.trials, "threads": args.threads, "load_avg": [round(x, 2) for x in load],
        "compile_s": {"templates": round(template_s, 1), "tuned": round(tuned_s, 1)},
        "tuning": tuning, "max_abs_diff_tuned_vs_templates": max_diff,
        "latency_ms": {k: {"min": round(min(v), 4), "median": round(statistics.median(v), 4), "runs": len(v)}
                       for k, v in samples.items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"{name}, {args.trials} trials, {args.threads} threads, load average {load[0]:.2f} "
          f"(compile: templates {template_s:.1f} s, tuned {tuned_s:.1f} s, tuning {tuning['seconds']:.1f} s, "
          f"{tuning['trials_run']} trials run, cost model {tuning['cost_model']})")
    print("| kernel | calls | template ms | tuned ms | kept |\n|---|---|---|---|---|")
    for kernel, row in tuning["kernels"].items():
        print(f"| {kernel} | {row['calls']} | {row['template_ms']} | {row['tuned_ms']} | {row['choice']} |")
    print("| artifact | min ms | median ms |\n|---|---|---|")
    for key, row in result["latency_ms"].items():
        print(f"| {key} | {row['min']:.4f} | {row['median']:.4f} |")
    print(f"max abs diff tuned vs templates: {max_diff:.2e}; results: {RESULTS}")


if __name__ == "__main__":
    main()
