"""Spatially vectorized reduction template: pooling windows and column reductions (reduce a non-innermost axis).

Applies to a kernel with one reduction block whose output's innermost axis is spatial and long enough to vectorize,
e.g. ``max_pool2d`` (``out[n, c, h, w] = max over (rh, rw)``) or ``sum(x[1, 512, 256], axis=1)``. The reduction
loops move outside the innermost spatial loop, which then vectorizes:

    parallel for outer in fuse(spatial[:-1], w_o):
        acc[w_i] = init                     # vectorized
        for r..: for w_i in vectorize: acc[w_i] = acc[w_i] (+|max) in[..]
        epilogue[w_i]                       # consumers computed per tile
"""

from __future__ import annotations

from tvm import s_tir

from effc.codegen.schedules import analysis as an
from effc.codegen.schedules.gemm import NotApplicable
from effc.codegen.schedules.tiles import TileConfig


def apply_reduce_spatial(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule a single-reduction kernel by vectorizing its innermost spatial axis.

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        ``"reduce_spatial"``.

    Raises:
        NotApplicable: not exactly one reduction, iterators not ``S..S R..R``, or the innermost spatial extent has
            no power-of-two divisor of at least 4 (a matmul's short odd extent, at most ``4 * lanes`` such as 15, is
            unrolled instead: the reduction still runs outside it, over contiguous rows).
    """
    blocks = an.child_blocks(sch)
    reductions = [b for b in blocks if an.block_facts(sch, b).is_reduction]
    if len(reductions) != 1:
        raise NotApplicable(f"{len(reductions)} reduction blocks")
    main = reductions[0]
    facts = an.block_facts(sch, main)
    n_s = len(facts.kinds) - len(facts.kinds.lstrip("S"))
    if n_s == 0 or set(facts.kinds[n_s:]) != {"R"}:
        raise NotApplicable(f"iterators {facts.kinds} are not S..S R..R")
    inner = facts.extents[n_s - 1]
    lanes = an.pow2_divisor(inner, tiles.lanes) if inner > 0 else 1
    # A matmul with short odd columns (PP-OCR rec's (8, 40, 40) @ (8, 40, 15)) unrolls them instead.
    unrolled = facts.mac is not None and lanes < 4 and 2 <= inner <= 4 * tiles.lanes
    if unrolled:
        lanes = inner
    elif lanes < 4:
        raise NotApplicable(f"innermost spatial extent {inner} does not vectorize")
    main_name = facts.name
    for blk in blocks:
        name = an.block_facts(sch, blk).name
        if name == main_name:
            continue
        try:
            sch.compute_inline(blk)
        except s_tir.ScheduleError:
            pass
    main = sch.get_sblock(main_name)
    loops = sch.get_loops(main)
    spatial, reduce = loops[:n_s], loops[n_s:]
    w_o, w_i = sch.split(spatial[-1], [None, lanes])
    sch.reorder(*spatial[:-1], w_o, *reduce, w_i)
    outer = sch.fuse(*spatial[:-1], w_o) if len(spatial) > 1 else w_o
    if an.iterations(facts.extents[:n_s]) >= tiles.min_parallel_elems // 4:
        sch.parallel(outer)
    for blk in sch.get_consumers(main):
        sch.reverse_compute_at(blk, outer, preserve_unit_loops=True)
        inner = sch.get_loops(blk)[-1]
        if an.loop_extent(sch, inner) == lanes:
            (sch.unroll if unrolled else sch.vectorize)(inner)
    (sch.unroll if unrolled else sch.vectorize)(w_i)
    init = sch.decompose_reduction(main, reduce[0])
    (sch.unroll if unrolled else sch.vectorize)(sch.get_loops(init)[-1])
    return "reduce_spatial"
