"""Integer-dot VNNI GEMV of int8 activation blocks × int4_asym / int4 / int8 weight blocks, and its quantizer."""

import numpy as np
import pytest
import tvm

from effc.codegen.ops import block_quant_gemv as gemv
from effc.codegen.ops import block_quant_vnni as vnni
from effc.ops.bitpack import pack_blocks, unpack_codes
from effc.ops.block_formats import FORMATS, quantize, quantize_dequantize

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})
HAS_VNNI = vnni.supports_vnni(TARGET)
NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})  # AVX2, no AVX-512


def _run(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in arrays]
    lib["main"](*args)
    return [a.numpy() for a in args]


def _activation(k: int, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((1, k)).astype(np.float32) * 3
    x[0, 32:64] = 0.0  # an all-zero block: scale 1, codes 0
    x[0, 64] = 1e4  # an outlier block
    return x


@pytest.mark.skipif(not HAS_VNNI, reason="the VNNI kernels need AVX-512 VNNI")
def test_quantizer_matches_the_int8_block_format_bit_for_bit():
    """Codes and float32 scales equal :func:`quantize` (``int8``, float32 scales); ``Q * SX`` is the QDQ output."""
    k = 160
    x = np.concatenate([_activation(k), np.random.default_rng(2).uniform(-1, 1, (1, k)).astype(np.float32)])
    with TARGET:
        func = vnni.quantize_act_kernel(2, k)
    _, q, sx = _run(func, x, np.zeros((2, k), np.int8), np.zeros((2, k // 32), np.float32))
    ref = quantize(x, "int8", axis=-1, scale_dtype="float32")
    np.testing.assert_array_equal(q, ref.codes.view(np.int8).reshape(2, k))
    np.testing.assert_array_equal(sx, ref.scales)
    assert sx[0, 1] == 1.0 and not q[0, 32:64].any()
    qdq = (q.reshape(2, -1, 32).astype(np.float32) * sx[..., None]).reshape(2, k)
    np.testing.assert_array_equal(qdq, quantize_dequantize(x, "int8", axis=-1, scale_dtype="float32"))


def _weights(name: str, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((1, n)))).astype(np.float32)
    w[:32, 3] = 0.0  # an all-zero block
    w[:, 5] += 3.0  # offset blocks: the asymmetric minimum carries most of each weight
    q = quantize(w, FORMATS[name], axis=0, scale_dtype="float16")
    return q, *pack_blocks(q.codes, q.scales, FORMATS[name].bits)


def _integer_reference(q, wq, qx: np.ndarray, sx: np.ndarray, name: str, k: int) -> np.ndarray:
    """``sum_b d * sx * (sum qw * qx) (+ m * sx * sum qx)`` with exact integer block sums (float64 outside)."""
    fmt = FORMATS[name]
    codes = unpack_codes(wq, fmt.bits, k).astype(np.int64)  # (N, K) unsigned codes
    if fmt.kind == "int":
        codes = np.where(codes >= 2 ** (fmt.bits - 1), codes - 2**fmt.bits, codes)
    blocks = (codes.reshape(len(codes), -1, 32) * qx.astype(np.int64).reshape(1, -1, 32)).sum(-1)  # (N, K/32)
    scale = q.scales.astype(np.float64) * sx.astype(np.float64)  # (N, K/32)
    y = (blocks * scale).sum(-1)
    if fmt.has_minimum:
        sums = qx.astype(np.int64).reshape(-1, 32).sum(-1)
        y = y + (q.minimums.astype(np.float64) * sx.astype(np.float64) * sums).sum(-1)
    return y[None, :]


@pytest.mark.skipif(not HAS_VNNI, reason="the VNNI kernels need AVX-512 VNNI")
@pytest.mark.parametrize(("name", "k", "n"), [("int4_asym", 192, 40), ("int4", 128, 12), ("int8", 96, 44),
                                              ("int4_asym", 576, 2048), ("int8", 576, 2048)])
def test_vnni_gemv_equals_the_integer_reference(name, k, n):
    """The kernel quantizes X itself (the int8 block format's codes and scales); exact int32 block sums: within
    1e-6 (relative to max |y|) of the float64 reference of the same integer math; int8 K = 96 (not a multiple of
    64), the offsets 8 / 128 that make int4 / int8 codes unsigned, the int4_asym minimum term, parallel tiles at
    576 x 2048."""
    from effc.codegen.build import set_runtime_threads

    fmt = FORMATS[name]
    q, wq, scales = _weights(name, k, n)
    x = _activation(k)
    ref_q = quantize(x, "int8", axis=-1, scale_dtype="float32")
    qx, sx = ref_q.codes.view(np.int8).reshape(1, k), ref_q.scales.reshape(1, -1)
    with TARGET:
        assert vnni.vnni_applies(fmt, 32, FORMATS["int8"], 32, k, n)
        func = vnni.vnni_gemv_kernel(k, n, fmt, str(scales.dtype))
    assert ("parallel" in func.script()) == (k * n >= 2**18)
    set_runtime_threads(2)
    lows = [gemv.kernel_minimums(q.minimums)] if fmt.has_minimum else []
    y = _run(func, x, gemv.kernel_rows(wq, fmt, k), scales, *lows, np.zeros((1, n), np.float32))[-1]
    ref = _integer_reference(q, wq, qx[0], sx[0], name, k)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))
    if fmt.has_minimum:  # the minimum term is no small correction (column 5 is offset by 3)
        assert abs(y[0, 5] - (ref[0, 5] - (q.minimums[5].astype(np.float64) * sx[0]
                                           * qx.reshape(-1, 32).sum(-1)).sum())) > 1e-3 * float(np.abs(ref).max())


def test_vnni_refuses_what_it_cannot_compute():
    int8, int4_asym = FORMATS["int8"], FORMATS["int4_asym"]
    with NO_VNNI:
        assert not vnni.vnni_applies(int4_asym, 32, int8, 32, 64, 8)  # no AVX-512 VNNI in the target
    with TARGET:
        if HAS_VNNI:
            assert vnni.vnni_applies(int4_asym, 32, int8, 32, 64, 8)
        assert not vnni.vnni_applies(int4_asym, 32, int8, 32, 96, 8)  # K not a multiple of the 64-weight chunk
        assert not vnni.vnni_applies(int4_asym, 32, int8, 32, 64, 6)  # N not a multiple of ROWS
        assert not vnni.vnni_applies(FORMATS["mxfp4"], 32, int8, 32, 64, 8)  # FP elements
        assert not vnni.vnni_applies(int4_asym, 32, FORMATS["mxint8"], 32, 64, 8)  # MX activations
    with pytest.raises(ValueError, match="no VNNI GEMV kernel"):
        vnni.vnni_gemv_kernel(96, 8, int4_asym, "float16")
    with pytest.raises(ValueError, match="K % 32"):
        vnni.quantize_act_kernel(1, 40)
