"""Small hand-built ONNX models and a minimal build → manifest step shared by the codegen/target/runtime tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from effc.ir.model import io_signature
from effc.runtime.manifest import write_manifest
from effc.targets import get_target


def _model(nodes, inputs, outputs, inits, opset=17, **kwargs) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def mlp(seed: int = 0) -> ir.Model:
    """x (2, 16) → Gemm(transB) → Relu → Gemm → y (2, 4)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.standard_normal((32, 16)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(32).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((32, 4)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(4).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)


def conv_pool(seed: int = 1) -> ir.Model:
    """x (1, 3, 16, 16) → Conv 3x3 (8) → Relu → MaxPool 2x2 → Conv 1x1 (4) → GlobalAveragePool → Flatten → y (1, 4)."""
    rng = np.random.default_rng(seed)
    inits = {
        "k1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.2,
        "c1": rng.standard_normal(8).astype(np.float32) * 0.1,
        "k2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.2,
    }
    nodes = [
        helper.make_node("Conv", ["x", "k1", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("MaxPool", ["ar"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "k2"], ["b"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["b"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)


def two_in_two_out() -> ir.Model:
    """a (3, 5), b (5,) → s = Softmax(a + b) (3, 5), m = ReduceMean(a * b, axis 1) (3,)."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["t"], name="add"),
        helper.make_node("Softmax", ["t"], ["s"], name="softmax", axis=-1),
        helper.make_node("Mul", ["a", "b"], ["u"], name="mul"),
        helper.make_node("ReduceMean", ["u"], ["m"], name="mean", axes=[1], keepdims=0),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 5]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3, 5]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [3])],
        {}, opset=13,
    )


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in io_signature(model)["inputs"]}


def ort_run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def build_artifact(model: ir.Model, out_dir: Path, options: dict | None = None, target: str = "cpu") -> Path:
    """Build with ``target`` into ``out_dir`` and write the manifest (what the compiler will do)."""
    options = dict(options or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    result = get_target(target).build(model, out_dir, options)
    signature = io_signature(model)
    data = {
        "effc_version": "test",
        "target": {"name": target, "options": options, "info": result.info},
        "inputs": signature["inputs"],
        "outputs": signature["outputs"],
    }
    write_manifest(out_dir, data, result.files)
    return out_dir
