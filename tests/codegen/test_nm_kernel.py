"""TVM lowering of effc.NMSparseMatMul: the packed TIR kernel equals the ONNX reference body (onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax
from effc.codegen.ops import nm_sparse as ns
from effc.ops.nm_sparse import pack_nm
from effc.passes import nm_sparsity as nm
from effc.passes import sparsegpt as sg
from tests.passes.nm_helpers import feeds, ffn_model, run

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})


@pytest.mark.parametrize(("rows", "k", "cout", "n", "m", "vector"),
                         [(8, 64, 64, 2, 4, 16), (5, 32, 48, 1, 4, 1), (16, 64, 32, 4, 8, 8)])
def test_standalone_kernel_matches_unpacked_matmul(rows, k, cout, n, m, vector):
    rng = np.random.default_rng(0)
    perm = rng.permutation(k)
    w = sg.prune_weight(rng.standard_normal((cout, k)).astype(np.float32), method="magnitude", n=n, m=m,
                        vector=vector, perm=perm)
    values, indices = ns.to_panels(*pack_nm(w.T, n, m, vector, perm))
    func = ns.schedule_nm(ns.nm_kernel(rows, k, cout, values.shape[1], vector), vector)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, values, indices, np.zeros((rows, cout), np.float32))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def packed_model():
    model = ffn_model(k=64, hidden=128, seq=16)
    nm.NMSparsityPass(n=2, m=4, vector=16)(model)
    return model


@pytest.mark.parametrize("policy", ["packed", "dense", "measure"])
def test_compiled_model_matches_onnxruntime(packed_model, policy):
    ns.LOWERING_LOG.clear()
    with ns.lowering_policy(policy):
        mod = to_relax(packed_model)
    ex, info = compile_cpu(mod, TARGET, {})
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    f = feeds(1, k=64, seq=16)[0]
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(f["x"])).numpy(), run(packed_model, f),
                               rtol=1e-5, atol=1e-5)
    forms = [e["form"] for e in ns.LOWERING_LOG]
    assert len(forms) == 2
    if policy != "measure":
        assert forms == [policy, policy]
    else:
        assert all(e["dense_ms"] > 0 and e["packed_ms"] > 0 for e in ns.LOWERING_LOG)
        assert forms == ["packed" if e["speedup"] > 1 else "dense" for e in ns.LOWERING_LOG]
    packed = [name for name, t in info["kernels"].items() if t == "nm_sparse"]
    assert len(packed) == forms.count("packed")
    assert all("add" in name for name in packed), packed  # the bias (and ReLU) epilogue is fused into the kernel


def test_unknown_policy_raises():
    with pytest.raises(ValueError, match="measure"), ns.lowering_policy("fast"):
        pass


@pytest.mark.parametrize(("cout", "vector", "panel"), [(64, 16, 16), (48, 1, 16), (40, 1, 8), (32, 8, 8)])
def test_panel_layout_is_a_relabeling_of_the_packed_form(cout, vector, panel):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, cout)).astype(np.float32)
    indices = rng.integers(0, 24, (6, cout // vector)).astype(np.uint16)
    pv, pi = ns.to_panels(values, indices)
    assert ns.panel_width(cout, vector) == panel
    assert pv.shape == (cout // panel, 6, panel) and pi.shape == (cout // vector, 6)
    assert pv.flags.c_contiguous and pi.flags.c_contiguous
    j = np.arange(cout)
    np.testing.assert_array_equal(pv[j // panel, :, j % panel].T, values)
    np.testing.assert_array_equal(pi.T, indices)


def test_accumulator_tile_needs_no_workspace_call():
    # The mr x P accumulator lives under the parallel loop: in "local" scope TVM allocated it per output tile with a
    # TVMBackendAllocWorkspace/Free pair; the schedule keeps it a stack slot (registers).
    func = ns.schedule_nm(ns.nm_kernel(64, 128, 256, 64, 16), 16)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    mods = [lib.mod, *lib.mod.imports]
    asm = "".join(m.inspect_source("asm") for m in mods if m.kind == "llvm")
    assert "vfmadd" in asm or "fma" in asm.lower()
    assert "TVMBackendAllocWorkspace" not in asm


def test_row_tiles_do_not_straddle_a_batch_boundary():
    # X (2, 5, 64): 10 rows in tiles of 2 put rows 4 and 5 (two batch items) in one tile; the fused bias epilogue's
    # write-back then filled y[1, 0] with wrong sums (max error 22 against onnxruntime before the fix).
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    nm.NMSparsityPass(n=2, m=4, vector=8, method="magnitude", reconstruct="false")(model)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    with ns.lowering_policy("packed"):
        ex, info = compile_cpu(to_relax(model), TARGET, {})
    out = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert list(info["kernels"].values()) == ["nm_sparse"]
    np.testing.assert_allclose(out, run(model, {"x": x}), rtol=1e-5, atol=1e-5)
