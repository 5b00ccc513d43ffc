"""Sparsity statistics of N:M-packed layers: zeros the packed format does not store are counted, bytes are not."""

from __future__ import annotations

import logging

import onnx_ir as ir
import pytest

from effc.eval.cost import param_bytes, sparsity_stats
from effc.eval.packed import packed_weights
from effc.eval.report import per_layer_tables, render_markdown, summary_rows
from effc.ops.nm_sparse import packed_layers
from effc.passes.nm_sparsity import NMSparsityPass
from tests.passes.nm_helpers import ffn_model


def _pack_up_only(n: int, m: int, vector: int, down_zero_rows: int = 10) -> ir.Model:
    """ffn_model (w1 (64, 128), w2 (128, 64)); w2 gets literal zero rows and stays dense, w1 is packed n:m."""
    model = ffn_model()
    w2 = model.graph.initializers["w2"]
    dense = w2.const_value.numpy().copy()
    dense[:down_zero_rows] = 0
    w2.const_value = ir.tensor(dense, name="w2")
    return NMSparsityPass(n=n, m=m, vector=vector, layers="ffn.up")(model).model


@pytest.mark.parametrize(("n", "m", "vector"), [(2, 4, 16), (2, 4, 1), (1, 4, 16), (4, 8, 8)])
def test_packed_layer_counts_its_structural_zeros(n, m, vector):
    model = _pack_up_only(n, m, vector)
    (node,) = packed_layers(model)
    values, indices = (v.const_value for v in node.inputs[1:])
    stats = sparsity_stats(model)
    up = stats["tensors"]["ffn.up.nm_values"]
    # by hand: the (64, 128) weight keeps 64·n/m rows per column; the rest are zeros that are not stored
    assert up["shape"] == [64, 128] and up["stored_shape"] == [64 * n // m, 128]
    assert up["elements"] == 64 * 128 and up["packed_zeros"] == 64 * 128 * (m - n) // m
    assert up["sparsity"] == pytest.approx(1 - n / m) and up["storage"] == f"packed {n}:{m}" + (
        f", vector {vector}" if vector > 1 else "")
    down = stats["tensors"]["w2"]
    assert down == {"shape": [128, 64], "elements": 8192, "storage": "dense", "zeros": 640, "literal_zeros": 640,
                    "packed_zeros": 0, "sparsity": 640 / 8192}
    assert "ffn.up.nm_indices" not in stats["tensors"]  # integer indices are not weights
    total = stats["total"]
    assert total["elements"] == 2 * 8192 and total["packed_zeros"] == up["packed_zeros"]
    assert total["zeros"] == up["zeros"] + 640 and total["sparsity"] == pytest.approx(total["zeros"] / 16384)
    assert total["by_storage"]["dense"] == {"tensors": 1, "elements": 8192, "zeros": 640, "sparsity": 640 / 8192}
    # bytes stay what the file holds: kept values + uint16 indices, not the dense shape
    stored = {"s": 64 * 4, "b1": 128 * 4, "w2": 8192 * 4, "reference body's 5 int64 Constants": 5 * 8}
    assert param_bytes(model) == sum(stored.values()) + values.size * 4 + indices.size * 2
    assert values.size == 64 * n // m * 128


def test_report_rows_say_packed_vs_literal_zeros():
    stats = sparsity_stats(_pack_up_only(2, 4, 16))
    report = {"model": {"name": "ffn"}, "cost": {"sparsity": stats},
              "passes": [{"name": "nm-sparsity", "text": "nm-sparsity", "seconds": 0.1, "modified": True}]}
    row = dict(summary_rows(report))["Weight sparsity"]
    assert row == (f"{100 * (4096 + 640) / 16384:.1f}% zeros (4.74 k of 16.4 k weight elements in 2 tensors); "
                   "4.1 k not stored (N:M-packed); 640 stored as literal zeros (no byte or MAC saving)")
    (table,) = [t for t in per_layer_tables(report) if t[0].startswith("weight sparsity")]
    rows = dict(table[2])
    assert rows["ffn.up.nm_values"]["storage"] == "packed 2:4, vector 16 (zeros not stored)"
    assert rows["w2"]["storage"] == "dense (zeros stored)" and rows["ffn.up.nm_values"]["sparsity"] == 0.5
    md = render_markdown(report)
    assert "| packed 2:4, vector 16 (zeros not stored) | 1 | 8,192 | 4,096 | 50.0% |" in md
    assert "| dense (zeros stored) | 1 | 8,192 | 640 | 7.8% |" in md


def test_malformed_packed_node_counts_as_stored(caplog):
    model = _pack_up_only(2, 4, 16)
    (node,) = packed_layers(model)
    node.attributes["m"] = ir.AttrInt64("m", 8)  # 32 packed rows · 8 / 2 = 128 != the input width 64
    with caplog.at_level(logging.WARNING, logger="effc.eval.packed"):
        assert packed_weights(model) == {}
    assert "input width 64" in caplog.text
    assert sparsity_stats(model)["tensors"]["ffn.up.nm_values"]["storage"] == "dense"
