"""Shared fixtures: small ONNX models built by hand, and real zoo models compiled once per test session."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_mlp(path=None, in_dim=16, hidden=32, out_dim=4, seed=0, dynamic_batch=False) -> onnx.ModelProto:
    """x (1|N, in_dim) → Gemm → Relu → MatMul + bias → y (.., out_dim); fp32 weights from a fixed seed."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((in_dim, hidden)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, out_dim)).astype(np.float32) * 0.3
    b2 = rng.standard_normal(out_dim).astype(np.float32) * 0.1
    batch = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
            helper.make_node("MatMul", ["hr", "w2"], ["m"], name="fc2"),
            helper.make_node("Add", ["m", "b2"], ["y"], name="bias2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_dim])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    make_mlp(path)
    return path


_ZOO_CACHE: dict = {}


@pytest.fixture(scope="session")
def compiled_zoo(tmp_path_factory):
    """compiled_zoo(name, passes="") -> CompileResult, compiled once per session (and per xdist worker)."""
    import effc

    def get(name: str, passes: str = ""):
        key = (name, passes)
        if key not in _ZOO_CACHE:
            out = tmp_path_factory.mktemp(name.replace(":", "_")) / "out"
            _ZOO_CACHE[key] = effc.compile(
                f"zoo:{name}", passes=passes, out_dir=out, eval_samples=3, latency_repeat=3, calibration_samples=8,
            )
        return _ZOO_CACHE[key]

    return get
