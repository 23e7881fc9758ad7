#!/usr/bin/env python3
"""Spot finding speed on a Pilatus 6M image: pyflm against fabio's decode time (and dials.find_spots
when DIALS is installed), measured in one run.

    python3 scripts/bench_spotfinding.py [IMAGE] [--repeat 3]
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "..", "..", "shared", "data", "real-pilatus6m-singles", "example_004.cbf.gz")


def best_of(fn, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("image", nargs="?", default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import fabio
    from pyflm import images, spotfinder
    from pyflm.model import Detector
    t_dec, _ = best_of(lambda: fabio.open(a.image).data, a.repeat)
    data, h = images.read_image(a.image)
    det = Detector(h.distance, *h.beam, h.pixel_fast, h.pixel_slow, h.n_fast, h.n_slow, overload=h.overload)
    t_find, spots = best_of(lambda: spotfinder.find_spots(data, det, wavelength=h.wavelength), a.repeat)
    n = int((spots["flag"] == 0).sum())
    print(f"image: {os.path.basename(a.image)}  {h.n_fast} x {h.n_slow} pixels")
    print(f"fabio decode          : {t_dec:7.3f} s")
    print(f"pyflm spot finding    : {t_find:7.3f} s  ({n} spots)   ratio to decode {t_find / t_dec:6.1f}")
    if shutil.which("dials.find_spots"):
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(["dials.import", os.path.abspath(a.image)], cwd=d, capture_output=True)
            t0 = time.perf_counter()
            r = subprocess.run(["dials.find_spots", "imported.expt", "nproc=1"], cwd=d, capture_output=True,
                               text=True)
            t_dials = time.perf_counter() - t0
        found = [ln for ln in r.stdout.splitlines() if "Saved" in ln and "reflections" in ln]
        print(f"dials.find_spots nproc=1 (whole command): {t_dials:7.3f} s  {found[-1] if found else ''}")
        print(f"ratio pyflm / DIALS: {t_find / t_dials:.2f}")
    else:
        print("DIALS is not installed: no comparison")


if __name__ == "__main__":
    main()
