"""Decode attention over a float32 KV cache vs one stored in MX rows: the kernels alone, SmolLM2's shapes.

    python benchmarks/kv_attention.py [--contexts 128 1024 2048] [--rounds 7] [--threads 1]

``effc.DecodeAttention`` (keys transposed ``(Hkv, D, S)``, values ``(Hkv, S, D)``, float32) against
``effc.DecodeAttentionMX`` (keys and values ``(Hkv, S, D + D/32)`` uint8 rows: codes then E8M0 scales; MXINT8 and
MXFP8 E4M3), one token (``T = 1``) of SmolLM2-135M (3 KV heads × 3 query heads each, head_dim 64, 2048 slots).
"30 layers" calls the kernel once on each of 30 distinct caches in turn (what one decode step does: the caches do
not stay in the CPU caches between steps at long contexts), "1 layer" repeats one call (hot caches). Min and median
of ``--rounds`` rounds, ms. Prints the load, the CPU and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

HKV, G, D, S, LAYERS = 3, 3, 64, 2048, 30


def _kernel(kind: str):
    import tvm

    from effc.codegen.ops.decode_attention import PARALLEL_FROM, attention_kernel
    from effc.codegen.ops.decode_attention_mx import attention_mx_kernel
    from effc.ops.block_formats import get_format

    if kind == "float32":
        func = attention_kernel(HKV, G, 1, D, S, D ** -0.5, PARALLEL_FROM)
    else:
        func = attention_mx_kernel(HKV, G, 1, D, S, D ** -0.5, get_format(kind), 32)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
    return tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]


def _caches(kind: str, rng: np.random.Generator) -> list[tuple]:
    import tvm

    from effc.ops.kv_blocks import encode_reference

    out = []
    for _ in range(LAYERS):
        k, v = (rng.standard_normal((HKV, S, D)).astype(np.float32) for _ in range(2))
        if kind == "float32":
            k = np.ascontiguousarray(k.transpose(0, 2, 1))
        else:
            k, v = (encode_reference(a, format=kind, block_size=32) for a in (k, v))
        out.append((tvm.runtime.tensor(k), tvm.runtime.tensor(v)))
    return out


def measure(kind: str, contexts: list[int], rounds: int) -> list[dict]:
    """Rows of the table for one cache kind."""
    import tvm

    rng = np.random.default_rng(0)
    fn, caches = _kernel(kind), _caches(kind, rng)
    t = lambda *shape: tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    q, kn, vn, y = t(HKV, G, 1, D), t(HKV, D, 1), t(HKV, 1, D), t(HKV, G, 1, D)
    mask = tvm.runtime.tensor(np.zeros((1, S + 1), np.float32))
    rows = []
    for length in contexts:
        pos = tvm.runtime.tensor(np.array([[length]], np.int64))
        every, one = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            for k, v in caches:
                fn(q, k, v, kn, vn, mask, pos, y)
            every.append((time.perf_counter() - start) * 1e3)
            k, v = caches[0]
            start = time.perf_counter()
            for _ in range(LAYERS):
                fn(q, k, v, kn, vn, mask, pos, y)
            one.append((time.perf_counter() - start) * 1e3 / LAYERS)
        per_slot = 2 * HKV * (D * 4 if kind == "float32" else D + D // 32)
        rows.append({"cache": kind, "context": length, "bytes_per_layer": per_slot * length,
                     "layers30_ms": [round(min(every), 3), round(float(np.median(every)), 3)],
                     "layer1_us": [round(min(one) * 1e3, 1), round(float(np.median(one)) * 1e3, 1)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 2048])
    parser.add_argument("--kinds", nargs="+", default=["float32", "mxint8", "mxfp8_e4m3"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from effc.codegen.build import set_runtime_threads

    set_runtime_threads(args.threads)
    print(json.dumps({"load": os.getloadavg(), "threads": args.threads, "cpu": platform.processor()}), flush=True)
    rows = [row for kind in args.kinds for row in measure(kind, args.contexts, args.rounds)]
    for row in rows:
        print(json.dumps(row), flush=True)
    print("| cache | context | KB read per layer | 30 layers ms, min (median) | 1 layer µs, min (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['context']} | {r['bytes_per_layer'] / 1024:.0f} | {r['layers30_ms'][0]} "
              f"({r['layers30_ms'][1]}) | {r['layer1_us'][0]} ({r['layer1_us'][1]}) |")
    print(json.dumps({"load_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
