"""Readable layer names: torch module path, ONNX scope, Paddle weight name, else the node name."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.ir.names import layer_names, readable_name

_SCOPES = "['', 'encoder', 'encoder.layer.0', 'encoder.layer.0.attention.self.query', 'linear']"


def _model() -> ir.Model:
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "val_49"], ["a"], name="node_MatMul_48"),  # torch dynamo export
        helper.make_node("MatMul", ["a", "onnx::MatMul_7"], ["b"], name="/encoder/layer.1/ffn/MatMul"),  # torchscript
        helper.make_node("MatMul", ["b", "conv2_expand_weights"], ["c"], name="MatMul@3"),  # Paddle
        helper.make_node("MatMul", ["c", "val_50"], ["d"], name="node_MatMul_9"),  # nothing better known
        helper.make_node("Relu", ["d"], ["y"], name="relu"),  # reads no weight: not listed
    ]
    inits = [numpy_helper.from_array(w, n) for n in ("val_49", "onnx::MatMul_7", "conv2_expand_weights", "val_50")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    model.graph.node(0).metadata_props["pkg.torch.onnx.name_scopes"] = _SCOPES
    return model


def test_readable_name_sources():
    nodes = list(_model().graph)
    assert [readable_name(n) for n in nodes] == [
        "encoder.layer.0.attention.self.query", "encoder/layer.1/ffn", "conv2_expand", "node_MatMul_9", "relu"]


def test_layer_names_maps_nodes_and_their_weights():
    assert layer_names(_model()) == {
        "node_MatMul_48": "encoder.layer.0.attention.self.query", "val_49": "encoder.layer.0.attention.self.query",
        "/encoder/layer.1/ffn/MatMul": "encoder/layer.1/ffn", "onnx::MatMul_7": "encoder/layer.1/ffn",
        "MatMul@3": "conv2_expand", "conv2_expand_weights": "conv2_expand",
    }


def test_repeated_readable_names_stay_distinct():
    model = _model()
    model.graph.node(3).metadata_props["pkg.torch.onnx.name_scopes"] = _SCOPES
    names = layer_names(model)
    assert names["node_MatMul_9"] == "encoder.layer.0.attention.self.query (node_MatMul_9)"
