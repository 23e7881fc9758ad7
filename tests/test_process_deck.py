"""xia2's integration deck on the simulated sweep with the true matrix: an MTZ that scores against truth."""
import json
import subprocess
import sys

import gemmi
import pytest

from conftest import SHARED, SIM, run_ipmosflm
from pyflm.summary import parse_loggraph

XIA2_INTEGRATE = f"""profile nooptimise
harvest on
pname P
xname X
dname D
template "sim_####.cbf"
directory "{SIM}"
matrix "{SIM}/truth.mat"
mosaic 0.30
refinement include partials
symmetry 19
postref fix all
postref maxresidual 5.0
genfile integrate.gen
separation close
process {{first}} {{last}}
go
"""


def score(mtz, *extra):
    r = subprocess.run([sys.executable, str(SHARED / "tools" / "score_mtz.py"), str(mtz), str(SIM),
                        "--json", *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_xia2_integration_deck_writes_an_mtz_that_matches_the_truth(workdir):
    r = run_ipmosflm(XIA2_INTEGRATE.format(first=1, last=60), "HKLOUT", "x.mtz", "SUMMARY", "x.sum",
                     cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout.count("Integrating Image") == 60
    assert "WRITTEN OUTPUT MTZ FILE" in r.stdout and "* Number of Reflections =" in r.stdout
    m = gemmi.read_mtz_file(str(workdir / "x.mtz"))
    assert [c.label for c in m.columns] == ["H", "K", "L", "M/ISYM", "BATCH", "I", "SIGI", "IPR", "SIGIPR",
                                            "FRACTIONCALC", "XDET", "YDET", "ROT", "WIDTH", "LP", "MPART",
                                            "FLAG", "BGPKRATIOS"]
    assert len(m.batches) == 60 and m.spacegroup.number == 19
    s = score(workdir / "x.mtz", "--dmax", "10")
    overall = s["overall"] if "overall" in s else s
    text = json.dumps(s)
    assert overall["cc_truth"] > 0.999 and overall["completeness"] > 0.6, text[:500]
    tables = parse_loggraph((workdir / "x.sum").read_text())
    assert len(tables["Integration statistics"][1]) == 60


def test_process_without_a_matrix_says_what_is_missing(workdir):
    deck = f'template "sim_####.cbf"\ndirectory "{SIM}"\nprocess 1 2\ngo\n'
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 1 and "no orientation matrix" in r.stdout and "Traceback" not in r.stdout
