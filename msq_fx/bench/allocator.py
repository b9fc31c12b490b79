"""Page faults, and ``--keep-freed-heap``.

On CPU, torch allocates through glibc's malloc, which returns freed memory at the top of its
heap to the system once more than a threshold is free, and serves large blocks by fresh
mappings. A step that then allocates again faults every page in anew (a minor page fault per
4 KiB page, or per 2 MiB with transparent huge pages). How many faults a step takes depends on
where earlier steps, of any contender, left the heap; on a 2-core VM it ranged from none to
about 20,000 per ResNet-20 step at batch 128 (tens of ms of system time), for float and MSQ
alike. The report gives each contender's minor faults per timed step, and
``--keep-freed-heap`` sets glibc to keep freed memory and to serve blocks up to 32 MiB from the
heap, so every contender reuses memory instead (larger blocks still fault, alike for all).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource

__all__ = ["minor_faults", "keep_freed_heap"]

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 * 2**20


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_heap() -> bool:
    """Keep freed heap memory and serve blocks up to 32 MiB from the heap, for the rest of the
    process; True if glibc took both settings (False where malloc is not glibc's)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt) and all(mallopt(option, value) == 1 for option, value in (
        (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)))
