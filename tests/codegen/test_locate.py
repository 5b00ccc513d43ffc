"""The node behind a TVM build failure that names none: bisection over graph prefixes (effc.codegen.locate)."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from effc.codegen.locate import first_failing_node
from effc.errors import TargetError


def _chain(ops: list[str]) -> ir.Model:
    nodes, current = [], "x"
    for k, op in enumerate(ops):
        nodes.append(helper.make_node(op, [current], [f"t{k}"], name=f"n{k}_{op}"))
        current = f"t{k}"
    info = [helper.make_tensor_value_info(f"t{k}", TensorProto.FLOAT, [4]) for k in range(len(ops))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [info[-1]], value_info=info[:-1])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _failing_on(op: str, message: str = "dtype mismatch on BufferStore"):
    built: list[int] = []

    def attempt(model: ir.Model) -> None:
        built.append(len(model.graph))
        if any(node.op_type == op for node in model.graph):
            raise TargetError("TVM failed at step 'lower and build'") from TypeError(message)

    return attempt, built


@pytest.mark.parametrize("position", [0, 5, 11])
def test_the_first_failing_node_is_found_in_log_builds(position):
    ops = ["Relu"] * 12
    ops[position] = "Erf"
    attempt, built = _failing_on("Erf")
    model = _chain(ops)
    with pytest.raises(TargetError) as whole:
        attempt(model)
    node = first_failing_node(model, attempt, whole.value)
    assert node is not None and node.name == f"n{position}_Erf"
    assert len(built) <= 1 + 5  # the whole graph + ceil(log2(12)) prefixes


def test_a_prefix_failing_differently_is_not_the_culprit():
    model = _chain(["Relu", "Neg", "Erf", "Abs"])
    attempt, _ = _failing_on("Neg", message="another failure")  # every prefix with Neg fails, but not alike
    failure = TargetError("TVM failed at step 'lower and build'")
    failure.__cause__ = TypeError("dtype mismatch on BufferStore")
    assert first_failing_node(model, attempt, failure) is None


def test_a_single_node_is_its_own_culprit():
    model = _chain(["Erf"])
    assert first_failing_node(model, lambda m: None, TargetError("x")).name == "n0_Erf"
