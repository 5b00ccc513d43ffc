"""Decode-in-GEMV kernels (M = 1) of effc.BlockQuantMatMul: kernel layout round trip, kernel = numpy reference."""

import numpy as np
import pytest
import tvm

from effc.codegen.ops import block_quant_gemv as gemv
from effc.ops.bitpack import pack_blocks, unpack_codes
from effc.ops.block_formats import FORMATS, dequantize, quantize

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})
HAS_AVX2 = gemv.supports_int8_gemm(TARGET)
AVX2_ONLY = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})  # runs on any AVX2 CPU


def _quantized(name: str, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((1, n)))).astype(np.float32)
    w[:32, 3] = 0.0  # an all-zero block (E8M0 code 0, int scale 1, asymmetric scale 0)
    w[:, 5] += 3.0  # offset blocks: the asymmetric minimum carries most of each weight
    q = quantize(w, FORMATS[name], axis=0, scale_dtype="float16")
    return q, *pack_blocks(q.codes, q.scales, FORMATS[name].bits)


@pytest.mark.parametrize("name", ["mxfp4", "int4", "int4_asym", "mxint8", "int8", "mxfp6_e2m3"])
def test_kernel_rows_round_trip(name):
    """Every code read back through the kernel layout's addressing equals the packed ONNX code."""
    fmt, k = FORMATS[name], 192
    _, wq, _ = _quantized(name, k, 8)
    rows = gemv.kernel_rows(wq, fmt, k)
    assert rows.shape[1] == k * fmt.bits // 8 + (fmt.bits == 6)  # no byte more than the packed ONNX rows
    codes = unpack_codes(wq, fmt.bits, k).astype(np.int64)
    c = np.arange(k)
    if fmt.bits == 4:  # element 64q + 8i + l: nibble i of int32 lane l of chunk q
        i, lane = (c % 64) // 8, c % 8
        back = (rows[:, (c // 64) * 32 + lane * 4 + i // 2].astype(np.int64) >> ((i % 2) * 4)) & 15
    elif fmt.bits == 8:
        back = rows.astype(np.int64)
    else:
        off = c * fmt.bits
        pair = rows[:, off // 8].astype(np.int64) | (rows[:, off // 8 + 1].astype(np.int64) << 8)
        back = (pair >> (off % 8)) & 63
    np.testing.assert_array_equal(back, codes)


def test_kernel_minimums_are_tile_major():
    """Minimum of block b of row j at [j // ROWS, b, j % ROWS]; rows past N (a partial last tile) are zero."""
    low = np.arange(10 * 3, dtype=np.float16).reshape(10, 3)
    tiles = gemv.kernel_minimums(low)
    assert tiles.shape == (3, 3, gemv.ROWS) and tiles.dtype == np.float16
    j, b = np.meshgrid(np.arange(10), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(tiles[j // gemv.ROWS, b, j % gemv.ROWS], low)
    assert not tiles[2, :, 2:].any()


@pytest.mark.skipif(not HAS_AVX2, reason="the GEMV kernel needs an x86 CPU with AVX2")
@pytest.mark.parametrize("name", ["mxfp4", "int4", "int4_asym", "mxint8", "int8"])
@pytest.mark.parametrize(("threads", "target"), [(1, TARGET), (2, TARGET), (1, AVX2_ONLY)])
def test_gemv_kernel_matches_numpy(name, threads, target):
    """Y (1, N) = X @ dequantize(W) within fp32 summation-order error: serial and parallel tiles; the lookups of
    AVX-512VL (one 16-entry ``vpermi2ps``, where this CPU has it) and of AVX2 (two ``vpermps`` + blend); the
    asymmetric minimum folded in as ``m * sum(X over the block)``."""
    from effc.codegen.build import set_runtime_threads

    fmt = FORMATS[name]
    k, n = 192, 2048 if threads == 2 else 40  # 2048 * 192 elements reach min_parallel_gemv: a parallel loop
    q, wq, scales = _quantized(name, k, n)
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    with target:
        assert gemv.gemv_applies(fmt, 32, k, n)
        func = gemv.gemv_kernel(k, n, fmt, str(scales.dtype))
    assert ("parallel" in func.script()) == (threads == 2)
    assert ("vpermi2var" in func.script()) == (fmt.bits == 4 and target is TARGET and gemv._has_avx512vl_in(target))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    set_runtime_threads(threads)
    lows = [gemv.kernel_minimums(q.minimums)] if fmt.has_minimum else []
    args = [x, gemv.kernel_rows(wq, fmt, k), scales, *lows, *([fmt.code_table()] if fmt.bits == 4 else []),
            np.zeros((1, n), np.float32)]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in args]
    lib["main"](*args)
    ref = (x.astype(np.float64) @ dequantize(q).astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    if fmt.has_minimum:  # the minimum is no small correction: without it column 5 (offset 3) would be far off
        codes_only = x @ (dequantize(q) - np.repeat(q.minimums.astype(np.float32), 32, axis=1).T)
        assert np.abs(codes_only[0, 5] - ref[0, 5]) > 100 * 1e-5 * float(np.abs(ref).max())


def test_gemv_refuses_what_it_cannot_decode():
    with TARGET:
        assert not gemv.gemv_applies(FORMATS["mxfp8_e4m3"], 32, 64, 8)  # FP8 elements: decode-in-GEMM kernel
        assert not gemv.gemv_applies(FORMATS["mxfp4"], 16, 64, 8)  # blocks of 16
        assert not gemv.gemv_applies(FORMATS["mxfp4"], 32, 64, 6)  # N not a multiple of ROWS
        assert not gemv.gemv_applies(FORMATS["mxfp4"], 32, 96, 8)  # K not a multiple of the 64-weight chunk
    with pytest.raises(ValueError, match="no GEMV kernel"):
        gemv.gemv_kernel(64, 8, FORMATS["mxfp6_e2m3"], "uint8")
