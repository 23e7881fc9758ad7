"""A sweep with bad images: each is skipped with one line naming it, the rest is integrated."""
import shutil

import fabio
import gemmi
import numpy as np

from conftest import SIM, run_ipmosflm
from pyflm.summary import parse_loggraph


def make_sweep(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(1, 13):
        shutil.copy(SIM / f"sim_{i:04d}.cbf", d / f"sim_{i:04d}.cbf")
    src = (SIM / "sim_0002.cbf").read_bytes()
    (d / "sim_0002.cbf").write_bytes(b"")                                   # zero length
    (d / "sim_0003.cbf").write_bytes(src[: len(src) // 2])                 # truncated
    (d / "sim_0004.cbf").write_bytes(src[:4000] + bytes(len(src) - 4000))  # corrupt data
    (d / "sim_0005.cbf").unlink()                                           # missing in the middle
    img = fabio.open(str(SIM / "sim_0006.cbf"))
    img.data = np.zeros_like(img.data)
    img.write(str(d / "sim_0006.cbf"))                                      # blank
    img.data = np.full_like(img.data, 2_000_000)
    img.write(str(d / "sim_0007.cbf"))                                      # all overloaded
    img.data = np.ones((100, 120), np.int32)
    img.write(str(d / "sim_0008.cbf"))                                      # another detector size
    (d / "sim_0009.cbf").write_text("# not an image at all\n")              # text named .cbf
    return d


def test_bad_images_are_skipped_and_named(tmp_path):
    d = make_sweep(tmp_path)
    deck = (f'template "sim_####.cbf"\ndirectory "{d}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
            "image 1\nprocess 1 12\ngo\n")
    r = run_ipmosflm(deck, "HKLOUT", "b.mtz", "SUMMARY", "b.sum", cwd=tmp_path)
    out = r.stdout
    assert "Traceback" not in out + r.stderr + (tmp_path / "mosflm.lp").read_text(), out[-3000:]
    assert r.returncode == 0, out[-3000:]
    skipped = [ln for ln in out.splitlines() if "skipped" in ln]
    for n, why in [(2, "empty"), (3, "truncated"), (4, "corrupt"), (5, "no such file"), (6, "blank"),
                   (7, "overloaded"), (8, "981 x 1043"), (9, "not an image")]:
        line = [ln for ln in skipped if f"image {n} skipped" in ln]
        assert len(line) == 1 and why in line[0], (n, why, skipped)
    m = gemmi.read_mtz_file(str(tmp_path / "b.mtz"))
    assert sorted(b.number for b in m.batches) == [1, 10, 11, 12]
    assert "could not be integrated: 2, 3, 4, 5, 6, 7, 8, 9" in out
    summary = (tmp_path / "b.sum").read_text()       # flagged in the SUMMARY too, with the same reason
    for n in range(2, 10):
        line = [ln for ln in skipped if f"image {n} skipped" in ln][0]
        assert line in summary.splitlines()
    cols, rows = parse_loggraph(summary)["Integration statistics"]
    assert [int(r[0]) for r in rows] == [1, 10, 11, 12]
