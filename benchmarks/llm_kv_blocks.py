"""Perplexity of SmolLM2 with its KV cache in MX blocks (``block-quant(format=F,mode=kv)``) vs a float32 cache.

    flock /tmp/effc-smollm2.lock python benchmarks/llm_kv_blocks.py [--formats mxfp8_e4m3 mxint8 mxfp4 mxfp4+r]

A ``+r`` suffix adds ``kv_rearrange=true`` (value channels of each KV head grouped by magnitude, folded into
W_v / W_o; see :mod:`effc.passes.quant.decoder_kv` for why keys are not rearranged).

Each configuration is the zoo's token-generic graph specialized to the prefill chunk, rewritten by the pass (keys
after RoPE and values quantized-dequantized in blocks of 32 along head_dim before they are written to the cache
and attended to), and scored by onnxruntime on the held-out evaluation text in 512-token windows (each window from
an empty cache, prefilled in chunks of 128: every attention read, the chunk's own included, sees the quantized
values; 8-bit formats store the cache as uint8 MX rows, which the runtime holds and the graph decodes). Prints one
JSON line per format and a Markdown table: perplexity, change vs the float32 cache, KV bytes per token as stored
(MX rows: codes + E8M0 scales; MXFP4: float32 values on the grid) and the ratio to float32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

PPL_WINDOW = 512


def measure(base, info: dict, ids: list[int], fmt: str | None, threads: int) -> dict:
    """Perplexity of one KV format (None: the float32 cache) under onnxruntime, on a copy of ``base``."""
    import onnx_ir as ir

    from effc.decoder.compile import kv_bytes_per_token
    from effc.ir.decoder import decoder_info
    from effc.passes.pipeline import parse_pipeline
    from effc.runtime.decoder import DecoderSession, OrtBackend, perplexity

    graph = ir.from_proto(ir.to_proto(base))
    label, rearrange = fmt, bool(fmt and fmt.endswith("+r"))
    fmt = fmt.removesuffix("+r") if fmt else None
    if fmt is not None:
        (quant,) = parse_pipeline(f"block-quant(format={fmt},mode=kv,kv_rearrange={str(rearrange).lower()})")
        quant(graph)
    start = time.perf_counter()
    window = min(PPL_WINDOW, info["max_cache"])
    rewritten = {**decoder_info(graph), "chunk": info["chunk"]}  # 8-bit formats: the cache is stored as MX rows
    result = perplexity(DecoderSession(OrtBackend({"prefill": graph}, threads), rewritten), ids, window)
    kv = kv_bytes_per_token(rewritten)
    return {"kv_format": label or "float32", **result, "kv_bytes_per_token": kv,
            "kv_storage": "mx rows" if rewritten.get("kv_row_bytes") else "float32",
            "kv_ratio_vs_fp32": round(kv_bytes_per_token(info) / kv, 3),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["mxfp8_e4m3", "mxint8", "mxfp4", "mxfp4+r"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps({"load": os.getloadavg(), "threads": args.threads}), flush=True)
    from effc.decoder import smollm2, text
    from effc.ir.decoder import decoder_info, specialize
    from effc.ir.model import load

    generic = load(smollm2.generic_graph_path(smollm2.DEFAULT_MAX_CACHE))
    info = decoder_info(generic)
    base = specialize(generic, info["chunk"])
    del generic
    ids = list(smollm2.load_tokenizer()(text.eval_text())["input_ids"])
    rows = []
    for fmt in [None, *args.formats]:
        rows.append(measure(base, info, ids, fmt, args.threads))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
    base = rows[0]["perplexity"]
    print(f"\nload {os.getloadavg()}")
    print("| KV cache | stored as | perplexity (512-token windows) | change | KV bytes per token | vs float32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_format']} | {r['kv_storage']} | {r['perplexity']:.4f} | "
              f"{(r['perplexity'] / base - 1) * 100:+.2f}% | {r['kv_bytes_per_token']:,.0f} | "
              f"{r['kv_ratio_vs_fp32']:.2f}x fewer |")


if __name__ == "__main__":
    main()
