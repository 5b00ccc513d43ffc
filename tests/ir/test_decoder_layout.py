"""The KV-cache layout of decoder graphs (:func:`effc.ir.decoder.kv_layout`): names, order, shapes, removed layers."""

from __future__ import annotations

from effc.ir.decoder import INPUTS, io_shapes, kv_layout

INFO = {"layers": 3, "kv_heads": 2, "head_dim": 8, "max_cache": 32}


def test_layout_names_each_layers_keys_then_values_in_graph_order():
    layout = kv_layout(INFO)
    assert [s.input for s in layout] == ["past_key.0", "past_value.0", "past_key.1", "past_value.1",
                                         "past_key.2", "past_value.2"]
    assert [s.output for s in layout[:2]] == ["key.0", "value.0"]
    assert [s.layer for s in layout] == [0, 0, 1, 1, 2, 2]


def test_keys_are_stored_transposed_and_values_by_slot():
    key, value = kv_layout(INFO)[:2]
    assert key.shape(INFO, 32) == (2, 8, 32) and key.seq_axis == 2
    assert value.shape(INFO, 32) == (2, 32, 8) and value.seq_axis == 1
    shapes = io_shapes(INFO, 4)
    assert list(shapes)[:len(INPUTS)] == list(INPUTS)
    assert shapes["attn_mask"] == (4, 36) and shapes["past_key.1"] == (2, 8, 32)


def test_removed_layers_keep_their_original_numbers():
    layout = kv_layout({**INFO, "kv_layers": [0, 2]})
    assert [s.input for s in layout] == ["past_key.0", "past_value.0", "past_key.2", "past_value.2"]


def _graph_with_caches():
    import json

    import onnx_ir as ir

    from effc.ir.decoder import METADATA_KEY

    values = {name: ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT))
              for name in ("x", "past_key.0", "past_value.0", "past_key.1", "past_value.1")}
    nodes = [ir.Node("", "Identity", [values["past_key.0"]]), ir.Node("", "Identity", [values["past_value.0"]]),
             ir.Node("", "Identity", [values["x"]]), ir.Node("", "Identity", [values["x"]])]
    for node, name in zip(nodes, ("key.0", "value.0", "key.1", "value.1"), strict=True):
        node.outputs[0].name = name
    graph = ir.Graph(list(values.values()), [n.outputs[0] for n in nodes], nodes=nodes, opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    model.metadata_props[METADATA_KEY] = json.dumps({**INFO, "layers": 2})
    return model


def test_remove_kv_layer_drops_its_inputs_outputs_and_records_the_rest():
    import pytest

    from effc.errors import ShapeError
    from effc.ir.decoder import decoder_info, remove_kv_layer

    model = _graph_with_caches()
    remove_kv_layer(model, 1)  # nothing reads past_key.1 / past_value.1
    assert [v.name for v in model.graph.inputs] == ["x", "past_key.0", "past_value.0"]
    assert [v.name for v in model.graph.outputs] == ["key.0", "value.0"]
    assert [s.input for s in kv_layout(decoder_info(model))] == ["past_key.0", "past_value.0"]
    with pytest.raises(ShapeError, match="still read"):
        remove_kv_layer(model, 0)
    with pytest.raises(ShapeError, match="no KV cache"):
        remove_kv_layer(model, 1)
