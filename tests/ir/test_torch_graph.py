"""The torch evaluator of a canonical graph (``effc.ir.torch_graph``) against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from effc import zoo
from effc.errors import PassError
from effc.ir.reference import Reference
from effc.ir.torch_graph import SUPPORTED, TorchGraph, _ops, check_supported


def _ops_model() -> ir.Model:
    """ids (1, 6) int64 + mask (1, 6) → embedding → attention-like mixing → masked mean pooling (many op types)."""
    rng = np.random.default_rng(0)
    inits = {"table": rng.standard_normal((10, 8)), "w": rng.standard_normal((8, 8)) / 3, "g": 1 + rng.random(8),
             "b": rng.random(8), "lo": np.array(1e-3), "zero": np.array(0.0), "ax1": np.array([1], np.int64),
             "ax0": np.array([0], np.int64), "shape": np.array([0, 6, 2, 4], np.int64),
             "nd_idx": np.array([[0, 1], [0, 4]], np.int64)}
    tensors = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in inits.items()]
    n = helper.make_node
    nodes = [
        n("Gather", ["table", "ids"], ["emb"], axis=0),                      # (1, 6, 8)
        n("MatMul", ["emb", "w"], ["h"]),
        n("Gelu", ["h"], ["a"]),
        n("Reshape", ["a", "shape"], ["heads"]),                             # (1, 6, 2, 4), 0 copies the batch dim
        n("Transpose", ["heads"], ["ht"], perm=[0, 2, 1, 3]),
        n("Softmax", ["ht"], ["sm"], axis=-1),
        n("Transpose", ["sm"], ["st"], perm=[0, 2, 1, 3]),
        n("Reshape", ["st", "shape8"], ["flat"]),
        n("LayerNormalization", ["flat", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
        n("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["maskf", "ax1_last"], ["mask3"]),
        n("Mul", ["ln", "mask3"], ["masked"]),
        n("ReduceSum", ["masked", "ax1"], ["summed"], keepdims=0),
        n("ReduceSum", ["mask3", "ax1"], ["count"], keepdims=0),
        n("Clip", ["count", "lo"], ["count_c"]),
        n("Div", ["summed", "count_c"], ["pooled"]),
        n("Equal", ["maskf", "zero"], ["pad"]),
        n("Not", ["pad"], ["real"]),
        n("And", ["real", "real"], ["real2"]),
        n("Where", ["real2", "maskf", "zero"], ["mask_again"]),
        n("ReduceMean", ["mask_again", "ax1"], ["frac"], keepdims=1),
        n("Concat", ["pooled", "frac"], ["out"], axis=1),
        n("GatherND", ["ln", "nd_idx"], ["picked"]),                         # (2, 8): tokens 1 and 4
        n("Squeeze", ["pooled_u", "ax0"], ["pooled_s"]),
        n("Unsqueeze", ["pooled", "ax0"], ["pooled_u"]),
    ]
    nodes = nodes[:-2] + [nodes[-1], nodes[-2]]  # topological order: Unsqueeze before Squeeze
    tensors += [numpy_helper.from_array(np.array([1, 6, 8], np.int64), "shape8"),
                numpy_helper.from_array(np.array([2], np.int64), "ax1_last")]
    graph = helper.make_graph(
        nodes, "ops",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 9]),
         helper.make_tensor_value_info("picked", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("pooled_s", TensorProto.FLOAT, [1, 8])], tensors)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def test_every_op_of_the_table_matches_onnxruntime():
    model = _ops_model()
    feed = {"ids": np.array([[1, 7, 3, 3, 9, 0]], np.int64), "mask": np.array([[1, 1, 1, 1, 0, 0]], np.int64)}
    want = Reference(model).run(feed)
    with torch.no_grad():
        got = TorchGraph(model).run(feed)
    for name, w in zip([v.name for v in model.graph.outputs], want, strict=True):
        np.testing.assert_allclose(got[name].numpy(), w, atol=1e-5, rtol=1e-5, err_msg=name)


def test_minilm_matches_onnxruntime_and_gradients_reach_overridden_weights():
    entry = zoo.get("minilm-l6")
    model = entry.load()
    feed = entry.samples("eval", 1)[0]
    want = Reference(model).run(feed)
    graph = TorchGraph(model)
    up = next(nd for nd in model.graph if nd.op_type == "MatMul" and nd.inputs[1].const_value is not None
              and nd.inputs[1].const_value.shape[1] == 1536)
    w = torch.from_numpy(np.array(up.inputs[1].const_value.numpy())).requires_grad_(True)
    got = graph.run(feed, {up.inputs[1].name: w})
    for name, ref in zip(graph.outputs, want, strict=True):
        assert np.abs(got[name].detach().numpy() - ref).max() < 1e-4, name
    got["sentence_embedding"].sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_unsupported_ops_are_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    wt = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "conv", [x], [y], [wt])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert check_supported(model) == ["Conv"]
    with pytest.raises(PassError, match="Conv"):
        TorchGraph(model)


def test_supported_names_exactly_the_evaluated_ops():
    assert set(_ops(torch)) == SUPPORTED
