"""The host's memory allocator: keep freed activations in the heap instead of the kernel's hands.

A CPU training step allocates and frees the same multi-megabyte activations every iteration.
glibc's malloc hands blocks above its mmap threshold straight back to the kernel and trims the
heap's free top, so the next step gets fresh pages and pays a page fault (and the kernel's
zeroing) for every 4 KiB of them: ~10,000 faults per ResNet-20 step at batch 128 on this
project's machine. Raising the mmap threshold to glibc's ceiling and never trimming keeps those
pages mapped: no faults, the same arithmetic (results/bench/allocator).
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters (malloc.h) and glibc's ceiling for the threshold on 64-bit systems
# (HEAP_MAX_SIZE / 2): larger values are refused.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free top it will keep, 2 GiB
# A user's own settings win: glibc reads these at start-up.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_kept = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks (up to 32 MiB each) for reuse; True if in force.

    Applies to the whole process from now on, results unchanged; memory the process has freed
    stays in its heap rather than returning to the system. Does nothing (False) off glibc or
    when the environment already sets malloc's thresholds.
    """
    global _kept
    if _kept:
        return True
    if not is_glibc():
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept


def is_glibc() -> bool:
    """Whether this process runs on GNU libc, whose malloc mallopt(3) tunes."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False


def kept() -> bool:
    """Whether keep_freed_memory() is in force in this process."""
    return _kept
