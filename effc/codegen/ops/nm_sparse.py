"""TVM lowering of ``effc.NMSparseMatMul``: a TIR kernel that reads the packed N:M form directly.

Packed form (see :mod:`effc.ops.nm_sparse`): ``values`` ``(R, Cout)`` float32 and ``indices`` ``(R, Cout/V)``
uint16 absolute input rows, ``R = K·n/m``. The converter re-lays them out at compile time into column panels of
``P`` columns (:func:`to_panels`; ``P = V`` for vector-wise N:M): ``values`` ``(Cout/P, R, P)`` and ``indices``
``(Cout/V, R)``, so the ``R × P`` values one output tile walks are contiguous (row-major, a column walk with a row
stride of Cout floats maps onto 2 L1 sets at Cout = 1536 and thrashes: 128×384→1536 on Zen 3, 1 thread, 1.63 →
1.00 ms). The kernel computes, for ``X`` ``(M, K)``::

    Y[i, j] = Σ_r X[i, indices[j // V, r]] · values[j // P, r, j % P]

so it does ``n/m`` of the dense multiply-adds and reads ``n/m`` of the weights. With ``V`` a multiple of the SIMD
width the index is uniform across a vector of outputs: ``X[i, idx]`` becomes one scalar broadcast and ``values``
one contiguous vector load (notes/cpu.md: 1.8–1.95× faster than dense on Zen 4 at V=16). Element-wise N:M
(``V=1``) needs a different input per lane (a gather) and loses to dense on CPUs.

Schedule: output tiles of ``mr`` rows × ``nv·P`` columns in parallel (column panel outer, so its values stay in L1
across row tiles), accumulator in registers, reduction over ``R`` outside the unrolled ``mr × nv`` block, innermost
``P`` lanes vectorized (Goto-style micro-kernel).

Form choice per layer: ``policy="measure"`` (default) compiles and times the dense and packed kernels for each
distinct ``(M, K, Cout, n, m, V)`` on the target and keeps the faster; ``"packed"`` / ``"dense"`` force one.
:data:`LOWERING_LOG` records what each node took and why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import tvm
from tvm import relax, s_tir, te

from effc.codegen.frontend import constant_input, register_converter

logger = logging.getLogger(__name__)

POLICIES = ("measure", "packed", "dense")
_STATE = {"policy": "measure"}
_TIMING_CACHE: dict[tuple, dict] = {}
LOWERING_LOG: list[dict] = []


BLOCK = "nm_sparse_matmul"


def panel_width(cout: int, vector: int) -> int:
    """Columns per packed panel and per vector of the micro-tile.

    Returns:
        ``V`` for vector-wise N:M; for element-wise (``V = 1``) 16, or the largest divisor of ``Cout`` ≤ 8.
    """
    if vector > 1:
        return vector
    return 16 if cout % 16 == 0 else _divisor(cout, 8)


def to_panels(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel layout of a packed weight (contiguous copies; ``P`` from :func:`panel_width`).

    Args:
        values: ``(R, Cout)`` float32 from :func:`effc.ops.nm_sparse.pack_nm`.
        indices: ``(R, Cout/V)`` integer rows from the same.

    Returns:
        ``(values (Cout/P, R, P), indices (Cout/V, R))``.
    """
    r, cout = values.shape
    panel = panel_width(cout, cout // indices.shape[1])
    return (np.ascontiguousarray(values.reshape(r, cout // panel, panel).transpose(1, 0, 2)),
            np.ascontiguousarray(indices.T))


def nm_kernel(rows: int, k: int, cout: int, r: int, vector: int, idx_dtype: str = "uint16",
              lead: tuple[int, ...] | None = None) -> tvm.tirx.PrimFunc:
    """Unscheduled ``main(X (*lead, K), values (Cout/P, R, P), indices (Cout/V, R), Y (*lead, Cout))``.

    Weights in the panel layout of :func:`to_panels`. ``lead`` (default ``(rows,)``) are the leading axes of ``X``
    (their product is ``rows``); keeping them lets Relax fuse the elementwise consumers (bias, activation, residual
    add) into the kernel without a reshape.
    """
    i64 = lambda *dims: [tvm.tirx.IntImm("int64", d) for d in dims]  # noqa: E731  (Relax's shape dtype)
    lead = tuple(lead) if lead else (rows,)
    panel = panel_width(cout, vector)
    x = te.placeholder(i64(*lead, k), "float32", "X")
    vals = te.placeholder(i64(cout // panel, r, panel), "float32", "values")
    idx = te.placeholder(i64(cout // vector, r), idx_dtype, "indices")
    red = te.reduce_axis(i64(0, r), "r")
    y = te.compute(
        i64(*lead, cout),
        lambda *ax: te.sum(x[(*ax[:-1], idx[ax[-1] // vector, red].astype("int32"))]
                           * vals[ax[-1] // panel, red, ax[-1] % panel], axis=red),
        name=BLOCK,
    )
    return te.create_prim_func([x, vals, idx, y]).with_attr("global_symbol", "main")


def schedule_nm(func: tvm.tirx.PrimFunc, vector: int, mr: int = 4, nv: int | None = None) -> tvm.tirx.PrimFunc:
    """Register-blocked schedule of a standalone :func:`nm_kernel`; marks ``tir.is_scheduled``.

    ``mr`` rows × ``nv`` blocks of ``V`` columns per micro-tile; by default ``nv`` keeps about 8 vector
    accumulators for the target's SIMD width (AVX2: 4 × 16 columns; AVX-512: 4 × 32).
    """
    sch = s_tir.Schedule(func)
    _tile(sch, sch.get_sblock(BLOCK), vector, mr, nv, consumers=[])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _tile(sch: s_tir.Schedule, blk, vector: int, mr: int, nv: int | None, consumers: list) -> None:
    """Tile the N:M block; write the accumulator back through ``consumers`` (fused epilogue) or a local cache."""
    if nv is None:
        from effc.codegen.schedules.tiles import vector_lanes

        nv = max(1, 8 * vector_lanes(_target()) // (mr * max(vector, 16)))
    *lead, j, red = sch.get_loops(blk)
    # A row tile must not straddle two slices of the leading axes: the tile's write-back region over the fused
    # (batch, seq) loop was computed wrongly and filled the next slice's first row with another row's sums.
    mr = _divisor(int(sch.get(lead[-1]).extent), mr)
    i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    rows, cout = (int(sch.get(loop).extent) for loop in (i, j))
    lanes = panel_width(cout, vector)
    nv = _divisor(cout // lanes, nv)
    io, ii = sch.split(i, [None, mr])
    jo, jv, ji = sch.split(j, [None, nv, lanes])
    sch.reorder(jo, io, red, ii, jv, ji)  # column block outer: its values (R × nv·V) stay in L1 across rows
    # The accumulator is an mr × nv·P tile under the parallel loop: in "global" scope TVM gives it a stack slot
    # (registers after LLVM); in "local" scope it became a TVMBackendAllocWorkspace/Free call pair per tile.
    if consumers:
        sch.set_scope(blk, 0, "global")
        for c in consumers:  # bias / activation / residual add applied to the tile in registers
            sch.reverse_compute_at(c, io, preserve_unit_loops=True)
            inner = sch.get_loops(c)[-1]
            if int(sch.get(inner).extent) % 8 == 0:
                sch.vectorize(inner)
    else:
        acc = sch.cache_write(blk, 0, "global")
        sch.reverse_compute_at(acc, io)
        sch.vectorize(sch.get_loops(acc)[-1])
    sch.parallel(sch.fuse(jo, io))
    sch.vectorize(ji)
    sch.unroll(jv)
    sch.unroll(ii)
    sch.decompose_reduction(blk, red)


def apply_nm_template(sch: s_tir.Schedule, tiles) -> str:
    """Schedule template for a fused kernel holding one :func:`nm_kernel` block and its elementwise epilogue.

    Intermediate epilogue blocks are inlined; the remaining consumer(s) are computed per output tile.

    Raises:
        NotApplicable: the kernel holds no N:M block (or more than one).
    """
    from effc.codegen.schedules import analysis as an
    from effc.codegen.schedules.gemm import NotApplicable

    del tiles
    blocks = an.child_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    mains = [i for i, name in enumerate(names) if name.startswith(BLOCK)]
    if len(mains) != 1:
        raise NotApplicable(f"{len(mains)} N:M blocks")
    main = blocks[mains[0]]
    for blk in blocks[mains[0] + 1:]:
        with contextlib.suppress(s_tir.ScheduleError):
            sch.compute_inline(blk)
    stmt = sch.get(main)
    idx = next(b for b in map(an.region_buffer, stmt.reads) if "int" in str(b.dtype))
    vector = int(an.region_buffer(stmt.writes[0]).shape[-1]) // int(idx.shape[0])
    _tile(sch, main, vector, 4, None, consumers=list(sch.get_consumers(main)))
    return "nm_sparse"


def _divisor(n: int, want: int) -> int:
    """Largest divisor of ``n`` not above ``want``."""
    return max(d for d in range(1, max(1, min(n, want)) + 1) if n % d == 0)


def _dense_kernel(rows: int, k: int, cout: int) -> tvm.tirx.PrimFunc:
    from effc.codegen.schedules import schedule_kernel, tile_config  # the dense path the CPU pipeline takes

    a = te.placeholder((rows, k), "float32", "A")
    b = te.placeholder((k, cout), "float32", "B")
    red = te.reduce_axis((0, k), "k")
    c = te.compute((rows, cout), lambda i, j: te.sum(a[i, red] * b[red, j], axis=red), name="C")
    func = te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")
    return schedule_kernel(func, tile_config(_target()))[0]


def _target() -> tvm.target.Target:
    return tvm.target.Target.current(allow_none=True) or tvm.target.Target(
        {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())}
    )


def time_layer(rows: int, k: int, cout: int, n: int, m: int, vector: int, repeat: int = 5) -> dict:
    """Min milliseconds of the dense GEMM template and the packed kernel for one layer shape (random data).

    ``repeat`` interleaved rounds of 10 single timed calls per kernel; the min over single calls catches the quiet
    moments of a loaded machine that an average over a batch of calls would not.

    Returns:
        ``{"dense_ms", "packed_ms", "speedup"}`` (speedup = dense / packed).
    """
    key = (rows, k, cout, n, m, vector, str(_target()))
    if key in _TIMING_CACHE:
        return _TIMING_CACHE[key]
    rng = np.random.default_rng(0)
    r = k // m * n
    dev = tvm.cpu()
    x = rng.standard_normal((rows, k)).astype("float32")
    idx = np.sort(rng.random((k // m, m, cout // vector)).argsort(1)[:, :n], axis=1)
    idx = idx + np.arange(0, k, m)[:, None, None]
    values, indices = to_panels(rng.standard_normal((r, cout)).astype("float32"),
                                idx.reshape(r, cout // vector).astype("uint16"))
    packed_args = [x, values, indices, np.zeros((rows, cout), "float32")]
    dense_args = [x, rng.standard_normal((k, cout)).astype("float32"), np.zeros((rows, cout), "float32")]
    runs = {}
    for name, func, args in (("dense_ms", _dense_kernel(rows, k, cout), dense_args),
                             ("packed_ms", schedule_nm(nm_kernel(rows, k, cout, r, vector), vector), packed_args)):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=_target())
        runs[name] = (lib.mod.time_evaluator("main", dev, number=1, repeat=10),
                      [tvm.runtime.tensor(a, dev) for a in args])
    out = {name: float("inf") for name in runs}
    for _ in range(repeat):  # interleaved rounds, min of each: fair on a machine whose load changes
        for name, (timer, args) in runs.items():
            out[name] = min(out[name], float(timer(*args).min * 1e3))
    out["speedup"] = out["dense_ms"] / out["packed_ms"]
    _TIMING_CACHE[key] = out
    return out


def _register_template() -> None:
    """Put :func:`apply_nm_template` first in the CPU template table (once)."""
    from effc.codegen.schedules import TEMPLATES

    if not any(name == "nm_sparse" for name, _ in TEMPLATES):
        TEMPLATES.insert(0, ("nm_sparse", apply_nm_template))


_register_template()


@contextlib.contextmanager
def lowering_policy(policy: str) -> Iterator[None]:
    """Choose how ``effc.NMSparseMatMul`` lowers inside the block: ``measure`` | ``packed`` | ``dense``.

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown N:M lowering policy {policy!r}; use one of {', '.join(POLICIES)}")
    old, _STATE["policy"] = _STATE["policy"], policy
    try:
        yield
    finally:
        _STATE["policy"] = old



@register_converter("NMSparseMatMul")
class NMSparseMatMulConverter:
    """``effc.NMSparseMatMul(X, values, indices)`` → ``call_tir`` of the packed kernel, or dense ``matmul``."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, values_e, indices_e = inputs
        what = "NMSparseMatMul values and indices"
        values, indices = constant_input(values_e, params, what), constant_input(indices_e, params, what)
        n, m = int(attr.get("n", 2)), int(attr.get("m", 4))
        r, cout = values.shape
        vector = cout // indices.shape[1]
        x = bb.normalize(x)
        shape = [int(d) for d in x.ty.shape.values]
        k, rows = shape[-1], int(np.prod(shape[:-1]))
        policy = _STATE["policy"]
        entry = {"shape": [rows, k, cout], "n": n, "m": m, "vector": vector, "policy": policy}
        if policy == "measure":
            entry.update(time_layer(rows, k, cout, n, m, vector))
            form = "packed" if entry["speedup"] > 1.0 else "dense"
            entry["reason"] = f"measured {entry['speedup']:.2f}x vs dense"
        else:
            form, entry["reason"] = policy, "forced"
        entry["form"] = form
        LOWERING_LOG.append(entry)
        logger.info("NMSparseMatMul %s: %s (%s)", entry["shape"], form, entry["reason"])
        if form == "dense":
            from effc.ops.nm_sparse import unpack_nm

            return relax.op.matmul(x, relax.const(unpack_nm(values, indices, k)))
        # Unscheduled, with the GEMM fusion pattern: FuseOps merges the elementwise epilogue into it and
        # apply_nm_template schedules the fused kernel.
        func = nm_kernel(rows, k, cout, r, vector, str(indices.dtype), lead=tuple(shape[:-1]))
        func = func.without_attr("global_symbol").with_attr("op_pattern", 4)
        gv = bb.add_func(func, "effc_nm_sparse_matmul")
        values, indices = to_panels(values, indices)  # the kernel's layout, fixed at compile time
        return relax.call_tir(gv, [x, relax.const(values), relax.const(indices)],
                              out_ty=relax.TensorType([*shape[:-1], cout], "float32"))
