"""The ONNX backend node conformance runner on the ops of the zoo models and LLM exports (config inputs frozen).

The fast subset: the first 2 cases of every op in ``benchmarks.onnx_conformance.FAST_OPS``, compiled for cpu in one
worker process with the agreement gate on (as a user compiles). The full run is ``python
benchmarks/onnx_conformance.py --freeze-config-inputs`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import onnx_conformance as conformance

#: PASS count of the fast subset measured when this test was written; a lower count is a regression.
MIN_PASS = 100


@pytest.mark.slow
def test_fast_subset_has_no_wrong_answer_and_no_crash():
    cases = conformance.collect_cases(conformance.FAST_OPS, per_op=2)
    rows = conformance.run_cases(cases, freeze=True, gate=True, jobs=1, timeout=120)
    bad = [(r["name"], r["class"], r["detail"]) for r in rows if r["class"] in ("WRONG", "CRASH", "TIMEOUT")]
    assert not bad
    passed = sum(r["class"] == "PASS" for r in rows)
    assert passed >= MIN_PASS, [(r["name"], r["detail"]) for r in rows if r["class"] != "PASS"]
    unnamed = [(r["name"], r["detail"]) for r in rows
               if r["class"] == "CLEAN_ERROR" and not conformance.names_op(r["detail"], r["op"])]
    assert not unnamed


def test_the_recorded_full_run_meets_the_bar():
    # benchmarks/results/onnx_conformance_frozen.json: the last full run (docs/BENCHMARKS.md shows its table)
    result = json.loads((conformance.RESULTS / "onnx_conformance_frozen.json").read_text())
    effc = result["summary"]["effc"]
    assert result["summary"]["cases"] == 1884 and effc["WRONG"] == 0 and effc["CRASH"] == 0 and effc["PASS"] >= 1500
    unnamed = [(r["name"], r["detail"]) for r in result["cases"]
               if r["class"] == "CLEAN_ERROR" and not conformance.names_op(r["detail"], r["op"])]
    assert not unnamed  # every refusal names the op (or the inner node of a function body) it stopped at


@pytest.mark.parametrize(("detail", "op", "named"), [
    ("TargetError: TVM cannot compile MatMul node 'n27' (bfloat16): ...", "Attention", True),
    ("UnsupportedOpError: ... not supported by TVM's ONNX frontend: RandomUniformLike (e.g. node 'n')", "Bernoulli",
     True),
    ("ShapeError: input(s) with unknown dims: x (?N); fix: give a deployment shape", "Shape", False),
    ("TargetError: TVM failed at step 'lower and build': InternalError: Check failed", "HannWindow", False),
])
def test_a_clean_error_names_an_op(detail, op, named):
    assert conformance.names_op(detail, op) is named


def test_compare_is_exact_on_dtype_shape_and_nan():
    x = np.array([1.0, np.nan], np.float32)
    assert conformance.compare(x, x.copy()) is None
    assert "dtype" in conformance.compare(x, x.astype(np.float64))
    assert "shape" in conformance.compare(x, x[:1])
    assert "differ" in conformance.compare(x, np.array([1.0, 0.0], np.float32))
    assert conformance.compare(x, x * np.float32(1 + 5e-4)) is None  # within rtol 1e-3


def test_freeze_config_inputs_makes_small_integer_inputs_initializers():
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    model = helper.make_model(graph)
    frozen = conformance.freeze_config_inputs(model, {"x": np.zeros((2, 3), np.float32),
                                                      "shape": np.array([3, 2], np.int64)})
    assert frozen == ["shape"] and [v.name for v in model.graph.input] == ["x"]
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist() == [3, 2]
