"""worker/allocator.py: a host's malloc keeps what it frees (glibc), checked in a fresh process."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from hetserve.worker.allocator import MMAP_THRESHOLD

BLOCK = 16 << 20  # a dequantized weight's size class: above glibc's default mmap threshold, below ours

# Frees a BLOCK and prints how much free memory the heap then holds (mallinfo2, glibc >= 2.33).
PROBE = f"""
import ctypes, sys
from hetserve.worker.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc({BLOCK})
ctypes.memset(block, 1, {BLOCK})
libc.free(block)
print(libc.mallinfo2().fordblks)
"""


def heap_free_after_block(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33 or later")
def test_a_freed_block_stays_in_the_heap_only_when_kept():
    assert BLOCK < MMAP_THRESHOLD
    assert heap_free_after_block("keep") >= BLOCK  # reused by the next step's allocation, no page faults
    assert heap_free_after_block("default") < BLOCK  # mapped, then returned to the OS on free
