"""Structural queries on the blocks of a fused PrimFunc (read-only; every template starts here).

The fused kernels come from TVM's ``LegalizeOps`` + ``FuseTIR``: each block sits in its own loop nest, one loop
per block iterator, in iterator order. These helpers name what a template needs: spatial/reduction iterators,
extents, and whether a reduction is a multiply-accumulate (``C += A * B``, the GEMM/conv body).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation

_DATA_PAR = 0
_COMM_REDUCE = 2


@dataclasses.dataclass
class BlockFacts:
    """What a template needs to know about one block.

    Attributes:
        name: the block's name hint.
        kinds: one letter per iterator: ``S`` spatial, ``R`` reduction, ``O`` other.
        extents: integer extent per iterator (``-1`` when symbolic).
        is_reduction: at least one ``R`` iterator.
        mac: ``(A, B)`` buffer loads when the body is ``C = C + A * B`` (casts allowed), else None.
        n_allocs: buffers allocated inside the block (vectorizing loops above it is unsafe).
    """

    name: str
    kinds: str
    extents: list[int]
    is_reduction: bool
    mac: tuple[Any, Any] | None
    n_allocs: int


def is_load(expr) -> bool:
    """True for a buffer load (TVM 0.27 names the node ``TensorLoad``; ``tirx.BufferLoad`` is a function)."""
    return type(expr).__name__ in ("TensorLoad", "BufferLoad")


def load_buffer(expr) -> Any:
    """The buffer a load reads (``source`` in TVM 0.27, ``buffer`` before)."""
    source = getattr(expr, "source", None)
    return source if source is not None else getattr(expr, "buffer", None)


def _strip_cast(expr: Any) -> Any:
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _mac_operands(block: s_tir.SBlock) -> tuple[Any, Any] | None:
    """``(A, B)`` when ``block`` computes ``C[idx] = C[idx] + A[...] * B[...]``."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    lhs, rhs = store.value.a, store.value.b
    if not (is_load(lhs) and load_buffer(lhs).same_as(store.buffer)):
        lhs, rhs = rhs, lhs
    if not (is_load(lhs) and load_buffer(lhs).same_as(store.buffer)):
        return None
    rhs = _strip_cast(rhs)
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = _strip_cast(rhs.a), _strip_cast(rhs.b)
    if is_load(a) and is_load(b):
        return a, b
    return None


def _extent(iv: tirx.IterVar) -> int:
    ext = iv.dom.extent
    return int(ext) if isinstance(ext, tirx.IntImm) else -1


def block_facts(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> BlockFacts:
    """Facts about ``block`` in the current state of ``sch``."""
    stmt = sch.get(block)
    kinds = "".join(
        "S" if iv.iter_type == _DATA_PAR else "R" if iv.iter_type == _COMM_REDUCE else "O" for iv in stmt.iter_vars
    )
    return BlockFacts(
        name=stmt.name_hint,
        kinds=kinds,
        extents=[_extent(iv) for iv in stmt.iter_vars],
        is_reduction="R" in kinds,
        mac=_mac_operands(stmt) if "R" in kinds else None,
        n_allocs=len(stmt.alloc_buffers),
    )


def child_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """The blocks directly under the root block, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def loop_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int:
    """Integer extent of ``loop`` (``-1`` when symbolic)."""
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else -1


def index_vars(load: Any) -> list[tirx.Var | None]:
    """Per index of ``load``: the block iterator it is (a bare variable), or None for any other expression."""
    return [idx if isinstance(idx, tirx.Var) else None for idx in load.indices]


def largest_divisor(n: int, candidates: tuple[int, ...] | list[int]) -> int | None:
    """The first of ``candidates`` that divides ``n`` (candidates ordered best first), else None."""
    for c in candidates:
        if c > 0 and n % c == 0:
            return c
    return None


def iterations(extents: list[int]) -> int:
    """A block's iteration count: the product of ``extents`` (symbolic ``-1`` and 0 count as 1).

    With the reduction extents included it is the block's MACs; the templates compare it with
    ``TileConfig.min_parallel_*`` before using threads.
    """
    return math.prod(max(e, 1) for e in extents)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two ≤ ``cap`` dividing ``n`` (1 at least)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def region_buffer(region) -> Any:
    """The buffer of a block read/write region (``TensorRegion.source`` in TVM 0.27, ``.buffer`` before)."""
    return load_buffer(region)


_DIV_MOD = (tirx.FloorDiv, tirx.FloorMod, tirx.Div, tirx.Mod)
#: Fields through which :func:`_div_mods` walks a TIR statement or expression.
_CHILDREN = ("body", "value", "indices", "a", "b", "args", "condition", "true_value", "false_value")


def _div_mods(node: Any, found: list) -> None:
    """Collect the div/mod nodes of ``node`` that are not inside another div/mod (their dividends hold the rest)."""
    if isinstance(node, _DIV_MOD):
        found.append(node)
        return
    for field in _CHILDREN:
        child = getattr(node, field, None)
        if child is None or isinstance(child, (str, int, float)):
            continue
        for item in child if isinstance(child, (list, tuple, tvm.ir.Array)) else [child]:
            _div_mods(item, found)


def _uses(expr: Any, var: tirx.Var) -> bool:
    """Whether ``var`` occurs in ``expr`` outside any nested div/mod."""
    if isinstance(expr, tirx.Var):
        return expr.same_as(var)
    if isinstance(expr, _DIV_MOD):
        return False
    return any(_uses(getattr(expr, f), var) for f in ("a", "b", "value") if getattr(expr, f, None) is not None)


def safe_vector_lanes(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, var_index: int, lanes: int) -> int:
    """Lanes (≤ ``lanes``, a power of two) that no index div/mod period of iterator ``var_index`` splits.

    A vector of ``lanes`` consecutive values of the iterator must see ``x // d`` constant and ``x % d`` as one
    ramp for every divisor ``d`` applied to an expression linear in it (stride ``c``): ``lanes * c`` divides ``d``.
    Wider vectors are miscompiled on AVX-512 by TVM 0.27 / LLVM 22 (onnx cases ``test_tile``,
    ``test_rotary_embedding_3d_input``: a reshape merging an axis of 8 into 32, vectorized by 16, read the wrong
    head). Non-linear uses of the iterator give 1 (no vectorization).
    """
    stmt = sch.get(block)
    var = stmt.iter_vars[var_index].var
    found: list = []
    _div_mods(stmt.body, found)
    for node in found:
        if not _uses(node.a, var):
            continue
        linear = detect_linear_equation(node.a, [var])
        if not linear or not isinstance(linear[0], tirx.IntImm) or not isinstance(node.b, tirx.IntImm):
            return 1
        stride, divisor = abs(int(linear[0].value)), int(node.b.value)
        if stride == 0:
            continue
        lanes = pow2_divisor(divisor // stride, lanes) if divisor % stride == 0 else 1
    return lanes
