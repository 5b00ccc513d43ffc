"""Fast-math rewrites: which Relax ops change, that no scalar libm call is left, and the extra error they add."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax

from effc.codegen.cpu import compile_cpu
from effc.codegen.fastmath import apply_fast_math, rewritable_ops

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
OPS = {
    "gelu": (relax.op.nn.gelu, lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    "erf": (relax.op.erf, np.vectorize(math.erf)),
    "exp": (relax.op.exp, np.exp),
    "tanh": (relax.op.tanh, np.tanh),
    "sigmoid": (relax.op.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    "softmax": (lambda x: relax.op.nn.softmax(x, axis=-1), lambda x: _softmax(x)),
}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _module(op) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 256), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, data, fast_math):
    executable, info = compile_cpu(mod, TARGET, {"fast_math": fast_math})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy(), info


@pytest.mark.parametrize("name", sorted(OPS))
def test_fast_form_error_is_below_1e5(name):
    op, ref = OPS[name]
    data = np.linspace(-12, 12, 4 * 256, dtype=np.float32).reshape(4, 256)
    if name == "exp":
        data = data * 3  # covers underflow to 0 and values up to e^36
    fast, info = _run(_module(op), data, fast_math=True)
    exact = ref(data.astype(np.float64))
    assert info["fast_math"] is True and sum(info["fast_math_rewrites"].values()) == 1
    assert all(t != "none" for t in info["kernels"].values())
    if name == "exp":
        np.testing.assert_allclose(fast, exact, rtol=2e-6)
    else:
        assert np.abs(fast - exact).max() <= 1e-5


def test_fast_math_off_keeps_exact_lowering():
    data = np.linspace(-4, 4, 1024, dtype=np.float32).reshape(4, 256)
    exact, info = _run(_module(OPS["gelu"][0]), data, fast_math=False)
    assert info["fast_math"] is False and info["fast_math_rewrites"] == {}
    fast, _ = _run(_module(OPS["gelu"][0]), data, fast_math=True)
    assert np.abs(fast - exact).max() <= 1e-6


def test_rewrite_removes_scalar_erf():
    mod, counts = apply_fast_math(_module(OPS["gelu"][0]))
    assert counts == {"relax.nn.gelu": 1}
    text = mod.script()
    assert "R.nn.gelu" not in text and "T.erf" not in text
    assert "relax.nn.gelu" in rewritable_ops()


def test_non_float32_is_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.exp(x))
        bb.emit_func_output(out)
    _, counts = apply_fast_math(bb.get())
    assert counts == {}
