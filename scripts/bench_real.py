#!/usr/bin/env python3
"""Per-stage time per image on real data: pyflm's spot finding and indexing (and integration, with
--integrate) on the Pilatus 6M singles and L-cysteine, next to fabio's decode and, when DIALS is
installed, dials.import / dials.find_spots / dials.index (nproc=1), all measured in this one run.

    python3 scripts/bench_real.py [--cases p6m_004,p6m_009,lcys_1,lcys_4] [--integrate]

pyflm's stages are timed in this process (the functions AUTOINDEX calls); 'deck' is the whole
`ipmosflm` run of a user's AUTOINDEX deck, start-up included, comparable with DIALS's whole commands.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
CASES = {
    "p6m_004": ("real-pilatus6m-singles", "example_###.cbf", [4]),
    "p6m_009": ("real-pilatus6m-singles", "example_###.cbf", [9]),
    "lcys_1": ("real-lcys-pilatus2m", "l-cyst_01_#####.cbf", list(range(1, 16))),
    "lcys_4": ("real-lcys-pilatus2m", "l-cyst_04_#####.cbf", list(range(1, 16))),
}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(cmd, cwd, stdin=None):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True)
    return time.perf_counter() - t0, r


def image_path(directory, template, n):
    from pyflm.images import image_path as path_of
    return path_of(template, directory, n)


def pyflm_stages(directory, template, images):
    """(decode s, spot finding s, indexing s, result line) for AUTOINDEX's own steps."""
    import fabio
    import numpy as np
    from pyflm import indexing
    from pyflm.job import JobState
    from pyflm.log import Log
    job = JobState()
    job.template, job.directory = template, directory
    job.log = Log(path=None, stream=open(os.devnull, "w"))
    paths = [image_path(directory, template, n) for n in images]
    t_dec = sum(timed(lambda p=p: fabio.open(p).data)[0] for p in paths)
    merge = indexing._thin_consecutive(images, job.experiment(images[0])[3].osc)
    t_find, found = timed(lambda: [indexing._spots_for(job, n, 20, keep_weak=merge) for n in images])
    beam, det, gonio, scan = found[0][1]
    t_sel0 = time.perf_counter()
    if merge:
        from pyflm.spotfinder import merge_3d
        spots = merge_3d([f[0] for f in found], scan.osc)
    else:
        spots = np.concatenate([f[0] for f in found])
    ok = spots["flag"] == 0
    isig = spots["intensity"] / np.maximum(spots["sigma"], 1e-9)
    t = 20.0
    while np.sum(ok & (isig >= t)) < 60 and t > 3:
        t = max(3.0, t * 0.6)
    use = spots[ok & (isig >= t)]
    t_merge = time.perf_counter() - t_sel0
    t_idx, res = timed(lambda: indexing.index_with_beam_search(use, beam, det, gonio))
    cell = " ".join(f"{v:.3f}" for v in res.crystal.cell[:3])
    return t_dec, t_find + t_merge, t_idx, f"{res.chosen.lattice} {cell} from {len(use)} spots"


def deck_for(directory, template, images, process=False):
    sel = f"IMAGE {images[0]}" + (f" TO {images[-1]}" if len(images) > 1 else "")
    deck = f"TEMPLATE {template}\nDIRECTORY {directory}\nAUTOINDEX DPS REFINE {sel}\nGO\n"
    if process:
        deck += f"PROCESS {images[0]} TO {images[-1]}\nGO\n" if len(images) > 1 else f"PROCESS {images[0]}\nGO\n"
    return deck


def dials_stages(directory, template, images):
    paths = [os.path.abspath(image_path(directory, template, n)) for n in images]
    with tempfile.TemporaryDirectory() as d:
        t_imp, r = run(["dials.import", *paths], d)
        if r.returncode:
            return None
        t_find, r = run(["dials.find_spots", "imported.expt", "nproc=1"], d)
        n = [ln for ln in r.stdout.splitlines() if ln.startswith("Saved")]
        t_idx, r = run(["dials.index", "imported.expt", "strong.refl", "nproc=1"], d)
        cells = [ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if "Unit cell:" in ln]
        return t_imp, t_find, t_idx, (n[-1] if n else "?"), (cells[-1] if cells else "failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--integrate", action="store_true", help="also time PROCESS after AUTOINDEX (deck)")
    a = ap.parse_args()
    have_dials = shutil.which("dials.find_spots") is not None
    print("seconds per image (whole stage / number of images); DIALS: whole commands, nproc=1")
    for name in a.cases.split(","):
        sub, template, images = CASES[name]
        directory = os.path.abspath(os.path.join(DATA, sub))
        k = len(images)
        t_dec, t_find, t_idx, result = pyflm_stages(directory, template, images)
        with tempfile.TemporaryDirectory() as d:
            t_deck, r = run([sys.executable, "-m", "pyflm.cli"], d, deck_for(directory, template, images))
            ok_deck = r.returncode == 0
            line = f"\n== {name}: {k} image(s), {template}"
            print(line)
            print(f"  fabio decode            {t_dec / k:7.3f}")
            print(f"  pyflm read+find spots   {t_find / k:7.3f}   (x{t_find / t_dec:.1f} decode; 3D merging included)")
            print(f"  pyflm indexing          {t_idx / k:7.3f}   -> {result}")
            print(f"  pyflm AUTOINDEX deck    {t_deck / k:7.3f}   ({'ok' if ok_deck else 'failed'}, start-up included)")
            if a.integrate and ok_deck:
                t_proc, r = run([sys.executable, "-m", "pyflm.cli", "HKLOUT", "b.mtz"], d,
                                deck_for(directory, template, images, process=True))
                state = "ok" if r.returncode == 0 else "failed"
                print(f"  pyflm PROCESS (deck with PROCESS minus AUTOINDEX deck) {max(t_proc - t_deck, 0) / k:7.3f}"
                      f"   ({state})")
        if have_dials:
            dl = dials_stages(directory, template, images)
            if dl is None:
                print("  DIALS: dials.import failed")
                continue
            t_imp, t_dfind, t_didx, n, cell = dl
            print(f"  dials.import            {t_imp / k:7.3f}")
            print(f"  dials.find_spots        {t_dfind / k:7.3f}   ({n})   pyflm/DIALS {t_find / t_dfind:.2f}")
            print(f"  dials.index             {t_didx / k:7.3f}   -> {cell}   pyflm/DIALS {t_idx / t_didx:.2f}")
            print(f"  whole: pyflm deck {t_deck:.2f} s, DIALS import+find+index {t_imp + t_dfind + t_didx:.2f} s"
                  f"   ratio {t_deck / (t_imp + t_dfind + t_didx):.2f}")
        else:
            print("  DIALS is not installed: no comparison")


if __name__ == "__main__":
    main()
