"""Unstructured pruning: exact sparsity per group, selection rules, magnitude vs Wanda, numbers under ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import CalibrationError
from effc.ir.calibration import Calibration
from effc.passes import parse_pipeline
from effc.passes.prune import PrunePass


class TapCalibration(Calibration):
    """The real Calibration, recording which values were tapped."""

    def __init__(self, feeds):
        super().__init__(feeds, source="test feeds")
        self.calls = []

    def tap(self, model, value_names, progress=True, threads=1):
        self.calls.append(list(value_names))
        return super().tap(model, value_names, progress=False, threads=threads)


def mlp(seed=0, k=64, h=48, n=16, dtype=np.float32, share=False) -> ir.Model:
    """x (8, k) → MatMul w1 (k, h) → Relu → Gemm w2 (n, h) transB=1 + b2 → [MatMul w3 (n, n) or w2-shared] → y."""
    rng = np.random.default_rng(seed)
    tp = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = {
        "w1": rng.standard_normal((k, h)), "w2": rng.standard_normal((n, h)), "b2": rng.standard_normal(n),
        "w3": rng.standard_normal((n, n)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="/ffn/fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="/ffn/relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["g"], name="/ffn/fc2", transB=1),
        helper.make_node("MatMul", ["g", "w3"], ["m"], name="/head/proj"),
        helper.make_node("MatMul", ["m", "w3"], ["y"], name="/head/proj2")  # second reader of w3
        if share
        else helper.make_node("Relu", ["m"], ["y"], name="/head/relu"),
    ]
    io = [helper.make_tensor_value_info("x", tp, [8, k])], [helper.make_tensor_value_info("y", tp, [8, n])]
    graph = helper.make_graph(
        nodes, "mlp", *io,
        [numpy_helper.from_array(a.astype(dtype), name) for name, a in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def conv_model(groups=2) -> ir.Model:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4 // groups * 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=groups, pads=[1, 1, 1, 1])],
        "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8 if groups == 2 else 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 5, 5])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def weights(model):
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def run(model, x):
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


X = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_layer_granularity_reaches_exact_sparsity(sparsity):
    model = mlp()
    p = PrunePass(sparsity=sparsity, min_params=0)
    result = p(model)
    assert result.modified is (sparsity > 0)
    for name, w in weights(model).items():
        if name == "b2":
            assert np.count_nonzero(w) == w.size  # 1-D never pruned (not a weight input at all)
            continue
        assert abs(np.count_nonzero(w == 0) - sparsity * w.size) <= 1, name
        assert abs(p.stats["layers"][name]["sparsity"] - sparsity) <= 1 / w.size
    assert p.stats["params_considered"] == 64 * 48 + 16 * 48 + 16 * 16
    assert p.stats["layers"]["w1"]["rel_output_error"] is None  # no calibration: nothing measured


def test_row_granularity_per_output_channel():
    model = mlp()
    PrunePass(sparsity=0.25, granularity="row", min_params=0)(model)
    w = weights(model)
    # MatMul w1 (K=64, N=48): one output row of Wanda's convention is a column of W
    assert (np.count_nonzero(w["w1"] == 0, axis=0) == 16).all()
    # Gemm transB=1 w2 (N=16, K=48): output rows are rows of W
    assert (np.count_nonzero(w["w2"] == 0, axis=1) == 12).all()


def test_magnitude_keeps_the_largest():
    model = mlp()
    before = weights(model)
    PrunePass(sparsity=0.6, min_params=0)(model)
    for name in ("w1", "w2", "w3"):
        after = weights(model)[name]
        kept, pruned = np.abs(before[name][after != 0]), np.abs(before[name][after == 0])
        assert kept.min() >= pruned.max()
        np.testing.assert_array_equal(after[after != 0], before[name][after != 0])


def test_include_exclude_and_min_params_are_respected_and_reported():
    model = mlp()
    before = weights(model)
    p = PrunePass(sparsity=0.5, include=("/ffn/*",), exclude=("w2",), min_params=0)
    p(model)
    after = weights(model)
    assert np.count_nonzero(after["w1"] == 0) == 64 * 48 // 2
    np.testing.assert_array_equal(after["w2"], before["w2"])
    np.testing.assert_array_equal(after["w3"], before["w3"])
    reasons = {s["weight"]: s["reason"] for s in p.stats["skipped"]}
    assert reasons == {"w2": "excluded by 'w2'", "w3": "not matched by include"}
    p = PrunePass(sparsity=0.5, min_params=1000)
    p(mlp())
    assert set(p.stats["layers"]) == {"w1"} and "256 elements < min_params=1000" in str(p.stats["skipped"])


def test_sparsity_zero_keeps_mlp_outputs_and_sparsity_changes_them():
    model = mlp()
    expected = run(model, X)
    assert parse_pipeline("prune(sparsity=0,min_params=0)")[0](model).modified is False
    np.testing.assert_array_equal(run(model, X), expected)
    PrunePass(sparsity=0.5, min_params=0)(model)
    assert not np.allclose(run(model, X), expected, atol=1e-3)


def test_shared_weight_is_pruned_once_and_dtype_is_kept():
    model = mlp(share=True, dtype=np.float16)
    p = PrunePass(sparsity=0.5, min_params=0)
    p(model)
    assert p.stats["layers"]["w3"]["shared_by"] == 2
    w3 = weights(model)["w3"]
    assert w3.dtype == np.float16 and np.count_nonzero(w3 == 0) == 128
    assert model.graph.initializers["w1"].const_value.dtype == ir.DataType.FLOAT16
    assert run(model, X.astype(np.float16)).dtype == np.float16


def test_global_scope_one_threshold_across_layers():
    model = mlp()
    before = weights(model)
    before["w3"] *= 10.0  # make one layer much larger: global pruning spares it
    model.graph.initializers["w3"].const_value = ir.tensor(before["w3"], name="w3")
    p = PrunePass(sparsity=0.5, scope="global", min_params=0)
    p(model)
    total = sum(before[n].size for n in ("w1", "w2", "w3"))
    assert abs(p.stats["params_zeroed"] - total / 2) <= 1
    assert p.stats["layers"]["w3"]["sparsity"] < 0.05 < 0.5 < p.stats["layers"]["w1"]["sparsity"]


def _skewed_model():
    w = np.full((4, 6), 0.5, np.float32)
    w[0, :] = 0.1  # small weights on input channel 0 ...
    w[1:, :] += np.random.default_rng(0).uniform(0, 0.1, (3, 6)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 6])], [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_wanda_differs_from_magnitude_on_skewed_activations_and_has_lower_error():
    rng = np.random.default_rng(3)
    feeds = [{"x": (rng.standard_normal((16, 4)) * np.array([100.0, 1, 1, 1])).astype(np.float32)} for _ in range(3)]
    cal = TapCalibration(feeds)
    reference = _skewed_model()
    errors, masks = {}, {}
    for method in ("magnitude", "wanda"):
        model = _skewed_model()
        p = parse_pipeline(f"prune(sparsity=0.25,granularity=row,method={method},min_params=0)", calibration=cal)[0]
        p(model)
        masks[method] = weights(model)["w"] == 0
        diff = sum(np.square(run(model, f["x"]) - run(reference, f["x"])).sum() for f in feeds)
        errors[method] = np.sqrt(diff / sum(np.square(run(reference, f["x"])).sum() for f in feeds))
        assert p.stats["layers"]["w"]["rel_output_error"] == pytest.approx(errors[method], rel=1e-4)
        assert p.stats["max_rel_output_error"] == p.stats["layers"]["w"]["rel_output_error"]
    assert masks["magnitude"][0].all() and not masks["wanda"][0].any()  # ... but channel 0 carries 100x activations
    assert (masks["wanda"].sum(axis=0) == 1).all()
    assert errors["wanda"] < 0.2 * errors["magnitude"]
    assert cal.calls == [["x"], ["x"]]


def test_wanda_on_grouped_conv_reaches_sparsity_and_runs():
    model = conv_model(groups=2)
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    x[:, 4] *= 1000.0  # global input channel 4 = local channel 0 of group 1
    p = PrunePass(sparsity=0.5, method="wanda", granularity="row", min_params=0, calibration=TapCalibration([{"x": x}]))
    p(model)
    w = weights(model)["w"]
    assert (np.count_nonzero(w.reshape(8, -1) == 0, axis=1) == 18).all()
    assert np.count_nonzero(w[4:, 0]) == 36  # group 1 (outputs 4..7) keeps its large-activation channel
    assert np.count_nonzero(w[:4, 0]) < 30  # group 0's local channel 0 is global channel 0: not favoured
    assert run(model, x).shape == (2, 8, 5, 5)


def test_wanda_without_calibration_raises_calibration_error():
    with pytest.raises(CalibrationError, match="prune\\(method=wanda\\).*no calibration data"):
        PrunePass(method="wanda", min_params=0)(mlp())


def test_constant_node_weight_is_pruned_and_graph_input_weight_is_skipped():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    v = rng.standard_normal((6, 6)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "v"], ["y"], name="mm2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(v, "v")],
    )
    graph.input.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [6, 6]))  # overridable weight
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    p = PrunePass(sparsity=0.5, min_params=0)
    assert p(model).modified is True
    pruned = next(n for n in model.graph if n.op_type == "Constant").attributes["value"].as_tensor().numpy()
    assert np.count_nonzero(pruned == 0) == 12 and pruned.dtype == np.float32
    assert p.stats["skipped"] == [{"node": "mm2", "weight": "v", "reason": "weight is a graph input"}]
    x = rng.standard_normal((3, 4)).astype(np.float32)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x, "v": v})[0], x @ pruned @ v, rtol=1e-5, atol=1e-5)


def test_measured_error_of_transposed_gemm_matches_numpy():
    model = mlp()
    cal = TapCalibration([{"x": X}, {"x": X[::-1].copy()}])
    hr = cal.tap(model, ["hr"])["hr"]
    w2 = weights(model)["w2"]  # (N, K), transB=1
    p = PrunePass(sparsity=0.5, include=("/ffn/fc2",), min_params=0, calibration=cal)
    p(model)
    d = w2 - weights(model)["w2"]
    expected = np.sqrt(sum(np.square(h @ d.T).sum() for h in hr) / sum(np.square(h @ w2.T).sum() for h in hr))
    assert p.stats["layers"]["w2"]["rel_output_error"] == pytest.approx(expected, rel=1e-6)
    assert 0 < expected < 1


def test_measured_error_gram_and_direct_paths_match_numpy():
    # 240 calibration tokens: w1 (K=64, N=48) and w3 (16x16) take the Gram path XᵀX, w2 (N=16 < K=48) the direct one
    model = mlp()
    rng = np.random.default_rng(5)
    cal = TapCalibration([{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(30)])
    acts = cal.tap(model, ["x", "hr", "g"])
    before = weights(model)
    p = PrunePass(sparsity=0.5, min_params=0, calibration=cal)
    p(model)
    after = weights(model)
    for name, act, transpose in (("w1", "x", False), ("w2", "hr", True), ("w3", "g", False)):
        w, d = before[name].astype(np.float64), before[name].astype(np.float64) - after[name]
        w, d = (w.T, d.T) if transpose else (w, d)
        xs = [a.astype(np.float64) for a in acts[act]]
        expected = np.sqrt(sum(np.square(x @ d).sum() for x in xs) / sum(np.square(x @ w).sum() for x in xs))
        assert p.stats["layers"][name]["rel_output_error"] == pytest.approx(expected, rel=1e-9), name
