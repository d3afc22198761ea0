"""Resident memory of the training process: readings for the logs, and handing freed heap back.

Why hand it back: a training loop allocates and frees the same mid-sized buffers (rollout
arrays, tensors, checkpoint bytes) millions of times. glibc's allocator raises its mmap
threshold after large blocks are freed, so such buffers then come from the heap, whose free
pages it keeps: in a 2M-step LunarLander run resident memory rose 31% with nothing alive
growing (Python's object count stayed flat). ``malloc_trim`` returns those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path


def max_rss_mib() -> float | None:
    """Peak resident memory of this process so far (Linux/macOS), in MiB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def rss_mib() -> float | None:
    """Resident memory of this process now, in MiB (Linux; ``None`` elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_heap() -> bool:
    """Return the allocator's free heap pages to the system (glibc ``malloc_trim``); ``False``
    where there is no such call. Cheap: it walks the free lists only."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
