"""Direct conv template: loop order, padding nest and numbers of scheduled convs against a numpy reference."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm import te, topi

from effc.codegen.schedules import TILE_TABLE, schedule_kernel, vector_lanes

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
TILES = TILE_TABLE[vector_lanes(TARGET)]
# These convs are small: drop the work thresholds so the parallel loops the test checks are generated.
ALWAYS_PARALLEL = dataclasses.replace(TILES, min_parallel_macs=0, min_parallel_elems=0)
RNG = np.random.default_rng(0)


def _conv_func(ci, co, h, w, k, pad):
    x = te.placeholder((1, ci, h, w), name="x")
    wt = te.placeholder((co, ci, k, k), name="w")
    return te.create_prim_func([x, wt, topi.nn.conv2d_nchw(x, wt, 1, pad, 1)])


def _reference(x, w, pad):
    ci, h, wd = x.shape[1:]
    co, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    out = np.zeros((1, co, oh, ow), np.float64)
    for ry in range(k):
        for rx in range(k):
            out += np.einsum("oc,nchw->nohw", w[:, :, ry, rx], xp[:, :, ry : ry + oh, rx : rx + ow])
    return out


@pytest.mark.parametrize("ci,co,h,w,rows_outer", [(32, 8, 6, 64, True), (8, 24, 6, 64, True), (32, 64, 6, 8, False)])
def test_conv_loop_order_and_numbers(ci, co, h, w, rows_outer):
    func = _conv_func(ci, co, h, w, 3, 1)
    scheduled, template = schedule_kernel(func, ALWAYS_PARALLEL)
    assert template == "conv2d"
    text = scheduled.script()
    assert "for rc, ry, rx in" in text
    # Wide images: rows outside the channel tiles (each row's input reused by all of them); narrow: channels out.
    fused = re.findall(r"for (nn\w+) in T\.parallel", text)
    assert fused == ["nn_yy_ff_0_fused" if rows_outer else "nn_ff_0_yy_fused"]
    # The padding copy is parallel over (N, C), not over every element (no per-element div/mod).
    assert f"T.parallel({ci})" in text
    x = RNG.standard_normal((1, ci, h, w)).astype("float32")
    wt = RNG.standard_normal((co, ci, 3, 3)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(wt), tvm.runtime.tensor(np.zeros((1, co, h, w), "float32"))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), _reference(x, wt, 1), rtol=1e-4, atol=1e-4)


def test_one_dimensional_conv_puts_column_tiles_outside_channel_tiles():
    # (N, C, L, 1): the L tiles (yy_0) outside the channel tiles (ff_0), fused into one parallel loop.
    x = te.placeholder((1, 8, 52, 1), name="x")
    wt = te.placeholder((8, 8, 5, 1), name="w")
    func = te.create_prim_func([x, wt, topi.nn.conv2d_nchw(x, wt, 1, 0, 1)])
    scheduled, _ = schedule_kernel(func, ALWAYS_PARALLEL)
    assert re.findall(r"for (nn\w+) in T\.parallel", scheduled.script()) == ["nn_xx_yy_0_ff_0_fused"]
    xv = RNG.standard_normal((1, 8, 52, 1)).astype("float32")
    wv = RNG.standard_normal((8, 8, 5, 1)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    args = [tvm.runtime.tensor(xv), tvm.runtime.tensor(wv), tvm.runtime.tensor(np.zeros((1, 8, 48, 1), "float32"))]
    lib["main"](*args)
    expected = sum(np.einsum("oc,cl->ol", wv[:, :, t, 0], xv[0, :, t : t + 48, 0]) for t in range(5))
    np.testing.assert_allclose(args[-1].numpy()[0, :, :, 0], expected, rtol=1e-4, atol=1e-4)


def test_one_dimensional_conv_takes_three_vector_tile():
    # (N, C, L, 1) with 5 taps and L = 48, a multiple of 3 lanes: unrolled lane-wide vectors, not one 24-wide vector.
    x = te.placeholder((1, 8, 52, 1), name="x")
    wt = te.placeholder((4, 8, 5, 1), name="w")
    func = te.create_prim_func([x, wt, topi.nn.conv2d_nchw(x, wt, 1, 0, 1)])
    scheduled, _ = schedule_kernel(func, TILES)
    text = scheduled.script()
    assert f"T.vectorized({TILES.lanes})" in text and "T.unroll(3)" in text
    xv = RNG.standard_normal((1, 8, 52, 1)).astype("float32")
    wv = RNG.standard_normal((4, 8, 5, 1)).astype("float32")
    lib = tvm.compile(tvm.IRModule({"main": scheduled}), target=TARGET)
    args = [tvm.runtime.tensor(xv), tvm.runtime.tensor(wv), tvm.runtime.tensor(np.zeros((1, 4, 48, 1), "float32"))]
    lib["main"](*args)
    expected = sum(np.einsum("oc,ncl->nol", wv[:, :, k, 0], xv[:, :, k : k + 48, 0]) for k in range(5))
    np.testing.assert_allclose(args[-1].numpy()[..., 0], expected, rtol=1e-4, atol=1e-4)
