import numpy as np
import pytest
from onnx import TensorProto

from effc.errors import CalibrationError, DataError, EffcError
from effc.ir.calibration import Calibration
from effc.ir.reference import Reference, run_with_taps


def test_reference_runs_in_output_order(zoo_models):
    entry, _, model = zoo_models.get("ppocr-cls")
    ref = Reference(model, threads=1)
    assert ref.input_names == ["x"] and len(ref.output_names) == 1
    (out,) = ref.run(entry.samples("eval", 1)[0])
    assert out.shape == (1, 2)
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-5)  # softmax over the two angles
    with pytest.raises(DataError, match="lack"):
        ref.run({"y": out})


def test_taps_shapes_and_tapped_output_equals_graph_output(zoo_models):
    entry, _, model = zoo_models.get("ppocr-cls")
    convs = [n for n in model.graph if n.op_type == "Conv"][:3]
    names = [n.outputs[0].name for n in convs] + [model.graph.outputs[0].name, "x"]
    feeds = entry.samples("eval", 2)
    taps = run_with_taps(model, feeds, names)
    assert len(taps) == 2
    for feed, tapped in zip(feeds, taps, strict=True):
        for node in convs:
            value = node.outputs[0]
            assert tapped[value.name].shape == tuple(value.shape)
        # exposing intermediates can change onnxruntime's kernel fusion: equal up to float rounding
        np.testing.assert_allclose(tapped[model.graph.outputs[0].name], Reference(model).run(feed)[0],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(tapped["x"], feed["x"])
    # the tapped copy is a copy: the model keeps its single output
    assert len(model.graph.outputs) == 1


def test_unknown_tap_name_lists_candidates(zoo_models):
    entry, _, model = zoo_models.get("ppocr-cls")
    real = next(n for n in model.graph if n.op_type == "Conv").outputs[0].name
    with pytest.raises(EffcError, match="close names") as info:
        run_with_taps(model, entry.samples("eval", 1), [real + "_typo"])
    assert real in str(info.value)


def test_calibration_tap_collects_one_array_per_feed(zoo_models):
    entry, _, model = zoo_models.get("magika")
    feeds = entry.samples("calibration", 3)
    calib = Calibration(feeds, source="zoo:magika real samples (calibration split)")
    assert len(calib) == 3 and list(calib)[1]["bytes"].shape == (1, 2048)
    matmul = next(n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv"))
    name = matmul.outputs[0].name
    taps = calib.tap(model, [name], progress=True)
    assert list(taps) == [name] and len(taps[name]) == 3
    assert taps[name][0].shape == tuple(matmul.outputs[0].shape)
    assert not np.array_equal(taps[name][0], taps[name][1])  # different files -> different activations


def test_calibration_errors(zoo_models):
    with pytest.raises(CalibrationError, match="no samples"):
        Calibration([], source="empty")
    _, _, model = zoo_models.get("magika")
    calib = Calibration([{"wrong": np.zeros((1, 2048), np.int32)}], source="bad")
    with pytest.raises(CalibrationError, match="lacks model input"):
        calib.tap(model, [model.graph.outputs[0].name], progress=False)


def test_tap_on_untyped_value_made_by_a_pass():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.outputs[0].type = None  # as a freshly inserted node would leave it
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    (taps,) = run_with_taps(model, [{"x": x}], ["r"])
    np.testing.assert_array_equal(taps["r"], np.maximum(x, 0))


@pytest.mark.parametrize("dtype", [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN, TensorProto.INT4])
def test_narrow_dtype_feeds_and_outputs_pass_through_exact_boundary_casts(dtype):
    # onnxruntime's Python bindings refuse ml_dtypes arrays ("Numpy_type 256 can't be converted to MLDataType")
    import onnx_ir as ir
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["n"]), helper.make_node("Identity", ["n"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", dtype, [2, 3])],
                              [helper.make_tensor_value_info("y", dtype, [2, 3]),
                               helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 3])])
    graph.node.append(helper.make_node("Cast", ["n"], ["f"], to=TensorProto.FLOAT))
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    x = np.array([[1, -2, 3], [0.5, 0, -7]]).astype(np_dtype) if dtype != TensorProto.INT4 else \
        np.array([[1, -2, 3], [7, 0, -7]]).astype(np_dtype)
    ref = Reference(model)
    assert ref.input_names == ["x"] and ref.output_names == ["y", "f"]
    y, f = ref.run({"x": x})
    assert y.dtype == np_dtype and f.dtype == np.float32
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))
    np.testing.assert_array_equal(f, x.astype(np.float32))


def test_an_op_onnxruntime_has_no_kernel_for_is_named_with_an_actionable_fix():
    import onnx_ir as ir
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Max", ["a", "b"], ["y"], name="peak")], "g",
                              [helper.make_tensor_value_info(n, TensorProto.INT16, [2]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.INT16, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(EffcError, match=r"Max\(13\)") as err:
        Reference(model)
    assert "no CPU kernel for this op and type" in err.value.hint
