"""Direct conv2d template (NCHW, any groups incl. depthwise) with the epilogue fused into the tile write-back.

Applies to a kernel whose one reduction block is ``out[n, co, oh, ow] += in[n, ci, oh*s+ry, ow*s+rx] * w[co, ..]``
(iterators ``SSSS`` then 2–3 reductions), as TOPI's ``conv2d_nchw``/``group_conv2d_nchw``/``depthwise_conv2d_nchw``
produce it. Schedule (register blocking over output channels × output columns, as in MLAS/oneDNN direct convs):

    parallel for (n, oh, co_o):        # (n, co_o, oh) when streaming the weights per row would cost more;
                                       # a 1-D conv: parallel for (n, ow_o, co_o), epilogue per tile
        for ow_o:
            acc[co_i, ow_i] = 0
            for ci, ry, rx:  for co_i in unroll:  for ow_i in vectorize:  acc += in * w   # w broadcast
            out[...] = epilogue(acc)                                                       # bias, act, residual
    padding: a separate copy, parallel over (n, c).

Rows outside the channel tiles (:func:`rows_outer`) keep a row's input window in cache for every channel tile:
with the channel tiles outside, PP-OCR det's 96->24 3x3 conv at 80x80 streamed its 2.6 MB input six times. The
tile is ``conv_co`` output channels × ``2 * lanes`` columns (``conv_co_wide`` channels where they divide, twice
``conv_co`` for a one-vector tile); a 1-D conv with several taps takes ``3 * lanes`` columns
(unrolled lane-wide vectors). Stride-2 convs vectorize over a strided input walk (gathers); output widths that
are not multiples of the tile vectorize by their largest power-of-two divisor, which is why
:mod:`effc.codegen.conv_rewrite` pads or flattens such convs before legalization.
"""

from __future__ import annotations

from tvm import s_tir

from effc.codegen.schedules import analysis as an
from effc.codegen.schedules.gemm import NotApplicable, find_mac_block
from effc.codegen.schedules.injective import schedule_nest
from effc.codegen.schedules.tiles import TileConfig


def one_d_tile(taps: int, lanes: int) -> int:
    """Output columns per micro-tile of a 1-D conv (``(N, C, L, 1)``) with ``taps`` kernel taps along ``L``.

    Three lane-wide vectors (12 accumulators with 4 output channels) when the kernel has more than one tap:
    Magika's 256->512, 5-tap conv ran 12 % faster than with 16 columns (1 thread, interleaved A/B). A pointwise
    1-D conv keeps ``2 * lanes``. :func:`effc.codegen.conv_rewrite.rewrite_convs` pads ``L`` to this tile.
    """
    return 3 * lanes if taps > 1 else 2 * lanes


def conv_tile(co: int, ow: int, tiles: TileConfig, one_d_taps: int = 0) -> tuple[int, int]:
    """Register tile ``(output channels, output columns)`` of the conv micro-kernel.

    Args:
        co: output channels.
        ow: length of the vectorized output axis.
        tiles: the target's tile table row.
        one_d_taps: kernel taps of a 1-D conv (0 for a 2-D conv).
    """
    wide = one_d_tile(one_d_taps, tiles.lanes) if one_d_taps else 0
    if wide and ow % wide == 0:
        return an.pow2_divisor(co, tiles.conv_co), wide
    cols = an.pow2_divisor(ow, 2 * tiles.lanes)
    if tiles.conv_co_wide and cols == 2 * tiles.lanes and co % tiles.conv_co_wide == 0:
        return tiles.conv_co_wide, cols
    if cols == tiles.lanes:  # one vector of columns: twice the channels keeps 2 * conv_co accumulators in flight
        # (PP-OCR det 96->24 3x3 at 40x40, Zen 3, 1 thread: 1.68 -> 1.12 ms min, ORT 1.13).
        return an.pow2_divisor(co, 2 * tiles.conv_co), cols
    return an.pow2_divisor(co, tiles.conv_co), cols


def rows_outer(extents: list[int], co_tile: int) -> bool:
    """Whether output rows should be the outer loop, output-channel tiles inside (input rows reused from cache).

    Channel tiles outside stream the whole input once per tile, ``Cout / co_tile`` times; rows outside stream the
    whole weight once per output row, ``OH`` times. The smaller traffic wins.

    Args:
        extents: the conv block's iterator extents ``(N, Cout, OH, OW, Cin/groups, KH, KW)`` (not depthwise).
        co_tile: output channels per register tile.
    """
    _, co, oh, ow, ci, *taps = extents
    k = an.iterations(taps)
    input_elems = ci * (oh + k - 1) * ow  # per group member: ~ what one channel tile reads
    weight_elems = co * ci * k
    return oh * weight_elems < (co // co_tile) * input_elems


def _schedule_producer(sch: s_tir.Schedule, blk: s_tir.schedule.SBlockRV, tiles: TileConfig) -> None:
    """Parallel over (N, C) for a 4-D padding copy; rows and columns stay nested loops.

    Fusing all four axes into one parallel loop (the injective nest) costs four 64-bit div/mods per element,
    which made the padding of a 96×82×82 input slower than the 3×3 conv that reads it. Other producers get the
    injective nest.
    """
    loops = sch.get_loops(blk)
    facts = an.block_facts(sch, blk)
    if len(loops) != 4 or facts.kinds != "SSSS":
        schedule_nest(sch, blk, tiles)
        return
    if an.iterations(facts.extents) >= tiles.min_parallel_elems:
        sch.parallel(sch.fuse(loops[0], loops[1]))


def apply_conv(sch: s_tir.Schedule, tiles: TileConfig) -> str:
    """Schedule a conv2d kernel with register blocking over output channels and columns.

    Args:
        sch: schedule of one fused PrimFunc (modified in place).
        tiles: the target's tile table row.

    Returns:
        ``"conv2d"`` or ``"depthwise_conv2d"`` (the weight has one input channel per group).

    Raises:
        NotApplicable: the kernel has no single MAC reduction over ``SSSS`` + 2–3 reduction iterators.
    """
    main = find_mac_block(sch)
    facts = an.block_facts(sch, main)
    if not facts.kinds.startswith("SSSS") or facts.kinds[4:] not in ("RR", "RRR"):
        raise NotApplicable(f"iterators {facts.kinds} are not NCHW conv (SSSS + RR/RRR)")
    depthwise = facts.kinds[4:] == "RR"
    main_name = facts.name
    blocks = an.child_blocks(sch)
    names = [an.block_facts(sch, b).name for b in blocks]
    pos = names.index(main_name)
    for blk in blocks[pos + 1 :]:
        try:
            sch.compute_inline(blk)
        except s_tir.ScheduleError:
            pass
    consumers = list(sch.get_consumers(main)) or [sch.cache_write(main, 0, "global")]
    _, co, oh, ow = facts.extents[:4]
    loops = sch.get_loops(main)
    n_l, co_l, oh_l, ow_l, *r_loops = loops
    one_d_taps = 0
    is_1d = ow == 1 and oh > 1
    if is_1d:  # a 1-D conv stored as (N, C, L, 1): vectorize along L instead
        oh_l, ow_l, ow = ow_l, oh_l, oh
        one_d_taps = an.loop_extent(sch, r_loops[-2]) if len(r_loops) == 3 else 0
    co_i, ow_i = conv_tile(co, ow, tiles, one_d_taps)
    by_rows = not depthwise and facts.extents[3] > 1 and rows_outer(facts.extents, co_i)  # 2-D, dense
    coo, coi = sch.split(co_l, [None, co_i])
    owo, owi = sch.split(ow_l, [None, ow_i])
    tile_loop = owo  # the consumers (epilogue) are computed per tile under this loop
    if is_1d:  # column tiles outside the channel tiles, all fused: a tile's input window is reused by every
        # channel tile (Magika's 256->512 5-tap conv 11.1 -> 9.1 ms, ORT 8.9; det's 1x1 over 20x20/10x10
        # pixels -5 % / -12 %; Zen 3, 1 thread, loaded box)
        sch.reorder(n_l, oh_l, owo, coo, *r_loops, coi, owi)
        outer = tile_loop = sch.fuse(n_l, oh_l, owo, coo)
    elif by_rows:  # rows outer, channel tiles inside: a row's input window is reused by every channel tile
        sch.reorder(n_l, oh_l, coo, owo, *r_loops, coi, owi)
        outer = sch.fuse(n_l, oh_l, coo)
    else:
        sch.reorder(n_l, coo, oh_l, owo, *r_loops, coi, owi)
        outer = sch.fuse(n_l, coo, oh_l)
    if an.iterations(facts.extents) >= tiles.min_parallel_macs:
        sch.parallel(outer)
    for blk in consumers:
        sch.reverse_compute_at(blk, tile_loop, preserve_unit_loops=True)
        c_inner = sch.get_loops(blk)[-1]
        if an.loop_extent(sch, c_inner) >= 4:
            sch.vectorize(c_inner)
    sch.unroll(coi)
    if ow_i > tiles.lanes and (ow_i & (ow_i - 1) or ow_i > 2 * tiles.lanes):  # 24, 32: unrolled lane-wide vectors
        owc, owi = sch.split(owi, [None, tiles.lanes])
        sch.unroll(owc)
    if ow_i >= 2:
        sch.vectorize(owi)
    init = sch.decompose_reduction(main, r_loops[0])
    if ow_i >= 2:
        sch.vectorize(sch.get_loops(init)[-1])
    # Producers (padding, and anything else before the conv) run as their own parallel nests.
    for blk in an.child_blocks(sch):
        if an.block_facts(sch, blk).name in (names[:pos]):
            _schedule_producer(sch, blk, tiles)
    return "depthwise_conv2d" if depthwise else "conv2d"
