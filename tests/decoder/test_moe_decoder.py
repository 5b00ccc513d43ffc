"""``moe`` on a decoder (the tiny random Llama of tests/decoder/conftest.py): SwiGLU FFNs become ``effc.MoEFFN``, the
prefill (grouped kernel) and decode (GEMV kernel) entry points agree with the rewritten graph, and it generates."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_moe_on_the_decoder_keeps_it_generating(tiny):
    import effc
    import effc.runtime

    _, graph, _, folder = tiny
    result = effc.compile(graph, out_dir=folder / "moe", passes="moe(experts=4,top_k=2)", measure_latency=False,
                          calibration_samples=8)
    stats = result.report["passes"][0]["stats"]
    assert [layer["activation"] for layer in stats["layers"]] == ["silu", "silu"]
    assert all(layer["gated"] and layer["active_fraction"] == 0.5 for layer in stats["layers"])
    section = result.report["decoder"]
    ppl = section["perplexity"]
    assert ppl["compiled"]["perplexity"] == pytest.approx(ppl["rewritten_onnxruntime"]["perplexity"], rel=1e-4)
    assert section["prefill_decode_consistency_max_abs"] < 1e-3
    assert stats["ffn_weight_bytes_fraction"] < 0.6
    assert len(effc.runtime.load(result.out_dir).generate("Soup", max_new_tokens=3).tokens) <= 3
