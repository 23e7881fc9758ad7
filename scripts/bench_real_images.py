#!/usr/bin/env python3
"""Time per image of each stage on real images, pyflm next to DIALS, measured in one run.

    python3 scripts/bench_real_images.py                 # L-cysteine sweeps 1 and 4, the Pilatus 6M singles
    python3 scripts/bench_real_images.py --sets lcys1    # one set
    python3 scripts/bench_real_images.py --no-dials      # pyflm only

Sets: lcys1, lcys4 (fifteen 0.1 degree Pilatus 2M images each) and 6m (example_004 and example_009,
single 0.1 degree Pilatus3 6M images, each indexed and integrated on its own).

pyflm runs the deck a user would write, stage by stage in this process, on one job: decoding the
images (fabio, for reference), spot finding (pyflm.spotfinder on every image, as AUTOINDEX searches
them), AUTOINDEX (which searches its images again: the column gives its own time), and PROCESS
(integration with the automatic parameters, MTZ written).  DIALS 3.12 runs dials.import, find_spots,
index (space group given, as the deck gives SYMMETRY), refine (sweeps only) and integrate (the
minimum-spot limits for profiles set to 0, as the reference results needed), each one process,
nproc=1, in the same run.  Printed: seconds per image of each stage, the totals and the ratio
pyflm/DIALS, and the machine load (os.getloadavg): the cores may be shared, so only ratios measured in
the same run mean anything.  Work files go to a temporary directory, never into the repository.
"""
from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("PYFLM_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"

SETS = {
    "lcys1": dict(folder="real-lcys-pilatus2m", template="l-cyst_01_#####.cbf", images=list(range(1, 16)),
                  symmetry="P212121", dials_sg="P212121", sweep=True),
    "lcys4": dict(folder="real-lcys-pilatus2m", template="l-cyst_04_#####.cbf", images=list(range(1, 16)),
                  symmetry="P212121", dials_sg="P212121", sweep=True),
    "6m": dict(folder="real-pilatus6m-singles", template="example_###.cbf", images=[4, 9], symmetry="P3",
               dials_sg="P3", sweep=False),
}


def pyflm_stages(spec, work):
    """{stage: seconds} for pyflm on one set, and a note (indexing or integration outcome)."""
    from pyflm import images as pimg
    from pyflm.cli import run_batch
    from pyflm.job import JobState
    from pyflm.log import Log
    from pyflm.spotfinder import find_spots
    d = DATA / spec["folder"]
    out = {"decode": 0.0, "spots": 0.0, "index": 0.0, "integrate": 0.0}
    notes = []
    runs = [spec["images"]] if spec["sweep"] else [[i] for i in spec["images"]]
    for imgs in runs:
        job = JobState(log=Log(path=None, stream=io.StringIO()))
        job.files["HKLOUT"] = str(work / f"pyflm_{imgs[0]}.mtz")
        head = [f"DIRECTORY {d}", f"TEMPLATE {spec['template']}"]
        run_batch(head, job)
        for i in imgs:
            t = time.perf_counter()
            data, _ = pimg.read_image(pimg.image_path(spec["template"], str(d), i))
            out["decode"] += time.perf_counter() - t
            beam, det, gonio, scan = job.experiment(i)
            t = time.perf_counter()
            find_spots(data, det, image=i, phi=sum(scan.phi_range(i)) / 2, threshold=3.0,
                       wavelength=beam.wavelength)
            out["spots"] += time.perf_counter() - t
        which = f"IMAGE {imgs[0]} TO {imgs[-1]}" if len(imgs) > 1 else f"IMAGE {imgs[0]}"
        t = time.perf_counter()
        status = run_batch([f"AUTOINDEX DPS REFINE {which}", "GO"], job)
        out["index"] += time.perf_counter() - t
        log = job.log.stream.getvalue()
        if status != 0 or job.crystal is None:
            notes.append(f"image(s) {imgs[0]}-{imgs[-1]}: indexing failed")
            continue
        cell = log.split("Final cell (after refinement) is")[-1].split()[:6]
        t = time.perf_counter()
        status = run_batch([f"SYMMETRY {spec['symmetry']}", f"PROCESS {imgs[0]} TO {imgs[-1]}", "GO"], job)
        out["integrate"] += time.perf_counter() - t
        n = job.log.stream.getvalue().split("Number of Reflections =")[-1].split()[:1]
        notes.append(f"image(s) {imgs[0]}-{imgs[-1]}: cell {' '.join(cell[:3])}, "
                     + (f"{n[0]} reflections" if status == 0 and n else "integration failed"))
    return {k: v / len(spec["images"]) for k, v in out.items()}, "; ".join(notes)


def dials_stages(spec, work):
    """{stage: seconds per image} for DIALS on one set (None when DIALS is not installed)."""
    if shutil.which("dials.import") is None:
        return None, "DIALS not installed"
    d = DATA / spec["folder"]
    out = {"import": 0.0, "spots": 0.0, "index": 0.0, "refine": 0.0, "integrate": 0.0}
    notes = []
    runs = [spec["images"]] if spec["sweep"] else [[i] for i in spec["images"]]
    for imgs in runs:
        w = work / f"dials_{imgs[0]}"
        w.mkdir()
        files = [str(d / pimg_name(spec["template"], i)) for i in imgs]

        failed = []

        def run(stage, *cmd):
            t = time.perf_counter()
            r = subprocess.run(list(cmd), cwd=w, capture_output=True, text=True)
            out[stage] += time.perf_counter() - t
            if r.returncode != 0:
                last = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()][-1:]
                failed.append(f"{cmd[0]} failed: {last[0].strip() if last else r.returncode}")
            return r.returncode == 0
        ok = run("import", "dials.import", *files) and run("spots", "dials.find_spots", "imported.expt",
                                                             "nproc=1")
        # the space group first; DIALS indexed L-cysteine sweep 4 only in P1 (the reference results)
        ok = ok and (run("index", "dials.index", "imported.expt", "strong.refl",
                         f"space_group={spec['dials_sg']}")
                     or run("index", "dials.index", "imported.expt", "strong.refl"))
        expt, refl = "indexed.expt", "indexed.refl"
        if ok and spec["sweep"] and run("refine", "dials.refine", "indexed.expt", "indexed.refl"):
            expt, refl = "refined.expt", "refined.refl"
        ok = ok and run("integrate", "dials.integrate", expt, refl, "nproc=1",
                        "profile.gaussian_rs.min_spots.overall=0",
                        "profile.gaussian_rs.min_spots.per_degree=0")
        notes.append(f"image(s) {imgs[0]}-{imgs[-1]}: " + ("integrated" if ok else "stopped before the end")
                     + (f" ({'; '.join(failed)})" if failed else ""))
    return {k: v / len(spec["images"]) for k, v in out.items()}, "; ".join(notes)


def pimg_name(template, number):
    from pyflm.images import image_name
    name = image_name(template, number)
    for ext in ("", ".gz", ".bz2"):
        if (DATA / "real-lcys-pilatus2m" / (name + ext)).exists() or \
                (DATA / "real-pilatus6m-singles" / (name + ext)).exists():
            return name + ext
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="lcys1,lcys4,6m")
    ap.add_argument("--no-dials", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="pyflm_bench_real_") as tmp:
        for name in args.sets.split(","):
            spec = SETS[name]
            work = pathlib.Path(tmp) / name
            work.mkdir()
            os.chdir(work)               # anything pyflm writes stays in the temporary folder
            p, pnote = pyflm_stages(spec, work)
            os.chdir(tmp)
            dl, dnote = (None, "not run") if args.no_dials else dials_stages(spec, work)
            n = len(spec["images"])
            print(f"\n{name}: {n} image(s) of {spec['folder']}  (seconds per image)")
            print(f"  pyflm: decode {p['decode']:.3f} (fabio, in the stages below too), spots "
                  f"{p['spots']:.3f}, index {p['index']:.3f} (with its own spot search), integrate "
                  f"{p['integrate']:.3f} (with the automatic parameters and the MTZ)")
            pt = p["index"] + p["integrate"]
            print(f"         whole job (index + integrate) {pt:.3f}   [{pnote}]")
            if dl:
                dt = sum(dl.values())
                print(f"  DIALS: import {dl['import']:.3f}, find_spots {dl['spots']:.3f}, index "
                      f"{dl['index']:.3f}, refine {dl['refine']:.3f}, integrate {dl['integrate']:.3f}")
                print(f"         whole job {dt:.3f}   [{dnote}]")
                ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "n/a"
                print(f"  ratio pyflm/DIALS: spots {ratio(p['spots'], dl['spots'])}, index "
                      f"{ratio(p['index'], dl['index'])}, integrate {ratio(p['integrate'], dl['integrate'])}, "
                      f"whole job {ratio(pt, dt)}")
            else:
                print(f"  DIALS: {dnote}")
    print(f"\nload average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
