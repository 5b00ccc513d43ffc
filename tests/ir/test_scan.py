"""Scan unrolled into copies of its body (effc.ir.scan) computes what onnxruntime computes on the Scan."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from effc.ir.canonicalize import canonicalize
from effc.ir.queries import op_types
from effc.ir.reference import Reference


def _running_sum_model(input_direction: int, output_direction: int, output_axis: int) -> ir.Model:
    """state (2,) + x_t (2,) -> (state', y_t = state' * w), with x of shape (2, T=3) scanned along axis 1."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "w"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [2])])
    scan = helper.make_node("Scan", ["s0", "x"], ["s_final", "y"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[input_direction],
                            scan_output_axes=[output_axis], scan_output_directions=[output_direction])
    out_shape = [3, 2] if output_axis == 0 else [2, 3]
    graph = helper.make_graph(
        [scan], "g",
        [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [helper.make_tensor("w", TensorProto.FLOAT, [2], [2.0, -1.0])])  # an outer-scope value used by the body
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize(("input_direction", "output_direction", "output_axis"),
                         [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, -1)])
def test_unrolled_scan_matches_onnxruntime(input_direction, output_direction, output_axis):
    model = _running_sum_model(input_direction, output_direction, output_axis)
    feeds = {"s0": np.array([1.0, 2.0], np.float32), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    expected = Reference(model).run(feeds)
    canonical = canonicalize(model)
    assert "Scan" not in op_types(canonical)
    for got, want in zip(Reference(canonical).run(feeds), expected, strict=True):
        np.testing.assert_array_equal(got, want)
