import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.ir.queries import linear_layers, op_types


def _model():
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(w(2, 3, 3, 3), "conv_w"), numpy_helper.from_array(w(4, 6), "gemm_b"),
             numpy_helper.from_array(w(4, 5), "mm_w"), numpy_helper.from_array(w(6, 5), "gemm_t")]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Slice", ["f", "s0", "s1"], ["f4"], name="slice"),
        helper.make_node("Gemm", ["f4", "gemm_b"], ["g"], name="gemm"),
        helper.make_node("Gemm", ["g", "gemm_t"], ["gt"], name="gemm_t", transB=1),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(w(5, 5), "k")),
        helper.make_node("MatMul", ["gt", "k"], ["h"], name="mm_const"),
        helper.make_node("MatMul", ["h", "y"], ["out"], name="mm_dynamic"),
    ]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
              numpy_helper.from_array(np.array([4], np.int64), "s1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return ir.from_proto(helper.make_model(graph))


def test_linear_layers_kinds_and_reduction_axes():
    layers = linear_layers(_model())
    got = [(layer.name, layer.kind, layer.reduction_axis, layer.weight.name) for layer in layers]
    assert got == [("conv", "conv", 1, "conv_w"), ("gemm", "gemm", 0, "gemm_b"), ("gemm_t", "gemm", 1, "gemm_t"),
                   ("mm_const", "matmul", 0, "k")]


def test_linear_layers_on_zoo_models(zoo_models):
    _, _, minilm = zoo_models.get("minilm-l6")
    layers = linear_layers(minilm)
    matmuls = [layer for layer in layers if layer.kind == "matmul"]
    assert len(matmuls) == 6 * 6  # q, k, v, attention out, FFN up, FFN down per layer
    shapes = sorted({tuple(layer.weight.shape) for layer in matmuls})
    assert shapes == [(384, 384), (384, 1536), (1536, 384)]
    _, _, cls = zoo_models.get("ppocr-cls")
    convs = [layer for layer in linear_layers(cls) if layer.kind == "conv"]
    assert convs and all(layer.reduction_axis == 1 and len(layer.weight.shape) == 4 for layer in convs)


def test_op_types_counts_subgraphs_and_functions(zoo_models):
    _, original, canonical = zoo_models.get("silero-vad")
    counts = op_types(original)
    assert counts["LSTM"] == 4 and counts["If"] == 25  # two LSTMs per 8k/16k branch, inside If bodies
    assert op_types(canonical)["LSTM"] == 0
    fn = ir.Function("effc", "Double", "", graph=ir.Graph([], [], nodes=[], name="f"), attributes=[])
    model = _model()
    x = fn.graph
    inp = ir.Value(name="a")
    x.inputs.append(inp)
    node = ir.node("Add", [inp, inp])
    x.append(node)
    x.outputs.append(node.outputs[0])
    model.functions[fn.identifier()] = fn
    assert op_types(model)["Add"] == 1 and op_types(model)["MatMul"] == 2
