"""``block-quant(mode=kv)`` on a decoder: cache entries on the MX grid along head_dim, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from effc.ir.decoder import decoder_info, kv_layout, regeneralize, specialize
from effc.ops.block_formats import quantize_dequantize
from effc.passes.pipeline import parse_pipeline
from tests.decoder.tiny import tiny_llama

pytestmark = pytest.mark.slow  # exports a tiny Llama twice (~15 s quiet, ~60 s under load)

S, T = 64, 4


@pytest.fixture(scope="module")
def graph():
    return tiny_llama(2, max_cache=S, chunk=8, tokenizer=False, vocab_size=256, intermediate_size=96,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)[1]  # head_dim 32


def _feeds(info, tokens):
    mask = np.full((tokens, S + tokens), -1.0e9, np.float32)
    mask[:, S:] = np.triu(mask[:, S:], 1)
    feeds = {"input_ids": np.arange(7, 7 + tokens)[None], "positions": np.arange(tokens)[None], "attn_mask": mask}
    return {**feeds, **{s.input: np.zeros(s.shape(info, S), s.dtype) for s in kv_layout(info)}}


def test_mxfp4_cache_entries_lie_on_the_grid(graph):
    """MXFP4 (not stored as rows): the float32 cache entries are the numpy codec's round trip."""
    from effc.ir.reference import Reference

    info = decoder_info(graph)
    plain, quant = specialize(graph, T), specialize(graph, T)
    (pass_,) = parse_pipeline("block-quant(format=mxfp4,mode=kv)")
    assert pass_(quant).modified
    assert [v["value"] for v in pass_.stats["kv_values"]] == ["key.0", "value.0", "key.1", "value.1"]
    assert decoder_info(quant)["kv_format"] == "mxfp4" and "kv_row_bytes" not in decoder_info(quant)
    assert not pass_(quant).modified  # a second run changes nothing
    feeds = _feeds(info, T)
    want, got = Reference(plain).run(feeds)[1:], Reference(quant).run(feeds)[1:]
    for slot, x, y in zip(kv_layout(info), want, got, strict=True):
        axis = 1 if slot.kind == "key" else 2  # head_dim: keys (Hkv, D, T), values (Hkv, T, D)
        np.testing.assert_array_equal(y, quantize_dequantize(y, "mxfp4", axis=axis, block_size=32))  # on the grid
        if slot.layer == 0:  # its input is not yet touched by quantization: exactly the codec's round trip
            np.testing.assert_array_equal(y, quantize_dequantize(x, "mxfp4", axis=axis, block_size=32))
            assert np.abs(y - x).max() > 0


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxint8"])
def test_stored_cache_rows_round_trip_the_numpy_codec(graph, fmt):
    """8-bit formats: the cache is uint8 rows whose codes and E8M0 scales are the numpy codec's, read back by the
    next chunk (prefill of T tokens, then T more over the stored cache, equal to one prefill of 2T)."""
    from effc.ir.reference import Reference
    from effc.ops.block_formats import quantize

    info = decoder_info(graph)
    plain, quant = specialize(graph, T), specialize(graph, T)
    (pass_,) = parse_pipeline(f"block-quant(format={fmt},mode=kv)")
    assert pass_(quant).modified and pass_.stats["kv_row_bytes"] == 32 + 1
    stored = decoder_info(quant)
    assert stored["kv_format"] == fmt and stored["kv_row_bytes"] == 33
    assert not pass_(quant).modified  # a second run changes nothing
    layout = kv_layout(stored)
    assert [(s.input, s.dtype, s.shape(stored, S)) for s in layout[:2]] == [
        ("past_key.0", "uint8", (1, S, 33)), ("past_value.0", "uint8", (1, S, 33))]
    want, got = Reference(plain).run(_feeds(info, T))[1:], Reference(quant).run(_feeds(stored, T))[1:]
    for slot, x, rows in zip(layout, want, got, strict=True):
        assert rows.dtype == np.uint8 and rows.shape == (1, T, 33)
        if slot.layer == 0:  # its input is not yet touched by quantization: exactly the codec's codes and scales
            entries = x.transpose(0, 2, 1) if slot.kind == "key" else x  # (Hkv, T, D)
            q = quantize(entries, fmt, axis=-1, block_size=32)
            np.testing.assert_array_equal(rows[..., :32], q.codes.reshape(1, T, 32))
            np.testing.assert_array_equal(rows[..., 32:], q.scales)
    # the stored rows written into the cache and read back: two chunks equal one prefill of both (onnxruntime)
    ids = np.arange(7, 7 + 2 * T)[None]
    whole = specialize(regeneralize(quant), 2 * T)
    feeds = _feeds(stored, 2 * T)
    feeds["input_ids"] = ids
    logits = Reference(whole).run(feeds)[0][0]
    feeds, session = _feeds(stored, T), Reference(quant)
    first = session.run({**feeds, "input_ids": ids[:, :T]})
    for slot, rows in zip(layout, first[1:], strict=True):
        feeds[slot.input][:, :T] = rows
    feeds["attn_mask"][:, :T] = 0.0
    second = session.run({**feeds, "input_ids": ids[:, T:], "positions": np.arange(T, 2 * T)[None]})
    np.testing.assert_allclose(np.concatenate([first[0][0], second[0][0]]), logits, atol=1e-5)


def test_kv_bytes_per_token_of_the_formats(graph):
    from effc.decoder.compile import kv_bytes_per_token

    info = decoder_info(graph)  # 2 layers × (K + V) × 1 KV head × 32 = 128 entries per token
    assert kv_bytes_per_token(info) == 128 * 4
    assert kv_bytes_per_token(info, "mxfp8_e4m3") == 128 * 8.25 / 8
    assert kv_bytes_per_token(info, "mxfp4") == 128 * 4.25 / 8
    stored = {**info, "kv_format": "mxint8", "kv_block_size": 32, "kv_row_bytes": 33}
    assert kv_bytes_per_token(stored) == 4 * 33 == kv_bytes_per_token(info, "mxint8")  # what the runtime holds


def test_value_rearrangement_keeps_the_model_before_quantization(graph):
    from effc.ir.reference import Reference
    from effc.passes.quant.decoder_kv import rearrange_values

    info = decoder_info(graph)
    plain, moved = specialize(graph, T), specialize(graph, T)
    stats = {"skipped": []}
    assert rearrange_values(moved, stats) == 2 and stats["kv_rearranged"] == [0, 1] and not stats["skipped"]
    wv = moved.graph.initializers["layers.0.self_attn.v_proj"].const_value.numpy()
    assert not np.array_equal(wv, plain.graph.initializers["layers.0.self_attn.v_proj"].const_value.numpy())
    norms = np.linalg.norm(wv, axis=0)  # (the random model's RMSNorm gains are all 1)
    assert (np.diff(norms) <= 0).all()  # channels sorted by magnitude: the largest share the first block
    feeds = _feeds(info, T)
    want, got = Reference(plain).run(feeds), Reference(moved).run(feeds)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # logits
    for slot, x, y in zip(kv_layout(info), want[1:], got[1:], strict=True):
        if slot.kind == "key":
            np.testing.assert_allclose(y, x, atol=1e-5)
        else:  # the same values, channels reordered
            np.testing.assert_allclose(np.sort(y, axis=2), np.sort(x, axis=2), atol=1e-5)
    (pass_,) = parse_pipeline("block-quant(format=mxfp4,mode=kv,kv_rearrange=true)")
    quant = specialize(graph, T)
    assert pass_(quant).modified and pass_.stats["kv_rearranged"] == [0, 1]
