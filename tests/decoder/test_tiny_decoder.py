"""A tiny random Llama (SmolLM2's tokenizer and vocabulary, 2 layers) exported, compiled and run token by token.

Compiled prefill/decode against torch fp32 (the transformers model itself): greedy tokens equal, decode-step logits
within 1e-3, perplexity within 0.5%; passes on the decoder keep it generating.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.decoder.tiny import assert_prefill_last_matches

pytestmark = pytest.mark.slow

PROMPTS = ("The harbour town wakes up slowly", "A bicycle is a simple machine", "Good soup does not need")


@pytest.fixture(scope="module")
def compiled(tiny):
    import effc
    import effc.runtime

    hf, graph, tokenizer, folder = tiny
    result = effc.compile(graph, out_dir=folder / "fp32", latency_repeat=2)
    return result, effc.runtime.load(result.out_dir)


def _torch_greedy(hf, ids, n):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_equal_torch(tiny, compiled):
    hf, _, tokenizer, _ = tiny
    session = compiled[1].decoder()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        mine = session.generate(ids, max_new_tokens=12)
        assert mine.tokens == _torch_greedy(hf, ids, 12)[:len(mine.tokens)]
        assert mine.prompt_tokens == len(ids) and mine.decode_ms_per_token > 0


def test_decode_logits_within_1e3_of_torch(tiny, compiled):
    import torch

    from effc.decoder.text import eval_text

    hf, _, tokenizer, _ = tiny
    ids = tokenizer(eval_text())["input_ids"][:24]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    session = compiled[1].decoder()
    session.reset()
    first = session.prefill(ids[:20])  # two chunks: one full, one padded
    steps = np.stack([session.decode(t) for t in ids[20:]])
    np.testing.assert_allclose(first, ref[:20], atol=1e-3)
    np.testing.assert_allclose(steps, ref[20:], atol=1e-3)


def test_perplexity_within_half_a_percent_of_torch(tiny, compiled):
    import torch

    from effc.decoder.text import eval_text
    from effc.runtime.decoder import perplexity

    hf, _, tokenizer, _ = tiny
    ids = tokenizer(eval_text())["input_ids"][:160]
    mine = perplexity(compiled[1].decoder(), ids, window=80)
    nll = []
    for start in range(0, len(ids), 80):
        window = torch.tensor([ids[start:start + 80]])
        with torch.no_grad():
            nll.append(torch.nn.functional.cross_entropy(hf(window).logits[0, :-1], window[0, 1:], reduction="none"))
    ref = float(torch.exp(torch.cat(nll).mean()))
    assert mine["perplexity"] == pytest.approx(ref, rel=5e-3)


def test_report_and_manifest_describe_the_decoder(compiled):
    result, model = compiled
    section = result.report["decoder"]
    ppl = section["perplexity"]
    assert ppl["compiled"]["perplexity"] == pytest.approx(ppl["original_onnxruntime"]["perplexity"], rel=1e-3)
    assert section["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert section["weight_bytes_per_decoded_token"] > 49152 * 64 * 4
    assert section["prefill_decode_consistency_max_abs"] < 1e-3
    assert section["decode_attention_fused_layers"] == section["prefill_attention_fused_layers"] == 2
    assert section["latency"]["effc"]["decode_ms_per_token"]["median"] > 0
    assert set(result.manifest["decoder"]["entries"]) == {"prefill", "decode", "prefill_last"}
    assert result.manifest["decoder"]["entries"]["prefill_last"]["outputs"][0]["shape"] == [1, 1, 49152]
    assert result.manifest["decoder"]["entries"]["decode"]["inputs"][0]["shape"] == [1, 1]
    assert "Perplexity" in (result.out_dir / "report.md").read_text()


def test_prefill_last_is_the_last_row_of_prefill(compiled):
    """Generation's prefill (``prefill_last``: the LM head of one row) returns the last real row of ``prefill``'s
    logits within 1e-5 with padding in the chunk, writes the same cache, gives the same greedy tokens, and shares
    the weights with the other entry points: ``model.so`` holds the fp32 12.6 MB table in the two layouts it held
    before ``prefill_last`` (its M = 1 LM head reads the decode step's), not three."""
    result, model = compiled
    session = model.decoder()
    assert session.has_prefill_last
    for n in (5, 16, 20):  # a padded chunk, a full one, a full one then a padded one
        assert assert_prefill_last_matches(session, list(range(300, 300 + n))).shape == (n, 49152)
    ids = list(range(300, 320))
    session.reset()
    logits, tokens = session.prefill(ids)[-1], []
    for _ in range(8):
        tokens.append(int(np.argmax(logits)))
        logits = session.decode(tokens[-1])
    assert session.generate(ids, max_new_tokens=8).tokens == tokens
    weights = result.report["cost"]["params_bytes_after"]
    assert weights > 49152 * 64 * 4 and (result.out_dir / "model.so").stat().st_size < 2.5 * weights


def test_decode_attention_rewrite_keeps_the_decode_step(tiny):
    """Both layers fused; onnxruntime on the fused and the standard decode graph agree, and slots past the context
    are ignored even where the mask admits them."""
    from effc.decoder.attention import fuse_decode_attention
    from effc.ir.decoder import decoder_info, kv_layout, specialize
    from effc.ir.reference import Reference

    graph = tiny[1]
    info = decoder_info(graph)
    plain, fused = specialize(graph, 1), specialize(graph, 1)
    assert fuse_decode_attention(fused) == 2
    assert [n.op_type for n in fused.graph].count("DecodeAttention") == 2
    assert [n.op_type for n in fused.graph].count("Softmax") == 0
    rng = np.random.default_rng(1)
    s, length = info["max_cache"], 37
    mask = np.zeros((1, s + 1), np.float32)
    feeds = {"input_ids": np.array([[42]]), "positions": np.array([[length]]), "attn_mask": mask,
             **{slot.input: rng.standard_normal(slot.shape(info, s)).astype(np.float32) for slot in kv_layout(info)}}
    got = Reference(fused).run(feeds)
    mask[0, length:s] = -1.0e9  # the standard graph needs the mask to hide the slots past the context
    want = Reference(plain).run(feeds)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_generate_text_and_errors(compiled, tmp_path):
    from effc.errors import ArtifactError, DataError

    model = compiled[1]
    out = model.generate("Hello", max_new_tokens=4)
    assert isinstance(out.text, str) and len(out.tokens) <= 4
    with pytest.raises(DataError, match="KV cache of 96"):
        model.generate("word " * 120, max_new_tokens=4)
    from effc.api import run_artifact

    with pytest.raises(ArtifactError, match="is a decoder language model.*fix: generate text with effc generate"):
        run_artifact(compiled[0].out_dir)  # was: "input 'input_ids' has no static shape; fix: ... --input-shape"

    import effc
    import effc.runtime
    from tests.runtime.helpers import mlp

    plain = effc.compile(mlp(), out_dir=tmp_path / "mlp", measure_latency=False)
    with pytest.raises(ArtifactError, match="not a decoder"):
        effc.runtime.load(plain.out_dir).generate("Hello")


def test_block_quant_on_the_decoder_keeps_it_generating(tiny):
    import effc

    _, graph, _, folder = tiny
    result = effc.compile(graph, out_dir=folder / "mxint8", passes="block-quant(format=mxint8)",
                          measure_latency=False)
    section = result.report["decoder"]
    assert section["perplexity"]["compiled"]["perplexity"] == pytest.approx(
        section["perplexity"]["rewritten_onnxruntime"]["perplexity"], rel=1e-3)
    assert abs(section["perplexity_change_pct"]) < 5
    assert section["weight_bytes_per_decoded_token"] < result.report["cost"]["params_bytes_before"]
    import effc.runtime

    assert len(effc.runtime.load(result.out_dir).generate("Soup", max_new_tokens=3).tokens) <= 3


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8"])
def test_kv_cache_stored_in_mx_blocks(tiny, fmt):
    """``block-quant(mode=kv)`` stores the cache as uint8 MX rows: the runtime holds codes + scales (17 bytes per
    entry of head_dim 16 with blocks of 16, instead of 64), decode reads them in effc.DecodeAttentionMX, the
    compiled artifact agrees with its own model.onnx under onnxruntime, and decode agrees with prefill."""
    import effc
    import effc.runtime

    _, graph, tokenizer, folder = tiny
    result = effc.compile(graph, out_dir=folder / f"kv-{fmt}",
                          passes=f"block-quant(format={fmt},mode=kv,block_size=16)", measure_latency=False)
    section, info = result.report["decoder"], result.manifest["decoder"]
    assert section["kv_format"] == fmt and section["kv_cache_storage"] == "mx rows"
    assert section["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 17 == section["kv_format_bytes_per_token"]
    assert info["kv_row_bytes"] == 17 and info["kv_format"] == fmt
    assert section["decode_attention_fused_layers"] == section["prefill_attention_fused_layers"] == 2
    assert section["prefill_decode_consistency_max_abs"] < 1e-4
    cache_inputs = [spec for spec in info["entries"]["decode"]["inputs"] if spec["name"].startswith("past_")]
    assert {spec["dtype"] for spec in cache_inputs} == {"uint8"} and cache_inputs[0]["shape"] == [2, 96, 17]
    ppl = section["perplexity"]
    assert ppl["compiled"]["perplexity"] == pytest.approx(ppl["rewritten_onnxruntime"]["perplexity"], rel=1e-4)
    assert 0 < abs(section["perplexity_change_pct"]) < 2
    mine = effc.runtime.load(result.out_dir).decoder()
    assert {a.dtype for a in mine.cache.values()} == {np.dtype(np.uint8)}
    assert sum(a.nbytes for a in mine.cache.values()) == 96 * 2 * 2 * 2 * 17
    _agrees_with_own_model_onnx(mine, result.out_dir, tokenizer)
    ids = tokenizer(PROMPTS[0])["input_ids"] * 3  # 2 chunks, then 3 decode steps from the stored cache
    mine.reset()
    whole = mine.prefill(ids)[-3:]
    mine.reset()
    mine.prefill(ids[:-3])
    steps = np.stack([mine.decode(t) for t in ids[-3:]])
    np.testing.assert_allclose(steps, whole, atol=1e-4)


def _agrees_with_own_model_onnx(mine, out_dir, tokenizer) -> None:
    """Greedy logits of the compiled session ``mine`` within 1e-4 of its ``model.onnx`` under onnxruntime, tokens
    equal except at a near-tie (top-2 logits within 1e-4), over 10 decode steps after each prompt."""
    from effc.decoder.last_token import entry_graph
    from effc.ir.decoder import specialize
    from effc.ir.model import load
    from effc.runtime.decoder import DecoderSession, OrtBackend

    onnx_model = load(out_dir / "model.onnx")
    graphs = {"prefill_last": entry_graph(onnx_model, mine.chunk), "decode": specialize(onnx_model, 1)}
    ref = DecoderSession(OrtBackend(graphs), mine.info, mine.tokenizer)
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        mine.reset()
        ref.reset()
        a, b = mine.prefill_last(ids), ref.prefill_last(ids)
        for _ in range(10):
            np.testing.assert_allclose(a, b, atol=1e-4)
            top = np.sort(b)[-2:]
            if top[1] - top[0] > 1e-4:
                assert int(np.argmax(a)) == int(np.argmax(b))
            token = int(np.argmax(b))
            a, b = mine.decode(token), ref.decode(token)


def test_eval_text_cli_reports_perplexity(compiled, tmp_path):
    import json

    from click.testing import CliRunner

    from effc.cli import cli

    text = tmp_path / "t.txt"
    text.write_text("A bicycle is a simple machine, yet keeping one in good condition takes attention. " * 3)
    out = CliRunner().invoke(cli, ["eval", str(compiled[0].out_dir), "--text", str(text), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["window"] == 96 and data["tokens_scored"] > 10 and data["perplexity_compiled"] > 1
    assert "not available" in data["perplexity_original_onnxruntime"]  # compiled from an in-memory graph
    npz = tmp_path / "d.npz"
    np.savez(npz, input_ids=np.zeros((1, 4), np.int64))
    out = CliRunner().invoke(cli, ["eval", str(compiled[0].out_dir), "--data", str(npz)])  # was silently ignored
    assert out.exit_code != 0 and "does not apply to a decoder" in out.output and "--text FILE" in out.output


@pytest.mark.parametrize(("fmt", "table_bits"), [("mxfp4", 4), ("int4", 4), ("int4_asym", 4),
                                                 ("int4_asym,embedding_format=int8", 8)])
def test_4bit_artifact_generates_as_its_own_model_onnx(tiny, fmt, table_bits):
    """Greedy tokens of the compiled 4-bit artifact equal those of its model.onnx under onnxruntime.

    Both run the same quantized weights (the compiled kernels decode the codes bit-exactly; only fp32 summation
    order differs), so the criterion is exact agreement except at a near-tie (top-2 logits within 1e-4).
    ``int4_asym`` adds the block minimums (GEMV: ``m * sum(x)`` per block); with ``embedding_format=int8`` the tied
    table is int8 (GGUF Q4_1 layout) and the decode step's LM head takes the 8-bit GEMV.
    """
    import onnx_ir as ir

    import effc
    import effc.codegen.ops.block_quant as bq
    import effc.runtime
    from effc.ir.model import load

    _, graph, tokenizer, folder = tiny
    start = len(bq.LOWERING_LOG)
    result = effc.compile(graph, out_dir=folder / fmt.replace(",", "-").replace("=", "-"),
                          passes=f"block-quant(format={fmt})", measure_latency=False)
    kernels = {(e["shape"][0], e["kernel"]) for e in bq.LOWERING_LOG[start:]}
    assert (1, "gemv") in kernels and (16, "fp32") in kernels  # decode: GEMV kernel; prefill: decode-in-GEMM
    onnx_model = load(result.out_dir / "model.onnx")
    tables = [v for v in onnx_model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8
              and tuple(v.const_value.shape) == (49152, 64 * table_bits // 8)]
    assert len(tables) == 1  # the tied embedding: one packed table for the lookup and the output projection
    assert (result.out_dir / "model.so").stat().st_size < 49152 * 64 * 4  # less than the fp32 table alone
    _agrees_with_own_model_onnx(effc.runtime.load(result.out_dir).decoder(), result.out_dir, tokenizer)


def test_w4a8_artifact_generates_as_its_own_model_onnx(tiny):
    """``mode=weight_act,act_format=int8`` over int4_asym linears and the int8 tied table: model.onnx quantizes
    each linear's input to int8 blocks (float32 scale per 32); the decode step runs the integer-dot VNNI GEMV and
    prefill the VNNI GEMM where the CPU has AVX-512 VNNI (else the float GEMV / GEMM on the quantize-dequantized
    input).
    Same numbers up to fp32 rounding: greedy tokens and logits agree with onnxruntime on model.onnx."""
    import tvm

    import effc
    import effc.codegen.ops.block_quant as bq
    import effc.runtime
    from effc.codegen.ops.block_quant_vnni import supports_vnni

    _, graph, tokenizer, folder = tiny
    start = len(bq.LOWERING_LOG)
    result = effc.compile(graph, out_dir=folder / "w4a8", measure_latency=False, passes=(
        "block-quant(format=int4_asym,embedding_format=int8,mode=weight_act,act_format=int8)"))
    kernels = {(e["shape"][0], e["format"], e["kernel"]) for e in bq.LOWERING_LOG[start:]}
    host = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
    decode, prefill = ("vnni", "vnni_gemm") if supports_vnni(host) else ("gemv", "fp32")
    assert {(1, "int4_asym", decode), (1, "int8", decode), (16, "int4_asym", prefill)} <= kernels
    _agrees_with_own_model_onnx(effc.runtime.load(result.out_dir).decoder(), result.out_dir, tokenizer)
