"""Decoder latency: effc fp32 vs onnxruntime fp32 (the same prefill/decode graphs, KV cache inputs) vs torch eager.

    python benchmarks/llm_decode.py ARTIFACT [--threads 1 2] [--rounds 3] [--steps 32] [--context N]

ARTIFACT is a compiled decoder (``effc compile zoo:smollm2-135m -o out``). Each runtime runs in its own process,
rounds alternate between them; every process prefills one chunk of P tokens (3 times) and decodes ``--steps``
tokens after a P-token context (``--context N``: after N tokens). A STREAM-like read kernel (numpy sum over 512 MB, split over the threads) gives
the machine's read bandwidth; effective GB/s = weight bytes per decoded token / decode time. Prints one JSON
line per measurement and a summary table (median of the rounds' medians, and min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


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


def _session(kind: str, artifact: Path, threads: int):
    import effc.runtime
    from effc.runtime.decoder import DecoderSession, OrtBackend

    model = effc.runtime.load(artifact)
    session = model.decoder()
    if kind == "effc":
        return session
    from effc.ir.decoder import specialize
    from effc.ir.model import load

    generic = load(artifact / "model.onnx")
    graphs = {"prefill": specialize(generic, session.chunk), "decode": specialize(generic, 1)}
    return DecoderSession(OrtBackend(graphs, threads), session.info, session.tokenizer)


def _torch_run(artifact: Path, threads: int, steps: int, chunk: int) -> dict:
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


def worker(kind: str, artifact: Path, threads: int, steps: int, context: int | None = None) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    manifest = json.loads((artifact / "manifest.json").read_text())
    chunk = manifest["decoder"]["chunk"]
    if kind == "torch":
        return _torch_run(artifact, threads, steps, chunk)
    if kind == "effc":
        from effc.codegen.build import set_runtime_threads

        set_runtime_threads(threads)
    session = _session(kind, artifact, threads)
    if kind == "effc":
        session.backend._runner.threads = threads
    prompt = list(range(100, 100 + chunk))
    prefill = []
    for _ in range(4):
        session.reset()
        start = time.perf_counter()
        logits = session.prefill(prompt)
        prefill.append((time.perf_counter() - start) * 1e3)
    if context and context > chunk:  # decode after a longer context: prefill it in chunks (not timed)
        session.reset()
        logits = session.prefill([100 + i % 1000 for i in range(context)])
    token, times = int(np.argmax(logits[-1])), []
    for _ in range(steps + 1):
        start = time.perf_counter()
        token = int(np.argmax(session.decode(token)))
        times.append((time.perf_counter() - start) * 1e3)
    return {"prefill_ms": prefill[1:], "decode_ms": times[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runtimes", nargs="+", default=["effc", "ort", "torch"])
    parser.add_argument("--context", type=int, default=None,
                        help="tokens of context before the timed decode steps (default: one prefill chunk)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.artifact, args.threads[0], args.steps, args.context)))
        return
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    weight_bytes = manifest["metrics"]["decoder"]["weight_bytes_per_decoded_token"]
    results: dict = {}
    for threads in args.threads:
        bandwidth = read_bandwidth(threads)
        print(json.dumps({"threads": threads, "read_bandwidth_gb_s": round(bandwidth, 2)}), flush=True)
        for round_index in range(args.rounds):
            for kind in args.runtimes:
                cmd = [sys.executable, __file__, str(args.artifact), "--worker", kind, "--threads", str(threads),
                       "--steps", str(args.steps), *(["--context", str(args.context)] if args.context else [])]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                data = json.loads(line)
                record = results.setdefault((threads, kind), {"prefill": [], "decode": [], "decode_min": []})
                record["prefill"].append(float(np.median(data["prefill_ms"])))
                record["decode"].append(float(np.median(data["decode_ms"])))
                record["decode_min"].append(float(np.min(data["decode_ms"])))
                print(json.dumps({"threads": threads, "round": round_index, "runtime": kind,
                                  "prefill_ms": round(record["prefill"][-1], 2),
                                  "decode_ms": round(record["decode"][-1], 2)}), flush=True)
        results[(threads, "bandwidth")] = bandwidth
    print(f"\nweight bytes per decoded token: {weight_bytes / 1e6:.1f} MB; load {os.getloadavg()}")
    print("| threads | runtime | prefill ms (median / min) | decode ms/token (median / min) | effective GB/s | "
          "% of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        bw = results[(threads, "bandwidth")]
        for kind in args.runtimes:
            r = results[(threads, kind)]
            decode = float(np.median(r["decode"]))
            gbs = weight_bytes / (decode / 1e3) / 1e9
            print(f"| {threads} | {kind} | {np.median(r['prefill']):.1f} / {min(r['prefill']):.1f} | "
                  f"{decode:.2f} / {min(r['decode_min']):.2f} | {gbs:.2f} | {gbs / bw * 100:.0f}% of {bw:.1f} |")


if __name__ == "__main__":
    main()
