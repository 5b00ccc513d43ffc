"""Export a decoder (:class:`effc.decoder.llama.StaticLlama`) to one token-generic ONNX graph.

The module is exported twice with ``torch.export`` → ONNX (:func:`effc.ir.capture.capture_torch`) at two small
chunk lengths; :func:`effc.ir.decoder.generalize_tokens` compares them and names the token axis ``-1``. The
decoder's shape and the cache length are recorded in ``metadata_props["effc.decoder"]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import onnx_ir as ir

from effc.ir.decoder import INPUTS, METADATA_KEY, OUTPUTS, generalize_tokens, kv_layout

logger = logging.getLogger(__name__)

#: The two chunk lengths of the export (any two distinct lengths > 1 give the same generic graph).
_EXPORT_TOKENS = (4, 5)


def _example(module: Any, info: dict[str, Any], tokens: int) -> tuple:
    import torch

    s = module.shape.max_cache
    return (torch.zeros((1, tokens), dtype=torch.int64), torch.arange(tokens, dtype=torch.int64)[None],
            torch.zeros((tokens, s + tokens)), *(torch.zeros(slot.shape(info, s)) for slot in kv_layout(info)))


def export_decoder(hf_model: Any, max_cache: int, chunk: int, extra: dict[str, Any] | None = None) -> ir.Model:
    """The token-generic decoder graph of a ``transformers`` Llama model.

    Args:
        hf_model: a ``LlamaForCausalLM`` in fp32.
        max_cache: KV-cache slots ``S``.
        chunk: default prefill chunk ``P`` recorded in the metadata (the graph itself takes any chunk).
        extra: more metadata (e.g. ``{"zoo": "smollm2-135m"}``).

    Raises:
        LoadError: the export fails, or the graph is not token-generic.
    """
    from effc.decoder.llama import MASKED, StaticLlama
    from effc.ir.capture import capture_torch

    module = StaticLlama(hf_model, max_cache=max_cache, chunk=chunk)
    facts = {**dataclasses.asdict(module.shape), "masked": MASKED, "architecture": "llama", **(extra or {})}
    layout = kv_layout(facts)
    names = {"input_names": [*INPUTS, *(slot.input for slot in layout)],
             "output_names": [*OUTPUTS, *(slot.output for slot in layout)]}
    graphs = [capture_torch(module, _example(module, facts, t), **names) for t in _EXPORT_TOKENS]
    graphs[0].metadata_props[METADATA_KEY] = json.dumps(facts, sort_keys=True)
    model = generalize_tokens(*graphs)
    _name_linear_nodes(model)
    logger.info("exported a token-generic decoder graph: %d nodes", len(model.graph))
    return model


def _name_linear_nodes(model: ir.Model) -> None:
    """Name each MatMul with a weight after it (``layers.3.mlp.gate_proj/MatMul``), for reports and ``layers=``."""
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if weight is not None and weight.name in model.graph.initializers:
            node.name = f"{weight.name}/MatMul"
