"""Worker processes that decode images (the loader's, `data check`'s): how many, bounded by the
machine, and none outliving the process that started them, however that process ends (a kill
-9, the out-of-memory killer): an orphaned worker holds its memory until killed by hand. A
torchrun rank asks the same of its agent (distributed.process_group)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def max_workers() -> int:
    """The most worker processes reslab starts: one per core of this machine."""
    return os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes: one per core up to 8 (decoding a 110 KB JPEG and Sec. 3.4's resize
    take ~10 ms of one core, so 8 feed ~800 images/s; more workers help a larger machine)."""
    return min(8, max_workers())


def check_workers(n: int, what: str = "--workers") -> int:
    """`n` if this machine can run that many workers, else a ValueError naming the bound."""
    if n < 0:
        raise ValueError(f"{what} must be >= 0 (got {n})".strip())
    if n > max_workers():
        raise ValueError(f"{what} {n} is more worker processes than this machine's "
                         f"{max_workers()} cores; give 0 to {max_workers()} (or omit it for the "
                         "default)".strip())
    return n


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_on_parent_death(signum: int) -> None:
    """Have the kernel send this process `signum` when the process that started it dies, however
    it dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing). If the parent died while this was
    being set, the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # it died before the call took effect
        os.kill(os.getpid(), signum)


class DieWithParent:
    """A worker's initialiser (DataLoader's worker_init_fn, a process pool's initializer): the
    kernel kills the worker when the process that started it dies (Linux's PR_SET_PDEATHSIG;
    torch's own check notices only when the worker next waits for work, and a worker blocked
    writing to a dead parent's queue never does). A class, not a closure: workers pickle it."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, *_worker_id: int) -> None:
        signal_on_parent_death(signal.SIGKILL)
        if os.getppid() != self.parent:  # the parent died before this worker started
            os._exit(1)
