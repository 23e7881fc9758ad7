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
