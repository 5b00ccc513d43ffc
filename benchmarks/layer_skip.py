"""layer-skip: fidelity curves of static block removal on MiniLM-L6 and SmolLM2-135M, and compiled latency.

Run (from the repository root; results are merged into benchmarks/results/layer_skip.json part by part)::

    python benchmarks/layer_skip.py --part minilm        # cosine vs removed blocks, by ranking (~5 min shared)
    python benchmarks/layer_skip.py --part latency       # compiled MiniLM: dense, static, adaptive (skip rates)
    python benchmarks/layer_skip.py --part timing --artifact DIR...   # those artifacts, own process each
    flock /tmp/effc-smollm2.lock python benchmarks/layer_skip.py --part smollm2 --count 4   # perplexity vs layers
    flock /tmp/effc-smollm2.lock python benchmarks/layer_skip.py --part speculate --artifact DIR   # --speculate
    python benchmarks/layer_skip.py --part decode --artifact DENSE ADAPTIVE... --prompts 4 --tokens 32
    flock /tmp/effc-smollm2.lock python benchmarks/layer_skip.py --part adaptive-curve --windows 8   # ppl vs skip

``minilm``: for each candidate kind (FFN sub-blocks; whole layers with the post-norms kept or dropped) and each
ranking (``influence`` = ShortGPT block influence, ``sleb`` = iterative measured search, ``last`` = the naive
baseline), the pass runs once with the largest count on 16 calibration sentences; every prefix of its removal order
is then applied to a fresh copy (a count-k run removes exactly that prefix: the rankings are greedy) and scored by
the cosine of ``sentence_embedding`` against the original on the 20 held-out sentences.

``smollm2``: the prefill graph (128 tokens, 2048-slot cache) with whole layers removed by each ranking (4
calibration windows of 128 tokens; SLEB scores calibration perplexity), then the perplexity of the held-out prose
in 512-token windows under onnxruntime (the same windows as the compile report).

``speculate``: an artifact compiled with ``layer-skip(mode=draft)``: greedy generation of ``--tokens`` tokens after
each of ``--prompts`` chat prompts, plain vs self-speculative (``adaptive`` = ``--speculate``, or a fixed draft
length), each mode and thread count in its own process, rounds alternating; tokens/s, acceptance rate, and how many
prompts give exactly the plain greedy tokens.

``decode``: decoder artifacts (the first is the baseline, e.g. dense fp32; the others compiled with
``layer-skip(mode=adaptive,ratio=...)``): greedy generation after ``--prompts`` chat prompts, each artifact in its own
process per round, rounds alternating; decode ms/token (median and min of the steps), the fraction of FFN calls
skipped in those decode steps (the artifact's gate output), and the compile report's perplexity and skip rate on the
held-out prose.

``adaptive-curve``: SmolLM2's prefill graph with ``layer-skip(mode=adaptive)`` at each ``--ratios`` and
``--allocate`` (``--windows`` calibration windows of 128 tokens): held-out perplexity (512-token windows, onnxruntime;
the FFN output masked per token by the gate, which is token-by-token decoding) and the skip rate measured on it.

``latency``: ``effc compile zoo:minilm-l6`` with each variant (dense; 1 / 2 layers removed by SLEB; FFNs under
adaptive gates calibrated to skip 0 / 25 / 50% of sequences); the compile report's latency (effc and onnxruntime on
the original, alternating, in-process) on the 20 held-out sentences, plus the cosine and the FFN skip rate measured
on them from the artifact's model.onnx (the gate decisions tapped under onnxruntime).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effc import zoo  # noqa: E402
from effc.ir.calibration import Calibration  # noqa: E402
from effc.ir.reference import Reference  # noqa: E402
from effc.passes.layer_skip import LayerSkipPass, candidates, remove_blocks  # noqa: E402
from effc.passes.skip_scoring import row_cosine  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "layer_skip.json"
log = logging.getLogger("bench.layer_skip")


def machine() -> dict:
    """Date, CPU model, load and threads beside every number."""
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "load_1min": os.getloadavg()[0], "python": platform.python_version()}


def copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def apply_prefix(base: ir.Model, blocks: str, norm: str, names: list[str]) -> ir.Model:
    """A copy of ``base`` with the candidates named ``names`` removed."""
    model = copy(base)
    pool, _ = candidates(model, blocks)
    by_name = {c.name: c for c in pool}
    remove_blocks(model, [by_name[n] for n in names], norm)
    return model


def save(part: str, data: dict) -> None:
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results[part] = {"machine": machine(), **data}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))


def minilm() -> None:
    from effc.ir.canonicalize import canonicalize
    from effc.ir.model import load

    entry = zoo.get("minilm-l6")
    base = canonicalize(load(entry.path()), input_shapes=entry.input_shapes, constant_inputs=entry.constant_inputs)
    calib = Calibration(entry.samples("calibration", 16), entry.samples_description("calibration"))
    held_out = entry.samples("eval", 20)
    reference = [Reference(base).run(f)[1] for f in held_out]
    curves = []
    for blocks, norm, count in (("ffn", "keep", 4), ("layer", "keep", 3), ("layer", "drop", 3)):
        for rank in ("influence", "sleb", "last"):
            started = time.perf_counter()
            p = LayerSkipPass(blocks=blocks, norm=norm, rank=rank, count=count, output="sentence_embedding",
                              calibration=calib)
            p(copy(base))
            seconds = time.perf_counter() - started
            names = [r["name"] for r in p.stats["removed"]]
            cosines = []
            for k in range(1, len(names) + 1):
                model = apply_prefix(base, blocks, norm, names[:k])
                session = Reference(model)
                got = [session.run(f)[1] for f in held_out]
                cosines.append(round(float(np.mean([row_cosine(a, b) for a, b in zip(reference, got, strict=True)])),
                                     4))
            curves.append({"blocks": blocks, "norm": norm, "rank": rank, "removed": names, "held_out_cosine": cosines,
                           "calibration_cosine": [round(r["score_after"], 4) for r in p.stats["removed"]],
                           "pass_seconds": round(seconds, 1), "trials": p.stats["trials"]})
            log.info("%s", curves[-1])
            save("minilm", {"calibration": "16 sentences (calibration split)", "held_out": "20 sentences (eval)",
                            "curves": curves})


LATENCY_VARIANTS = (
    ("dense", ""),
    ("static: 1 layer removed", "layer-skip(rank=sleb,norm=drop,count=1)"),
    ("static: 2 layers removed", "layer-skip(rank=sleb,norm=drop,count=2)"),
    ("adaptive ratio=0 (gates, nothing skipped)", "layer-skip(mode=adaptive,blocks=ffn,ratio=0)"),
    ("adaptive ratio=0.25", "layer-skip(mode=adaptive,blocks=ffn,ratio=0.25)"),
    ("adaptive ratio=0.5", "layer-skip(mode=adaptive,blocks=ffn,ratio=0.5)"),
)


def held_out(out: Path, reference: list, feeds: list) -> dict:
    """Cosine of sentence_embedding vs the original and the measured FFN skip rate of an artifact's model.onnx."""
    from effc.ir.model import load
    from effc.ir.reference import with_taps

    model = load(out / "model.onnx")
    gates = sorted(n.outputs[0].name for n in model.graph if n.op_type == "Less" and n.name.endswith("_run"))
    session = Reference(with_taps(model, gates) if gates else model)
    cosines, runs = [], []
    for feed, ref in zip(feeds, reference, strict=True):
        result = session.run(feed)
        cosines.append(row_cosine(ref, result[1]))
        runs += [bool(v) for v in result[2:]]
    return {"cosine": round(float(np.mean(cosines)), 4),
            "ffn_skip_rate": round(1 - float(np.mean(runs)), 3) if runs else 0.0}


def latency(threads: int, repeat: int, only: str | None = None) -> None:
    import effc
    from effc.ir.model import load

    entry = zoo.get("minilm-l6")
    feeds = entry.samples("eval", 20)
    original = Reference(load(entry.path()))
    reference = [original.run(f)[1] for f in feeds]
    rows = []
    for label, passes in LATENCY_VARIANTS:
        if only and not any(word in label for word in only.split(",")):
            continue
        out = Path("/tmp/effc-bench-layer-skip") / label.split(":")[0].replace(" ", "_").replace("=", "")
        out = out.with_name(f"{out.name}-{len(rows)}")
        result = effc.compile("zoo:minilm-l6", passes=passes, out_dir=out, force=True, threads=threads,
                              latency_repeat=repeat, eval_samples=20, calibration_samples=16)
        lat = result.report["latency"]
        pick = lambda d: {k: d[k] for k in ("median_ms", "min_ms")}  # noqa: E731
        rows.append({"variant": label, "passes": passes, "effc_ms": pick(lat["effc"]),
                     "ort_original_ms": pick(lat["ort"]),
                     "params_bytes": result.report["cost"].get("params_bytes_after"),
                     **held_out(out, reference, feeds)})
        log.info("%s", rows[-1])
        save(f"latency-{only}" if only else "latency",
             {"threads": threads, "repeat": repeat, "feeds": "the 20 held-out sentences", "rows": rows})


def _time_worker(artifact: str, threads: int, runs: int) -> None:
    """One round in this process: ``runs`` passes over the 20 held-out sentences; prints ms per sentence."""
    import effc.runtime

    feeds = zoo.get("minilm-l6").samples("eval", 20)
    model = effc.runtime.load(artifact)
    model.run(feeds[0])
    times = []
    for _ in range(runs):
        for feed in feeds:
            started = time.perf_counter()
            model.run(feed)
            times.append((time.perf_counter() - started) * 1e3)
    print(json.dumps(times))


def timing(artifacts: list[str], threads: int, rounds: int, runs: int) -> None:
    """Each artifact in its own process, rounds alternating; median and min ms per sentence."""
    samples: dict[str, list[float]] = {a: [] for a in artifacts}
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    for _ in range(rounds):
        for artifact in artifacts:
            out = subprocess.run([sys.executable, __file__, "--part", "time-worker", "--artifact", artifact,
                                  "--runs", str(runs)], capture_output=True, text=True, env=env, check=True)
            samples[artifact] += json.loads(out.stdout.strip().splitlines()[-1])
    rows = [{"artifact": a, "median_ms": round(float(np.median(t)), 2), "min_ms": round(float(np.min(t)), 2),
             "n": len(t)} for a, t in samples.items()]
    log.info("%s", rows)
    save("timing", {"threads": threads, "rounds": rounds, "method": "own process per artifact and round, "
                    "rounds alternating; every held-out sentence timed", "rows": rows})


def _smollm2_setup(windows: int) -> tuple[ir.Model, dict, Calibration, list[int]]:
    """SmolLM2's prefill graph at its chunk, its decoder facts, ``windows`` calibration windows, held-out token ids."""
    from effc.decoder import text
    from effc.decoder.compile import calibration_feeds
    from effc.decoder.smollm2 import load_tokenizer
    from effc.ir.decoder import decoder_info, specialize
    from effc.ir.model import load

    generic = load(zoo.get("smollm2-135m").path())
    info = decoder_info(generic)
    tokenizer = load_tokenizer()
    base = specialize(generic, info["chunk"])
    del generic
    calib = Calibration(calibration_feeds(info, text.calibration_windows(tokenizer, windows, info["chunk"]),
                                          info["chunk"]), text.CALIBRATION_DESCRIPTION)
    return base, info, calib, list(tokenizer(text.eval_text())["input_ids"])


def smollm2(counts: int, windows: int, ranks: list[str], prefixes: list[int]) -> None:
    from effc.runtime.decoder import DecoderSession, OrtBackend, perplexity

    base, info, calib, eval_ids = _smollm2_setup(windows)

    def held_out_ppl(model: ir.Model) -> float:
        from effc.ir.decoder import decoder_info as facts

        session = DecoderSession(OrtBackend({"prefill": model}, 2), {**facts(model), "chunk": info["chunk"]})
        return round(perplexity(session, eval_ids, 512)["perplexity"], 3)

    curves = [{"rank": "none", "removed": [], "held_out_ppl_by_layers_removed": {0: held_out_ppl(base)}}]
    save("smollm2", {"curves": curves})
    for rank in ranks:
        started = time.perf_counter()
        p = LayerSkipPass(blocks="layer", rank=rank, count=counts, samples=windows, calibration=calib)
        p(copy(base))
        seconds = time.perf_counter() - started
        names = [r["name"] for r in p.stats["removed"]]
        ppl = {}
        for k in [k for k in prefixes if k <= len(names)]:
            ppl[k] = held_out_ppl(apply_prefix(base, "layer", "keep", names[:k]))
            gc.collect()
        curves.append({"rank": rank, "removed": names, "held_out_ppl_by_layers_removed": ppl,
                       "calibration_ppl_before": p.stats["score_before"],
                       "calibration_ppl": [round(r["score_after"], 3) for r in p.stats["removed"]],
                       "pass_seconds": round(seconds, 1), "trials": p.stats["trials"]})
        log.info("%s", curves[-1])
        save("smollm2", {"calibration": f"{windows} windows of {info['chunk']} tokens", "window": 512,
                         "curves": curves})
        gc.collect()


def adaptive_curve(ratios: list[float], windows: int, allocations: list[str]) -> None:
    """SmolLM2 with ``layer-skip(mode=adaptive)`` at each ratio: held-out perplexity and FFN skip rate.

    The rewritten prefill graph (FFN output masked per token by the gate, the numbers of token-by-token decoding)
    under onnxruntime on the held-out prose in 512-token windows, as the compile report measures it.
    """
    from effc.decoder.compile import PPL_WINDOW
    from effc.ir.decoder import decoder_info
    from effc.runtime.decoder import DecoderSession, OrtBackend, perplexity

    base, info, calib, eval_ids = _smollm2_setup(windows)

    def held_out(model: ir.Model) -> dict:
        session = DecoderSession(OrtBackend({"prefill": model}, 2), {**decoder_info(model), "chunk": info["chunk"]})
        ppl = perplexity(session, eval_ids, PPL_WINDOW)["perplexity"]
        skip = session.ffn_skip.summary()["prefill"] if session.ffn_skip is not None else None
        return {"perplexity": ppl, "skip_rate": skip["skip_rate"] if skip else 0.0,
                "skip_rate_per_ffn": skip["skip_rate_per_ffn"] if skip else None}

    rows = [{"ratio": 0.0, "allocate": "dense", **held_out(base)}]
    log.info("%s", rows[-1])
    for allocate in allocations:
        for ratio in ratios:
            model = copy(base)
            started = time.perf_counter()
            p = LayerSkipPass(mode="adaptive", ratio=ratio, allocate=allocate, samples=windows, calibration=calib)
            p(model)
            rows.append({"ratio": ratio, "allocate": allocate,
                         "calibration_skip_rate": p.stats["calibration_skip_rate"],
                         "pass_seconds": round(time.perf_counter() - started, 1), **held_out(model)})
            rows[-1]["perplexity_change_pct"] = round((rows[-1]["perplexity"] / rows[0]["perplexity"] - 1) * 100, 2)
            log.info("%s", rows[-1])
            save("smollm2-adaptive", {"calibration": f"{windows} windows of {info['chunk']} tokens",
                                      "window": PPL_WINDOW, "rows": rows})
            del model, p
            gc.collect()


#: Chat prompts of the self-speculative benchmark (SmolLM2-135M-Instruct, one user turn each).
PROMPTS = (
    "What is the capital of France?", "Write a short poem about the sea.", "Explain photosynthesis in simple words.",
    "List three uses of a paperclip.", "How do I boil an egg?", "What is 17 times 3?",
    "Tell me a fun fact about octopuses.", "Summarize the story of Cinderella.", "Why is the sky blue?",
    "Give me a tip for learning a new language.", "What does a compiler do?", "Describe a rainy day in a city.",
    "Name the planets of the solar system.", "How does a bicycle stay upright?", "Write a haiku about autumn.",
    "What is the difference between weather and climate?", "Suggest a name for a pet turtle.",
    "How many legs does a spider have?", "What should I pack for a weekend hike?",
    "Translate 'good morning' to Spanish.")


def _speculate_worker(artifact: str, threads: int, mode: str, prompts: int, tokens: int) -> None:
    """Greedy generation of ``tokens`` tokens for the first ``prompts`` prompts in this process; prints one JSON line.

    ``mode``: ``plain``, ``adaptive`` (speculate=True) or a fixed draft length. Decode time = generate's wall time
    minus its prefill (the same measure for every mode).
    """
    import effc.runtime
    from effc.codegen.build import set_runtime_threads

    set_runtime_threads(threads)
    model = effc.runtime.load(artifact)
    session = model.decoder()
    session.backend._runner.threads = threads
    speculate = {"plain": False, "adaptive": True}.get(mode) if mode in ("plain", "adaptive") else int(mode)
    session.generate("Hello", max_new_tokens=4, chat=True, speculate=speculate)  # warm-up
    rows = []
    for prompt in PROMPTS[:prompts]:
        started = time.perf_counter()
        out = session.generate(prompt, max_new_tokens=tokens, chat=True, speculate=speculate)
        wall = (time.perf_counter() - started) * 1e3 - out.prefill_ms
        rows.append({"tokens": out.tokens, "decode_ms": wall, "speculation": out.speculation})
    print(json.dumps(rows))


def speculate(artifact: str, threads: list[int], modes: list[str], rounds: int, prompts: int, tokens: int) -> None:
    """Plain vs self-speculative greedy decoding of one artifact: tokens/s, acceptance, identical tokens."""
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    rows = []
    for t in threads:
        env = {**os.environ, "TVM_NUM_THREADS": str(t)}
        runs: dict[str, list] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--part", "speculate-worker", "--artifact", artifact,
                                      "--threads", str(t), "--mode", mode, "--prompts", str(prompts), "--tokens",
                                      str(tokens)], capture_output=True, text=True, env=env, check=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                log.info("threads %d %s: load %.1f", t, mode, os.getloadavg()[0])
        plain = [r["tokens"] for r in runs[modes[0]][0]]
        for mode, rounds_ in runs.items():
            rates = [sum(len(r["tokens"]) - 1 for r in rnd) / sum(r["decode_ms"] for r in rnd) * 1e3 for rnd in rounds_]
            spec = [r["speculation"] for rnd in rounds_ for r in rnd if r["speculation"]]
            drafted, accepted = sum(s["drafted"] for s in spec), sum(s["accepted"] for s in spec)
            rows.append({"threads": t, "mode": mode, "tokens_per_s_median": round(float(np.median(rates)), 2),
                         "tokens_per_s_max": round(float(np.max(rates)), 2),
                         "identical_to_plain": sum(r["tokens"] == p for r, p in zip(rounds_[0], plain, strict=True)),
                         "prompts": prompts, "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                         "verify_calls": sum(s["verify_calls"] for s in spec),
                         "plain_steps": sum(s["plain_steps"] for s in spec)})
            log.info("%s", rows[-1])
    part = "speculate-threads-" + "-".join(map(str, threads))
    save(part, {"artifact": artifact, "draft": manifest["decoder"].get("draft"), "tokens": tokens,
                "rounds": rounds, "method": "own process per mode and round, rounds alternating; tokens/s = "
                "generated tokens after the first / decode wall time (generate minus prefill), chat prompts",
                "rows": rows})


def _decode_worker(artifact: str, threads: int, prompts: int, tokens: int) -> None:
    """Greedy generation of ``tokens`` tokens after each of ``prompts`` chat prompts; prints one JSON line per
    prompt list: decode ms per token (generate's median step) and the FFN calls skipped in decode."""
    import effc.runtime
    from effc.codegen.build import set_runtime_threads

    set_runtime_threads(threads)
    session = effc.runtime.load(artifact).decoder()
    session.backend._runner.threads = threads
    session.generate("Hello", max_new_tokens=4, chat=True)  # warm-up
    rows = []
    for prompt in PROMPTS[:prompts]:
        out = session.generate(prompt, max_new_tokens=tokens, chat=True)
        rows.append({"decode_ms": out.decode_ms_per_token, "tokens": len(out.tokens),
                     "ffn_skip": (out.ffn_skip or {}).get("decode")})
    print(json.dumps(rows))


def decode(artifacts: list[str], threads: int, rounds: int, prompts: int, tokens: int) -> None:
    """Decode ms/token of decoder artifacts (dense vs ``layer-skip(mode=adaptive)``), own process each, rounds
    alternating; with each artifact's compile-report perplexity and the FFN skip rate measured in decode."""
    runs: dict[str, list] = {a: [] for a in artifacts}
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    for _ in range(rounds):
        for artifact in artifacts:
            out = subprocess.run([sys.executable, __file__, "--part", "decode-worker", "--artifact", artifact,
                                  "--threads", str(threads), "--prompts", str(prompts), "--tokens", str(tokens)],
                                 capture_output=True, text=True, env=env, check=True)
            runs[artifact] += json.loads(out.stdout.strip().splitlines()[-1])
            log.info("%s: load %.1f", artifact, os.getloadavg()[0])
    rows = []
    for artifact, got in runs.items():
        manifest = json.loads((Path(artifact) / "manifest.json").read_text())
        report = manifest["metrics"]["decoder"]
        skips = [r["ffn_skip"] for r in got if r["ffn_skip"]]
        calls = sum(s["ffn_calls"] for s in skips)
        step = [r["decode_ms"] for r in got if r["decode_ms"]]
        rows.append({"artifact": artifact, "pipeline": manifest["pipeline"],
                     "decode_ms_median": round(float(np.median(step)), 2),
                     "decode_ms_min": round(float(np.min(step)), 2),
                     "decode_skip_rate": round(sum(s["skipped"] for s in skips) / calls, 4) if calls else None,
                     "eval_skip_rate": ((report.get("ffn_skip") or {}).get("eval_text") or {}).get("skip_rate"),
                     "perplexity": report["perplexity"]["compiled"]["perplexity"],
                     "perplexity_original": report["perplexity"]["original_onnxruntime"]["perplexity"]})
        log.info("%s", rows[-1])
    base = rows[0]["decode_ms_median"]
    for row in rows:
        row["speedup_vs_first"] = round(base / row["decode_ms_median"], 3)
    save(f"decode-threads-{threads}", {"threads": threads, "rounds": rounds, "prompts": prompts, "tokens": tokens,
                                       "method": "own process per artifact and round, rounds alternating; decode "
                                       "ms/token = median step of greedy generate after chat prompts", "rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=(
        "minilm", "latency", "smollm2", "timing", "time-worker", "speculate", "speculate-worker", "decode",
        "decode-worker", "adaptive-curve"))
    parser.add_argument("--modes", default="plain,adaptive,2", help="speculate: plain, adaptive, or draft lengths")
    parser.add_argument("--thread-list", default="1,2", help="speculate: thread counts")
    parser.add_argument("--prompts", type=int, default=20, help="speculate: chat prompts (of 20)")
    parser.add_argument("--tokens", type=int, default=32, help="speculate: new tokens per prompt")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", nargs="*", default=[], help="timing: compiled MiniLM artifacts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timing: passes over the 20 sentences per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--count", type=int, default=6, help="smollm2: layers removed at most")
    parser.add_argument("--windows", type=int, default=4, help="smollm2: calibration windows")
    parser.add_argument("--ranks", default="influence,last", help="smollm2: rankings (sleb is slow: 30+29+... trials)")
    parser.add_argument("--prefixes", default="2,4", help="smollm2: layer counts scored on the held-out prose")
    parser.add_argument("--ratios", default="0.1,0.25,0.4", help="adaptive-curve: target skip rates")
    parser.add_argument("--allocate", default="uniform,global", help="adaptive-curve: threshold allocations")
    parser.add_argument("--only", help="latency: comma-separated words selecting variants (e.g. dense,adaptive)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.part == "adaptive-curve":
        adaptive_curve([float(r) for r in args.ratios.split(",")], args.windows, args.allocate.split(","))
    elif args.part == "decode-worker":
        _decode_worker(args.artifact[0], args.threads, args.prompts, args.tokens)
    elif args.part == "decode":
        decode(args.artifact, args.threads, args.rounds, args.prompts, args.tokens)
    elif args.part == "speculate-worker":
        _speculate_worker(args.artifact[0], args.threads, args.mode, args.prompts, args.tokens)
    elif args.part == "speculate":
        speculate(args.artifact[0], [int(t) for t in args.thread_list.split(",")], args.modes.split(","), args.rounds,
                  args.prompts, args.tokens)
    elif args.part == "time-worker":
        _time_worker(args.artifact[0], args.threads, args.runs)
    elif args.part == "timing":
        timing(args.artifact, args.threads, args.rounds, args.runs)
    elif args.part == "minilm":
        minilm()
    elif args.part == "latency":
        latency(args.threads, args.repeat, args.only)
    else:
        smollm2(args.count, args.windows, args.ranks.split(","), [int(k) for k in args.prefixes.split(",")])


if __name__ == "__main__":
    main()
