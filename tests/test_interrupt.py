"""A PROCESS run killed part-way leaves a valid MTZ of the images it finished."""
import signal
import subprocess
import sys

import gemmi
import pytest

from conftest import SIM
from pyflm.summary import parse_loggraph


@pytest.mark.parametrize("sig,status,nproc", [(signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)])
def test_killed_process_run_keeps_finished_images(tmp_path, sig, status, nproc):
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
            f"nproc {nproc}\nblock 2\nprocess 1 60\ngo\n")
    p = subprocess.Popen([sys.executable, "-m", "pyflm.cli", "HKLOUT", "k.mtz", "SUMMARY", "k.sum"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    p.stdin.write(deck)
    p.stdin.close()
    seen, lines = 0, []
    for line in p.stdout:
        lines.append(line)
        if "Integrating Image" in line:
            seen += 1
            if seen == 6:
                p.send_signal(sig)
                break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=120) == status
    log = (tmp_path / "mosflm.lp").read_text()          # the log too is closed and under its name
    assert "Traceback" not in out + p.stderr.read() + log
    assert f"Interrupted by signal {int(sig)}" in log
    m = gemmi.read_mtz_file(str(tmp_path / "k.mtz"))
    assert 6 <= len(m.batches) < 60 and m.nreflections > 1000
    cols, rows = parse_loggraph((tmp_path / "k.sum").read_text())["Integration statistics"]
    assert [int(r[0]) for r in rows] == sorted(b.number for b in m.batches)    # a SUMMARY to match
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".part")]
