"""Small hand-built models and a calibration stand-in shared by the N:M / SparseGPT / structured-pruning tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.ir.reference import Reference, run_with_taps


class TapCalibration:
    """Feeds plus ``tap`` via onnxruntime (``effc.ir.calibration.Calibration`` when it exists)."""

    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.source = "synthetic test feeds"

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)

    def tap(self, model, value_names, progress=True):
        runs = run_with_taps(model, self.feeds, value_names)
        return {name: [r[name] for r in runs] for name in value_names}


def calibration(feeds):
    """The real ``Calibration`` if available, else :class:`TapCalibration`."""
    try:
        from effc.ir.calibration import Calibration

        return Calibration(feeds, source="synthetic test feeds")
    except ImportError:
        return TapCalibration(feeds)


def ffn_model(k=64, hidden=128, seq=16, seed=0) -> ir.Model:
    """x (1, seq, k) → MatMul w1 (k, hidden) + b1 → Relu → MatMul w2 (hidden, k) → Add x (residual) → y."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(k)).astype(np.float32)  # uneven input channels (Wanda matters)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, k)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("MatMul", ["xs", "w1"], ["h"], name="ffn.up"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn.up_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="ffn.act"),
        helper.make_node("MatMul", ["a", "w2"], ["o"], name="ffn.down"),
        helper.make_node("Add", ["o", "xs"], ["y"], name="residual"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((scale, "s"), (w1, "w1"), (b1, "b1"), (w2, "w2"))]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, k])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def feeds(n=8, k=64, seq=16, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, seq, k)).astype(np.float32)} for _ in range(n)]


def run(model, feed):
    return Reference(model).run(feed)[0]
