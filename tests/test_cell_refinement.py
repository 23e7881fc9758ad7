"""Cell refinement from two segments far apart (xia2's deck), starting from the indexing result."""
import re

import pytest

from conftest import SIM, run_ipmosflm


def test_xia2_cell_refinement_deck_refines_the_indexed_cell(workdir):
    index = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nnewmat xiaindex.mat\n'
             "autoindex dps refine image 1 thresh 20\nautoindex dps refine image 45 thresh 20\ngo\n")
    assert run_ipmosflm(index, cwd=workdir).returncode == 0
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix xiaindex.mat\nnewmat xiarefine.mat\n'
            "symmetry 19\nmosaic 0.30\npostref fix mosaic\nseparation close\nrefinement residual 15.0\n"
            "refinement include partials\npostref multi segments 2 repeat 10\npostref maxresidual 5.0\n"
            "genfile refine.gen\nprocess 1 3\ngo\nprocess 58 60\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    out = r.stdout
    lines = out.splitlines()
    # read the log as xia2's cell-refinement parser does (Wrappers/Mosflm/MosflmRefineCell.py)
    i = lines.index(" Cell refinement is complete")
    assert lines[i + 1].startswith(" Starting cell")
    refined = [float(x) for x in lines[i + 2].split()[2:]]
    esd = [float(x) for x in lines[i + 3].split()[1:]]
    for got, true in zip(refined[:3], (42.3, 51.9, 78.6)):
        assert abs(got / true - 1) < 0.001                # within 0.1 % of the truth
    assert len(refined) == len(esd) == 6 and all(e > 0 for e in esd[:3])
    # cycles: a banner each, then every image's "Final rms residual" (none before the first banner)
    first_banner = next(n for n, ln in enumerate(lines) if "Post-refinement will use partials" in ln)
    assert not any("Final rms residual" in ln for ln in lines[:first_banner])
    n_cycles = sum("Post-refinement will use partials" in ln for ln in lines)
    per_cycle = [float(ln.replace("mm", " ").split()[3]) for ln in lines if "Final rms residual" in ln]
    assert n_cycles >= 1 and len(per_cycle) == 6 * n_cycles
    # the rms table: images in the header, each cycle's values in 6-wide columns from column 11
    j = next(n for n, ln in enumerate(lines) if "Rms positional error (mm) as a function of" in ln) + 1
    assert [int(v) for v in lines[j].replace("Image", "").split()] == [1, 2, 3, 58, 59, 60]
    rows = []
    while lines[j + 1].split():
        j += 1
        rows.append([float(lines[j][k:k + 6]) for k in range(11, len(lines[j]), 6) if lines[j][k:k + 6].strip()])
    assert len(rows) == n_cycles and all(len(rw) == 6 for rw in rows)
    assert max(rows[-1]) < 0.3 * 0.172                    # below 0.3 pixel
    assert rows[-1] == per_cycle[-6:]
    # distance and YSCALE: the last cycle is the line before the table's blank line
    for label, lo, hi in (("Detector distance as a", 119.9, 120.1), ("YSCALE as a function", 0.99, 1.01)):
        j = next(n for n, ln in enumerate(lines) if label in ln) + 1
        while lines[j].strip():
            j += 1
        values = [float(v) for v in lines[j - 1].split()[2:]]
        assert len(values) == 6 and all(lo < v < hi for v in values)
    mosaic = [float(ln.split()[-1]) for ln in lines if "Refined mosaic spread (excluding safety factor)" in ln]
    assert mosaic == [0.30]                                 # POSTREF FIX MOSAIC held the 0.30 given
    k = max(n for n, ln in enumerate(lines) if "XCEN    YCEN  XTOFRA" in ln)
    xcen, ycen, _, dist = (float(v) for v in lines[k + 1].split()[:4])
    assert abs(xcen - 89.66) < 0.02 and abs(ycen - 84.73) < 0.02 and abs(dist - 120.0) < 0.1
    assert (workdir / "xiarefine.mat").exists()


@pytest.mark.slow
def test_index_refine_integrate_in_one_deck(workdir):
    """A user's whole job: autoindex, cell refinement on two segments, then every image."""
    import json
    import subprocess
    import sys
    from conftest import SHARED
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\n'
            "autoindex dps refine image 1 thresh 20\nautoindex dps refine image 45 thresh 20\n"
            "mosaic estimate 1\ngo\nsymmetry P212121\npostref multi segments 2\nprocess 1 3\ngo\n"
            "process 58 60\ngo\npostref nosegment\nprocess 1 60\ngo\n")
    r = run_ipmosflm(deck, "HKLOUT", "all.mtz", cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout.count("Cell refinement is complete") == 1
    s = subprocess.run([sys.executable, str(SHARED / "tools" / "score_mtz.py"), str(workdir / "all.mtz"),
                        str(SIM), "--dmax", "10", "--json"], capture_output=True, text=True)
    overall = json.loads(s.stdout)["overall"]
    assert overall["cc_truth"] > 0.999 and overall["completeness"] >= 0.647   # DIALS: 0.9999, 0.647
