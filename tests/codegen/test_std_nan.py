"""NaN, ±inf and out-of-range floats the compile never saw: compiled vs onnxruntime (effc.codegen.std_nan, Cast).

Each model is compiled with clean data (the agreement gate passes on it), then run on special values: the
differences were silent before (ArgMax of a -inf row gave -1, Clip turned NaN into its lower bound, a NaN cast to
an index read row 0).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import effc
from effc import runtime
from effc.errors import DataError

NAN, INF = np.nan, np.inf
#: Rows with NaN in front, in the middle, at the end, all -inf, ties, ±0.
ROWS = np.array([[-INF, -INF, -INF, -INF], [NAN, 2, 1, 0], [1, NAN, 3, 3], [3, 3, 1, NAN], [INF, NAN, INF, 1],
                 [NAN, NAN, NAN, NAN], [-0.0, 0.0, -1, -1], [-1, -2, -INF, -1]], np.float32)


def _model(nodes, x_shape, y_type, y_shape, inits=(), opset=18, x_type=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
                              [helper.make_tensor_value_info("y", y_type, y_shape)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _compiled_and_reference(model, clean, tmp_path):
    effc.compile(model, out_dir=tmp_path / "out", data=[{"x": clean}], measure_latency=False)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return runtime.load(tmp_path / "out"), session


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("last", [0, 1])
def test_arg_extreme_matches_onnxruntime_on_nan_and_infinite_rows(op, last, tmp_path):
    node = helper.make_node(op, ["x"], ["y"], axis=1, keepdims=0, select_last_index=last)
    model = _model([node], [8, 4], TensorProto.INT64, [8])
    compiled, session = _compiled_and_reference(model, np.arange(32, dtype=np.float32).reshape(8, 4), tmp_path)
    got = compiled.run({"x": ROWS})[0]
    np.testing.assert_array_equal(got, session.run(None, {"x": ROWS})[0])
    if op == "ArgMax" and not last:
        assert got[0] == 0 and got[1] == 0  # all -inf: 0, not -1; NaN in front: 0, not 1


def _aligned(a):
    """``a`` in memory that starts on a 64-byte boundary (onnxruntime's Hardmax of a NaN row depends on it)."""
    buf = np.empty(a.size + 16, a.dtype)
    start = (-buf.ctypes.data // a.itemsize) % 16
    out = buf[start:start + a.size].reshape(a.shape)
    out[...] = a
    return out


def _special_rows(shape, seed):
    """Small integers (ties) with up to three NaN / ±inf per row of the last axis; rows of only -inf and NaN."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    for row in rows:
        row[rng.integers(0, row.size, rng.integers(0, 4))] = rng.choice([NAN, NAN, INF, -INF])
    rows[0], rows[1] = -INF, NAN
    return x


@pytest.mark.parametrize(("opset", "axis", "shape"), [(13, -1, [8, 4]), (13, -1, [60, 9]), (13, 0, [9, 7]),
                                                      (11, 1, [30, 2, 3])])
def test_hardmax_matches_onnxruntime_on_nan_and_infinite_rows(opset, axis, shape, tmp_path):
    """Opset 13 over the last axis (rows of 4: whole packets; of 9: four alignments) and over axis 0 (onnxruntime
    transposes), opset 11 over the flattened (2, 3)."""
    model = _model([helper.make_node("Hardmax", ["x"], ["y"], axis=axis)], shape, TensorProto.FLOAT, shape,
                   opset=opset)
    clean = np.random.default_rng(0).permutation(np.prod(shape)).astype(np.float32).reshape(shape)
    compiled, session = _compiled_and_reference(model, clean, tmp_path)
    x = ROWS if shape == [8, 4] else _special_rows(shape, seed=len(shape) + shape[0])
    got, want = compiled.run({"x": x})[0], session.run(None, {"x": _aligned(x)})[0]
    np.testing.assert_array_equal(got, want)
    assert 0 < np.isnan(x).any(axis=axis).sum() and (got.sum(axis=axis) == 0).any()
    if shape == [8, 4]:  # all -inf: 1 at 0 (TVM: a row of zeros); NaN in front: zeros; NaN later: passed over
        np.testing.assert_array_equal(got[:3], [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])


def _const(name, value):
    return numpy_helper.from_array(np.array(value, np.float32), name)


ELEMENTWISE = {  # name: (nodes, initializers)
    "Clip": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [_const("lo", 0.0), _const("hi", 2.0)]),
    "Clip-no-max": ([helper.make_node("Clip", ["x", "lo"], ["y"])], [_const("lo", 0.0)]),
    "Clip-no-min": ([helper.make_node("Clip", ["x", "", "hi"], ["y"])], [_const("hi", 2.0)]),
    "Relu": ([helper.make_node("Relu", ["x"], ["y"])], []),
    "ThresholdedRelu": ([helper.make_node("ThresholdedRelu", ["x"], ["y"], alpha=0.5)], []),
    "HardSigmoid": ([helper.make_node("HardSigmoid", ["x"], ["y"])], []),
    "Elu": ([helper.make_node("Elu", ["x"], ["y"])], []),
    "Selu": ([helper.make_node("Selu", ["x"], ["y"])], []),
    "Sign": ([helper.make_node("Sign", ["x"], ["y"])], []),
    "Erf": ([helper.make_node("Erf", ["x"], ["y"])], []),
    "Max": ([helper.make_node("Max", ["x", "b"], ["y"])], [_const("b", [0.0, 1.0, NAN, -INF])]),
    "Min": ([helper.make_node("Min", ["x", "b"], ["y"])], [_const("b", [0.0, 1.0, NAN, INF])]),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_keeps_nan_and_infinities_as_onnxruntime(name, tmp_path):
    nodes, inits = ELEMENTWISE[name]
    model = _model(nodes, [8, 4], TensorProto.FLOAT, [8, 4], inits)
    compiled, session = _compiled_and_reference(model, np.linspace(-3, 3, 32, dtype=np.float32).reshape(8, 4),
                                                tmp_path)
    got, want = compiled.run({"x": ROWS})[0], session.run(None, {"x": ROWS})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("to", [TensorProto.INT32, TensorProto.INT64])
@pytest.mark.parametrize("source", [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16])
def test_undefined_float_to_int_cast_is_the_integer_minimum(source, to, tmp_path):
    x = np.array([NAN, INF, -INF, 1e30, -1e30, 3e9, -3e9, 2.7, -2.7, 0], np.float32)
    with np.errstate(over="ignore"):  # 1e30 is inf in float16
        x = x.astype(helper.tensor_dtype_to_np_dtype(source))
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=to)], [10], to, [10], x_type=source)
    compiled, session = _compiled_and_reference(model, np.ones(10, x.dtype), tmp_path)
    got = compiled.run({"x": x})[0]
    np.testing.assert_array_equal(got, session.run(None, {"x": x})[0])  # onnxruntime on x86: cvttss2si
    assert got[0] == np.iinfo(helper.tensor_dtype_to_np_dtype(to)).min


def test_nan_cast_to_a_gather_index_is_refused_like_onnxruntime(tmp_path):
    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "table")
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "i"], ["y"], name="lookup")]
    model = _model(nodes, [2], TensorProto.FLOAT, [2, 3], [table])
    compiled, session = _compiled_and_reference(model, np.array([1, 2], np.float32), tmp_path)
    x = np.array([3.7, -1.2], np.float32)
    np.testing.assert_array_equal(compiled.run({"x": x})[0], session.run(None, {"x": x})[0])
    for bad in (NAN, INF, 1e30):
        x = np.array([bad, 1], np.float32)
        with pytest.raises(Exception, match="out of data bounds"):
            session.run(None, {"x": x})
        with pytest.raises(DataError, match="lookup"):  # before: NaN read row 0
            compiled.run({"x": x})

