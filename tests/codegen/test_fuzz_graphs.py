"""Graph fuzzing (bounded): random small graphs with ±0, subnormals, ±inf, NaN and empty dims, compiled vs
onnxruntime through effc's agreement gate; the long mode is ``python benchmarks/fuzz_graphs.py``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper

from benchmarks import fuzz_graphs


@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fuzz_graphs.graphs())
def test_random_graphs_agree_or_are_refused(example):
    # a MismatchError (wrong answer) or a non-EffcError (raw crash) fails the test with the graph printed
    outcome = fuzz_graphs.check(*example)
    assert outcome == "agree" or outcome.startswith("refused: "), outcome


def _chain(op: str, shape=(3,)):
    graph = helper.make_graph([helper.make_node(op, ["x", "y"], ["t"]), helper.make_node("Add", ["t", "y"], ["z"])],
                              "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "xy"],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_found_by_fuzzing_max_min_propagate_nan(op):
    # hypothesis seed 0: Max(NaN, 0) compiled to 0 (LLVM maxnum); onnxruntime gives NaN
    feeds = {"x": np.array([np.nan, 1.0, -0.0], np.float32), "y": np.array([0.0, np.nan, 0.0], np.float32)}
    assert fuzz_graphs.check(_chain(op), feeds) == "agree"
