"""Schedule templates: which template each kernel pattern takes, and the scheduled kernels compute the same numbers."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm import te, topi

from effc.codegen.schedules import TILE_TABLE, schedule_kernel, vector_lanes
from effc.codegen.schedules import analysis as an

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
TILES = TILE_TABLE[vector_lanes(TARGET)]
# Structure tests use small kernels: drop the work thresholds so the parallel loops they check are generated.
ALWAYS_PARALLEL = dataclasses.replace(TILES, min_parallel_macs=0, min_parallel_elems=0)
RNG = np.random.default_rng(0)


def _run(func, arrays, out_shape):
    scheduled, template = schedule_kernel(func, TILES)
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"))]
    lib["main"](*args)
    return template, args[-1].numpy()


def _matmul_epilogue(b, m, k, n):
    a = te.placeholder((b, m, k), name="A")
    w = te.placeholder((k, n), name="W")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), name="k")
    mm = te.compute((b, m, n), lambda x, i, j: te.sum(a[x, i, r] * w[r, j], axis=r), name="matmul")
    add = te.compute((b, m, n), lambda x, i, j: mm[x, i, j] + bias[j], name="T_add")
    out = te.compute((b, m, n), lambda x, i, j: te.max(add[x, i, j], 0.0), name="T_relu")
    return te.create_prim_func([a, w, bias, out])


@pytest.mark.parametrize(
    "b,m,k,n,expected",
    [(1, 64, 96, 128, "gemm"), (2, 8, 64, 32, "gemm"), (1, 1, 64, 256, "gemv"), (1, 40, 24, 213, "gemm_padded"),
     (1, 16, 40, 96, "gemm")],  # N=96: AVX2 takes nr=24 (3 vectors, split into lane-wide chunks)
)
def test_gemm_template_with_fused_epilogue(b, m, k, n, expected):
    x = RNG.standard_normal((b, m, k)).astype("float32")
    w = RNG.standard_normal((k, n)).astype("float32")
    bias = RNG.standard_normal(n).astype("float32")
    template, got = _run(_matmul_epilogue(b, m, k, n), [x, w, bias], (b, m, n))
    assert template == expected
    np.testing.assert_allclose(got, np.maximum(x @ w + bias, 0), rtol=1e-5, atol=1e-4)


def test_gemm_schedule_is_register_blocked():
    scheduled, _ = schedule_kernel(_matmul_epilogue(1, 64, 96, 128), ALWAYS_PARALLEL)
    text = scheduled.script()
    assert "T.parallel" in text and "T.vectorized" in text and "T.unroll" in text
    assert "matmul_init" in text  # reduction decomposed: the accumulator tile is zeroed, not the whole output


def test_softmax_rows_are_parallel_and_vectorized():
    x = te.placeholder((4, 32, 64), name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])
    data = RNG.standard_normal((4, 32, 64)).astype("float32") * 4
    template, got = _run(func, [data], (4, 32, 64))
    assert template == "rowwise"
    ref = np.exp(data - data.max(-1, keepdims=True))
    np.testing.assert_allclose(got, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    text = schedule_kernel(func, ALWAYS_PARALLEL)[0].script()
    assert "T.parallel" in text and "_rf" in text  # rfactor: vector partial sums


@pytest.mark.parametrize("b,m,k,n,parallel", [(1, 8, 16, 32, False), (1, 128, 384, 384, True)])
def test_small_kernels_stay_single_threaded(b, m, k, n, parallel):
    # Below min_parallel_macs (PP-OCR cls's small convs and GEMMs) waking the thread pool costs more than it saves.
    assert (b * m * k * n >= TILES.min_parallel_macs) == parallel
    text = schedule_kernel(_matmul_epilogue(b, m, k, n), TILES)[0].script()
    assert ("T.parallel" in text) == parallel


def test_layer_norm_rowwise():
    x = te.placeholder((1, 16, 384), name="x")
    g = te.placeholder((384,), name="g")
    b = te.placeholder((384,), name="b")
    func = te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[2], epsilon=1e-12)])
    data = RNG.standard_normal((1, 16, 384)).astype("float32")
    gamma = RNG.standard_normal(384).astype("float32")
    beta = RNG.standard_normal(384).astype("float32")
    template, got = _run(func, [data, gamma, beta], (1, 16, 384))
    assert template == "rowwise"
    mean = data.mean(-1, keepdims=True)
    ref = (data - mean) / np.sqrt(data.var(-1, keepdims=True) + 1e-12) * gamma + beta
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_rms_norm_with_keepdims_reduces_once_per_row():
    # x * rsqrt(mean(x², axis=-1, keepdims) + eps) * w, as torch exports Llama's RMSNorm: the kept unit axis of the
    # mean is not a row axis. Counting it as one fused (rows × hidden) into the parallel loop and recomputed the
    # row's mean for every element (SmolLM2 prefill: 2.3 ms per norm instead of ~0.06).
    rows, hidden = 32, 576
    x = te.placeholder((rows, hidden), name="x")
    w = te.placeholder((hidden,), name="w")
    k = te.reduce_axis((0, hidden), name="k")
    total = te.compute((rows, 1), lambda i, j: te.sum(x[i, k] * x[i, k], axis=k), name="sum_sq")
    out = te.compute((rows, hidden), lambda i, j: x[i, j] / te.sqrt(total[i, 0] / hidden + 1e-5) * w[j], name="rms")
    func = te.create_prim_func([x, w, out])
    data = RNG.standard_normal((rows, hidden)).astype("float32")
    gamma = RNG.standard_normal(hidden).astype("float32")
    template, got = _run(func, [data, gamma], (rows, hidden))
    assert template == "rowwise"
    np.testing.assert_allclose(got, data / np.sqrt((data**2).mean(-1, keepdims=True) + 1e-5) * gamma,
                               rtol=1e-4, atol=1e-5)
    text = schedule_kernel(func, ALWAYS_PARALLEL)[0].script()
    assert re.search(rf"T\.parallel\((T\.int64\()?{rows}\)", text), text  # one parallel iteration per row


@pytest.mark.parametrize(
    "cin,cout,ksize,stride,groups",
    [(8, 16, 3, 1, 1), (16, 32, 1, 1, 1), (16, 16, 3, 2, 16), (8, 16, (5, 1), 1, 1)],
    ids=["3x3", "1x1", "depthwise-s2", "conv1d-as-Lx1"],
)
def test_conv_template(cin, cout, ksize, stride, groups):
    torch = pytest.importorskip("torch")
    kh, kw = ksize if isinstance(ksize, tuple) else (ksize, ksize)
    width = 1 if kw == 1 and kh > 1 else 32
    x = te.placeholder((1, cin, 20, width), name="x")
    w = te.placeholder((cout, cin // groups, kh, kw), name="w")
    pad = (kh // 2, kw // 2)
    if groups == 1:
        conv = topi.nn.conv2d_nchw(x, w, stride, pad, 1)
    else:
        conv = topi.nn.group_conv2d_nchw(x, w, stride, pad, 1, groups)
    out = te.compute(conv.shape, lambda *i: te.max(conv(*i), 0.0), name="relu")
    func = te.create_prim_func([x, w, out])
    data = RNG.standard_normal((1, cin, 20, width)).astype("float32")
    weight = RNG.standard_normal((cout, cin // groups, kh, kw)).astype("float32")
    ref = torch.relu(torch.nn.functional.conv2d(torch.tensor(data), torch.tensor(weight), stride=stride, padding=pad,
                                                groups=groups)).numpy()
    template, got = _run(func, [data, weight], ref.shape)
    assert template in ("conv2d", "depthwise_conv2d")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_injective_transpose():
    x = te.placeholder((2, 12, 64, 32), name="x")
    y = topi.transpose(x, (0, 2, 1, 3))
    z = te.compute(y.shape, lambda *i: y(*i) * 0.5, name="scale")
    func = te.create_prim_func([x, z])
    data = RNG.standard_normal((2, 12, 64, 32)).astype("float32")
    template, got = _run(func, [data], (2, 64, 12, 32))
    assert template == "injective"
    np.testing.assert_allclose(got, data.transpose(0, 2, 1, 3) * 0.5)


def test_unmatched_reduction_falls_back_but_is_scheduled():
    x = te.placeholder((64, 48), name="x")
    func = te.create_prim_func([x, topi.sum(x, axis=0)])  # reduces the leading axis: no row template
    data = RNG.standard_normal((64, 48)).astype("float32")
    template, got = _run(func, [data], (48,))
    assert template in ("fallback", "rowwise", "reduce_spatial")
    np.testing.assert_allclose(got, data.sum(0), rtol=1e-5, atol=1e-4)


def test_tile_table_and_lanes():
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == 16
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == 8
    assert vector_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "generic"})) == 4
    for lanes, row in TILE_TABLE.items():
        assert row.lanes == lanes
        assert all(nr % lanes == 0 for nr in row.gemm_nr)  # whole vectors only
        assert row.gemm_mr * (max(row.gemm_nr) // lanes) <= 16  # accumulators fit the register file


def test_gemm_non_power_of_two_vector_count_is_chunked():
    """nr = 3 vectors is split into lane-wide vectors (one <3·lanes x float> vector lowers ~10x slower)."""
    tiles = dataclasses.replace(TILES, gemm_nr=(3 * TILES.lanes,))
    scheduled, template = schedule_kernel(_matmul_epilogue(1, 8, 16, 6 * TILES.lanes), tiles)
    assert template == "gemm"
    widths = {int(w) for w in re.findall(r"T\.vectorized\((?:T\.int\d+\()?(\d+)", scheduled.script())}
    assert widths == {TILES.lanes}


def test_pow2_divisor():
    assert an.pow2_divisor(384, 16) == 16
    assert an.pow2_divisor(40, 16) == 8
    assert an.pow2_divisor(10, 16) == 2
    assert an.pow2_divisor(7, 16) == 1


def test_pool_and_column_sum_vectorize_spatially():
    x = te.placeholder((1, 8, 4, 64), name="x")
    func = te.create_prim_func([x, topi.nn.pool2d(x, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), "max")])
    data = RNG.standard_normal((1, 8, 4, 64)).astype("float32")
    template, got = _run(func, [data], (1, 8, 2, 32))
    assert template == "reduce_spatial"
    np.testing.assert_allclose(got, data.reshape(1, 8, 2, 2, 32, 2).max(axis=(3, 5)))
    y = te.placeholder((1, 96, 64), name="y")
    func = te.create_prim_func([y, topi.sum(y, axis=1)])
    data = RNG.standard_normal((1, 96, 64)).astype("float32")
    template, got = _run(func, [data], (1, 64))
    assert template == "reduce_spatial"
    np.testing.assert_allclose(got, data.sum(1), rtol=1e-5, atol=1e-4)


def test_global_mean_is_rowwise():
    x = te.placeholder((1, 8, 12, 96), name="x")
    total = topi.sum(x, axis=(2, 3), keepdims=True)
    func = te.create_prim_func([x, te.compute(total.shape, lambda *i: total(*i) / 1152.0, name="T_divide")])
    data = RNG.standard_normal((1, 8, 12, 96)).astype("float32")
    template, got = _run(func, [data], (1, 8, 1, 1))
    assert template == "rowwise"
    np.testing.assert_allclose(got, data.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-5)


def test_elementwise_chain_into_row_max_is_one_vectorized_pass():
    """Magika's GELU chain + max over the sequence: producers inline into the reduction, lanes rfactored."""
    x = te.placeholder((1, 64, 100), name="x")
    bias = te.placeholder((1, 64, 1), name="bias")
    y = te.compute(x.shape, lambda n, c, s: x[n, c, s] + bias[n, c, 0], name="T_add")
    z = te.compute(x.shape, lambda *i: y(*i) * te.tanh(y(*i)), name="T_act")
    func = te.create_prim_func([x, bias, topi.max(z, axis=2, keepdims=True)])
    data = RNG.standard_normal((1, 64, 100)).astype("float32")
    b = RNG.standard_normal((1, 64, 1)).astype("float32")
    scheduled, _ = schedule_kernel(func, ALWAYS_PARALLEL)
    text = scheduled.script()
    assert 'sblock("T_add")' not in text and 'sblock("T_act")' not in text  # inlined: one pass over x
    assert "T.parallel" in text
    assert {int(w) for w in re.findall(r"T\.vectorized\((?:T\.int\d+\()?(\d+)", text)} == {4}  # 100 = 25 x 4
    template, got = _run(func, [data, b], (1, 64, 1))
    assert template == "row_reduce"
    expected = ((data + b) * np.tanh(data + b)).max(axis=2, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 128, 1), (3, 512)])
def test_reduction_as_output_is_row_reduce(shape):
    """MiniLM's ``sum`` of a (1, 128, 1) mask over tokens, Magika's sums over 512 channels: output = reduction."""
    x = te.placeholder(shape, name="x")
    data = RNG.standard_normal(shape).astype("float32")
    template, got = _run(te.create_prim_func([x, topi.sum(x, axis=1)]), [data], data.sum(1).shape)
    assert template == "row_reduce"
    np.testing.assert_allclose(got, data.sum(1), rtol=1e-5, atol=1e-4)


def test_batch_matmul_with_odd_short_columns_unrolls_them():
    """PP-OCR rec's (8, 40, 40) @ (8, 40, 15): reduction outside the 15 unrolled columns, not a fallback."""
    a = te.placeholder((8, 40, 40), name="a")
    b = te.placeholder((8, 40, 15), name="b")
    r = te.reduce_axis((0, 40), name="k")
    mm = te.compute((8, 40, 15), lambda x, i, j: te.sum(a[x, i, r] * b[x, r, j], axis=r), name="matmul")
    func = te.create_prim_func([a, b, mm])
    da = RNG.standard_normal((8, 40, 40)).astype("float32")
    db = RNG.standard_normal((8, 40, 15)).astype("float32")
    template, got = _run(func, [da, db], (8, 40, 15))
    assert template == "reduce_spatial"
    assert "T.unroll" in schedule_kernel(func, TILES)[0].script()
    np.testing.assert_allclose(got, da @ db, rtol=1e-5, atol=1e-4)


def test_depth_to_space_keeps_the_vector_row_out_of_the_parallel_fusion():
    """PP-OCR det's pixel shuffle: the innermost axis is its own loop (no div/mod of one fused counter)."""
    x = te.placeholder((1, 16, 8, 32), name="x")  # (N, C*2*2, H, W) -> (N, C, 2H, 2W)
    y = topi.reshape(topi.transpose(topi.reshape(x, (1, 4, 2, 2, 8, 32)), (0, 1, 4, 2, 5, 3)), (1, 4, 16, 64))
    func = te.create_prim_func([x, y])
    scheduled, _ = schedule_kernel(func, ALWAYS_PARALLEL)
    assert re.search(r"T\.parallel\((?:T\.int64\()?64\)", scheduled.script())  # (N, C, 2H) fused, 2W separate
    data = RNG.standard_normal((1, 16, 8, 32)).astype("float32")
    template, got = _run(func, [data], (1, 4, 16, 64))
    assert template == "injective"
    expected = data.reshape(1, 4, 2, 2, 8, 32).transpose(0, 1, 4, 2, 5, 3).reshape(1, 4, 16, 64)
    np.testing.assert_array_equal(got, expected)


def test_reshape_merging_a_short_axis_is_not_vectorized_across_it():
    """(2, 3, 4, 8) → (2, 3, 32): a vector must not span the ``% 8`` period (16 lanes misread on AVX-512)."""
    x = te.placeholder((2, 3, 4, 8), name="x")
    y = topi.reshape(x, (2, 3, 32))
    z = te.compute(y.shape, lambda *i: y(*i) * 2.0, name="scale")
    func = te.create_prim_func([x, z])
    scheduled, _ = schedule_kernel(func, TILES)
    widths = {int(w) for w in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", scheduled.script())}
    assert widths and max(widths) <= 8, widths
    data = RNG.standard_normal((2, 3, 4, 8)).astype("float32")
    _, got = _run(func, [data], (2, 3, 32))
    np.testing.assert_array_equal(got, data.reshape(2, 3, 32) * 2.0)
