"""Back the process's large anonymous mappings (a loaded artifact's weight constants) with 2 MB huge pages.

Batch-1 decoding streams every weight once per token. On 4 KB pages that is one TLB miss every 4 KB, and in a
virtual machine each miss walks two page tables: docs/notes/cpu_decode.md measured a 113 MB GEMV at 21.0 ms on
4 KB pages vs 15.1 ms on huge pages (1 thread, shared machine). Linux backs anonymous memory with transparent huge
pages only where a program asks (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``), and TVM's
allocator does not ask. :func:`advise_huge_pages` asks after loading: ``madvise(MADV_HUGEPAGE)`` on every private
anonymous read-write mapping of at least ``min_bytes`` (``/proc/self/maps``), then ``MADV_COLLAPSE`` (Linux 6.1+)
so that pages already filled are collapsed now rather than by the background daemon. Linux only; elsewhere, or
where the kernel refuses, it does nothing (huge pages change speed, never results).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["advise_huge_pages"]

logger = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE = 2 * 2**20


def _large_anonymous(min_bytes: int) -> list[tuple[int, int]]:
    """``(start, length)`` of private anonymous read-write mappings of ``min_bytes`` or more, 2 MB aligned inside."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if (len(fields) > 5 and fields[5] != "[heap]") or not fields[1].startswith("rw") or fields[1][3] != "p":
                continue  # file-backed, shared, read-only or a named region other than the brk heap
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            start, end = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
            if end - start >= max(min_bytes, HUGE):
                spans.append((start, end - start))
    return spans


def advise_huge_pages(min_bytes: int = 16 * 2**20) -> int:
    """Ask for huge pages on the large anonymous mappings (module docstring); returns the bytes advised.

    Args:
        min_bytes: smallest mapping to advise (small ones are not worth a collapse).

    Returns:
        Bytes of the mappings the kernel accepted ``MADV_HUGEPAGE`` for (0 off Linux or when refused).
    """
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, length in _large_anonymous(min_bytes):
        if libc.madvise(start, length, MADV_HUGEPAGE) == 0:
            advised += length
            libc.madvise(start, length, MADV_COLLAPSE)  # best effort: EAGAIN/EINVAL leave it to khugepaged
    logger.info("huge pages advised for %.1f MB of anonymous memory", advised / 2**20)
    return advised
