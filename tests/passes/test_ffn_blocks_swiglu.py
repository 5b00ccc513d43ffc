"""The FFN-block finder learns gated units (SwiGLU: down(SiLU(x·Wg) ⊙ x·Wu)) and its torch replica matches ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from effc.passes.ffn_blocks import TorchBlock, find_ffn_blocks


def _swiglu(rng) -> tuple[ir.Model, dict]:
    w = {"wg": rng.standard_normal((8, 16)), "wu": rng.standard_normal((8, 16)), "wd": rng.standard_normal((16, 8))}
    w = {k: (v * 0.3).astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate"),
        helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
        helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
        helper.make_node("MatMul", ["x", "wu"], ["u"], name="up"),
        helper.make_node("Mul", ["silu", "u"], ["h"], name="glu"),
        helper.make_node("MatMul", ["h", "wd"], ["y"], name="down"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto), w


def test_swiglu_block_found_with_its_second_projection():
    model, _ = _swiglu(np.random.default_rng(0))
    blocks, skipped = find_ffn_blocks(model)
    assert len(blocks) == 1 and skipped == []
    block = blocks[0]
    assert (block.up.name, block.gate_linear.name, block.down.name) == ("gate", "up", "down")
    assert [n.op_type for n in block.act] == ["Sigmoid", "Mul", "Mul"]


def test_swiglu_torch_replica_matches_onnxruntime():
    rng = np.random.default_rng(1)
    model, w = _swiglu(rng)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    (ref,) = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})
    block = find_ffn_blocks(model)[0][0]
    got = TorchBlock(block).forward(torch.from_numpy(x), torch.from_numpy(w["wg"]), None,
                                    torch.from_numpy(w["wd"]), None).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_a_foreign_multiplier_is_still_refused():
    model, _ = _swiglu(np.random.default_rng(2))
    up = next(n for n in model.graph if n.name == "up")
    other = ir.val("z", ir.DataType.FLOAT, ir.Shape([4, 8]))
    model.graph.inputs.append(other)
    up.replace_input_with(0, other)  # the multiplier no longer reads the block input
    blocks, skipped = find_ffn_blocks(model)
    assert blocks == [] and any("from outside the block" in s["reason"] for s in skipped)
