"""``moe`` pass: MiniLM-L6 fidelity curve and the MoE FFN kernel's time against its active fraction.

Run (from the repository root; results go to benchmarks/results/moe_<mode>.json)::

    python benchmarks/moe.py minilm [--calib 64] [--configs 8:2,8:4,8:6] [--routers trained,analytic] [--recover 0]
    python benchmarks/moe.py kernel [--shape minilm|smollm2] [--rows 1] [--experts 8] [--threads 1]
    flock /tmp/effc-smollm2.lock python benchmarks/moe.py smollm2 [--calib 64] [--configs 8:6,8:4,8:4+norefit]
        [--sequential G]

``smollm2``: each config rewrites the 30 FFNs of ``zoo:smollm2-135m``'s prefill graph (calibration: ``calib``
windows of 128 tokens, every 5th held out for the routers and the refit's ridge) and scores perplexity under
onnxruntime on the held-out prose (512-token windows, as the compile report) against the dense graph.

``minilm``: each config ``E:k`` (``E`` experts, ``k`` chosen per token; ``E:k:S`` adds a shared fraction ``S``)
rewrites a fresh copy of ``zoo:minilm-l6``'s 6 FFNs with ``moe(experts=E,top_k=k,router=R,...)`` from the first
``calib`` calibration sentences and reports the mean cosine of ``sentence_embedding`` against the dense model on
the 20 held-out ("eval") sentences, the fraction of FFN MACs per token, the pass's seconds, and each layer's
held-out FFN error of both routers.

``kernel``: one FFN layer shape (MiniLM: K=384, H=1536, GELU; SmolLM2-135M: K=576, H=1536, SwiGLU) compiled
three ways on this CPU — TVM's dense FFN through effc's CPU pipeline (the same MatMul schedules a dense model gets)
and the ``effc.MoEFFN`` kernel at each ``top_k`` — timed in alternating rounds (median and min over rounds of
the mean of ``number`` calls, ms per FFN layer). ``depth`` FFNs are chained so that their weights exceed the
last-level cache, as a decoder's do. Thread count, CPU and load are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.moe")
SHAPES = {"minilm": (384, 1536, "gelu", False), "smollm2": (576, 1536, "silu", True)}


def _machine(threads: int | None = None) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    return {"cpu": cpu, "threads": threads, "load_average": os.getloadavg(),
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def _save(name: str, row: dict) -> None:
    path = RESULTS / f"moe_{name}.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    results["rows"].append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=float))


def minilm(args) -> None:
    """The fidelity curve (module docstring)."""
    from benchmarks.nm_fidelity import embeddings, mean_cosine
    from effc import zoo
    from effc.ir.calibration import Calibration
    from effc.passes.moe import MoEFFNPass

    entry = zoo.get("minilm-l6")
    base = entry.load()
    held_out = entry.samples("eval", args.held_out)
    reference = embeddings(base, held_out)
    cal = Calibration(entry.samples("calibration", args.calib), source=entry.samples_description("calibration"))
    for config in args.configs.split(","):
        e, k, *shared = config.split(":")
        for router in args.routers.split(","):
            model = ir.from_proto(ir.to_proto(base))
            p = MoEFFNPass(experts=int(e), top_k=int(k), shared=float(shared[0]) if shared else 0.0, router=router,
                           recover=args.recover, fill=not args.no_fill, refit=not args.no_refit,
                           zero_experts=tuple(z for z in args.zero.split(",") if z), zero_share=args.zero_share,
                           calibration=cal)
            start = time.perf_counter()
            p(model)
            row = {"pipeline": str(p), "router": router, "calibration_sentences": len(cal),
                   "seconds": round(time.perf_counter() - start, 1),
                   "ffn_mac_fraction": p.stats["ffn_mac_fraction"],
                   "active_fraction_measured": float(np.mean([r["active_fraction_measured"]
                                                              for r in p.stats["layers"]])),
                   "cosine": mean_cosine(model, held_out, reference), "held_out": len(held_out),
                   "layers": [{k: r[k] for k in ("error_trained", "error_analytic", "error_final", "refit", "recovery")}
                              for r in p.stats["layers"]], **_machine()}
            log.info("%s: cosine %.4f at %.0f%% of FFN MACs (%.0f%% of neurons measured; %.0f s)", row["pipeline"],
                     row["cosine"], 100 * row["ffn_mac_fraction"], 100 * row["active_fraction_measured"],
                     row["seconds"])
            _save("minilm", row)


def smollm2(args) -> None:
    """SmolLM2-135M perplexity against the active fraction (module docstring); run under the SmolLM2 lock."""
    from effc import zoo
    from effc.decoder.compile import PPL_WINDOW, calibration_feeds
    from effc.decoder.text import calibration_windows, eval_text
    from effc.ir.calibration import Calibration
    from effc.ir.decoder import decoder_info, specialize
    from effc.ir.model import load
    from effc.passes.moe import MoEFFNPass
    from effc.runtime.decoder import DecoderSession, OrtBackend, perplexity

    entry = zoo.get("smollm2-135m")
    generic = load(entry.decoder_graph(2048))
    info = decoder_info(generic)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(entry.tokenizer_dir()))
    eval_ids = list(tokenizer(eval_text())["input_ids"])
    windows = calibration_windows(tokenizer, args.calib, info["chunk"])
    cal = Calibration(calibration_feeds(info, windows, info["chunk"]), source="decoder calibration windows")
    prefill = specialize(generic, info["chunk"])
    del generic
    taps, tap = {}, cal.tap

    def tap_once(model, names, **kw):  # every config rewrites the same dense graph: tap it once
        if any(n.op_type == "MoEFFN" for n in model.graph):  # moe(sequential=G): a partly rewritten graph
            return tap(model, names, **kw)
        key = tuple(names)
        if key not in taps:
            taps[key] = tap(model, names, **kw)
        return taps[key]

    cal.tap = tap_once

    def ppl(model) -> float:
        session = DecoderSession(OrtBackend({"prefill": model}, args.threads), info)
        return perplexity(session, eval_ids[:args.eval_tokens], PPL_WINDOW)["perplexity"]

    start = time.perf_counter()
    dense = ppl(prefill)
    log.info("dense perplexity %.4f (%.0f s)", dense, time.perf_counter() - start)
    runs = [(config, router, refit) for config in args.configs.split(",") for router in args.routers.split(",")
            for refit in ((True, False) if args.both_refit else (not args.no_refit,))]
    for config, router, refit in runs:
        config, *flags = config.split("+")  # E:k[:S][+analytic][+norefit][+zero]: per-config overrides
        router, refit = ("analytic" if "analytic" in flags else router), refit and "norefit" not in flags
        zero = tuple(z for z in args.zero.split(",") if z) if "zero" in flags or not args.zero_flagged else ()
        e, k, *shared = config.split(":")
        model = ir.from_proto(ir.to_proto(prefill))
        p = MoEFFNPass(experts=int(e), top_k=int(k), shared=float(shared[0]) if shared else 0.0, router=router,
                       refit=refit, recover=args.recover, layers=args.layers, zero_experts=zero,
                       sequential=args.sequential,
                       zero_share=args.zero_share, calibration=cal)
        start = time.perf_counter()
        p(model)
        seconds = time.perf_counter() - start
        value = ppl(model)
        layers = p.stats["layers"]
        row = {"pipeline": str(p), "router": router, "calibration_windows": len(cal),
               "calibration_tokens": p.stats["calibration_tokens"], "pass_seconds": round(seconds, 1),
               "recovery_seconds": p.stats["recovery_seconds"], "calibration_taps": p.stats["calibration_taps"],
               "tap_seconds": p.stats["tap_seconds"],
               "ffn_mac_fraction": p.stats["ffn_mac_fraction"],
               "ffn_weight_bytes_fraction": p.stats["ffn_weight_bytes_fraction"],
               "perplexity_dense": dense, "perplexity": value, "change_pct": round((value / dense - 1) * 100, 2),
               "eval_tokens": min(len(eval_ids), args.eval_tokens),
               "error_before": float(np.mean([r[f"error_{router}"] for r in layers])),
               "error_trained_router": float(np.mean([r["error_trained"] for r in layers])),
               "error_analytic_router": float(np.mean([r["error_analytic"] for r in layers])),
               "layers_trained_better": int(sum(r["error_trained"] < r["error_analytic"] for r in layers)),
               "error_final": float(np.mean([r["error_final"] for r in layers])),
               "active_fraction_measured": float(np.mean([r["active_fraction_measured"] for r in layers])),
               **_machine(args.threads)}
        log.info("%s: perplexity %.3f (%+.1f%%) at %.0f%% of FFN MACs; FFN error %.3f -> %.3f; pass %.0f s",
                 row["pipeline"], value, row["change_pct"], 100 * row["ffn_mac_fraction"], row["error_before"],
                 row["error_final"], seconds)
        _save("smollm2", row)
        del model


def _ffn_model(k: int, h: int, activation: str, gated: bool, rows: int, depth: int, seed: int = 0) -> ir.Model:
    """``depth`` dense FFNs with residual adds on ``(1, rows, K)`` in ONNX (the graph the pass rewrites), random
    weights; a depth whose weights exceed the last-level cache makes every call read them from memory, as decode
    does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for d in range(depth):
        arr = {"w1": rng.standard_normal((k, h)) / np.sqrt(k), "b1": rng.standard_normal(h) * 0.1,
               "w2": rng.standard_normal((h, k)) / np.sqrt(h), "b2": rng.standard_normal(k) * 0.1}
        n = lambda op, ins, out, i=d, x=x: helper.make_node(  # noqa: E731
            op, [f"{v}{i}" if v != x else v for v in ins], [f"{out}{i}"], name=f"{op}_{out}{i}")
        nodes += [n("MatMul", [x, "w1"], "h"), n("Add", ["h", "b1"], "hb")]
        if activation == "gelu":
            nodes.append(n("Gelu", ["hb"], "a"))
        else:
            nodes += [n("Sigmoid", ["hb"], "s"), n("Mul", ["hb", "s"], "a0" if gated else "a")]
            if gated:
                arr["w3"] = rng.standard_normal((k, h)) / np.sqrt(k)
                nodes += [n("MatMul", [x, "w3"], "u"), n("Mul", ["a0", "u"], "a")]
        nodes += [n("MatMul", ["a", "w2"], "o"), n("Add", ["o", "b2"], "f"), n("Add", ["f", x], "y")]
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{name}{d}") for name, v in arr.items()]
        x = f"y{d}"
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, rows, k])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def kernel(args) -> None:
    """FFN time: dense vs MoE at each top_k (module docstring)."""
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    import tvm
    from tvm import relax

    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.passes.moe import MoEFFNPass

    k, h, activation, gated = SHAPES[args.shape]
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": args.threads})
    x = np.random.default_rng(1).standard_normal((1, args.rows, k)).astype(np.float32)
    runs = {}
    ks = [int(v) for v in args.ks.split(",")] if args.ks else list(range(1, args.experts + 1))
    zero = tuple(z for z in args.zero.split(",") if z)
    variants = [(0, ())] + [(top_k, ()) for top_k in ks] + [(top_k, zero) for top_k in ks if zero]
    for top_k, zk in variants:
        model = _ffn_model(k, h, activation, gated, args.rows, args.depth)
        if top_k:  # no calibration: zero-computation experts get a logit below every routed one (never chosen)
            MoEFFNPass(experts=args.experts, top_k=top_k, router="analytic", zero_experts=zk)(model)
        ex, _ = compile_cpu(to_relax(model), target, {})
        vm = relax.VirtualMachine(ex, tvm.cpu())
        inp = tvm.runtime.tensor(x)
        vm["main"](inp)
        name = "dense" if not top_k else f"k={top_k}" + (f"+zero({','.join(zk)})" if zk else "")
        runs[name] = (vm, inp, top_k / args.experts if top_k else 1.0)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):  # alternating rounds: every variant sees the same load
        for name, (vm, inp, _) in runs.items():
            timer = vm.time_evaluator("main", tvm.cpu(), number=args.number, repeat=1)
            times[name].append(timer(inp).mean * 1e3)
    table = [{"variant": name, "active_fraction": runs[name][2], "median_ms": statistics.median(t) / args.depth,
              "min_ms": min(t) / args.depth} for name, t in times.items()]  # per FFN layer
    for row in table:
        log.info("%-6s active %.3f: median %.4f ms, min %.4f ms", row["variant"], row["active_fraction"],
                 row["median_ms"], row["min_ms"])
    _save("kernel", {"shape": args.shape, "K": k, "H": h, "activation": activation, "gated": gated,
                     "rows": args.rows, "depth": args.depth, "experts": args.experts, "rounds": args.rounds,
                     "number": args.number,
                     "table": table, **_machine(args.threads), "target": str(target)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("minilm")
    m.add_argument("--calib", type=int, default=64)
    m.add_argument("--held-out", type=int, default=20)
    m.add_argument("--configs", default="8:2,8:4,8:6")
    m.add_argument("--routers", default="trained,analytic")
    m.add_argument("--recover", type=int, default=0, help="Adam steps of local distillation per FFN")
    m.add_argument("--no-fill", action="store_true")
    m.add_argument("--no-refit", action="store_true", help="keep the carved down projection (no least squares)")
    m.add_argument("--zero", default="", help="zero-computation experts, e.g. zero,const")
    m.add_argument("--zero-share", type=float, default=0.25)
    sm = sub.add_parser("smollm2")
    sm.add_argument("--calib", type=int, default=64, help="calibration windows of 128 tokens (at most 97)")
    sm.add_argument("--configs", default="8:6,8:4")
    sm.add_argument("--routers", default="trained,analytic")
    sm.add_argument("--no-refit", action="store_true")
    sm.add_argument("--both-refit", action="store_true", help="each config with and without the refit")
    sm.add_argument("--recover", type=int, default=0)
    sm.add_argument("--layers", default="all")
    sm.add_argument("--sequential", type=int, default=1, help="moe(sequential=G): FFN groups calibrated in turn")
    sm.add_argument("--zero", default="", help="zero-computation experts, e.g. zero,const")
    sm.add_argument("--zero-share", type=float, default=0.25)
    sm.add_argument("--zero-flagged", action="store_true", help="--zero only for configs marked +zero")
    sm.add_argument("--threads", type=int, default=2)
    sm.add_argument("--eval-tokens", type=int, default=1536, help="held-out tokens scored (512-token windows)")
    kk = sub.add_parser("kernel")
    kk.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    kk.add_argument("--rows", type=int, default=1, help="tokens per call (1 = decode)")
    kk.add_argument("--experts", type=int, default=8)
    kk.add_argument("--threads", type=int, default=1)
    kk.add_argument("--depth", type=int, default=8, help="FFN layers chained (8 SmolLM2 FFNs: 85 MB of weights)")
    kk.add_argument("--rounds", type=int, default=7)
    kk.add_argument("--ks", default="", help="top_k values (default 1..experts)")
    kk.add_argument("--zero", default="", help="also each k with these zero-computation experts (grouped kernel)")
    kk.add_argument("--number", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("onnxscript", "onnx_ir", "effc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    {"minilm": minilm, "kernel": kernel, "smollm2": smollm2}[args.mode](args)


if __name__ == "__main__":
    main()
