"""Register-blocked GEMM / batch-matmul template with the epilogue fused into the tile write-back.

Applies to a kernel whose one reduction block is ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` (dense, batch
matmul, and any MAC whose last spatial iterator indexes B's innermost axis). Schedule (Goto & van de Geijn,
"Anatomy of High-Performance Matrix Multiplication", 2008, micro-kernel level only):

    parallel for (b.., jo):              # one column panel per iteration
        Bp[K, nr] = B[:, jo*nr:+nr]      # packed panel (contiguous; unpacked, a column walk with row stride
                                         # N maps onto few L1 sets), reused by every row tile below
        for io:                          # one mr×nr output tile
            acc[mr, nr] = 0              # decomposed init, vectorized
            for k:                       # A[i, k] broadcast, Bp[k, :] vector loads
                for ii in unroll(mr): for ji in vectorize(nr): acc[ii, ji] += A * Bp
            out = epilogue(acc)          # bias, activation, residual add: inlined and vectorized

The accumulator buffer shrinks to mr×nr (registers) because both its producer and consumer sit under the tile loop.
When every call passes a constant ``(K, N)`` B (marked by :mod:`effc.codegen.prepack`), B's layout is changed to
the packed panels ``Bp[N/nr, K, nr]`` instead (``transform_layout``; the constants are repacked at compile time)
and the per-call packing copy disappears (MiniLM-L6, 1 thread: -9 % latency).
When N is not a multiple of the lanes (N ≥ 4 lanes), ``pad_einsum`` pads N to the tile width: B is zero-padded
in a parallel copy and the epilogue writes only the valid columns (template ``gemm_padded``).

One-row products (``M = 1``, template ``gemv``: batch-1 decoding) stream their weight once and are bound by
memory bandwidth (``docs/BENCHMARKS.md``, "Batch-1 matmuls"). With a packed constant B the loop nest is the one
above with ``mr = 1`` (the same packed layout as a prefill GEMM over the same weight, so both can share one
packed copy) and its own parallel threshold; a runtime B is read in whole rows, K split across the threads
(:func:`_runtime_gemv`).
"""

from __future__ import annotations

from tvm import s_tir

from effc.codegen.prepack import constant_param_names
from effc.codegen.schedules import analysis as an
from effc.codegen.schedules.tiles import TileConfig


def schedule_nest(sch, blk, tiles):
    """Parallel + vectorized loop nest for a helper block (deferred import: injective imports this module)."""
    from effc.codegen.schedules.injective import schedule_nest as nest

    nest(sch, blk, tiles)


class NotApplicable(Exception):
    """The template does not fit this kernel (the reason is the message)."""


def _inline_all(sch: s_tir.Schedule, blocks: list, keep: set[str]) -> None:
    """Inline every spatial block except those named in ``keep``; blocks that refuse stay as they are."""
    for blk in blocks:
        facts = an.block_facts(sch, blk)
        if facts.is_reduction or facts.name in keep:
            continue
        try:
            sch.compute_inline(blk)
        except s_tir.ScheduleError:
            try:
                sch.reverse_compute_inline(blk)
            except s_tir.ScheduleError:
                pass


def find_mac_block(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV:
    """The single MAC reduction block of the kernel.

    Raises:
        NotApplicable: no reduction, several reductions, or the reduction is not ``C += A * B``.
    """
    reductions = [b for b in an.child_blocks(sch) if an.block_facts(sch, b).is_reduction]
    if len(reductions) != 1:
        raise NotApplicable(f"{len(reductions)} reduction blocks")
    facts = an.block_facts(sch, reductions[0])
    if facts.mac is None:
        raise NotApplicable("reduction is not a multiply-accumulate")
    return reductions[0]


def _write_back(sch: s_tir.Schedule, main: s_tir.schedule.SBlockRV) -> list:
    """Inline the epilogue chain and return the blocks that consume ``main``'s result (creating one if none)."""
    blocks = an.child_blocks(sch)
    names = [an.block_facts(sch, b).name for b in blocks]
    main_name = an.block_facts(sch, main).name
    pos = names.index(main_name)
    after = blocks[pos + 1 :]
    # Inline intermediate epilogue blocks into the last ones (outputs cannot be inlined: compute_inline refuses).
    _inline_all(sch, after, keep=set())
    consumers = list(sch.get_consumers(main))
    if not consumers:
        consumers = [sch.cache_write(main, 0, "global")]
    return consumers


def apply_gemm(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule the kernel in ``sch`` as a register-blocked GEMM.

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        The template name (``"gemm"`` or ``"gemv"`` when the output has one row per batch).

    Raises:
        NotApplicable: the kernel is not a MAC over its last iterator with a vectorizable output axis.
    """
    main = find_mac_block(sch)
    facts = an.block_facts(sch, main)
    if not facts.kinds.endswith("R") or facts.kinds.count("R") != 1 or "O" in facts.kinds or len(facts.kinds) < 3:
        raise NotApplicable(f"iterators {facts.kinds} are not (S.., S, S, R)")
    j_var = sch.get(main).iter_vars[-2].var
    # The vectorized operand is the one indexed by j in its innermost axis.
    if not any(an.index_vars(ld)[-1:] == [j_var] for ld in facts.mac):
        raise NotApplicable("no operand is contiguous along the output's last axis")
    m, n = facts.extents[-3], facts.extents[-2]
    nr = an.largest_divisor(n, [c for c in tiles.gemm_nr if c % tiles.lanes == 0])
    padded = False
    if nr is None:
        if n < 4 * tiles.lanes:
            raise NotApplicable(f"N={n} is not a multiple of {tiles.lanes} lanes")
        # Pad N up to the smallest tile width: B's padding happens in the panel packing, the output is trimmed.
        nr = min(tiles.gemm_nr)
        sch.pad_einsum(main, [1] * (len(facts.kinds) - 2) + [nr, 1])
        padded = True
        main = sch.get_sblock(facts.name)
        facts = an.block_facts(sch, main)
    mr = an.pow2_divisor(m, tiles.gemm_mr)
    # Producers (reshape/transpose of an operand) are inlined into the loads.
    blocks = an.child_blocks(sch)
    main_name = facts.name
    before = blocks[: [an.block_facts(sch, b).name for b in blocks].index(main_name)]
    if padded:  # the zero-padding copy of B stays a block (inlined, its condition would reach the inner loop)
        pad_names = {an.block_facts(sch, b).name for b in before}
    else:
        _inline_all(sch, before, keep=set())
        pad_names = set()
    consumers = _write_back(sch, main)
    facts = an.block_facts(sch, main)

    # The operand read along j (B) is packed per column panel: K×nr contiguous floats reused by every row tile.
    # Unpacked, a K-long column walk with a row stride of N floats maps onto a few L1 sets (N=1536: 2 sets).
    stmt = sch.get(main)
    j_var = stmt.iter_vars[-2].var
    b_buf = next(an.load_buffer(ld) for ld in facts.mac if an.index_vars(ld)[-1:] == [j_var])
    b_index = next(i for i, r in enumerate(stmt.reads) if an.region_buffer(r).same_as(b_buf))
    loops = sch.get_loops(main)
    *batch, i, j, k = loops
    constant_b = not padded and _constant_2d_operand(sch, stmt, b_buf)
    gemv = m == 1 and not padded
    if gemv and not constant_b:
        _runtime_gemv(sch, main, consumers, facts, tiles)
        return "gemv"
    io, ii = sch.split(i, [None, mr])
    threaded = an.iterations(facts.extents) >= (tiles.min_parallel_gemv if gemv else tiles.min_parallel_macs)
    jo, ji = sch.split(j, [None, nr])
    sch.reorder(*batch, jo, io, k, ii, ji)
    outer = sch.fuse(*batch, jo) if batch else jo
    if threaded:
        sch.parallel(outer)
    if constant_b:
        # Constant weight: stored packed at compile time (effc.codegen.prepack), read as Bp[jo, k, ji].
        sch.transform_layout(main, ("read", b_index), lambda kk, nn: (nn // nr, kk, nn % nr))
    elif an.loop_extent(sch, io) > 1:
        packed = sch.cache_read(main, b_index, "global")
        sch.compute_at(packed, outer, preserve_unit_loops=True)
        p_loops = sch.get_loops(packed)
        if an.loop_extent(sch, p_loops[-1]) % tiles.lanes == 0:
            _vectorize(sch, p_loops[-1], tiles)
    for blk in consumers:
        sch.reverse_compute_at(blk, io, preserve_unit_loops=True)
        c_loops = sch.get_loops(blk)[2:]
        if c_loops and not padded:
            inner = c_loops[-1]
            if an.loop_extent(sch, inner) % tiles.lanes == 0:
                _vectorize(sch, inner, tiles)
    for blk in an.child_blocks(sch):
        if an.block_facts(sch, blk).name in pad_names:
            schedule_nest(sch, blk, tiles)
    _register_block(sch, main, k, ii, ji, tiles)
    return ("gemv" if m == 1 else "gemm") + ("_padded" if padded else "")


def _gemv_chunk(n: int, tiles: TileConfig) -> tuple[int, int]:
    """``(width, nr)`` of a runtime-weight GEMV: columns per chunk, and the vector tile inside it.

    ``width`` is the widest whole number of vectors dividing ``n`` and at most ``tiles.gemv_chunk``; ``nr`` the
    widest GEMM tile dividing ``width``.
    """
    width = max(w for w in range(tiles.lanes, min(n, tiles.gemv_chunk) + 1, tiles.lanes) if n % w == 0)
    return width, an.largest_divisor(width, [c for c in tiles.gemm_nr if c % tiles.lanes == 0]) or tiles.lanes


def _runtime_gemv(sch: s_tir.Schedule, main, consumers: list, facts: an.BlockFacts, tiles: TileConfig) -> None:
    """GEMV whose row-major ``B (K, N)`` is a runtime tensor (not pre-packed): every thread streams whole rows.

    Read in ``nr``-wide column panels, each weight row is a short run with a stride of N floats, and the hardware
    prefetchers restart at every 4 KB page: 576×1536, 1 thread, 3.5 GB/s against 13 GB/s for the packed weight
    (measured here, loaded box). Here each thread reads runs of ``width`` floats (the whole row up to
    ``tiles.gemv_chunk``) into a partial output row kept in L1; with one batch (too few to share), the threads
    split K instead (``rfactor``: each sums its block of rows, the write-back adds the partial rows).
    """
    n, k_extent = facts.extents[-2], facts.extents[-1]
    width, nr = _gemv_chunk(n, tiles)
    n_batch = an.iterations(facts.extents[:-3])
    threaded = an.iterations(facts.extents) >= tiles.min_parallel_gemv and tiles.threads > 1
    split_k = threaded and n_batch < tiles.threads and k_extent % tiles.threads == 0
    block = main
    if split_k:
        ko, _ = sch.split(sch.get_loops(main)[-1], [tiles.threads, None])
        block = sch.rfactor(ko, 0)  # block[ko, b.., i, j] = Σ over K/threads rows; main sums over ko
        *batch, i, j, ko, k = sch.get_loops(block)
        batch = [ko, *batch]
    else:
        *batch, i, j, k = sch.get_loops(block)
    jo, jw, ji = sch.split(j, [None, width // nr, nr])
    sch.reorder(*batch, i, jo, k, jw, ji)
    at = jo  # where the write-back goes
    if split_k:
        sch.parallel(batch[0])  # rfactor's ko
    elif threaded:
        at = sch.fuse(*batch, i, jo)
        sch.parallel(at)
    _vectorize(sch, ji, tiles)
    _vectorize(sch, sch.get_loops(sch.decompose_reduction(block, k))[-1], tiles)
    if split_k:  # the write-back: Σ over ko of the partial rows, vectors of nr columns, epilogue at each
        *batch, i, j, ko = sch.get_loops(main)
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(*batch, i, jo, ko, ji)
        _vectorize(sch, ji, tiles)
        _vectorize(sch, sch.get_loops(sch.decompose_reduction(main, ko))[-1], tiles)
        at = jo
    for blk in consumers:
        sch.reverse_compute_at(blk, at, preserve_unit_loops=True)
        inner = sch.get_loops(blk)[-1]
        if an.loop_extent(sch, inner) > nr:
            inner = sch.split(inner, [None, nr])[1]
        if an.loop_extent(sch, inner) % tiles.lanes == 0:
            _vectorize(sch, inner, tiles)


def _constant_2d_operand(sch: s_tir.Schedule, stmt, b_buf) -> bool:
    """True when B is a ``(K, N)`` parameter that every call passes as a constant (so it can be pre-packed)."""
    if b_buf.name not in constant_param_names(sch.mod["main"]):
        return False
    k_var, j_var = stmt.iter_vars[-1].var, stmt.iter_vars[-2].var
    loads = [ld for ld in an.block_facts(sch, sch.get_sblock(stmt.name_hint)).mac if an.load_buffer(ld).same_as(b_buf)]
    return len(loads) == 1 and len(loads[0].indices) == 2 and an.index_vars(loads[0]) == [k_var, j_var]


def _vectorize(sch: s_tir.Schedule, loop, tiles: TileConfig, unroll: bool = True) -> None:
    """Vectorize ``loop`` (extent a multiple of ``lanes``) as vectors LLVM lowers well.

    A power-of-two number of ``lanes``-wide vectors is vectorized as one wide vector, which LLVM splits cleanly
    into registers. Any other count (AVX2 ``nr = 24`` = 3 ymm) is split into ``lanes``-wide vectors under an
    unrolled chunk loop: vectorized whole, LLVM legalizes ``<24 x float>`` about 10× slower (measured on Zen 3,
    128×384×1536: 6.3 vs 68 GFLOP/s).
    """
    n_vec = an.loop_extent(sch, loop) // tiles.lanes
    if n_vec > 1 and n_vec & (n_vec - 1):
        chunk, loop = sch.split(loop, [None, tiles.lanes])
        if unroll:
            sch.unroll(chunk)
    sch.vectorize(loop)


def _register_block(sch: s_tir.Schedule, main, k, ii, ji, tiles: TileConfig) -> None:
    """Micro-kernel of the tile: ``ii`` unrolled, ``ji`` in ``lanes``-wide vectors; init decomposed at ``k``."""
    sch.unroll(ii)
    _vectorize(sch, ji, tiles)
    init = sch.decompose_reduction(main, k)
    _vectorize(sch, sch.get_loops(init)[-1], tiles)
