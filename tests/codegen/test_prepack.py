"""Compile-time GEMM weight pre-packing: packed layout, which kernels get it, and numerics of the compiled module."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from effc.codegen.cpu import compile_cpu, legalize_and_fuse
from effc.codegen.prepack import pack_panels, pad_constant_weights
from effc.codegen.schedules import apply_templates, tile_config, vector_lanes

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})
RNG = np.random.default_rng(0)


def test_pack_panels_layout():
    w = np.arange(6 * 48, dtype=np.float32).reshape(6, 48)
    p = pack_panels(w, 16)
    assert p.shape == (3, 6, 16) and p.flags.c_contiguous
    for jo in range(3):
        np.testing.assert_array_equal(p[jo], w[:, jo * 16 : (jo + 1) * 16])


def _two_layer(x_shape, w1, w2, runtime_b: bool):
    """x @ w1 + b1, then (optionally) the same-shaped matmul again with a runtime B (same fused kernel)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    params = [x]
    if runtime_b:
        params.append(relax.Var("w", relax.TensorType(w1.shape, "float32")))
    with bb.function("main", params):
        with bb.dataflow():
            h = bb.emit(relax.op.add(relax.op.matmul(x, relax.const(w1)), relax.const(np.ones(w1.shape[1], "float32"))))
            y = bb.emit(relax.op.matmul(h, relax.const(w2)))
            if runtime_b:
                y = bb.emit(relax.op.add(relax.op.matmul(y, params[1]), relax.const(np.ones(w1.shape[1], "float32"))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _matmul_param_shapes(mod) -> dict[str, list[tuple[int, ...]]]:
    """Parameter shapes of each matmul kernel after scheduling."""
    fused, _ = legalize_and_fuse(mod, TARGET, True)
    scheduled, _ = apply_templates(fused, TARGET)
    return {
        gv.name_hint: [tuple(int(d) for d in p.ty.shape) for p in f.params]
        for gv, f in scheduled.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("matmul", "fused_matmul"))
    }


def _run(mod, *arrays) -> np.ndarray:
    executable, _ = compile_cpu(mod, TARGET, {})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def test_constant_weights_are_packed_and_results_match():
    x = RNG.standard_normal((1, 32, 48)).astype("float32")
    w1 = RNG.standard_normal((48, 48)).astype("float32")
    w2 = RNG.standard_normal((48, 48)).astype("float32")
    mod = _two_layer(x.shape, w1, w2, runtime_b=False)
    shapes = _matmul_param_shapes(mod)
    assert shapes and all(len(s[1]) == 3 and s[1][1] == 48 for s in shapes.values())  # B is (N/nr, K, nr)
    np.testing.assert_allclose(_run(mod, x), (x @ w1 + 1) @ w2, rtol=1e-4, atol=1e-4)


def test_kernel_shared_with_a_runtime_b_is_not_packed():
    x = RNG.standard_normal((1, 32, 48)).astype("float32")
    w1 = RNG.standard_normal((48, 48)).astype("float32")
    w2 = RNG.standard_normal((48, 48)).astype("float32")
    w3 = RNG.standard_normal((48, 48)).astype("float32")
    mod = _two_layer(x.shape, w1, w2, runtime_b=True)
    # x@w1+b and y@w3+b share one fused kernel; one call passes a runtime B, so that kernel keeps (K, N).
    assert any(s[1] == (48, 48) for s in _matmul_param_shapes(mod).values())
    np.testing.assert_allclose(_run(mod, x, w3), ((x @ w1 + 1) @ w2) @ w3 + 1, rtol=1e-4, atol=1e-3)


def test_constant_weight_with_ragged_n_is_padded_at_compile_time():
    x = RNG.standard_normal((1, 24, 40)).astype("float32")
    w = RNG.standard_normal((40, 1003)).astype("float32")  # 1003 columns: no multiple of any vector width
    bias = RNG.standard_normal(1003).astype("float32")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.add(relax.op.matmul(xv, relax.const(w)), relax.const(bias))))
        bb.emit_func_output(out)
    mod = bb.get()
    lanes = vector_lanes(TARGET)
    assert pad_constant_weights(mod, lanes, max(tile_config(TARGET).gemm_nr))[1] == 1
    square = np.ones((48, 48), "float32")  # N = 48: whole vectors already, left alone
    assert pad_constant_weights(_two_layer((1, 8, 48), square, square, False), lanes, 24)[1] == 0
    fused, _ = legalize_and_fuse(mod, TARGET, True)
    _, kernels = apply_templates(fused, TARGET)
    assert "gemm" in kernels.values() and "gemm_padded" not in kernels.values()
    np.testing.assert_allclose(_run(mod, x), x @ w + bias, rtol=1e-4, atol=1e-4)
