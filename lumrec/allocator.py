"""Host allocator tuning for training loops that allocate the same large buffers every step."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("lumrec.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS.

    glibc serves blocks above 32 MB with fresh mmap'd pages and unmaps them on free, so a
    [6300 x 3706] logits buffer (93 MB) costs ~23k page faults on every step. Keeping freed
    blocks lets the next step reuse warm pages (measured: HSTU on ML-1M, 17.3k -> 21.3k tokens/s
    on 2 cores). The process's peak RSS stays what it was; it is just not given back. Returns
    False (and changes nothing) where the C library is not glibc.
    """
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        _applied = True
        log.debug("glibc: mmap disabled and trimming off, freed host memory is reused")
    return ok
