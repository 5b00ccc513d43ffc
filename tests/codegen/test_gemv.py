"""Batch-1 matmuls (GEMV) through the CPU codegen: SmolLM2-135M's decode shapes against onnxruntime, the template
they take (``gemv``, never ``fallback``), and the two GEMV schedules (packed constant weight in the GEMM's panel
layout; runtime weight streamed in whole rows, K split across threads)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te

from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax
from effc.codegen.schedules import TILE_TABLE, schedule_kernel, vector_lanes
from effc.ir.reference import Reference

MCPU = str(tvm.target.codegen.llvm_get_system_cpu())
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": MCPU, "num-cores": 2})
TILES = dataclasses.replace(TILE_TABLE[vector_lanes(TARGET)], threads=2)
RNG = np.random.default_rng(0)


def _model(k: int, n: int, op: str, rank: int = 2) -> ir.Model:
    """``x (1, K)`` (or ``(1, 1, K)``) times a constant weight: ``MatMul`` (W ``(K, N)``), ``Gemm`` (transB=1,
    W ``(N, K)`` plus bias), ``swiglu`` (``silu(x·Wg) ⊙ (x·Wu)``), or ``runtime`` (W a graph input, plus bias)."""
    x_shape = [1] * (rank - 1) + [k]
    y_shape = [1] * (rank - 1) + [n]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    w = RNG.standard_normal((k, n), dtype=np.float32) * k**-0.5
    inits = [numpy_helper.from_array(w, "w")]
    if op == "Gemm":
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"),
                 numpy_helper.from_array(RNG.standard_normal(n, dtype=np.float32), "b")]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    elif op == "swiglu":
        inits.append(numpy_helper.from_array(RNG.standard_normal((k, n), dtype=np.float32) * k**-0.5, "wu"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["g"]), helper.make_node("Sigmoid", ["g"], ["s"]),
                 helper.make_node("Mul", ["g", "s"], ["a"]), helper.make_node("MatMul", ["x", "wu"], ["u"]),
                 helper.make_node("Mul", ["a", "u"], ["y"])]
    elif op == "runtime":  # with a bias: the epilogue runs after the K-split partial rows are summed
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n]))
        inits = [numpy_helper.from_array(RNG.standard_normal(n, dtype=np.float32), "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "gemv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _check_against_ort(model: ir.Model, threads: int = 2) -> dict[str, str]:
    """Compile ``model`` for ``threads`` cores, compare with onnxruntime within 1e-4; return the kernel templates."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": MCPU, "num-cores": threads})
    executable, info = compile_cpu(to_relax(model), target, {"fast_math": True})
    reference = Reference(model, threads=1)
    feeds = {v.name: RNG.standard_normal(v.shape.numpy(), dtype=np.float32) for v in model.graph.inputs}
    expected = reference.run(feeds)[0]
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](*[tvm.runtime.tensor(feeds[v.name])
                                                               for v in model.graph.inputs]).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4, f"max abs diff {np.abs(got - expected).max():.2e}"
    return info["kernels"]


# SmolLM2-135M: q/o projections, k/v projections, FFN up/gate, FFN down.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_decode_shapes_match_onnxruntime_and_take_gemv(k, n, op):
    kernels = _check_against_ort(_model(k, n, op))
    assert "gemv" in kernels.values(), kernels
    assert not [t for t in kernels.values() if t in ("none", "fallback")], kernels


@pytest.mark.parametrize("op,threads", [("runtime", 2), ("runtime", 1), ("swiglu", 2)])
def test_runtime_weight_and_swiglu_match_onnxruntime(op, threads):
    kernels = _check_against_ort(_model(576, 1536, op), threads)
    assert list(kernels.values()).count("gemv") == (2 if op == "swiglu" else 1), kernels


def test_decoder_rank3_input_takes_gemv():
    kernels = _check_against_ort(_model(576, 576, "MatMul", rank=3))
    assert list(kernels.values()) == ["gemv"], kernels


@pytest.mark.slow
def test_lm_head_matches_onnxruntime():
    kernels = _check_against_ort(_model(576, 49152, "MatMul"))
    assert list(kernels.values()) == ["gemv"], kernels


def _gemv_func(k: int, n: int, constant: bool, batch: int = 1, m: int = 1) -> tvm.tirx.PrimFunc:
    """``A (batch, m, K) · W (K, N)`` (or ``W (batch, K, N)``); ``constant`` marks W as a pre-packable constant."""
    a = te.placeholder((batch, m, k), name="A")
    w = te.placeholder((batch, k, n) if batch > 1 else (k, n), name="W")
    r = te.reduce_axis((0, k), name="k")
    load = (lambda b, j: w[b, r, j]) if batch > 1 else (lambda b, j: w[r, j])
    mm = te.compute((batch, m, n), lambda b, i, j: te.sum(a[b, i, r] * load(b, j), axis=r), name="matmul")
    func = te.create_prim_func([a, w, mm])
    return func.with_attr("effc.const_params", [1]) if constant else func


def _run(func, k, n, batch=1):
    scheduled, template = schedule_kernel(func, TILES)
    x = RNG.standard_normal((batch, 1, k)).astype("float32")
    w = RNG.standard_normal((batch, k, n) if batch > 1 else (k, n)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(np.zeros((batch, 1, n), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x @ w, rtol=1e-5, atol=1e-4)
    return template, scheduled.script()


def test_packed_gemv_keeps_the_gemm_panel_layout():
    """Prefill (GEMM) and decode (GEMV) over one constant weight must pack it alike to share one copy."""
    nr = max(c for c in TILES.gemm_nr if 576 % c == 0)
    layouts = []
    for m in (1, 16):
        scheduled, template = schedule_kernel(_gemv_func(576, 576, constant=True, m=m), TILES)
        assert template == ("gemv" if m == 1 else "gemm")
        assert "T.parallel" in scheduled.script()
        layouts.append([int(d) for d in scheduled.params[1].ty.shape])
    assert layouts == [[576 // nr, 576, nr]] * 2


def test_runtime_weight_splits_k_across_threads():
    template, text = _run(_gemv_func(576, 1536, constant=False), 576, 1536)
    assert template == "gemv"
    assert "_rf" in text and "T.parallel(2)" in text  # rfactor over K, one block of rows per thread


def test_batched_runtime_gemv_is_parallel_over_batch():
    """Decode attention's P·V shape: 9 heads × (1×2048 · 2048×64); the heads are shared by the threads, no rfactor."""
    template, text = _run(_gemv_func(2048, 64, constant=False, batch=9), 2048, 64, batch=9)
    assert template == "gemv"
    assert "_rf" not in text and "T.parallel" in text
