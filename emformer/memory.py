"""Keep freed heap memory in the process instead of handing it back to the OS at every free (glibc).

glibc's malloc returns a freed block above its mmap threshold (128 KiB at first, raised to the largest such
block freed) to the OS, and trims the top of the heap once more than twice that is free there. Sampling one
batch of episodes allocates a few MB of fresh buffers (the PCG64 words, Box-Muller temporaries, points,
labels), so under those rules every batch page-faults its buffers in again. PyTorch's CPU performance notes
recommend a caching allocator (jemalloc, tcmalloc) for the same reason; this is the glibc half of that,
without a preload: a process that samples episodes keeps up to KEEP_BYTES of freed memory for reuse.
Measured in BENCHMARKS.md (data section, hand-measured block).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

KEEP_BYTES = 64 << 20  # freed memory the heap may hold before trimming (RSS may stay this much higher)
MMAP_BYTES = 32 << 20  # blocks below this come from the heap (glibc's own ceiling for the threshold)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)

_applied: bool | None = None


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's mmap and trim thresholds for this process (fixed from then on: glibc stops adapting them);
    False where malloc is not glibc's. benchmarks/bench_sampler_ab.py compares settings with it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # musl and others: no such symbol, leave their malloc alone
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes))
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds to keep freed buffers (once per process); False where malloc is not glibc's."""
    global _applied
    if _applied is None:
        _applied = set_malloc_thresholds(MMAP_BYTES, KEEP_BYTES)
    return _applied
