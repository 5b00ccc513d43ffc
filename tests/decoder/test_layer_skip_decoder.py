"""layer-skip on a decoder: removed layers take their KV cache with them, and generation stays exact.

A tiny random Llama (SmolLM2's tokenizer and vocabulary, 4 layers): layers 1 and 3 (not adjacent) are removed;
the compiled artifact generates with its KV cache the same greedy tokens as the transformers model with those two
layers deleted, and its cache holds 2 layers.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.decoder.tiny import without_layers

pytestmark = pytest.mark.slow

PROMPTS = ("The harbour town wakes up slowly", "Good soup does not need")


def test_removing_non_adjacent_layers_shrinks_the_cache_and_generation_matches(tiny4):
    import torch

    import effc
    import effc.runtime
    from effc.ir.decoder import decoder_info, specialize
    from effc.ir.residual import find_residual_blocks

    hf, graph, tokenizer, folder = tiny4
    result = effc.compile(graph, passes="layer-skip(include=[layers.1,layers.3],count=2,rank=last)",
                          out_dir=folder / "skip", latency_repeat=1, calibration_samples=2)
    record = result.manifest["passes"][0]
    assert [r["name"] for r in record["stats"]["removed"]] == ["layers.3", "layers.1"]
    model = effc.runtime.load(result.out_dir)
    info = model.manifest["decoder"]
    assert info["kv_layers"] == [0, 2]
    assert result.report["decoder"]["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    rewritten = effc.ir.model.load(result.out_dir / "model.onnx")
    assert decoder_info(rewritten)["kv_layers"] == [0, 2]
    assert sorted(v.name for v in rewritten.graph.inputs if v.name.startswith("past_")) == [
        "past_key.0", "past_key.2", "past_value.0", "past_value.2"]
    assert sum(b.kind == "attention" for b in find_residual_blocks(specialize(rewritten, 8))) == 2
    short = without_layers(hf, {1, 3})
    session = model.decoder()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        mine = session.generate(ids, max_new_tokens=12)
        with torch.no_grad():
            ref = short.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert mine.tokens == ref[0, len(ids):].tolist()[:len(mine.tokens)] and len(mine.tokens) >= 4
    session.reset()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        ref_logits = short(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(session.prefill(ids), ref_logits, atol=1e-3)
