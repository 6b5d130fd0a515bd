"""The training process's heap: big buffers reused instead of mapped afresh at every step.

glibc's malloc serves an allocation above its mmap threshold (which it raises as it goes, to
32 MiB at most) with a fresh ``mmap`` and returns it to the system when freed. The GRU kernel's
buffers grow with the members, the bins and the batch: an 8-member SAE at 5 ms allocates
buffers of 47 to 141 MiB at every step, so every step page-faults all of them in again, at a
cost that rivals the step's arithmetic (``benchmarks/memory.py``). Raising the
threshold, and the free memory the heap keeps before giving any back, lets those buffers come
from the heap and be reused step after step; the process holds on to its peak, which it
reaches anyway at every step.
"""
from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BELOW = 1 << 30


def keep_freed_buffers() -> bool:
    """Have malloc serve buffers up to 1 GiB from its heap and keep up to 1 GiB of freed memory;
    True where it took effect (glibc), False where the C library has no such settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BELOW))
