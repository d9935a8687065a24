"""How much host memory this process holds, and how much of it is in use (for memory-growth checks).

RSS alone cannot tell a leak from memory the C allocator keeps after it was freed: glibc's malloc raises
its mmap threshold to the size of the largest block freed so far, after which buffers of varying sizes up
to it come from the heap, and the holes they leave stay mapped. `heap_in_use_mib` counts only the bytes
malloc has handed out and not got back (heap and mmapped blocks, every arena), which is what grows when
something keeps references; `release_free_heap` hands the free pages back to the OS, so an RSS that falls
back after it was free memory, not a leak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_MIB = float(1 << 20)


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):       # not glibc, or a glibc before 2.33 (no mallinfo2)
        return None
    return libc


_LIBC = _libc()


def heap_in_use_mib() -> float | None:
    """MiB that malloc has handed out and not got back (heap blocks of every arena plus mmapped blocks);
    None where the C library is not glibc >= 2.33."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / _MIB


def release_free_heap() -> bool:
    """Return the allocator's free pages to the OS (glibc `malloc_trim(0)`); False where unavailable."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3      # glibc mallopt parameter


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every block of `nbytes` or more with its own mmap, returned to the OS when freed, and stop glibc
    from raising that threshold as larger blocks are freed (`mallopt(M_MMAP_THRESHOLD, nbytes)`, what the
    environment variable MALLOC_MMAP_THRESHOLD_ sets at start-up); False where unavailable."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
