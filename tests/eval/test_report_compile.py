"""The compile report of a small N:M-packed model: sparsity counted in the dense shape, baseline named."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

import effc
from effc.eval.report import summary_rows
from tests.passes.nm_helpers import ffn_model


def test_compile_report_counts_packed_zeros_and_names_the_original_baseline(tmp_path):
    ir.save(ffn_model(), tmp_path / "ffn.onnx")
    result = effc.compile(str(tmp_path / "ffn.onnx"), passes="nm-sparsity(n=2,m=4,vector=16,reconstruct=false)",
                          out_dir=tmp_path / "out", latency_repeat=2)
    data = json.loads((result.out_dir / "report.json").read_text())
    total = data["cost"]["sparsity"]["total"]
    # w1 (64, 128) and w2 (128, 64) packed 2:4: half of 16,384 weight elements are zeros that are not stored
    assert total["elements"] == 2 * 64 * 128 and total["packed_zeros"] == 64 * 128
    assert total["sparsity"] == pytest.approx(0.5) and total["by_storage"]["packed 2:4, vector 16"]["tensors"] == 2
    assert data["cost"]["params_bytes_after"] < 0.6 * data["cost"]["params_bytes_before"]  # bytes as stored
    assert data["latency"]["baseline"] == "original model"  # effc compile times onnxruntime on the original
    rows = dict(summary_rows(result.report))
    assert rows["Weight sparsity"].startswith("50.0% zeros (8.19 k of 16.4 k weight elements in 2 tensors)")
    assert rows["Latency (median)"].startswith("onnxruntime (original model) ")
    md = (result.out_dir / "report.md").read_text()
    assert "| packed 2:4, vector 16 (zeros not stored) | 2 | 16,384 | 8,192 | 50.0% |" in md
