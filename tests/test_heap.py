"""glibc's malloc keeps image-sized buffers in the heap, in ipmosflm and its workers, unless
PYFLM_MALLOC=default: a 6M image's 25 MB work array is then not mmapped (and faulted in) afresh."""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning is for Linux with glibc only")

# mmapped bytes glibc holds while a 25 MB array (a 6M image's float64 work array) is alive
PROBE = r"""
import ctypes, json, sys
import numpy as np
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
def mapped_with_image():
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo
    a = np.ones((2527, 1263))       # 25.5 MB
    return libc.mallinfo2().hblkhd
"""


def run(code, **env):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("PYFLM_MALLOC", None)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE + code], env=e, capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_program_start_keeps_images_in_the_heap():
    out = run("from pyflm.cli import main\nmain(['--version'])\nfrom pyflm import _heap\n"
              "print(json.dumps({'set': _heap.tune(), 'mapped': mapped_with_image()}))")
    from pyflm._heap import SETTINGS
    assert out["set"] == {k: v for k, (_, v) in SETTINGS.items()}
    assert out["mapped"] < 25 << 20


def test_workers_keep_images_in_the_heap():
    # the main process left untuned: the workers' own start does it
    out = run("from pyflm.distributed import local_pool\n"
              "ex = local_pool(2)\n"
              "print(json.dumps({'mapped': [f.result() for f in [ex.submit(mapped_with_image) for _ in range(2)]]}))")
    assert all(m < 25 << 20 for m in out["mapped"])


def test_pyflm_malloc_default_leaves_glibc_alone():
    out = run("from pyflm.cli import main\nmain(['--version'])\nfrom pyflm import _heap\n"
              "print(json.dumps({'set': _heap.tune(), 'mapped': mapped_with_image()}))", PYFLM_MALLOC="default")
    assert out["set"] == {}
    assert out["mapped"] >= 25 << 20       # glibc's own way: the big block mmapped


THP = r"""
import ctypes
# the flag is inherited: a test process that ran pyflm in-process (tune() at cli start) would hand it
# down, so this process starts from the system's setting
ctypes.CDLL(None).prctl(41, 0, 0, 0, 0)     # PR_SET_THP_DISABLE off
def thp_enabled():
    for line in open("/proc/self/status"):
        if line.startswith("THP_enabled:"):
            return int(line.split()[1])
    return None
"""


def test_program_and_workers_take_small_pages():
    # numpy's arrays of 4 MB and more asked for 2 MB pages, and faults on them stalled a fragmented
    # machine (_heap.no_huge_pages): the program's start turns them off, at every worker count
    code = (THP + "before = thp_enabled()\nfrom pyflm._heap import tune\ntune()\none = thp_enabled()\n"
            "from pyflm.distributed import local_pool\nex = local_pool(2)\n"
            "print(json.dumps({'before': before, 'one': one, 'main': thp_enabled(), "
            "'workers': [ex.submit(thp_enabled).result() for _ in range(2)]}))")
    out = run(code)
    if not out["before"]:
        pytest.skip("the kernel does not report THP_enabled, or has no transparent huge pages to refuse")
    assert out["one"] == 0 and out["main"] == 0 and out["workers"] == [0, 0]
    kept = run(code, PYFLM_THP="default")
    assert kept["one"] == kept["before"] and kept["main"] == kept["before"] and kept["workers"] == [kept["before"]] * 2
