"""effc.codegen.frontend: op checks (subgraphs included), effc converters, error wrapping, import numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

from effc.codegen import frontend
from effc.codegen.build import outputs_to_numpy
from effc.errors import TargetError, UnsupportedOpError
from tests.runtime.helpers import mlp, ort_run, random_feeds


def _model_with_unsupported() -> ir.Model:
    """Main graph: Relu, DFT (TVM lacks it), If whose then-branch holds a Det (TVM lacks it; its pre-check skips it)."""
    then_branch = helper.make_graph(
        [helper.make_node("Det", ["x"], ["d"], name="det_in_then")], "then", [],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["e"], name="sum_in_else", keepdims=0)], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("DFT", ["r"], ["f"], name="dft_main"),
        helper.make_node("If", ["c"], ["o"], name="branch", then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, None)],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _effc_model(op_type: str) -> ir.Model:
    """y = effc.<op_type>(x) (2, 3), whose reference body is a model-local function computing x * 2 + 1."""
    two = helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.FLOAT, [], [2.0]))
    one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("w", TensorProto.FLOAT, [], [1.0]))
    body = [two, one, helper.make_node("Mul", ["X", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["Y"])]
    function = helper.make_function("effc", op_type, ["X"], ["Y"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["h"], name="scale_node", domain="effc"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("effc", 1)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


class _ScaleConverter:
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.add(relax.op.multiply(inputs[0], relax.const(2.0, "float32")), relax.const(1.0, "float32"))


class _BrokenConverter:
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        raise ValueError("kernel table has no entry for this shape")


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(frontend, "_EFFC_CONVERTERS", {})


def _run_relax(mod, feeds):
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return outputs_to_numpy(vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))


def test_unsupported_ops_lists_main_graph_and_if_branch_ops():
    missing = frontend.unsupported_ops(_model_with_unsupported())
    assert missing == {"DFT": ["dft_main"], "Det": ["det_in_then"]}


def test_loop_body_ops_are_checked_too():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Det", ["m"], ["d"], name="det_in_loop")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", ""], ["ds"], name="loop", body=body)], "g",
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 2]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("ds", TensorProto.FLOAT, None)],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert frontend.unsupported_ops(model) == {"Loop": ["loop"], "Det": ["det_in_loop"]}


def test_check_importable_raises_one_error_listing_all():
    with pytest.raises(UnsupportedOpError) as info:
        frontend.check_importable(_model_with_unsupported())
    assert set(info.value.ops) == {"DFT", "Det"}
    assert "det_in_then" in str(info.value) and "dft_main" in str(info.value)


def test_supported_model_has_no_unsupported_ops():
    assert frontend.unsupported_ops(mlp()) == {}
    frontend.check_importable(mlp())  # does not raise


def test_effc_op_without_converter_is_unsupported(clean_registry):
    with pytest.raises(UnsupportedOpError) as info:
        frontend.to_relax(_effc_model("ScaleShift"))
    assert info.value.ops == {"effc::ScaleShift": ["scale_node"]}


def test_effc_converter_active_only_during_import_and_matches_ort(clean_registry):
    model = _effc_model("ScaleShift")
    frontend.register_converter("ScaleShift")(_ScaleConverter)
    assert frontend.unsupported_ops(model) == {}
    mod = frontend.to_relax(model)
    assert "effc.ScaleShift" not in tvm_onnx._get_convert_map()  # the map is restored
    assert tvm_onnx.ONNXGraphImporter._convert_operator.__name__ == "_convert_operator"
    feeds = random_feeds(model)
    np.testing.assert_allclose(_run_relax(mod, feeds)[0], ort_run(model, feeds)[0], atol=1e-6)


def test_effc_op_named_like_a_standard_op_does_not_shadow_it(clean_registry):
    """An effc op called 'Relu' uses the effc converter; the standard Relu beside it keeps TVM's."""
    model = _effc_model("Relu")
    frontend.register_converter("Relu")(_ScaleConverter)
    feeds = random_feeds(model)
    np.testing.assert_allclose(_run_relax(frontend.to_relax(model), feeds)[0], ort_run(model, feeds)[0], atol=1e-6)


def test_converter_failure_names_op_and_node(clean_registry):
    frontend.register_converter("ScaleShift")(_BrokenConverter)
    with pytest.raises(TargetError, match=r"ScaleShift node 'scale_node'.*kernel table has no entry"):
        frontend.to_relax(_effc_model("ScaleShift"))
    assert "effc.ScaleShift" not in tvm_onnx._get_convert_map()


def test_register_converter_rejects_other_domains_and_empty_classes():
    with pytest.raises(ValueError, match="domain"):
        frontend.register_converter("Foo", domain="com.microsoft")
    with pytest.raises(ValueError, match="_impl_v"):
        frontend.register_converter("Foo")(type("Empty", (), {}))


def test_to_relax_mlp_matches_ort():
    model = mlp()
    mod = frontend.to_relax(model)
    assert [str(p.name) for p in mod["main"].params] == ["x"]
    feeds = random_feeds(model)
    np.testing.assert_allclose(_run_relax(mod, feeds)[0], ort_run(model, feeds)[0], atol=1e-5)


def test_tvm_import_failure_is_a_target_error_naming_the_node():
    """Arithmetic on a run-time shape (not canonicalized) fails inside TVM: wrapped, node named, fix given."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Mul", ["s", "two"], ["s2"], name="double_shape"),
        helper.make_node("Reshape", ["x", "s2"], ["y"], name="reshape_dynamic"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("two", TensorProto.INT64, [2], [1, 1])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(TargetError, match=r"double_shape.*fix: canonicalize"):
        frontend.to_relax(model)


@pytest.mark.parametrize(("dtype", "role", "fix"), [
    (TensorProto.UINT4, "input", "pass it as uint8"), (TensorProto.INT4, "output", "pass it as int8"),
    (TensorProto.STRING, "input", "turn the strings into numbers"),
])
def test_boundary_types_an_artifact_cannot_carry_are_named_with_their_op(dtype, role, fix):
    # were TVM run-time checks ("arr_size == nbytes") or "unknown dtype `object`", naming no op
    x_type, y_type = (dtype, TensorProto.FLOAT) if role == "input" else (TensorProto.FLOAT, dtype)
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=y_type, name="convert")], "g",
                              [helper.make_tensor_value_info("x", x_type, [3])],
                              [helper.make_tensor_value_info("y", y_type, [3])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(TargetError, match=f"graph {role} '{'x' if role == 'input' else 'y'}' \\(of Cast node "
                                          f"'convert'\\)") as err:
        frontend.check_io_types(model)
    assert fix in err.value.hint


def test_a_sequence_input_is_named_with_its_op():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("SequenceAt", ["s", "i"], ["y"], name="pick")], "g",
                              [seq, helper.make_tensor_value_info("i", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(TargetError, match="graph input 's' \\(of SequenceAt node 'pick'\\) is a sequence"):
        frontend.check_io_types(model)


def test_a_failed_import_prints_nothing_from_tvm(capfd):
    # TVM's C++ "BlockBuilder destroyed with remaining blocks!" reached the terminal after a converter failed
    from benchmarks import onnx_conformance as conformance

    (case,) = conformance.collect_cases(names={"test_celu_float16"})
    from effc.ir.canonicalize import canonicalize

    model = canonicalize(ir.from_proto(onnx.load_from_string(case.model)))  # Celu's body: Elu on float16
    with pytest.raises(TargetError, match="Elu node"):
        frontend.to_relax(model)
    import gc

    gc.collect()
    assert "BlockBuilder" not in capfd.readouterr().err
