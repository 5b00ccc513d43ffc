"""Row-wise reduction template: softmax, layer/RMS norm, mean — every reduction runs along the innermost axes.

Applies when every reduction block reduces the trailing axes of a tensor whose leading axes are the output's
leading ("row") axes, e.g. softmax ``(b, h, i, k)`` reduces ``k`` per row ``(b, h, i)``. Schedule:

    parallel for row in rows:                      # all blocks computed per row (compute_at), buffers shrink
        max/sum over k: k split by lanes, rfactor   # vector partial accumulators, then a lane reduction
        elementwise over k: vectorized by lanes

The rfactor on the lane loop turns a serial scalar reduction into ``lanes`` independent vector accumulators.
"""

from __future__ import annotations

from tvm import s_tir

from effc.codegen.schedules import analysis as an
from effc.codegen.schedules.gemm import NotApplicable
from effc.codegen.schedules.tiles import TileConfig


def _n_rows(sch: s_tir.Schedule, blocks: list) -> int:
    """How many leading axes all blocks share as spatial row axes (the reductions' spatial prefix)."""
    n_rows = None
    for blk in blocks:
        facts = an.block_facts(sch, blk)
        if facts.is_reduction:
            if facts.kinds.rstrip("R").count("R") or "O" in facts.kinds:
                raise NotApplicable(f"block {facts.name} reduces non-trailing axes ({facts.kinds})")
            rows = len(facts.kinds.rstrip("R"))
            while rows > 1 and facts.extents[rows - 1] == 1:  # a kept reduced axis (keepdims) is not a row axis
                rows -= 1
            n_rows = rows if n_rows is None else min(n_rows, rows)
    if n_rows is None:
        raise NotApplicable("no reduction block")
    return n_rows


def _rfactor_lanes(sch: s_tir.Schedule, blk, tiles: TileConfig):
    """Split ``blk``'s single trailing reduction loop by lanes and rfactor the lane loop.

    Returns:
        The rfactor block (spatial over the lanes, reducing the chunks), or None when the loop is too short.
    """
    facts = an.block_facts(sch, blk)
    n_r = facts.kinds.count("R")
    if n_r > 1:  # e.g. a mean over (H, W): one fused reduction loop
        sch.fuse(*sch.get_loops(blk)[-n_r:])
    k = sch.get_loops(blk)[-1]
    ext = an.loop_extent(sch, k)
    lanes = an.pow2_divisor(ext, tiles.lanes) if ext > 0 else 1
    if lanes < 4 or ext == lanes:
        return None
    _, ki = sch.split(k, [None, lanes])
    return sch.rfactor(ki, factor_axis=0)


def apply_rowwise(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule a row-wise reduction kernel (softmax, norms, means).

    Order matters in TVM 0.27: rfactor before compute_at (rfactor needs compact dataflow under its loop),
    parallel/vectorize before decompose_reduction (both refuse reduction blocks without their init).

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        ``"rowwise"``.

    Raises:
        NotApplicable: a reduction is not along trailing axes, or blocks do not share the row axes.
    """
    blocks = an.child_blocks(sch)
    n_rows = _n_rows(sch, blocks)
    # Spatial intermediates over the rows only (mean = sum / n) inline into their consumers.
    for blk in blocks[:-1]:
        facts = an.block_facts(sch, blk)
        if not facts.is_reduction and len(facts.kinds) >= n_rows and all(e == 1 for e in facts.extents[n_rows:]):
            try:
                sch.compute_inline(blk)
            except s_tir.ScheduleError:
                pass
    blocks = an.child_blocks(sch)
    outputs = [b for b in blocks if not sch.get_consumers(b)]
    if len(outputs) != 1:
        raise NotApplicable(f"{len(outputs)} output blocks")
    out = outputs[0]
    out_facts = an.block_facts(sch, out)
    if len(out_facts.kinds) < n_rows or out_facts.is_reduction:
        raise NotApplicable("output block is not spatial over the row axes")
    rf_names = set()
    for blk in blocks:
        if an.block_facts(sch, blk).is_reduction:
            rf = _rfactor_lanes(sch, blk, tiles)
            if rf is not None:
                rf_names.add(an.block_facts(sch, rf).name)
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:n_rows]) if n_rows > 1 else loops[0]
    out_name = out_facts.name
    for blk in reversed(an.child_blocks(sch)):
        if an.block_facts(sch, blk).name != out_name:
            sch.compute_at(blk, row, preserve_unit_loops=True)
    if an.iterations(out_facts.extents) >= tiles.min_parallel_elems:
        sch.parallel(row)
    under = _blocks_under(sch, row)
    decompose_at = []
    for blk in under:
        facts = an.block_facts(sch, blk)
        loops = sch.get_loops(blk)[1:]
        # compute_at made one loop per block iterator (in iterator order); the output keeps its non-row loops.
        kinds = facts.kinds if len(loops) == len(facts.kinds) else facts.kinds[n_rows:]
        if len(loops) != len(kinds):
            raise NotApplicable(f"block {facts.name}: {len(loops)} loops for iterators {facts.kinds}")
        if facts.is_reduction:
            r_loops = [lp for lp, kd in zip(loops, kinds, strict=True) if kd == "R"]
            if facts.name in rf_names:
                lane = loops[0]  # rfactor(factor_axis=0) put the lane iterator first
                sch.reorder(r_loops[0], lane)
                sch.vectorize(lane)
            decompose_at.append((blk, r_loops[0], facts.name in rf_names))
            continue
        if not loops:
            continue
        inner = loops[-1]
        ext = an.loop_extent(sch, inner)
        lanes = an.pow2_divisor(ext, tiles.lanes) if ext > 0 else 1
        if lanes >= 4 and facts.n_allocs == 0:
            if lanes < ext:
                _, inner = sch.split(inner, [None, lanes])
            sch.vectorize(inner)
    for blk, r_loop, is_rf in decompose_at:
        init = sch.decompose_reduction(blk, r_loop)
        if is_rf:
            sch.vectorize(sch.get_loops(init)[-1])
    return "rowwise"


def _blocks_under(sch: s_tir.Schedule, loop) -> list:
    """The blocks nested under ``loop``, in program order."""
    return list(sch.get_child_blocks(loop))


def apply_row_reduce(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule a kernel whose output is a reduction over trailing axes, with its elementwise producers inlined.

    E.g. ``sum(x, axis=-1)``, MiniLM's ``sum`` over 128 tokens, or Magika's GELU chain followed by a max over the
    sequence (``max(gelu(x + b), axis=2)`` on ``(1, 512, 508)``): the producers are inlined into the reduction, so
    the chain runs once per element with no intermediate buffers; the reduction axis is split by lanes and the
    lane loop rfactored into vector partial accumulators (as :func:`apply_rowwise` does for reductions that feed
    an elementwise output):

        parallel for row in rows:                  # when rows x reduction length >= min_parallel_elems
            acc[lane] = init                       # vectorized
            for ko: for lane in vectorize: acc[lane] = acc[lane] (+|max) f(x[row, ko * lanes + lane])
            out[row] = reduce(acc)

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        ``"row_reduce"``.

    Raises:
        NotApplicable: not exactly one reduction block, the reduction is consumed inside the kernel (then
            :func:`apply_rowwise` applies), it does not reduce trailing axes, it multiplies two tensors (a
            matmul), or a producer does not inline.
    """
    blocks = an.child_blocks(sch)
    reductions = [b for b in blocks if an.block_facts(sch, b).is_reduction]
    if len(reductions) != 1:
        raise NotApplicable(f"{len(reductions)} reduction blocks")
    facts = an.block_facts(sch, reductions[0])
    if sch.get_consumers(reductions[0]):
        raise NotApplicable("the reduction feeds other blocks")
    if facts.mac is not None and not an.load_buffer(facts.mac[0]).same_as(an.load_buffer(facts.mac[1])):
        raise NotApplicable("a product of two tensors (matmul): the GEMM and spatial-reduction templates take it")
    n_s = len(facts.kinds.rstrip("R"))
    if "R" in facts.kinds[:n_s] or "O" in facts.kinds:
        raise NotApplicable(f"iterators {facts.kinds} are not S..S R..R")
    for blk in blocks:
        if an.block_facts(sch, blk).name != facts.name:
            sch.compute_inline(blk)  # ScheduleError (a producer that does not inline) -> the next template
    main = sch.get_sblock(facts.name)
    rf = _rfactor_lanes(sch, main, tiles)
    rows = sch.get_loops(main)[:n_s]
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0] if rows else None
    if rf is not None:
        if row is not None:
            sch.compute_at(rf, row, preserve_unit_loops=True)
        rf_loops = sch.get_loops(rf)
        if row is not None:  # compute_at made one loop per rf iterator, lane first (factor_axis=0), chunks last
            lane, k_outer = rf_loops[1], rf_loops[-1]
        else:  # the original nest: ..., chunks, lane
            k_outer, lane = rf_loops[-2], rf_loops[-1]
        sch.reorder(k_outer, lane)
        sch.vectorize(lane)
    if row is not None and an.iterations(facts.extents) >= tiles.min_parallel_elems:
        sch.parallel(row)
    if rf is not None:
        init = sch.decompose_reduction(rf, k_outer)
        sch.vectorize(sch.get_loops(init)[-1])
    return "row_reduce"
