"""A tiny random Llama with SmolLM2's tokenizer and vocabulary, exported as an effc decoder graph (shared by tests)."""

from __future__ import annotations

from typing import Any

#: The tiny Llama's configuration (``transformers.LlamaConfig`` fields); :func:`tiny_llama` overrides any of them.
CONFIG = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def tiny_llama(layers: int, max_cache: int, chunk: int, tokenizer: bool = True, **config: Any) -> tuple[Any, Any, Any]:
    """``(transformers model, token-generic effc graph, tokenizer)`` of a seeded random Llama (hidden 64, 4 heads).

    ``config`` overrides fields of :data:`CONFIG`. With ``tokenizer`` (SmolLM2's, whose vocabulary the default
    ``vocab_size`` matches) the graph names its folder; without, the third item is None.
    """
    import torch
    import transformers

    from effc.decoder import smollm2
    from effc.decoder.export import export_decoder

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=layers, **{**CONFIG, **config}))
    extra = {"tokenizer_dir": str(smollm2.fp32_folder())} if tokenizer else None
    graph = export_decoder(hf.eval(), max_cache=max_cache, chunk=chunk, extra=extra)
    return hf, graph, smollm2.load_tokenizer() if tokenizer else None


def without_layers(hf: Any, removed: set[int]) -> Any:
    """A copy of ``hf`` with the decoder layers ``removed`` deleted (the reference for skipped layers)."""
    import copy

    import torch

    short = copy.deepcopy(hf)
    kept = [layer for i, layer in enumerate(short.model.layers) if i not in removed]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    short.model.layers = torch.nn.ModuleList(kept)
    short.config.num_hidden_layers = len(kept)
    short.config.layer_types = short.config.layer_types[:len(kept)] if getattr(short.config, "layer_types", None) \
        else None
    return short


def assert_prefill_last_matches(session: Any, ids: list[int]) -> Any:
    """``session.prefill_last(ids)`` from an empty context equals the last row of ``session.prefill(ids)`` (1e-5)
    and leaves the same KV cache (1e-6); returns the all-rows logits."""
    import numpy as np

    session.reset()
    whole = session.prefill(ids)
    cache = {name: array.copy() for name, array in session.cache.items()}
    session.reset()
    last = session.prefill_last(ids)
    assert last.shape == (whole.shape[-1],) and session.length == len(ids)
    np.testing.assert_allclose(last, whole[-1], atol=1e-5)
    for name, array in cache.items():
        np.testing.assert_allclose(session.cache[name], array, atol=1e-6)
    return whole
