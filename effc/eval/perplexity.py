"""Perplexity of a decoder artifact on a text, beside the original model under onnxruntime (``effc eval --text``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Tokens per perplexity window (each window scored from an empty context).
WINDOW = 512


def evaluate_text(artifact: str | Path, text: str, threads: int = 1, window: int = WINDOW) -> dict[str, Any]:
    """Perplexity of ``text`` under the compiled artifact and under the original model (onnxruntime).

    Windows are ``window`` tokens, or the KV-cache length when that is shorter. The original model is the
    manifest's source graph (for zoo decoders the cached fp32 export), specialized to
    the artifact's prefill chunk; when that file is gone, its perplexity reads "not available".

    Returns:
        ``{"window", "tokens_scored", "windows", "perplexity_compiled", "perplexity_original_onnxruntime",
        "change_pct"}``.

    Raises:
        ArtifactError: the artifact is not a decoder.
        DataError: the text has fewer than 2 tokens.
    """
    import effc.runtime
    from effc.runtime.decoder import DecoderSession, OrtBackend, perplexity

    model = effc.runtime.load(artifact)
    session = model.decoder()
    ids = list(session.tokenizer(text)["input_ids"])
    window = min(window, session.max_cache)  # a shorter cache scores shorter windows (reported)
    mine = perplexity(session, ids, window)
    result: dict[str, Any] = {"window": window, "tokens_scored": mine["tokens_scored"], "windows": mine["windows"],
                              "perplexity_compiled": mine["perplexity"]}
    source = Path((model.manifest.get("source") or {}).get("path") or "")
    if source.is_file():
        from effc.ir.decoder import decoder_info, specialize
        from effc.ir.model import load

        graph = specialize(load(source), session.chunk)
        info = {**decoder_info(graph), "chunk": session.chunk}  # the original's own cache (all layers)
        original = DecoderSession(OrtBackend({"prefill": graph}, threads), info)
        base = perplexity(original, ids, window)["perplexity"]
        result["perplexity_original_onnxruntime"] = base
        result["change_pct"] = round((mine["perplexity"] / base - 1) * 100, 3)
    else:
        result["perplexity_original_onnxruntime"] = "not available (source model file not found)"
    return result
