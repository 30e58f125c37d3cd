"""Keep memory the host process frees for its next allocations, instead of handing it back to the OS.

Why: on a CPU every torch op mallocs its output and frees it after, and quanto's weight-only layers
also dequantize their weights into a fresh buffer on every call (MBs each). glibc serves large
blocks by mmap and gives the heap's free top back to the OS past a threshold, so those buffers came
back as fresh pages each step, every page faulted in and zeroed again. A SmolLM2 int4 decode step
on a 2-core machine took 97 or 270 ms, bimodal from step to step, and a steady ~100 ms once freed
memory stayed (docs/benchmarks.md). The cost: the process holds on to its peak of transient memory.

glibc only (mallopt); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and are reused there. 32 MiB is the most glibc takes
# on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are still mapped and unmapped each time.
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's top kept rather than returned: mallopt takes an int, so at most 2 GiB.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory; -> whether it took both settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        log.debug("no mallopt here (not glibc): the allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc keeps freed memory: %s", kept)
    return kept
