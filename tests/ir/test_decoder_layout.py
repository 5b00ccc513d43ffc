"""The KV-cache layout of decoder graphs (:func:`effc.ir.decoder.kv_layout`): names, order, shapes, removed layers."""

from __future__ import annotations

from effc.ir.decoder import INPUTS, io_shapes, kv_layout

INFO = {"layers": 3, "kv_heads": 2, "head_dim": 8, "max_cache": 32}


def test_layout_names_each_layers_keys_then_values_in_graph_order():
    layout = kv_layout(INFO)
    assert [s.input for s in layout] == ["past_key.0", "past_value.0", "past_key.1", "past_value.1",
                                         "past_key.2", "past_value.2"]
    assert [s.output for s in layout[:2]] == ["key.0", "value.0"]
    assert [s.layer for s in layout] == [0, 0, 1, 1, 2, 2]


def test_keys_are_stored_transposed_and_values_by_slot():
    key, value = kv_layout(INFO)[:2]
    assert key.shape(INFO, 32) == (2, 8, 32) and key.seq_axis == 2
    assert value.shape(INFO, 32) == (2, 32, 8) and value.seq_axis == 1
    shapes = io_shapes(INFO, 4)
    assert list(shapes)[:len(INPUTS)] == list(INPUTS)
    assert shapes["attn_mask"] == (4, 36) and shapes["past_key.1"] == (2, 8, 32)


def test_removed_layers_keep_their_original_numbers():
    layout = kv_layout({**INFO, "kv_layers": [0, 2]})
    assert [s.input for s in layout] == ["past_key.0", "past_value.0", "past_key.2", "past_value.2"]
