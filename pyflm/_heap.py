"""glibc's malloc tuned for image-sized buffers, in the program and in every worker.

By default glibc gives any block over its (dynamic, at most 32 MB) mmap threshold straight back to the
kernel when freed, and trims the heap top above 128 kB: a 6M sweep's 25 MB images and float work
arrays were then mapped and page-faulted in again for every image (284k page faults a run, ~10 % of
the single-core time).  Kept in the heap instead, they are reused from one image to the next.

Smaller values kept less memory but lost the gain (6M sweep, 1 worker, 3 runs each: 64 MB mmap / 128 MB
trim / 16 MB pad as slow as glibc's default; 64 MB / 512 MB / 16 MB between the two); these cost ~50 MB
more peak RSS a process and halve the system time (page faults 584k -> 325k a bench run).

``tune()`` is called at the program's start and by each worker's initialiser; it does nothing except
on Linux with glibc, or when ``PYFLM_MALLOC=default`` asks for the system's own behaviour.  It also
turns transparent huge pages off for the process (``no_huge_pages``), unless ``PYFLM_THP=default``.
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


_NO_THP = False


def no_huge_pages():
    """This process, and the processes it forks (prctl's flag is inherited), take 4 kB pages, not
    transparent huge pages.  numpy asks for huge pages for every array of 4 MB or more (madvise), and
    where the kernel compacts memory to find one (defrag=madvise, the default), a machine whose memory
    is fragmented stalls on the faults: six 6M images' spot search took 1.0 s of system time with huge
    pages and 0.1 s without (user time the same), and several processes growing their heaps at once
    (NPROC > 1) waited the same way.  Linux only; elsewhere, or if the kernel refuses, nothing changes.
    PYFLM_THP=default leaves the system's setting."""
    global _NO_THP
    if _NO_THP or not sys.platform.startswith("linux") or \
            os.environ.get("PYFLM_THP", "").strip().lower() == "default":
        return
    _NO_THP = True
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)     # PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass


def tune():
    """Set SETTINGS through mallopt and no_huge_pages(); returns {name: value} of what mallopt set
    ({} when skipped)."""
    global _applied
    no_huge_pages()
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
