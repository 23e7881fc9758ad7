#!/usr/bin/env python3
"""What refinement costs: one PROCESS block of the sim sweep integrated with and without its
refinement pass, and cell refinement on two segments, measured in one run (CPU time of this process).

    python3 scripts/bench_refinement.py [--repeat 3] [--distance 121]

Starts from ../shared/data/sim-p212121-cbf/truth.mat with the mosaic set to 0.28 (as MOSAIC ESTIMATE
gives it) and, with --distance, a wrong distance as DISTANCE would give it; prints the times, their
ratio and the refined figures against the truth (distance 120 mm, beam 89.6636 84.7272 mm, mosaic
0.30 FWHM).
"""
import argparse
import copy
import functools
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(HERE, "..", "..", "shared", "data", "sim-p212121-cbf")


def best_of(fn, repeat):
    best, out = None, None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        t = time.process_time() - t0
        best = t if best is None else min(best, t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--distance", type=float, default=None)
    ap.add_argument("--sim", default=SIM)
    a = ap.parse_args()
    from pyflm import integrate, refine
    from pyflm.job import JobState
    from pyflm.matrix import read_matrix
    from pyflm.shoebox import integrate_image
    job = JobState()
    job.template, job.directory = "sim_####.cbf", os.path.abspath(a.sim)
    if a.distance:
        job.kw["DISTANCE"] = {"_args": [a.distance]}
    beam, det, gonio, scan = job.experiment(1)
    crystal = read_matrix(os.path.join(a.sim, "truth.mat"))
    crystal.space_group, crystal.mosaic = "P 21 21 21", 0.28
    reader = functools.partial(integrate.read_image_data, job.template, job.directory, None)
    settings = integrate.settings_from_job(job, det)
    block = [21, 22, 23, 24, 25]

    def run(with_refinement):
        s = copy.copy(settings)
        s.refine = settings.refine if with_refinement else None
        return integrate.integrate_block(crystal, beam, det, gonio, scan, block, s, reader, integrate_image)
    t_plain, _ = best_of(lambda: run(False), a.repeat)
    t_ref, (_, stats) = best_of(lambda: run(True), a.repeat)
    r = stats[0].refined
    print(f"block of {len(block)} images, integration alone      : {t_plain:7.2f} s CPU")
    print(f"block of {len(block)} images, refinement + integration: {t_ref:7.2f} s CPU")
    print(f"ratio (refinement + integration) / integration: {t_ref / t_plain:.2f}")
    xc, yc = refine.direct_beam(r["detector"])
    print(f"  block refined: XCEN {xc:.3f} YCEN {yc:.3f} distance {r['detector'].distance:.3f} "
          f"mosaic {r['mosaic']:.3f} rms {r['rms']:.4f} mm ({r['n_pos']} spots, {r['n_frac']} partials)")
    opts = refine.options_from(job.kw)
    t_cell, res = best_of(lambda: refine.refine_cell([(1, 3), (58, 60)], crystal, beam, det, gonio, scan,
                                                     reader, opts, settings=settings), 1)
    d = res["detector"]
    xc, yc = refine.direct_beam(d)
    print(f"cell refinement, images 1-3 and 58-60, {len(res['cycles'])} cycles: {t_cell:7.2f} s CPU")
    print("  cell " + " ".join(f"{v:.3f}" for v in res["cell"][:3]) + "  esd " +
          " ".join(f"{v:.3f}" for v in res["esd"][:3]) +
          f"  XCEN {xc:.3f} YCEN {yc:.3f} distance {d.distance:.3f} mosaic {res['mosaic']:.3f}")


if __name__ == "__main__":
    main()
