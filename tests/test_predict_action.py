"""PREDICT from a deck: counts per class in the log and a picture a person can check."""
from PIL import Image

from conftest import SIM, run_ipmosflm


def test_predict_deck_reports_classes_and_draws_the_picture(workdir):
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
            "image 30\npredict png p30.png\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    counts = {}
    for ln in r.stdout.splitlines():
        for key in ("Reflections generated", "Fully recorded", "Partials", "Overlapped", "Too wide"):
            if key in ln:
                counts[key] = int(ln.split()[0])
    assert counts["Reflections generated"] == counts["Fully recorded"] + counts["Partials"]
    assert counts["Reflections generated"] > 1500 and counts["Too wide"] > 0
    img = Image.open(workdir / "p30.png")
    assert img.size == (981, 1043)
    px = set(map(tuple, __import__("numpy").asarray(img.convert("RGB")).reshape(-1, 3).tolist()))
    assert (255, 220, 0) in px and (40, 220, 40) in px      # partials yellow, too wide green
