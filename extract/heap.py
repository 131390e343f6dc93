"""Keep freed memory in the process for reuse instead of handing it back to the kernel.

An extraction allocates hundreds of MB of short-lived numpy temporaries (flow decisions,
index columns, read buffers), most above glibc's mmap threshold, so by default each one is
a fresh mmap that is unmapped again when freed. On the VMs we run on, the first touch of a
fresh page is what costs (a page fault the host may have to back: docs/BENCHMARKS.md, D14).
With large allocations served from the heap and the heap never trimmed, a process touches
fresh memory only up to its peak use, which made the selective extraction faster
(docs/BENCHMARKS.md, "Extraction": freed memory kept in the heap).
The process is short-lived, so nothing is held for long.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # both: blocks below 1 GiB come from the heap, which keeps 1 GiB free


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; False where that is not possible (another libc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
