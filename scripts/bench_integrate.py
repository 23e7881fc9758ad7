#!/usr/bin/env python3
"""Time per image of spot finding, refinement and integration on the simulated sweep, on 1 and 2 cores,
against the time fabio needs just to decode the same images; peak memory.  Everything printed is
measured in this one run (DIALS, where installed, is timed beside pyflm by scripts/bench_pipeline.py).

    python3 scripts/bench_integrate.py [--images 60] [--data ../shared/data/sim-p212121-cbf] [--quick]

The line that matters for issue 11 is "integration per image": pass 2's time per image (integrate_block
less its refine_block, the images' decoding included) over fabio's decode of the same images (fabio.open
with its MD5 check, best of two passes over the files), both on one core in this run.  --quick stops
there (no spot finding, no whole-command runs on 1 and 2 cores), after a line for pass 1 (refinement,
its first call's imports of scipy included) and for both passes, which is what a user's PROCESS costs.

Spot finding: pyflm.spotfinder.find_spots on every image (as dials.find_spots does).  Refinement and
integration: PROCESS 1 TO n with the sweep's matrix file; refinement is pass 1 of each block
(pyflm.refine.refine_block), integration the rest.  On 2 cores the blocks run in 2 processes
(NPROC 2); there the split between the two is not visible, so the PROCESS total is given.
"""
import argparse
import functools
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "shared", "data", "sim-p212121-cbf")

def _find(path):
    from pyflm import images, spotfinder
    from pyflm.model import Detector
    data, h = images.read_image(path)
    det = Detector(h.distance, *h.beam, h.pixel_fast, h.pixel_slow, h.n_fast, h.n_slow, overload=h.overload)
    return int((spotfinder.find_spots(data, det, wavelength=h.wavelength)["flag"] == 0).sum())


def process_deck(data_dir, n, nproc):
    return (f'template "sim_####.cbf"\ndirectory "{os.path.abspath(data_dir)}"\n'
            f'matrix "{os.path.abspath(data_dir)}/truth.mat"\nmosaic 0.30\nsymmetry 19\nnproc {nproc}\n'
            f"process 1 {n}\ngo\n")


def process_in_this_process(deck, workdir):
    """PROCESS with refine_block and integrate_block timed (one core)."""
    from pyflm import cli, integrate, refine
    times = {"refine": 0.0, "block": 0.0, "refine_cpu": 0.0, "block_cpu": 0.0}

    def timed(fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                times[key] += time.perf_counter() - t0
                times[key + "_cpu"] += time.process_time() - c0
        return wrapper
    orig_refine, orig_block = refine.refine_block, integrate.integrate_block
    refine.refine_block = timed(orig_refine, "refine")
    integrate.integrate_block = timed(orig_block, "block")
    old_in, old_out, cwd = sys.stdin, sys.stdout, os.getcwd()
    import io
    try:
        os.chdir(workdir)
        sys.stdin, sys.stdout = io.TextIOWrapper(io.BytesIO(deck.encode())), io.StringIO()
        t0 = time.perf_counter()
        status = cli.main(["HKLOUT", "b1.mtz", "SUMMARY", "b1.sum"])
        total = time.perf_counter() - t0
        log = sys.stdout.getvalue()
    finally:
        sys.stdin, sys.stdout = old_in, old_out
        os.chdir(cwd)
        refine.refine_block, integrate.integrate_block = orig_refine, orig_block
    if status not in (0, None) or "WRITTEN OUTPUT MTZ FILE" not in log:
        sys.exit("PROCESS failed:\n" + log[-2000:])
    # integrate_block includes its own call of refine_block
    return (total, times["refine"], times["block"] - times["refine"], times["refine_cpu"],
            times["block_cpu"] - times["refine_cpu"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="the integration line only")
    a = ap.parse_args()
    from pyflm._heap import tune
    tune()      # malloc as ipmosflm's start sets it (PYFLM_MALLOC=default: glibc's own)
    import fabio
    n = a.images
    paths = [os.path.join(a.data, f"sim_{i:04d}.cbf") for i in range(1, n + 1)]

    def decode():
        t0, c0 = time.perf_counter(), time.process_time()
        for p in paths:
            fabio.open(p).data
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    t_dec, c_dec = min(decode(), decode())

    # integration first, in this process (no tracemalloc: it slows numpy's allocations several times)
    with tempfile.TemporaryDirectory() as wd:
        total1, t_ref, t_int, c_ref, c_int = process_in_this_process(process_deck(a.data, n, 1), wd)
    t_dec2, c_dec2 = decode()                  # the machine's load may have changed meanwhile
    t_dec, c_dec = min(t_dec, t_dec2), min(c_dec, c_dec2)
    load = os.getloadavg()[0]
    print(f"integration per image: {c_int / n:.4f} s CPU ({t_int / n:.4f} wall), fabio decode {c_dec:.4f} s CPU "
          f"({t_dec:.4f} wall): ratio {c_int / n / c_dec:.1f} CPU, {t_int / n / t_dec:.1f} wall  "
          f"[{n} images, load average {load:.1f} on {os.cpu_count()} cores]")
    # a user's PROCESS runs both passes: refinement's (its first call's imports of scipy included) too
    print(f"refinement (pass 1) per image: {c_ref / n:.4f} s CPU: ratio {c_ref / n / c_dec:.1f} CPU; both "
          f"passes {(c_ref + c_int) / n:.4f} s CPU: ratio {(c_ref + c_int) / n / c_dec:.1f} CPU")
    if a.quick:
        return

    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    spots = [_find(p) for p in paths]
    t_find1, c_find1 = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    _, peak_find = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(_find, paths[:2]))          # start-up of the workers is not spot finding
        t0 = time.perf_counter()
        list(ex.map(_find, paths))
        t_find2 = (time.perf_counter() - t0) / n

    with tempfile.TemporaryDirectory() as wd:
        # both core counts as whole commands (start-up included), so they compare like with like
        walls = {}
        for cores in (1, 2):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pyflm.cli", "HKLOUT", f"c{cores}.mtz"],
                               input=process_deck(a.data, n, cores), text=True, capture_output=True, cwd=wd)
            walls[cores] = time.perf_counter() - t0
            if r.returncode != 0:
                sys.exit(f"PROCESS on {cores} cores failed:\n" + r.stdout[-2000:])
        total2 = walls[2]
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    shape = fabio.open(paths[0]).data.shape
    print(f"{os.path.basename(os.path.normpath(a.data))}, {n} images of {shape[1]} x {shape[0]} pixels; seconds "
          f"per image (load average {load:.1f} on {os.cpu_count()} cores: wall times of a shared machine run "
          f"long, CPU times less so)")
    print(f"fabio decode: {t_dec:.4f} wall, {c_dec:.4f} CPU")
    print(f"{'stage':22s} {'1 core wall':>11s} {'CPU':>7s} {'CPU/decode':>10s} {'2 cores wall':>12s} {'/decode':>8s}")
    rows = [("spot finding", t_find1, c_find1, t_find2),
            ("refinement (pass 1)", t_ref / n, c_ref / n, None),
            ("integration (pass 2)", t_int / n, c_int / n, None),
            ("PROCESS total", total1 / n, (c_ref + c_int) / n, total2 / n)]
    for name, w1, c1, w2 in rows:
        two = f"{w2:12.4f} {w2 / t_dec:8.1f}" if w2 is not None else ""
        print(f"{name:22s} {w1:11.4f} {c1:7.4f} {c1 / c_dec:10.1f} {two}".rstrip())
    print(f"[{sum(spots) / n:.0f} spots found per image]")
    print(f"PROCESS as a whole command (start-up included), wall per image: 1 core {walls[1] / n:.4f}, "
          f"2 cores {walls[2] / n:.4f}; 2 cores / 1 core {walls[2] / walls[1]:.2f}")
    print(f"peak memory: python heap {peak_find / 2**20:.0f} MB spot finding (tracemalloc); max RSS "
          f"{rss_self:.0f} MB this process, {rss_child:.0f} MB largest child (PROCESS as a command)")

if __name__ == "__main__":
    main()
