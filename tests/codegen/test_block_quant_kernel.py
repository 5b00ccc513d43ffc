"""TVM lowering of the block-quant effc ops: kernel = numpy dequantized matmul, compiled model = onnxruntime."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

import effc.codegen.ops.block_quant as bq
import effc.codegen.ops.block_quant_int8 as bq_int8
from effc.codegen.ops.block_quant_gemv import kernel_minimums, kernel_rows
from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax
from effc.ops.bitpack import pack_blocks
from effc.ops.block_formats import FORMATS, bits_per_weight, dequantize, quantize, quantize_dequantize
from effc.passes.block_quant import BlockQuantPass

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})


@pytest.mark.parametrize("name", ["mxint8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "int4", "int4_asym"])
def test_kernel_matches_numpy_dequantized_matmul(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(0)
    m, k, n = 8, 96, 64
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:32, 5] = 0.0  # an all-zero block (E8M0 code 0)
    w[:, 7] -= 2.0  # offset blocks (the asymmetric minimum)
    q = quantize(w, fmt, axis=0, scale_dtype="float32")
    wq, st = pack_blocks(q.codes, q.scales, fmt.bits)
    wt = kernel_rows(wq, fmt, k)
    assert wt.nbytes <= k * n * fmt.bits // 8 + n  # packed: bits/8 bytes per weight (+1 pad byte per row, 6-bit)
    func = bq.schedule_block_quant(bq.block_quant_kernel(m, k, n, fmt, 32, str(st.dtype)))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    dev = tvm.cpu()
    lows = [kernel_minimums(q.minimums)] if fmt.has_minimum else []
    args = [tvm.runtime.tensor(a, dev) for a in (x, wt, st, *lows, np.zeros((m, n), np.float32))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), x @ dequantize(q), rtol=1e-5, atol=1e-5)


def _toy():
    from tests.passes.test_block_quant import _toy as toy

    return toy()


def _compile_and_run(model, feeds):
    mod = to_relax(model)
    ex, info = compile_cpu(mod, TARGET, {})
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(v, tvm.cpu()) for v in feeds.values()])
    return out.numpy() if hasattr(out, "numpy") else out[0].numpy(), mod


@pytest.mark.parametrize(("fmt", "mode"), [("mxfp4", "weight"), ("mxfp6_e3m2", "weight"), ("mxfp8_e4m3", "weight_act"),
                                         ("int4_asym", "weight")])
def test_compiled_model_matches_onnxruntime(fmt, mode):
    model, _ = _toy()
    BlockQuantPass(format=fmt, mode=mode, min_params=0)(model)
    feeds = {"ids": np.array([[0, 3, 7, 49, 12, 3, 21, 5]], np.int64)}
    ref = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    start = len(bq.LOWERING_LOG)
    out, mod = _compile_and_run(model, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # weights enter the module packed: uint8 constants only, no fp32 weight of the quantized layers
    log = bq.LOWERING_LOG[start:]
    assert [e["shape"][1:] for e in log] == [[64, 64], [64, 32]]
    bits = bits_per_weight(fmt)  # codes + E8M0 scales, or float16 scales (+ minimums for int4_asym)
    assert all(e["weight_bytes"] <= e["shape"][1] * e["shape"][2] * bits / 8 + e["shape"][1] for e in log)
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("block_quant_matmul" in k for k in kernels) == 2 and any("block_quant_gather" in k for k in kernels)


def test_qdq_kernel_matches_reference_values():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 64)) * np.exp(rng.standard_normal((4, 64)))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 0] = 0.25  # a power-of-two amax
    for name in ("mxint8", "mxfp4", "mxfp6_e2m3", "mxfp8_e5m2"):
        func = bq._qdq_kernel([4, 64], FORMATS[name], 32)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
        args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, np.zeros_like(x))]
        lib["main"](*args)
        np.testing.assert_array_equal(args[1].numpy(), quantize_dequantize(x, name, axis=-1))


@pytest.mark.skipif(not bq_int8.supports_int8_gemm(TARGET), reason="the integer MXINT8 GEMM needs x86 AVX2")
# (64, 1024, 16): over the parallel thresholds (min_parallel_elems / min_parallel_macs), the others run serially
@pytest.mark.parametrize(("m", "k", "n"), [(8, 96, 64), (5, 64, 24), (1, 32, 8), (64, 1024, 16)])
def test_int8_gemm_equals_mxint8_qdq_matmul(m, k, n):
    """quantize kernel codes are bit-exact with the MXINT8 QDQ; the integer GEMM equals Q(X) @ Q(W) in fp32."""
    rng = np.random.default_rng(m)
    x = (rng.standard_normal((m, k)) * np.exp(rng.standard_normal((m, k)))).astype(np.float32)
    x[0, :32] = 0.0  # all-zero activation block
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:32, n - 1] = 0.0  # all-zero weight block
    w[32 % k:, 0] *= 1e4  # large scales: products must not saturate (|codes| <= 127)
    q = quantize(w, "mxint8", axis=0)
    wp, sw = bq_int8.pack_int8_weights(np.ascontiguousarray(q.codes.reshape(n, k).T), np.ascontiguousarray(q.scales.T))
    dev = tvm.cpu()
    quant = tvm.compile(tvm.IRModule({"main": bq_int8.quantize_act_kernel(m, k)}), target=TARGET)
    gemm = tvm.compile(tvm.IRModule({"main": bq_int8.int8_gemm_kernel(m, k, n)}), target=TARGET)
    qa = [tvm.runtime.tensor(a, dev) for a in (x, np.zeros((m, k), np.int8), np.zeros((m, k // 32), np.float32))]
    quant["main"](*qa)
    xq = quantize_dequantize(x, "mxint8", axis=-1)
    np.testing.assert_array_equal(qa[1].numpy() * np.repeat(qa[2].numpy(), 32, axis=1), xq)
    assert np.abs(qa[1].numpy()).max() <= 127
    ga = [*qa[1:], *(tvm.runtime.tensor(a, dev) for a in (wp, sw, np.zeros((m, n), np.float32)))]
    gemm["main"](*ga)
    ref = xq.astype(np.float64) @ dequantize(q).astype(np.float64)
    np.testing.assert_allclose(ga[4].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(("mcpu", "tiles", "lanes"), [("znver3", 2, 8), ("znver4", 3, 16)])
def test_decode_kernel_takes_the_targets_gemm_tile(mcpu, tiles, lanes):
    """N = 48 columns: AVX2 tiles of 24 in 8 lanes (2 parallel tiles), AVX-512 tiles of 16 in 16 lanes (3)."""
    with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
        script = bq.schedule_block_quant(bq.block_quant_kernel(8, 64, 48, "mxint8")).script()
    assert f"T.parallel({tiles})" in script and f"T.vectorized({lanes})" in script
    assert f"T.vectorized({2 * lanes})" not in script


def test_int8_kernels_use_threads_only_above_the_parallel_thresholds():
    """MiniLM's 128x384 activation (49,152 elements < min_parallel_elems) is quantized on the calling thread."""
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}):
        kernels = {"quant_small": bq_int8.quantize_act_kernel(128, 384), "quant_big": bq_int8.quantize_act_kernel(
            128, 1536), "gemm_small": bq_int8.int8_gemm_kernel(8, 64, 64), "gemm_big": bq_int8.int8_gemm_kernel(
            128, 384, 384)}
    parallel = {name: "T.parallel" in f.script() for name, f in kernels.items()}
    assert parallel == {"quant_small": False, "quant_big": True, "gemm_small": False, "gemm_big": True}


@pytest.mark.skipif(not bq_int8.supports_int8_gemm(TARGET), reason="the integer MXINT8 GEMM needs x86 AVX2")
def test_mxint8_weight_act_compiles_to_integer_kernels():
    model, _ = _toy()
    BlockQuantPass(format="mxint8", mode="weight_act", min_params=0)(model)
    feeds = {"ids": np.array([[0, 3, 7, 49, 12, 3, 21, 5]], np.int64)}
    ref = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    start = len(bq.LOWERING_LOG)
    with TARGET:
        out, mod = _compile_and_run(model, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert [e["kernel"] for e in bq.LOWERING_LOG[start:]] == ["int8", "int8"]
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("int8_gemm" in k for k in kernels) == 2 and not any("block_quant_matmul" in k for k in kernels)
    # without an AVX2 target in scope the same model keeps the fp32 decode-in-GEMM kernel
    start = len(bq.LOWERING_LOG)
    out, _ = _compile_and_run(model, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert [e["kernel"] for e in bq.LOWERING_LOG[start:]] == ["fp32", "fp32"]


def test_block_quantized_conv_compiles_and_matches_onnxruntime():
    from tests.passes.test_block_quant import _conv_toy

    model, _ = _conv_toy()
    BlockQuantPass(format="mxfp4", min_params=0)(model)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 32, 8, 8)).astype(np.float32)}
    ref = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out, mod = _compile_and_run(model, feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("block_quant_gather" in k for k in kernels) == 2  # both quantized convs decode packed rows
