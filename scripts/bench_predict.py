#!/usr/bin/env python3
"""Prediction speed: the Cython kernel against its numpy twin on one full image, measured in one run.

    python3 scripts/bench_predict.py [--repeat 5]

Uses the true matrix of ../shared/data/sim-p212121-cbf (Pilatus 1M, 1.27 A at the corner) and a
1-degree image (with the 5-degree margin PROCESS uses), and prints both times and their ratio.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(HERE, "..", "..", "shared", "data", "sim-p212121-cbf")


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sim", default=SIM)
    a = ap.parse_args()
    from pyflm import geometry, predict
    from pyflm.matrix import read_matrix
    c = read_matrix(os.path.join(a.sim, "truth.mat"))
    frame = geometry.detector_frame(120.0, 89.6636, 84.7272)
    args = (c.A, 0.9795, frame, 1, -5.0, 6.0, 1.27)
    if predict._ext is None:
        sys.exit("the Cython kernel is not built: pip install -e . (or python setup.py build_ext --inplace)")
    n = len(predict.predict_numpy(*args)[1])
    t_np = best_of(lambda: predict.predict_numpy(*args), a.repeat)
    t_cy = best_of(lambda: predict.predict_window_cython(*args), a.repeat)
    print(f"reflections predicted: {n}")
    print(f"numpy twin   : {t_np * 1000:8.2f} ms")
    print(f"Cython kernel: {t_cy * 1000:8.2f} ms")
    print(f"ratio numpy/Cython: {t_np / t_cy:.1f}x")


if __name__ == "__main__":
    main()
