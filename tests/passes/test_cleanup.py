"""Cleanup passes: structure after the pass, outputs equal under onnxruntime, and ``modified`` contract."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.passes.cleanup import (
    CleanupPass,
    DeadCodeEliminationPass,
    EliminateCommonSubexpressionPass,
    EliminateIdentityPass,
)


def _model(nodes, initializers=(), functions=()) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in initializers],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=8))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


X = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
C = [("c", [[1.0, 2.0, 3.0]])]


def identity_chain() -> ir.Model:
    return _model(
        [
            helper.make_node("Identity", ["x"], ["i1"], name="id1"),
            helper.make_node("Identity", ["i1"], ["i2"], name="id2"),
            helper.make_node("Add", ["i2", "c"], ["a"], name="add"),
            helper.make_node("Identity", ["a"], ["y"], name="id3"),
        ],
        C,
    )


def duplicates() -> ir.Model:
    return _model(
        [
            helper.make_node("Relu", ["x"], ["r1"], name="relu1"),
            helper.make_node("Relu", ["x"], ["r2"], name="relu2"),
            helper.make_node("Mul", ["r1", "c"], ["m1"], name="mul1"),
            helper.make_node("Mul", ["r2", "c"], ["m2"], name="mul2"),
            helper.make_node("Add", ["m1", "m2"], ["y"], name="add"),
        ],
        C,
    )


def dead_code() -> ir.Model:
    fn = helper.make_function("local", "Unused", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    return _model(
        [
            helper.make_node("Neg", ["x"], ["dead1"], name="dead1"),
            helper.make_node("Mul", ["dead1", "unused_w"], ["dead2"], name="dead2"),
            helper.make_node("Add", ["x", "c"], ["y"], name="add"),
        ],
        [*C, ("unused_w", [[5.0, 5.0, 5.0]]), ("orphan", [1.0])],
        [fn],
    )


@pytest.mark.parametrize(
    ("cls", "build", "left", "stat", "value"),
    [
        (EliminateIdentityPass, identity_chain, ["Add"], "nodes_removed", 3),
        (EliminateCommonSubexpressionPass, duplicates, ["Relu", "Mul", "Add"], "nodes_removed", 2),
        (DeadCodeEliminationPass, dead_code, ["Add"], "initializers_removed", 2),
        (CleanupPass, identity_chain, ["Add"], "nodes_removed", 3),
        (CleanupPass, duplicates, ["Relu", "Mul", "Add"], "nodes_removed", 2),
        (CleanupPass, dead_code, ["Add"], "functions_removed", 1),
    ],
)
def test_pass_removes_what_it_should_and_keeps_outputs(cls, build, left, stat, value):
    model = build()
    expected = _run(model, X)
    p = cls()
    result = p(model)
    assert result.modified is True
    assert [n.op_type for n in result.model.graph] == left
    assert p.stats[stat] == value
    assert p.stats["nodes_before"] - p.stats["nodes_after"] == p.stats["nodes_removed"]
    assert [o.name for o in result.model.graph.outputs] == ["y"]
    np.testing.assert_allclose(_run(result.model, X), expected, rtol=0, atol=1e-5)
    again = cls()(result.model)
    assert again.modified is False


def test_dce_removes_functions_and_initializers_but_keeps_the_signature():
    p = DeadCodeEliminationPass()
    model = p(dead_code()).model
    assert set(model.graph.initializers) == {"c"}
    assert len(model.functions) == 0
    assert p.stats == {
        "nodes_before": 4, "nodes_after": 1, "nodes_removed": 3, "initializers_removed": 2, "functions_removed": 1
    }


def test_passes_report_unmodified_on_clean_graph():
    model = _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")], C)
    for cls in (DeadCodeEliminationPass, EliminateIdentityPass, EliminateCommonSubexpressionPass, CleanupPass):
        p = cls()
        assert p(model).modified is False
        assert p.stats["nodes_removed"] == 0


def test_cleanup_sorts_an_out_of_order_graph():
    x = ir.val("x", ir.DataType.FLOAT, [2, 3])
    relu = ir.Node("", "Relu", [x], name="relu")
    neg = ir.Node("", "Neg", [relu.outputs[0]], name="neg")
    neg.outputs[0].name = "y"
    relu.outputs[0].name = "r"
    graph = ir.Graph([x], [neg.outputs[0]], nodes=[neg, relu], opset_imports={"": 17}, name="g")
    model = ir.Model(graph, ir_version=8)
    p = CleanupPass()
    assert p(model).modified is True
    assert [n.name for n in model.graph] == ["relu", "neg"]
    np.testing.assert_allclose(_run(model, X), -np.maximum(X, 0), atol=1e-6)
    assert CleanupPass()(model).modified is False


def test_cse_size_limit_option_is_respected():
    big = np.ones((2, 3), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["k1"], value=numpy_helper.from_array(big, "k1")),
        helper.make_node("Constant", [], ["k2"], value=numpy_helper.from_array(big, "k2")),
        helper.make_node("Add", ["x", "k1"], ["a"]),
        helper.make_node("Add", ["a", "k2"], ["y"]),
    ]
    assert EliminateCommonSubexpressionPass(size_limit=5)(_model(nodes)).modified is False
    model = _model(nodes)
    assert EliminateCommonSubexpressionPass(size_limit=6)(model).modified is True
    np.testing.assert_allclose(_run(model, X), X + 2, atol=1e-6)
