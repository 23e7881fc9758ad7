"""Cell refinement from two segments far apart (xia2's deck), starting from the indexing result."""
import re

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
    assert "Cell refinement is complete" in out
    for label in ("Rms positional error (mm) as a function of cycle for each image.",
                  "Detector distance as a function of cycle for each image:",
                  "YSCALE as a function of cycle for each image:", "Refined mosaic spread"):
        assert label in out
    refined = [float(x) for x in re.search(r"Refined cell\s+(.*)", out).group(1).split()]
    esd = [float(x) for x in re.search(r"\n Error\s+(.*)", out).group(1).split()]
    for got, true in zip(refined[:3], (42.3, 51.9, 78.6)):
        assert abs(got / true - 1) < 0.001                # within 0.1 % of the truth
    assert len(esd) == 6
    rms = re.search(r"Cycle\s+\d+\s+([\d. ]+)\n Detector distance", out).group(1).split()
    assert max(float(v) for v in rms) < 0.3 * 0.172       # below 0.3 pixel
    assert (workdir / "xiarefine.mat").exists()


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
