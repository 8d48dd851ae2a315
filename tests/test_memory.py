"""emformer.memory: a sampling process keeps freed buffers instead of page-faulting them in again."""
from __future__ import annotations

import subprocess
import sys

import pytest

from emformer.memory import keep_freed_memory

RETAINED = """
import os, sys
import numpy as np
if sys.argv[1] == "keep":
    from emformer.memory import keep_freed_memory
    assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
block = np.ones(2 << 20)  # 16 MiB, every page written
del block
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not keep_freed_memory(), reason="glibc only")
def test_a_freed_block_stays_in_the_process_only_when_kept():
    held = {mode: int(subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "keep")}
    assert held["default"] < 4 << 20  # glibc's default: a 16 MiB block is mmapped and unmapped when freed
    assert held["keep"] > 12 << 20  # kept: it stays in the heap for the next batch


def test_the_thresholds_are_set_once_per_process(monkeypatch):
    from emformer import memory

    calls = []
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory, "set_malloc_thresholds", lambda *args: calls.append(args) or True)
    assert memory.keep_freed_memory() and memory.keep_freed_memory()
    assert calls == [(memory.MMAP_BYTES, memory.KEEP_BYTES)]
