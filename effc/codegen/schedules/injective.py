"""Generic template for injective kernels (elementwise, broadcast, transpose, reshape, gather, pad).

Intermediate blocks are inlined into the outputs; each output loop nest becomes

    parallel for outer in fuse(leading axes):       # only when the kernel is big enough to pay for threads
        for inner in vectorize(innermost axis, split by lanes)

Also the fallback for any kernel no other template takes (``"fallback"``): then every block only gets its outer
loop parallelized and its innermost loop vectorized when that is safe.
"""

from __future__ import annotations

from tvm import s_tir

from effc.codegen.schedules import analysis as an
from effc.codegen.schedules.gemm import NotApplicable
from effc.codegen.schedules.tiles import TileConfig


def schedule_nest(sch: s_tir.Schedule, blk, tiles: TileConfig, vectorize: bool = True) -> None:
    """Vectorize the innermost spatial loop of ``blk`` by lanes and parallelize the spatial loops above it."""
    facts = an.block_facts(sch, blk)
    loops = sch.get_loops(blk)
    n_spatial = min(len(facts.kinds) - len(facts.kinds.lstrip("S")), len(loops))
    if n_spatial == 0:
        return
    total = an.iterations(facts.extents[:n_spatial])
    spatial = list(loops[:n_spatial])
    if vectorize and not facts.is_reduction and facts.n_allocs == 0:
        ext = an.loop_extent(sch, spatial[-1])
        lanes = an.pow2_divisor(ext, tiles.lanes) if ext > 0 else 1
        lanes = an.safe_vector_lanes(sch, blk, n_spatial - 1, lanes) if lanes >= 4 else lanes
        if lanes >= 4:
            if lanes < ext:
                outer, vec = sch.split(spatial[-1], [None, lanes])
                spatial[-1] = outer
            else:
                vec = spatial.pop()
            sch.vectorize(vec)
    if total < tiles.min_parallel_elems or not spatial:
        return
    if len(spatial) > 2 and an.iterations([an.loop_extent(sch, lp) for lp in spatial[:-1]]) >= 64:
        # The innermost loop stays out of the parallel fusion: with it fused in, index expressions go through
        # div/mod of one fused counter, which the simplifier cannot undo for reshape/transpose chains (PP-OCR
        # det's depth-to-space after the transposed-conv rewrite: gathers with ~20 div/mods per element).
        spatial = spatial[:-1]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    sch.parallel(fused)


def apply_injective(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule an all-spatial kernel.

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        ``"injective"``.

    Raises:
        NotApplicable: the kernel has a reduction block.
    """
    blocks = an.child_blocks(sch)
    if any(an.block_facts(sch, b).is_reduction for b in blocks):
        raise NotApplicable("kernel has a reduction")
    for blk in blocks:
        if sch.get_consumers(blk):
            try:
                sch.compute_inline(blk)
            except s_tir.ScheduleError:
                pass
    for blk in an.child_blocks(sch):
        schedule_nest(sch, blk, tiles)
    return "injective"


def apply_fallback(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Parallelize (and where safe vectorize) every block's loop nest as it stands; takes any kernel."""
    for blk in an.child_blocks(sch):
        try:
            schedule_nest(sch, blk, tiles, vectorize=not an.block_facts(sch, blk).is_reduction)
        except s_tir.ScheduleError:
            continue
    return "fallback"
