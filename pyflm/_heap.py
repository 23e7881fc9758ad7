"""glibc's malloc tuned for image-sized buffers, in the program and in every worker.

By default glibc gives any block over its (dynamic, at most 32 MB) mmap threshold straight back to the
kernel when freed, and trims the heap top above 128 kB: a 6M sweep's 25 MB images and float work
arrays were then mapped and page-faulted in again for every image (284k page faults a run, ~10 % of
the single-core time).  Kept in the heap instead, they are reused from one image to the next.

Smaller values kept less memory but lost the gain (6M sweep, 1 worker, 3 runs each: 64 MB mmap / 128 MB
trim / 16 MB pad as slow as glibc's default; 64 MB / 512 MB / 16 MB between the two); these cost ~50 MB
more peak RSS a process and halve the system time (page faults 584k -> 325k a bench run).

``tune()`` is called at the program's start and by each worker's initialiser; it does nothing except
on Linux with glibc, or when ``PYFLM_MALLOC=default`` asks for the system's own behaviour.
"""
from __future__ import annotations

import os
import sys

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    # blocks up to 256 MB from the heap (glibc's own maximum for 64 bits is 32 MB when left dynamic)
    "M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, 256 << 20),
    # free heap top kept up to 1 GB: a block's images freed and taken again at the next
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 1 << 30),
    # the heap grown 64 MB beyond each need, fewer brk calls and faults on the way up
    "M_TOP_PAD": (_M_TOP_PAD, 64 << 20),
}

_applied = None


def tune():
    """Set SETTINGS through mallopt; returns {name: value} of what was set ({} when skipped)."""
    global _applied
    if os.environ.get("PYFLM_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return {}
    if _applied is not None:
        return dict(_applied)
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version        # glibc only (musl has no mallopt knobs worth setting)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = {name: value for name, (param, value) in SETTINGS.items() if mallopt(param, value) == 1}
    _applied = done
    return dict(done)
