import json

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from effc import zoo
from effc.errors import LoadError, ShapeError
from effc.ir.canonicalize import canonicalize, parse_input_shape
from effc.ir.queries import op_types
from effc.ir.reference import Reference


def _static(value):
    return value.shape is not None and all(isinstance(d, int) and d >= 0 for d in value.shape)


@pytest.mark.parametrize("name", [n for n in zoo.names() if not zoo.get(n).is_decoder])  # decoders: tests/decoder
def test_zoo_canonical_is_static_and_numerically_equal(zoo_models, name):
    entry, original, canonical = zoo_models.get(name)
    values = [v for node in canonical.graph for v in node.outputs] + list(canonical.graph.inputs)
    assert values and all(_static(v) for v in values), [v.name for v in values if not _static(v)][:5]
    assert op_types(canonical)["LSTM"] == 0
    assert sorted(v.name for v in canonical.graph.inputs) == sorted(entry.input_shapes)
    ref_original, ref_canonical = Reference(original), Reference(canonical)
    for feed in entry.samples("eval", 2):
        expected = ref_original.run({**feed, **entry.constant_inputs})
        got = ref_canonical.run(feed)
        for e, g in zip(expected, got, strict=True):
            assert e.shape == g.shape
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    record = json.loads(canonical.metadata_props["effc.canonicalize"])
    assert record["dynamic_values"] == 0
    assert record["nodes_after"] <= record["nodes_before"] or record["lstm_unrolled"] > 0


def test_silero_sr_becomes_constant_and_lstm_unrolled(zoo_models):
    _, original, canonical = zoo_models.get("silero-vad")
    assert "sr" in {v.name for v in original.graph.inputs}
    assert "sr" not in {v.name for v in canonical.graph.inputs}
    assert op_types(original)["LSTM"] > 0 and op_types(canonical)["If"] == 0
    assert json.loads(canonical.metadata_props["effc.canonicalize"])["lstm_unrolled"] == 1


@pytest.mark.parametrize("name", ["ppocr-cls", "silero-vad"])
def test_canonicalize_is_idempotent(zoo_models, name):
    entry, _, canonical = zoo_models.get(name)
    again = canonicalize(canonical, entry.input_shapes, entry.constant_inputs)
    assert op_types(again) == op_types(canonical)
    feed = entry.samples("calibration", 1)[0]
    for a, b in zip(Reference(canonical).run(feed), Reference(again).run(feed), strict=True):
        np.testing.assert_array_equal(a, b)


def _dynamic_model(weights_as_inputs=False):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])]
    if weights_as_inputs:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "scale"], ["y"])], "g",
        inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unknown_dims_raise_shape_error_with_fix():
    with pytest.raises(ShapeError) as info:
        canonicalize(_dynamic_model(), constant_inputs={"scale": np.float32(2)})
    message = str(info.value)
    assert "x (?Nx4)" in message and "--input-shape x=1x4" in message


def test_shape_for_unknown_input_lists_valid_names():
    with pytest.raises(ShapeError, match=r"no input named 'images'.*\['scale', 'x'\]"):
        canonicalize(_dynamic_model(), input_shapes={"images": (1, 4)})


@pytest.mark.parametrize("shape", [(1, 4, 1), (3, 5)])
def test_wrong_rank_or_fixed_dim_raises(shape):
    with pytest.raises(ShapeError, match="input 'x'"):
        canonicalize(_dynamic_model(), input_shapes={"x": shape}, constant_inputs={"scale": np.float32(2)})


@pytest.mark.parametrize("shape,fix", [((1, 4, 1), "x=1x4"), ((3, 5), "x=3x4")])
def test_shape_error_hint_is_valid_input_shape_text(shape, fix):
    # the hint used to print the model's own dims ("x=?Nx4"), which --input-shape cannot parse
    with pytest.raises(ShapeError) as info:
        canonicalize(_dynamic_model(), input_shapes={"x": shape}, constant_inputs={"scale": np.float32(2)})
    suggested = info.value.hint.split("--input-shape ")[1].split()[0]
    assert suggested == fix
    assert parse_input_shape(suggested) == ("x", tuple(int(d) for d in fix[2:].split("x")))


def test_initializer_inputs_dropped_and_constant_input_folded():
    model = _dynamic_model(weights_as_inputs=True)
    canonical = canonicalize(model, input_shapes={"x": (2, 4)}, constant_inputs={"scale": np.float32(3)})
    assert [v.name for v in canonical.graph.inputs] == ["x"]
    assert tuple(canonical.graph.outputs[0].shape) == (2, 4)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(Reference(canonical).run({"x": x})[0], 3 * x)
    assert json.loads(canonical.metadata_props["effc.canonicalize"])["dropped_initializer_inputs"] == 1
    assert [v.name for v in model.graph.inputs] == ["x", "scale", "w"]  # the input model is left unchanged


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.:/]{0,12}", fullmatch=True),
       st.lists(st.integers(1, 4096), min_size=1, max_size=5))
def test_parse_input_shape_round_trip(name, dims):
    assert parse_input_shape(f"{name}={'x'.join(map(str, dims))}") == (name, tuple(dims))


@pytest.mark.parametrize("text", ["x", "x=", "=1x2", "x=1x0", "x=1xx2", "x=1,3", "x=-1x3", "x=ax3"])
def test_parse_input_shape_rejects_bad_text(text):
    with pytest.raises(ShapeError, match="cannot parse"):
        parse_input_shape(text)


def test_castlike_keeps_saturate_when_it_becomes_cast():
    # onnxscript's folder rewrote CastLike to Cast and dropped saturate=0 (float8 overflow saturated instead of inf)
    graph = helper.make_graph([helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                               helper.make_tensor_value_info("like", TensorProto.FLOAT8E5M2, [0])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT8E5M2, [3])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    out = canonicalize(model)
    (node,) = list(out.graph)
    assert node.op_type == "Cast" and node.attributes["saturate"].value == 0
    assert node.attributes["to"].value == TensorProto.FLOAT8E5M2 and out.graph.outputs[0].name == "y"


def test_constant_output_is_a_value_tensor():
    # Shape of a static input folds to Constant(value_ints) feeding the graph output; TVM reads only `value`
    graph = helper.make_graph([helper.make_node("Shape", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    out = canonicalize(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])))
    (node,) = list(out.graph)
    assert node.op_type == "Constant" and list(node.attributes) == ["value"]
    assert node.attributes["value"].value.numpy().tolist() == [2, 3]


def _chain_model(names_in_file_order: list[str]) -> ir.Model:
    """x -> Neg (first) -> h -> Relu (second) -> y, with the nodes written in the given order (cycle: 'cycle')."""
    nodes = {"first": helper.make_node("Neg", ["x"], ["h"], name="first"),
             "second": helper.make_node("Relu", ["h"], ["y"], name="second"),
             "cycle": helper.make_node("Add", ["y", "x"], ["x2"], name="cycle")}
    if "cycle" in names_in_file_order:  # first now reads x2, made from y: Neg -> Relu -> Add -> Neg
        nodes["first"] = helper.make_node("Neg", ["x2"], ["h"], name="first")
    graph = helper.make_graph([nodes[n] for n in names_in_file_order], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_nodes_out_of_topological_order_are_sorted():
    # tools write unsorted files; TVM's importer failed with a raw KeyError on the first unseen input
    out = canonicalize(_chain_model(["second", "first"]))
    assert [n.name for n in out.graph] == ["first", "second"]
    x = np.array([1.0, -2.0], np.float32)
    np.testing.assert_array_equal(Reference(out).run({"x": x})[0], np.maximum(-x, 0))


def test_a_cycle_is_a_load_error():
    with pytest.raises(LoadError, match="cycle"):
        canonicalize(_chain_model(["second", "first", "cycle"]))
