"""effc's schedule for microcontroller kernels: register accumulation with the epilogue fused into the write-back.

TVM's legalized conv2d/matmul is three naive loop nests: a reduction that re-reads and re-writes its output element in
memory on every multiply-accumulate, with the ``init`` as an ``if (k == 0)`` inside the reduction loop, then bias-add
and activation loops over a full-size intermediate buffer. The ``acc`` schedule (``s_tir.Schedule`` primitives):

1. ``reverse_compute_inline`` the element-wise epilogue chain (relu into add, ...);
2. ``cache_write`` the reduction output to a ``local`` buffer and ``reverse_compute_inline`` the epilogue into the
   write-back, then ``reverse_compute_at`` the write-back under the innermost spatial loop — the accumulator is one
   scalar the C compiler keeps in a register, and bias + activation are applied as each output is finished;
3. ``decompose_reduction`` at the first reduction loop — the init leaves the inner loop (no compare/branch per MAC).

The full-size intermediate buffers disappear too (less scratch). A kernel the schedule does not fit is kept naive.
"""

from __future__ import annotations

import logging
import re

from tvm import s_tir, tirx

logger = logging.getLogger(__name__)

#: Name recorded in the build info for kernels this schedule rewrote.
SCHEDULE_NAME = "effc-acc"
_BLOCK = re.compile(r'T\.sblock\("([^"]+)"\)')


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(int(iv.iter_type) == 2 for iv in sch.get(block).iter_vars)  # IterVar.CommReduce


def schedule_acc(func: tirx.PrimFunc) -> tuple[tirx.PrimFunc, bool]:
    """Apply the ``acc`` schedule to a kernel with exactly one reduction block.

    Returns:
        ``(func, applied)``: the scheduled kernel, or the input and False when it does not apply.
    """
    sch = s_tir.Schedule(func)
    names = list(dict.fromkeys(_BLOCK.findall(func.script())))
    try:
        blocks = {n: sch.get_sblock(n) for n in names if n != "root"}
        reductions = [n for n, b in blocks.items() if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return func, False
        red = reductions[0]
        after = names[names.index(red) + 1 :]
        for name in reversed(after[1:]):  # fold the epilogue chain into its first block
            try:
                sch.reverse_compute_inline(sch.get_sblock(name))
            except Exception:  # noqa: BLE001  (not inlinable: keep it as its own loop nest)
                logger.debug("schedule acc: %s stays a separate loop nest", name)
        red_block = sch.get_sblock(red)
        writeback = sch.cache_write(red_block, 0, "local")
        if after:
            try:
                sch.reverse_compute_inline(sch.get_sblock(after[0]))
            except Exception:  # noqa: BLE001
                logger.debug("schedule acc: epilogue %s not fused into the write-back", after[0])
        loops = sch.get_loops(red_block)
        kinds = [int(iv.iter_type) for iv in sch.get(red_block).iter_vars]
        n_spatial = kinds.index(2)
        sch.reverse_compute_at(writeback, loops[n_spatial - 1])
        sch.decompose_reduction(red_block, sch.get_loops(red_block)[n_spatial])
        return sch.mod["main"], True
    except Exception as exc:  # noqa: BLE001  (a schedule that does not fit leaves the naive kernel)
        logger.debug("schedule acc not applied: %s", exc)
        return func, False
