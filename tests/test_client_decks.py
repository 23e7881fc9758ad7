"""The decks real clients send (scripts/clients), run as those clients run them, on the shared sweep."""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import gemmi
import pytest

from conftest import ROOT, SIM
from pyflm.summary import parse_loggraph

CLIENTS = ROOT / "scripts" / "clients"


def run_script(name, workdir, *args, shell="bash"):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    assert shutil.which("ipmosflm", path=env["PATH"]), "ipmosflm is not installed"
    r = subprocess.run([shell, str(CLIENTS / name), str(SIM), *args], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in r.stdout + r.stderr
    return r


def test_xia2_index_then_integrate_decks(workdir):
    r = run_script("xia2_index.sh", workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    final = [ln for ln in r.stdout.splitlines() if "Final cell (after refinement)" in ln][-1]
    assert abs(float(final.split()[-6]) - 42.3) < 0.13
    assert len([ln for ln in r.stdout.splitlines() if "The mosaicity has been estimated as" in ln]) == 2
    r = run_script("xia2_integrate.sh", workdir, str(workdir / "xiaindex.mat"))
    assert r.returncode == 0, r.stdout[-1500:]
    assert "WRITTEN OUTPUT MTZ FILE" in r.stdout
    n = int([ln for ln in r.stdout.splitlines() if "Number of Reflections" in ln][0].split("=")[1])
    m = gemmi.read_mtz_file(str(workdir / "xia2_integrate.mtz"))
    assert m.nreflections == n > 100000 and len(m.batches) == 60


def test_xia2_cell_refinement_deck_runs_both_segments(workdir):
    r = run_script("xia2_cellrefine.sh", workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    assert r.stdout.count("Integrating Image") == 6


def test_imosflm_batch_job_writes_xml_summary_and_mtz(workdir):
    r = run_script("imosflm_batch.sh", workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    root = ET.parse(workdir / "sim_batch.xml").getroot()
    resp = root.findall("integration_response")
    assert [int(e.find("image").text) for e in resp] == [1, 2, 3, 4, 5, 6]
    assert all(e.find("status").text == "ok" for e in resp)
    tables = parse_loggraph((workdir / "sim_batch.sum").read_text())
    assert len(tables["Refined detector parameters"][1]) == 6
    assert gemmi.read_mtz_file(str(workdir / "sim_batch.mtz")).nreflections > 5000


def test_imosflm_fatal_condition_is_in_the_xml(workdir):
    deck = 'template "sim_####.cbf"\ndirectory "/nonexistent"\nprocess 1 2\nrun\n'
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "XMLFILE", "f.xml"], input=deck, text=True,
                       capture_output=True, cwd=workdir)
    assert r.returncode == 1
    fatal = ET.parse(workdir / "f.xml").getroot().find("fatal_condition_response")
    assert fatal is not None and fatal.find("status").text == "error"


@pytest.mark.parametrize("script,shell", [("tutorial_batch.sh", "bash"), ("tutorial_batch.csh", "csh")])
def test_tutorial_batch_scripts(workdir, script, shell):
    if not shutil.which(shell):
        if os.environ.get("CI"):     # CI installs tcsh (.ci/run): every client deck must run there
            pytest.fail(f"{shell} is missing in CI")
        pytest.skip(f"{shell} is not installed here (Debian: apt-get install tcsh)")
    r = run_script(script, workdir, shell=shell)
    assert r.returncode == 0, r.stdout[-1500:]
    mtz = [p for p in os.listdir(workdir) if p.endswith("1to10.mtz")]
    assert len(mtz) == 1
    m = gemmi.read_mtz_file(str(workdir / mtz[0]))
    assert len(m.batches) == 10 and m.spacegroup.number == 19
    assert [d.project_name for d in m.datasets][-1] == "SIM"
