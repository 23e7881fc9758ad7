"""The README's main job: the demo images and deck shipped in the package."""
import shutil
import subprocess
import sys

import gemmi


def test_demo_deck_indexes_and_integrates(tmp_path):
    demo = subprocess.run([sys.executable, "-m", "pyflm.cli", "--demo-dir"], capture_output=True,
                          text=True).stdout.strip()
    work = tmp_path / "demo"
    shutil.copytree(demo, work)
    deck = (work / "demo.deck").read_text()
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "HKLOUT", "demo.mtz", "SUMMARY", "demo.sum"],
                       input=deck, text=True, capture_output=True, cwd=work, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    final = [ln for ln in r.stdout.splitlines() if "Final cell (after refinement)" in ln][0]
    a, b, c = (float(x) for x in final.split()[-6:-3])
    assert abs(a - 42.3) < 0.13 and abs(b - 51.9) < 0.16 and abs(c - 78.6) < 0.24
    m = gemmi.read_mtz_file(str(work / "demo.mtz"))
    assert len(m.batches) == 4 and m.nreflections > 5000
