import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.ir.canonicalize import canonicalize
from effc.ir.lstm import unroll_lstms
from effc.ir.queries import op_types
from effc.ir.reference import Reference

SEQ, BATCH, IN, HID = 5, 2, 3, 4


def _lstm_model(layout=0, peephole=False, initial=True, direction="forward"):
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, 4 * HID, IN)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((dirs, 4 * HID, HID)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.standard_normal((dirs, 8 * HID)).astype(np.float32), "B")]
    names = ["X", "W", "R", "B", ""]
    x_shape = [SEQ, BATCH, IN] if layout == 0 else [BATCH, SEQ, IN]
    state_shape = [dirs, BATCH, HID] if layout == 0 else [BATCH, dirs, HID]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if initial:
        names += ["h0", "c0"]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in ("h0", "c0")]
    if peephole:
        names += ([] if initial else ["", ""]) + ["P"]
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, 3 * HID)).astype(np.float32), "P"))
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], hidden_size=HID, layout=layout, direction=direction)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph([node], "lstm", inputs, outputs, inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


def _feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(tuple(v.shape)).astype(np.float32) for v in model.graph.inputs}


@pytest.mark.parametrize("layout,peephole,initial", [(0, False, True), (0, True, True), (1, False, True),
                                                     (0, False, False), (0, True, False)])
def test_unrolled_lstm_matches_onnxruntime(layout, peephole, initial):
    model = _lstm_model(layout, peephole, initial)
    feeds = _feeds(model)
    if layout == 0:
        expected = Reference(model).run(feeds)
    else:  # onnxruntime has no batch-first LSTM: run the seq-first twin on transposed tensors
        twin = _lstm_model(0, peephole, initial)
        y, y_h, y_c = Reference(twin).run({k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
        expected = [y.transpose(2, 0, 1, 3), np.swapaxes(y_h, 0, 1), np.swapaxes(y_c, 0, 1)]
    canonical = canonicalize(model)
    assert op_types(canonical)["LSTM"] == 0
    assert op_types(canonical)["Sigmoid"] == 3 * SEQ
    got = Reference(canonical).run(feeds)
    assert [o.name for o in canonical.graph.outputs] == ["Y", "Y_h", "Y_c"]
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_bidirectional_lstm_is_left_in_place():
    model = _lstm_model(direction="bidirectional")
    assert unroll_lstms(model) == 0
    assert op_types(model)["LSTM"] == 1


def test_lstm_inside_if_branch_is_unrolled():
    inner = _lstm_model(initial=False)
    then_graph = helper.make_graph([ir.to_proto(inner).graph.node[0]], "then", [],
                                   [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, BATCH, HID])],
                                   list(ir.to_proto(inner).graph.initializer))
    else_graph = helper.make_graph([helper.make_node("Constant", [], ["Z"], value=numpy_helper.from_array(
        np.zeros((1, BATCH, HID), np.float32)))], "else", [],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, BATCH, HID])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph)], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [SEQ, BATCH, IN]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, BATCH, HID])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))
    feeds = {"X": _feeds(inner)["X"], "cond": np.array(True)}
    expected = Reference(model).run(feeds)[0]
    for g in model.graphs():  # subgraph values need shapes: give X its static shape inside the branch
        for node in g:
            if node.op_type == "LSTM":
                node.inputs[0].shape = ir.Shape([SEQ, BATCH, IN])
    assert unroll_lstms(model) == 1
    assert op_types(model)["LSTM"] == 0
    np.testing.assert_allclose(Reference(model).run(feeds)[0], expected, atol=1e-5)
