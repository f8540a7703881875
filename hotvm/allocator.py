"""Keep glibc malloc from handing every multi-MiB buffer back to the kernel and faulting it in again.

A backup moves data in 4 MiB chunks, and each chunk passes through several buffers of that size (the read
buffer, the zstd frame, the protocol libraries' request packing and signing copies). glibc serves blocks above
its mmap threshold (128 KiB at start, raised dynamically only up to what it has seen freed) with a fresh mmap
and returns them with munmap; its heap trimming does the same to the top of the heap. Every such buffer then
costs one page fault per 4 KiB page: measured here, an SMB export of 512 MiB took 747 000 minor page faults
and more system than user CPU time.

`tune_for_large_buffers()` raises both thresholds once, so freed chunk buffers are reused from the heap.
The memory kept is bounded by the peak in use (a few chunks per worker), which the backup needs anyway.
It is glibc-only (ctypes `mallopt`); elsewhere (musl, macOS) it does nothing. Environment variables
(MALLOC_MMAP_THRESHOLD_) would have to be set before the interpreter starts, which a library cannot do.
"""

from __future__ import annotations

import ctypes
import platform
import threading

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2): 4 MiB chunks and copies stay below."""
TRIM_THRESHOLD = 256 << 20
"""Free memory at the top of a heap kept before trimming: above the buffers of all workers in flight."""

_lock = threading.Lock()
_done: bool | None = None


def tune_for_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True where it was done."""
    global _done
    with _lock:
        if _done is None:
            _done = _tune()
        return _done


def _tune() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
