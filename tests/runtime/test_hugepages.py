"""Huge pages for large anonymous mappings: found in /proc/self/maps, advised without touching their contents."""

import mmap
import sys

import numpy as np
import pytest

from effc.runtime import hugepages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux's")
def test_large_anonymous_mapping_is_found_and_advised_unchanged():
    size = 48 * 2**20
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(region, np.uint8)
    data[::4096] = 7
    start = data.ctypes.data
    spans = hugepages._large_anonymous(32 * 2**20)
    assert any(s <= start + 2 * 2**20 and start + size - 2 * 2**20 <= s + n for s, n in spans)
    assert all(s % hugepages.HUGE == 0 and n % hugepages.HUGE == 0 for s, n in spans)
    advised = hugepages.advise_huge_pages(32 * 2**20)
    assert advised >= 0
    assert int(data[::4096].sum()) == 7 * (size // 4096)  # contents unchanged
    del data
    region.close()
