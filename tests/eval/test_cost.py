import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import ShapeError
from effc.eval.cost import count_macs, param_bytes, param_count, register_mac_counter, sparsity_stats, static_shape


def _to_ir(graph, opset=21, functions=()):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("effc", 1)],
                              functions=list(functions))
    model.ir_version = 10
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_batched_matmul_macs():
    w = numpy_helper.from_array(np.zeros((384, 1536), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="ffn")], "g",
                          [_vi("x", [1, 128, 384])], [_vi("y", None)], [w])
    macs = count_macs(_to_ir(g))
    assert macs["total"] == 128 * 384 * 1536
    assert macs["by_op"] == {"MatMul": 128 * 384 * 1536} and macs["by_node"] == {"ffn": 128 * 384 * 1536}


def test_broadcast_matmul_and_1d():
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="bmm"), helper.make_node("MatMul", ["v", "b2"], ["z"])],
        "g", [_vi("a", [4, 1, 8, 16]), _vi("b", [3, 16, 5]), _vi("v", [16]), _vi("b2", [16, 7])],
        [_vi("y", None), _vi("z", None)])
    macs = count_macs(_to_ir(g))
    assert macs["by_node"]["bmm"] == 4 * 3 * 8 * 5 * 16
    assert macs["by_node"]["MatMul_2"] == 16 * 7  # unnamed node keyed by op type and index
    assert macs["total"] == 4 * 3 * 8 * 5 * 16 + 16 * 7


def test_gemm_transb():
    w = numpy_helper.from_array(np.zeros((10, 20), np.float32), "w")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "g",
                          [_vi("x", [3, 20])], [_vi("y", None)], [w])
    assert count_macs(_to_ir(g))["total"] == 3 * 20 * 10


def test_conv_groups_dilations_and_transpose():
    w = numpy_helper.from_array(np.zeros((8, 2, 3, 3), np.float32), "w")  # groups=4, Cin=8
    wt = numpy_helper.from_array(np.zeros((8, 3, 2, 2), np.float32), "wt")  # ConvTranspose: Cin=8, Cout=3
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=4, dilations=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["x", "wt"], ["z"], name="up", strides=[2, 2])],
        "g", [_vi("x", [1, 8, 10, 12])], [_vi("y", None), _vi("z", None)], [w, wt])
    model = _to_ir(g)
    out = static_shape(model.graph.node(0).outputs[0])
    assert out == (1, 8, 8, 10)  # (10 + 2 - 2*2 - 1) + 1 = 8
    macs = count_macs(model)
    assert macs["by_node"]["gconv"] == 8 * 8 * 10 * 2 * 9
    assert macs["by_node"]["up"] == 8 * 10 * 12 * 3 * 4
    # without the output shape, the attributes give the same answer
    model.graph.node(0).outputs[0].shape = None
    assert count_macs(model)["by_node"]["gconv"] == 8 * 8 * 10 * 2 * 9


def test_unknown_shapes_skipped_or_strict():
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [_vi("x", ["N", 4]), _vi("w", [4, 4])], [_vi("y", None)])
    model = _to_ir(g)
    macs = count_macs(model)
    assert macs["total"] == 0 and macs["unknown_shape"] == ["mm"]
    with pytest.raises(ShapeError, match="mm"):
        count_macs(model, strict=True)


def test_vendor_counter_registry_and_uncounted(monkeypatch):
    from effc.eval import macs as macs_module

    monkeypatch.setattr(macs_module, "_COUNTERS", dict(macs_module._COUNTERS))  # keep the registration local
    g = helper.make_graph(
        [helper.make_node("FancyMatMul", ["x"], ["y"], name="f", domain="vendor"),
         helper.make_node("OtherOp", ["y"], ["z"], name="o", domain="effc")],
        "g", [_vi("x", [2, 6])], [_vi("z", None)])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                                              helper.make_opsetid("effc", 1),
                                                              helper.make_opsetid("vendor", 1)]))
    with pytest.raises(ValueError, match="OpSpec"):  # effc operators have one registry: effc.ops
        register_mac_counter("FancyMatMul", lambda node: 0, domain="effc")

    @register_mac_counter("FancyMatMul", domain="vendor")
    def _count(node):
        x = static_shape(node.inputs[0])
        return None if x is None else x[0] * x[1] * 5

    macs = count_macs(model)
    assert macs["by_op"] == {"FancyMatMul": 60}
    assert macs["uncounted"] == {"OtherOp": ["o"]}


def test_if_branches_counted_once_each():
    def branch(name, n):
        w = numpy_helper.from_array(np.zeros((4, n), np.float32), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"y_{name}"], name=f"mm_{name}")],
                                 name, [], [_vi(f"y_{name}", [2, n])], [w])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then", 3), else_branch=branch("else", 5))],
        "g", [_vi("c", [], TensorProto.BOOL), _vi("x", [2, 4])], [_vi("y", None)])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    macs = count_macs(model)
    assert macs["by_node"] == {"mm_then": 2 * 4 * 3, "mm_else": 2 * 4 * 5}
    # subgraph initializers are parameters too
    assert param_count(model) == 4 * 3 + 4 * 5


def test_param_bytes_sub_byte_constants_and_functions():
    w4 = ir.Value(name="w4", const_value=ir.Tensor(np.zeros((3, 5), np.uint8), dtype=ir.DataType.INT4))
    wf4 = ir.Value(name="wf4", const_value=ir.Tensor(np.zeros((8,), np.uint8), dtype=ir.DataType.FLOAT4E2M1))
    w16 = ir.Value(name="w16", const_value=ir.tensor(np.zeros((10,), np.float16)))
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros((2, 2), np.float32))})
    ints = ir.node("Constant", [], attributes={"value_ints": [1, 2, 3]})
    graph = ir.Graph([], [const.outputs[0]], nodes=[const, ints], initializers=[w4, wf4, w16],
                     opset_imports={"": 21, "effc": 1})
    fconst = ir.node("Constant", [], attributes={"value": ir.tensor(np.zeros((6,), np.int64))})
    func = ir.Function("effc", "F", "", graph=ir.Graph([], [fconst.outputs[0]], nodes=[fconst],
                                                       opset_imports={"": 21}), attributes=[])
    model = ir.Model(graph, ir_version=10, functions=[func])
    # INT4 (15 elements) -> 8 bytes, FP4 (8) -> 4, fp16 (10) -> 20, Constant fp32 2x2 -> 16, value_ints -> 24,
    # function Constant int64 x6 -> 48
    assert param_bytes(model) == 8 + 4 + 20 + 16 + 24 + 48
    assert param_count(model) == 15 + 8 + 10 + 4 + 3 + 6


def test_sparsity_stats():
    w = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    w[:, :2] = 0
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
                          "g", [_vi("x", [1, 4])], [_vi("z", None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(4, np.float32), "b")])
    stats = sparsity_stats(_to_ir(g))
    assert list(stats["tensors"]) == ["w"]  # the rank-1 bias is not a weight
    assert stats["tensors"]["w"]["sparsity"] == 0.5 and stats["tensors"]["w"]["zeros"] == 8
    assert stats["tensors"]["w"]["storage"] == "dense" and stats["tensors"]["w"]["literal_zeros"] == 8
    group = {"tensors": 1, "elements": 16, "zeros": 8, "sparsity": 0.5}
    assert stats["total"] == {"elements": 16, "zeros": 8, "sparsity": 0.5, "literal_zeros": 8, "packed_zeros": 0,
                              "tensors": 1, "by_storage": {"dense": group}, "sparse_tensors": group}
