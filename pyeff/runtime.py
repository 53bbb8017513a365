"""Process-wide settings that change how fast CPU inference runs, for the user to opt into.

    import pyeff.runtime
    pyeff.runtime.keep_freed_memory()   # once, at start-up

With glibc's default malloc, every tensor above the mmap threshold is handed back to the OS when
freed, and the next one of that size is page-faulted in again, one 4 KiB page at a time. On the
2-core Xeon pyeff is benchmarked on, that was about half of a ResNet-38 forward at batch 128
(dense float32 model 264 -> 136 ms, DFS at 25% computation 117 -> 69 ms; bench/dfs.py
--keep-memory). The price is that the process keeps its peak heap instead of returning it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and never trim it, so freed tensor
    memory is reused instead of returned to the OS and faulted in again. Returns False (and changes
    nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


__all__ = ["keep_freed_memory"]
