"""The VNNI W4A8 GEMM (many rows) of int8 activation blocks × int4_asym weight blocks against integer references."""

import numpy as np
import pytest
import tvm

from effc.codegen.ops import block_quant_gemv as gemv
from effc.codegen.ops import block_quant_vnni as vnni
from effc.codegen.ops import block_quant_vnni_gemm as gemm
from effc.ops.bitpack import pack_blocks, unpack_codes
from effc.ops.block_formats import FORMATS, quantize

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})
HAS_VNNI = vnni.supports_vnni(TARGET)
ASYM, INT8 = FORMATS["int4_asym"], FORMATS["int8"]


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=TARGET)["main"]


def _case(m: int, k: int, n: int, seed: int = 0):
    """Random int4_asym weights (an all-zero block, an offset column) and int8 activation codes of ``m`` rows."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((1, n)))).astype(np.float32)
    w[:32, 3 % n] = 0.0
    w[:, 5 % n] += 3.0  # the minimum carries most of these weights
    q = quantize(w, ASYM, axis=0, scale_dtype="float16")
    wq, scales = pack_blocks(q.codes, q.scales, ASYM.bits)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, 32:64] = 0.0  # an all-zero activation block (scale 1, codes 0)
    act = quantize(x, INT8, axis=-1, scale_dtype="float32")
    qx, sx = act.codes.view(np.int8).reshape(m, k), act.scales.reshape(m, -1)
    return q, wq, scales, qx, sx


def _reference(q, wq, qx: np.ndarray, sx: np.ndarray, k: int) -> np.ndarray:
    """``Y[i, j] = sum_b d * sx * (sum qw * qx) + m * sx * sum qx``: exact int64 block sums, float64 outside."""
    m = len(qx)
    codes = unpack_codes(wq, ASYM.bits, k).astype(np.int64).reshape(len(wq), -1, 32)  # (N, B, 32) unsigned
    acts = qx.astype(np.int64).reshape(m, -1, 32)  # (M, B, 32)
    dots = np.einsum("nbe,mbe->mnb", codes, acts)  # (M, N, B)
    sxd = sx.astype(np.float64)[:, None, :]
    y = (dots * q.scales.astype(np.float64)[None] * sxd).sum(-1)
    return y + (q.minimums.astype(np.float64)[None] * sxd * acts.sum(-1)[:, None, :]).sum(-1)


@pytest.mark.skipif(not HAS_VNNI, reason="the VNNI GEMM needs AVX-512 VNNI")
@pytest.mark.parametrize(("m", "k", "n"), [(5, 64, 16), (7, 192, 48), (128, 576, 192), (6, 128, 1024)])
def test_vnni_gemm_equals_the_integer_reference(m, k, n):
    """Exact int32 block sums: within 1e-6 (relative to max |y|) of the float64 reference of the same integer math;
    odd row counts (register tiles of 5 and 7 rows), one 16-column vector, SmolLM2's k/v projection shape, parallel
    column tiles."""
    from effc.codegen.build import set_runtime_threads

    q, wq, scales, qx, sx = _case(m, k, n)
    with TARGET:
        assert gemm.vnni_gemm_applies(ASYM, 32, INT8, 32, k, n)
        func = gemm.vnni_gemm_kernel(m, k, n, ASYM, str(scales.dtype))
    set_runtime_threads(2)
    args = [qx, sx, gemv.kernel_rows(wq, ASYM, k), scales, gemv.kernel_minimums(q.minimums),
            np.zeros((m, n), np.float32)]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in args]
    _build(func)(*tensors)
    y, ref = tensors[-1].numpy(), _reference(q, wq, qx, sx, k)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))
    column = (q.minimums[5 % n].astype(np.float64) * sx * qx.reshape(m, -1, 32).sum(-1)).sum(-1)
    assert np.abs(column).max() > 1e-2 * float(np.abs(ref).max())  # the minimum term is no small correction


def test_vnni_gemm_refuses_what_it_cannot_compute():
    no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})  # AVX2, no AVX-512
    with no_vnni:
        assert not gemm.vnni_gemm_applies(ASYM, 32, INT8, 32, 64, 16)
    with TARGET:
        if HAS_VNNI:
            assert gemm.vnni_gemm_applies(ASYM, 32, INT8, 32, 64, 16)
        assert not gemm.vnni_gemm_applies(ASYM, 32, INT8, 32, 96, 16)  # K not a multiple of the 64-weight chunk
        assert not gemm.vnni_gemm_applies(ASYM, 32, INT8, 32, 64, 8)  # N not a multiple of 16
        assert not gemm.vnni_gemm_applies(FORMATS["int4"], 32, INT8, 32, 64, 16)  # signed codes: the GEMV only
        assert not gemm.vnni_gemm_applies(ASYM, 32, FORMATS["mxint8"], 32, 64, 16)  # MX activations
    with pytest.raises(ValueError, match="no VNNI GEMM kernel"):
        gemm.vnni_gemm_kernel(4, 64, 8, ASYM, "float16")
