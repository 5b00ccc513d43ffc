"""The agreement gate: a planted miscompile is refused and named; --allow-mismatch writes and records it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import effc
from effc.errors import MismatchError
from effc.eval import agreement


def _tanh_mlp() -> onnx.ModelProto:
    """x (1, 8) → MatMul → Tanh ("act") → MatMul → y (1, 4)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Tanh", ["h"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def planted_tanh(monkeypatch):
    """TVM's Tanh converter made deliberately wrong (sigmoid instead of tanh) for the duration of a test."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    monkeypatch.setattr(onnx_frontend.Tanh, "_impl_v7",
                        classmethod(lambda cls, bb, inputs, attr, params: relax.op.sigmoid(inputs[0])))


def test_planted_miscompile_is_refused_and_names_output_and_node(tmp_path, planted_tanh):
    out = tmp_path / "out"
    with pytest.raises(MismatchError) as info:
        effc.compile(_tanh_mlp(), out_dir=out, measure_latency=False, eval_samples=2)
    text = str(info.value)
    assert "output 'y'" in text and "first disagreeing node: 'act' (Tanh" in text and "--allow-mismatch" in text
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no temp folder left


def test_allow_mismatch_writes_and_records(tmp_path, planted_tanh):
    out = tmp_path / "out"
    effc.compile(_tanh_mlp(), out_dir=out, measure_latency=False, eval_samples=2, allow_mismatch=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["agreement"]["ok"] is False and manifest["agreement"]["failed"] == ["y"]
    assert manifest["agreement"]["first_node"]["node"] == "act"
    first = (out / "report.md").read_text().splitlines()[0]
    assert first.startswith("**MISMATCH") and "'y'" in first


def test_correct_compile_passes_the_gate(tmp_path):
    result = effc.compile(_tanh_mlp(), out_dir=tmp_path / "out", measure_latency=False, eval_samples=2)
    assert result.manifest["agreement"]["ok"] is True and "failed" in result.manifest["agreement"]


def test_check_fails_on_misplaced_nan_dtype_and_shape():
    x = np.array([np.nan, 1.0], np.float32)
    r = agreement.check([[x, x, x]], [[np.array([0.0, 1.0], np.float32), x.astype(np.float64), x[:1]]],
                        ["nan", "dtype", "shape"])
    assert r["failed"] == ["nan", "dtype", "shape"]
    assert "NaN/inf" in r["outputs"]["nan"]["why"] and "dtype float64" in r["outputs"]["dtype"]["why"]
    assert "shape (1,)" in r["outputs"]["shape"]["why"]


def test_check_accepts_fp_rounding_at_large_scale_but_not_a_local_error():
    ref = np.linspace(-1000, 1000, 100_000, dtype=np.float32)
    rounding = ref * np.float32(1 + 3e-7)
    assert agreement.check([[ref]], [[rounding]], ["y"])["ok"]  # max abs 3e-4 > 1e-4, rel L2 3e-7
    local = ref.copy()
    local[7] += 5.0  # rel L2 3e-5 (< 1e-4), but one element off by 0.5% of the range
    row = agreement.check([[ref]], [[local]], ["y"])["outputs"]["y"]
    assert not row["ok"] and row["rel_l2"] < agreement.REL_L2 and "max abs 5" in row["why"]
