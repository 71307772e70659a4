"""Host memory for CPU training: keep freed activations in the heap, on huge pages.

A CPU training step allocates and frees the same multi-megabyte activations every iteration.
glibc's malloc hands blocks above its mmap threshold back to the kernel and trims the heap's free
top, by thresholds it adapts as the process runs: in some processes the next step gets fresh
pages and pays a page fault (and the kernel's zeroing) for every 4 KiB of them, ~10,000 faults
per ResNet-20 step at batch 128 on this project's machine, in others not. Raising the mmap
threshold to glibc's ceiling and never trimming keeps those pages mapped in every process; with
torch's huge-page allocation (THP_MEM_ALLOC_ENABLE) the kept blocks also sit on 2 MiB pages, which
spares the TLB. Neither changes a result (tests/test_allocator.py); results/bench/allocator
measures both.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

# mallopt(3) parameters (malloc.h) and glibc's ceiling for the threshold on 64-bit systems
# (HEAP_MAX_SIZE / 2): larger values are refused.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest free top it will keep, 2 GiB
# A user's own settings win: glibc reads these at start-up, torch reads THP_MEM_ALLOC_ENABLE at
# its first allocation. RESLAB_KEEP_FREED_MEMORY=0 leaves glibc's defaults alone.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
OPT_OUT = "RESLAB_KEEP_FREED_MEMORY"
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
HUGE_PAGE = 2 * 2**20

_kept = False


def tune_host_memory() -> dict[str, bool]:
    """Both settings for this process (see the module's docstring); which are in force."""
    return {"malloc_keeps_freed_memory": keep_freed_memory(), "huge_pages": use_huge_pages()}


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks (up to 32 MiB each) for reuse; True if in force.

    Applies to the whole process from now on; memory the process has freed stays in its heap
    rather than returning to the system. Does nothing (False) off glibc, when the environment
    sets malloc's thresholds, or with RESLAB_KEEP_FREED_MEMORY=0.
    """
    global _kept
    if _kept:
        return True
    if not is_glibc():
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (any(name in os.environ for name in USER_SETTINGS)
            or any(name in tunables for name in USER_TUNABLES)
            or os.environ.get(OPT_OUT) == "0"):
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _kept


def use_huge_pages() -> bool:
    """Ask torch to put CPU tensors of 2 MiB and more on huge pages; True if in force.

    torch reads its switch once, at the process's first CPU allocation: in a process that has
    already allocated, this only reports. The kernel must allow huge pages on request.
    """
    if HUGE_PAGES not in os.environ and kernel_allows_huge_pages():
        os.environ[HUGE_PAGES] = "1"
    return huge_pages()


def huge_pages() -> bool:
    """Whether torch asks for huge pages for large CPU tensors in this process. It then aligns
    them to the page; its default 64-byte alignment lands on a page one time in 64, so four
    probes all aligned by chance would happen once in ~17 million."""
    page = os.sysconf("SC_PAGE_SIZE")
    probes = [torch.empty(HUGE_PAGE, dtype=torch.uint8) for _ in range(4)]
    return all(p.data_ptr() % page == 0 for p in probes)


def kept() -> bool:
    """Whether keep_freed_memory() is in force in this process."""
    return _kept


def is_glibc() -> bool:
    """Whether this process runs on GNU libc, whose malloc mallopt(3) tunes."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a GNU system
        return False


def kernel_allows_huge_pages() -> bool:
    """Whether the kernel gives huge pages to memory that asks (THP not `never`)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode
