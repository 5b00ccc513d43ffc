"""Summary rows of a decoder's report section (perplexity, latency, bytes per token); read by effc.eval.report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _mb(value: Any) -> str:
    return f"{value / 1e6:,.1f} MB" if isinstance(value, (int, float)) else "not measured"


def decoder_rows(section: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(label, value)`` rows for ``report["decoder"]`` (empty when the report has none)."""
    if not isinstance(section, Mapping):
        return []
    ppl = section.get("perplexity") or {}
    window = section.get("perplexity_window")
    rows = []
    if ppl:
        base = (ppl.get("original_onnxruntime") or {}).get("perplexity")
        mine = (ppl.get("compiled") or {}).get("perplexity")
        rewritten = ppl.get("rewritten_onnxruntime") or {}
        tokens = (ppl.get("compiled") or rewritten).get("tokens_scored")
        change = section.get("perplexity_change_pct")
        compiled = (f"compiled {mine} ({change:+}%)" if mine is not None else
                    f"rewritten (onnxruntime) {rewritten.get('perplexity')}; compiled: not measured "
                    f"({section.get('compiled_not_measured', 'not run')})")
        rows.append((f"Perplexity ({window}-token windows, {tokens} tokens of held-out text)",
                     f"original (onnxruntime) {base} → {compiled}"))
    latency = section.get("latency")
    if isinstance(latency, Mapping):
        e, o = latency["effc"], latency["ort"]
        rows.append((f"Prefill {e['prefill_tokens']} tokens (median, {latency['threads']} thread(s))",
                     f"effc {e['prefill_ms']['median']:.1f} ms vs onnxruntime {o['prefill_ms']['median']:.1f} ms "
                     f"(×{latency['prefill_ratio']})"))
        rows.append(("Decode (median ms/token)",
                     f"effc {e['decode_ms_per_token']['median']:.2f} vs onnxruntime "
                     f"{o['decode_ms_per_token']['median']:.2f} (×{latency['decode_ratio']})"))
    rows.append(("Weight bytes read per decoded token", _mb(section.get("weight_bytes_per_decoded_token"))))
    per_token = section.get("kv_cache_bytes_per_token")
    stored = f" ({section['kv_format']}, {section.get('kv_cache_storage')})" if section.get("kv_format") else ""
    rows.append(("KV cache", f"{per_token:,} B per token, {_mb(section.get('kv_cache_bytes'))} for "
                             f"{section.get('max_cache')} tokens{stored}" if per_token else "not measured"))
    return rows
