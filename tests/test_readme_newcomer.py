"""The README's "A newcomer's first hour" works as written: its shell blocks are taken from README.md
(so the test fails when the README drifts from the program) and run in order, in a fresh folder that
has the shared data beside it as a checkout has; then the files and log lines the section tells the
reader to look at must be there, and each warning in its table must be a line the program can print.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

SECTION = "## A newcomer's first hour"


def section_text():
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, "the README has lost its newcomer section"
    body = text.split(SECTION, 1)[1]
    return body.split("\n## ", 1)[0]


def shell_blocks(text):
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def test_the_section_has_its_parts():
    text = section_text()
    blocks = shell_blocks(text)
    assert len(blocks) >= 4
    joined = "\n".join(blocks)
    assert "sim-p212121-cbf" in joined and "real-lcys-pilatus2m" in joined
    assert "| the log says | meaning | what to do |" in text


def final_cell(log):
    return [float(x) for x in log.split("Final cell (after refinement) is")[-1].split()[:3]]


@pytest.mark.slow
def test_the_first_hour_runs_as_written(tmp_path):
    text = section_text()
    script = "set -e\n" + "\n".join(shell_blocks(text))
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)          # ../shared beside the checkout, as in CI
    env = {k: v for k, v in os.environ.items() if k != "PYFLM_SHARED"}
    # the ipmosflm on PATH is this checkout's (installed editable); make sure of it in the test run
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ipmosflm").write_text(f"#!/bin/sh\nexec {sys.executable} -m pyflm.cli \"$@\"\n")
    (bindir / "ipmosflm").chmod(0o755)
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    hour = work / "first-hour"
    for f in ("sim/sim_1to20.mtz", "sim/sim_1to20.sum", "sim/sim_predict_1.png", "sim/mosflm.lp",
              "lcys/lcys1.mtz", "lcys/lcys1.sum", "lcys/mosflm.lp"):
        assert (hour / f).stat().st_size > 0, f
    sim_log = (hour / "sim" / "mosflm.lp").read_text()
    lcys_log = (hour / "lcys" / "mosflm.lp").read_text()
    # what the section tells the reader to look at is in the logs
    assert "Symmetry: oP" in sim_log and "The mosaicity has been estimated as --->" in sim_log
    assert final_cell(sim_log) == pytest.approx([42.3, 51.9, 78.6], rel=0.01)
    assert "$TABLE : Refined detector parameters" in (hour / "sim" / "sim_1to20.sum").read_text()
    assert final_cell(lcys_log) == pytest.approx([5.42, 8.14, 12.03], rel=0.01)
    for phrase in ("Few spots per image", "only 0 strong spots are fully recorded on one image",
                   "Threshold reduced from 20.0 to 3.0"):
        assert phrase in lcys_log, phrase
    # score_mtz's last line: all shells, cc_truth near 1
    last = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("all")][-1].split()
    assert float(last[-4]) > 0.99
    # every warning the section explains that these runs printed is explained word for word
    table = [re.sub(r"[`|]", "", row.split("|")[1]).strip() for row in text.splitlines()
             if row.startswith("| `")]
    assert len(table) >= 10
    for row in table:
        key = row.split("...")[0].split(" N ")[0].split("(N)")[0].strip()
        if key in sim_log + lcys_log:
            continue
        # the others are lines of other situations: they must exist in the program's source
        src = "".join(p.read_text() for p in (ROOT / "pyflm").glob("*.py"))
        words = re.sub(r"\b(N|x|c|20\.0|3\.0)\b", " ", key).split()
        assert all(w.strip(":,") in src for w in words), row
