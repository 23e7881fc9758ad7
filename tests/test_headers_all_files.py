"""HEADER, as a user runs it, on every image file in shared/data (every format and every set).

One deck per folder reads each file's header (DIRECTORY, TEMPLATE, IMAGE n, HEADER, GO) and the log is
checked against what the file says: the detector named as MOSFLM names it, the pixel size, the image
size, the overload cutoff and the beam in MOSFLM's convention (X along the slow pixel axis, Y along
fast, for the undisplaced detector).  The beams below are the headers' own numbers converted by hand,
and they agree with dxtbx's reading of the same files (fast, slow swapped) for every file dxtbx reads.
"""
import re

import pytest

from conftest import DATA, run_ipmosflm

IMAGE_SUFFIXES = (".cbf", ".img", ".gz", ".bz2", ".mar2300", ".mccd")

# name pattern -> detector, pixel mm, (n_fast, n_slow), overload, beam (X, Y) mm, distance mm or None,
# two-theta; how each beam follows from the header is in the comment
EXPECT = [
    # Beam_xy (1229.30, 1200.48) px: X = 1200.48 x 0.172
    (r"DLS_I03_smargon_0001", "PILATUS", 0.172, (2463, 2527), 91795, (206.483, 211.440), 291.47, 0),
    # Pilatus 12M (24 modules stacked as one image); Beam_xy (1080, 2595) px
    (r"DLS_I23_P12M_thau_00001", "PILATUS", 0.172, (2463, 5071), 28575, (446.340, 185.760), 10.0, 0),
    # BEAM_CENTER_X/Y 246.14 240.35 in pixels (fast, slow)
    (r"TIMEPIX_SU_516-stdgoni_0001", "TIMEPIX", 0.055, (516, 516), 65535, (13.219, 13.538), 531.85, 0),
    # BEAM_CENTER_X/Y 99.30 94.70 mm, X along slow
    (r"adsc_q4", "ADSC", 0.0816, (2304, 2304), 65535, (99.300, 94.700), 250.0, None),
    # MarCCD: beam 1043.089 px both ways; no distance in the header
    (r"corkcont2_H_0089", "MARCCD", 0.0791, (2048, 2048), 65535, (82.500, 82.500), None, 0),
    (r"somedata_0001", "MARCCD", 0.1579, (1024, 1024), 65535, (82.500, 82.500), None, 0),
    # Eiger 16M converted to CBF: Beam_xy (2216.06, 2300.41) px of 0.075 mm
    (r"dlsnxs2cbf_therm_0001", "EIGER", 0.075, (4148, 4362), 65535, (172.531, 166.204), 213.96, 0),
    # Mar345: the header's centre is not trusted, the image centre is used
    (r"example\.mar2300", "MAR", 0.15, (2300, 2300), 250000, (172.500, 172.500), 240.0, 0),
    # Pilatus 6M at SLS: Beam_xy (1230.10, 1310.50) px
    (r"run2_1_00148", "PILATUS", 0.172, (2463, 2527), 1583782, (225.406, 211.577), 300.0, 0),
    # Pilatus 300K at I19, two-theta 20: Beam_xy (243.82, 326.75) px
    (r"ximg2700_00001", "PILATUS", 0.172, (487, 619), 1221554, (56.201, 41.937), 122.37, 20.0),
    # L-cysteine, Pilatus 2M: Beam_xy (730, 865) px; sweeps 1-3 two-theta 30, sweep 4 0
    (r"l-cyst_0[123]_000\d\d", "PILATUS", 0.172, (1475, 1679), 388705, (148.780, 125.560), 160.0, 30.0),
    (r"l-cyst_04_000\d\d", "PILATUS", 0.172, (1475, 1679), 388705, (148.780, 125.560), 160.0, 0),
    # Pilatus3 6M singles and stills
    (r"example_00[49]", "PILATUS", 0.172, (2463, 2527), 247198, (227.831, 217.872), 305.0, 0),
    (r"thaum_0500", "PILATUS", 0.172, (2463, 2527), 1009797, (207.879, 214.384), 338.1, 0),
    (r"thau_3_2_000\d", "PILATUS", 0.172, (2463, 2527), 115897, (224.797, 216.997), 351.0, 0),
    # the simulated Pilatus 1M: Beam_xy (492.6, 521.3) px
    (r"sim_00\d\d", "PILATUS", 0.172, (981, 1043), 1048500, (89.664, 84.727), 120.0, 0),
]
# oscillation 0 in the header: the thaumatin stills, and the MarCCD test images (a diffractometer scan)
STILLS = ("thaum_0500", "thau_3_2_", "corkcont2_H", "somedata_")


def image_files(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)


def expectation(name):
    hits = [e for e in EXPECT if re.match(e[0], name)]
    assert len(hits) == 1, f"{name}: no expected header values in this test (add a line to EXPECT)"
    return hits[0]


def deck_line_for(path, tmp_path):
    """DIRECTORY/TEMPLATE/IMAGE for one file: its last run of digits becomes the template's #s.
    A file without an image number (example.mar2300) is linked under a numbered name first."""
    name = re.sub(r"\.(gz|bz2)$", "", path.name)
    stem, ext = name.rsplit(".", 1)
    m = list(re.finditer(r"\d+", stem))
    if not m:
        link = tmp_path / f"{stem}_001.{ext}"
        link.symlink_to(path)
        return tmp_path, f"{stem}_###.{ext}", 1
    d = m[-1]
    return path.parent, stem[:d.start()] + "#" * len(d.group()) + stem[d.end():] + "." + ext, int(d.group())


FOLDERS = ["formats", "real-pilatus6m-singles", "real-thaumatin-pilatus6m-stills",
           pytest.param("real-lcys-pilatus2m", marks=pytest.mark.slow),
           pytest.param("sim-p212121-cbf", marks=pytest.mark.slow)]


def test_every_image_folder_is_covered():
    folders = {p.parent.name for p in DATA.rglob("*") if p.is_file() and p.suffix in IMAGE_SUFFIXES
               and "ref" not in p.parts}
    assert folders == {f if isinstance(f, str) else f.values[0] for f in FOLDERS}


@pytest.mark.parametrize("folder", FOLDERS)
def test_header_of_every_file(folder, tmp_path):
    files = image_files(DATA / folder)
    assert files
    deck = []
    for p in files:
        d, tmpl, n = deck_line_for(p, tmp_path)
        deck += [f"DIRECTORY {d}", f"TEMPLATE {tmpl}", f"IMAGE {n}", "HEADER", "GO"]
    r = run_ipmosflm("\n".join(deck + ["EXIT", ""]), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    blocks = r.stdout.split(" From information in the image file, the detector has been")[1:]
    assert len(blocks) == len(files)
    for p, text in zip(files, blocks):
        _, det, pix, size, over, beam, dist, tt = expectation(p.name)
        where = f"{p.name}:\n{text[:1500]}"
        assert re.search(rf"recognized as: {det}\n", text), where
        assert float(re.search(r"Pixel size of ([\d.]+)mm", text).group(1)) == pytest.approx(pix, abs=1e-4), where
        m = re.search(r"Image size (\d+) x (\d+) pixels \(fast x slow\); overload cutoff (\d+)", text)
        assert (int(m.group(1)), int(m.group(2))) == size and int(m.group(3)) == over, where
        m = re.search(r"Beam coordinates of\s+([-\d.]+)mm\s+([-\d.]+)mm", text)
        assert (float(m.group(1)), float(m.group(2))) == pytest.approx(beam, abs=2e-3), where
        m = re.search(r"Crystal to detector distance of\s+([\d.]+)mm", text)
        if dist is None:
            assert m is None and "gives no crystal to detector distance: give DISTANCE" in text, where
        else:
            assert float(m.group(1)) == pytest.approx(dist, abs=0.01), where
        m = re.search(r"Detector two-theta\s+([-\d.]+) degrees", text)
        if tt is not None:
            assert (float(m.group(1)) if m else 0.0) == pytest.approx(tt, abs=0.01), where
        wl = float(re.search(r"Wavelength of ([\d.]+)A", text).group(1))
        assert (0.01 < wl < 0.05) if det == "TIMEPIX" else (0.5 < wl < 3.0), where
        if p.name.startswith(STILLS):
            assert "is a still (oscillation 0)" in text, where
        else:
            m = re.search(r"Phi start ([-\d.]+) end ([-\d.]+) oscillation ([\d.]+) degrees", text)
            assert m and 0 < float(m.group(3)) <= 2.0, where


def test_marccd_header_takes_the_distance_from_the_deck(tmp_path):
    """What the warning asks for works: with DISTANCE the MarCCD image has its full geometry."""
    deck = (f"DIRECTORY {DATA / 'formats'}\nTEMPLATE somedata_####.mccd\nIMAGE 1 PHI 0 TO 1\n"
            "DISTANCE 150\nHEADER\nGO\nEXIT\n")
    r = run_ipmosflm(deck, cwd=tmp_path)
    assert r.returncode == 0
    assert "Crystal to detector distance of   150.00mm taken from keyword input" in r.stdout
    assert re.search(r"Start and end phi values for image\s+1 from keyword input are\s+0.00 and\s+1.00", r.stdout)
    assert "give DISTANCE" not in r.stdout


# one file of each kind, with a crystal for PREDICT: the set's own cell where it is known
PREDICT_CASES = [
    ("formats/DLS_I03_smargon_0001.cbf.gz", (57.8, 57.8, 150.0, 90, 90, 90), ""),
    ("formats/DLS_I23_P12M_thau_00001.cbf.gz", (57.8, 57.8, 150.0, 90, 90, 90), ""),
    ("formats/TIMEPIX_SU_516-stdgoni_0001.img", (20.0, 30.0, 40.0, 90, 90, 90), ""),
    ("formats/adsc_q4.img.gz", (50.0, 60.0, 70.0, 90, 90, 90), ""),
    ("formats/corkcont2_H_0089.mccd.gz", (50.0, 60.0, 70.0, 90, 90, 90), "DISTANCE 100\nIMAGE 89 PHI 0 TO 1"),
    ("formats/somedata_0001.mccd.gz", (50.0, 60.0, 70.0, 90, 90, 90), "DISTANCE 100\nIMAGE 1 PHI 0 TO 1"),
    ("formats/dlsnxs2cbf_therm_0001.cbf.gz", (57.8, 57.8, 150.0, 90, 90, 90), ""),
    ("formats/example.mar2300", (50.0, 60.0, 70.0, 90, 90, 90), ""),
    ("formats/run2_1_00148.cbf.gz", (50.0, 60.0, 70.0, 90, 90, 90), ""),
    ("formats/ximg2700_00001.cbf", (5.42, 8.14, 12.03, 90, 90, 90), ""),
    ("real-lcys-pilatus2m/l-cyst_01_00001.cbf.gz", (5.42, 8.14, 12.03, 90, 90, 90), ""),
    ("real-pilatus6m-singles/example_004.cbf.gz", (91.4, 91.4, 45.9, 90, 90, 120), ""),
    ("real-pilatus6m-singles/thaum_0500.cbf.gz", (58.0, 58.0, 149.8, 90, 90, 90), "IMAGE 500 PHI 0 TO 0.5"),
    ("real-thaumatin-pilatus6m-stills/thau_3_2_0001.cbf.bz2", (58.0, 58.0, 149.8, 90, 90, 90),
     "IMAGE 1 PHI 90 TO 90.5"),
    ("sim-p212121-cbf/sim_0001.cbf", (42.3, 51.9, 78.6, 90, 90, 90), ""),
]


@pytest.mark.slow
def test_predict_draws_an_overlay_on_every_kind_of_image(tmp_path):
    """PREDICT with a given cell and orientation (a MATRIX file written here) on one image of each
    detector and set: the classes are counted and a picture in MOSFLM's colours is written."""
    import numpy as np
    from PIL import Image
    from pyflm import geometry
    from pyflm.matrix import write_matrix
    from pyflm.model import Crystal
    U = geometry.rot_x(20) @ geometry.rot_y(-35) @ geometry.rot_z(50)     # any orientation will do
    deck, pngs = [], []
    for k, (rel, cell, extra) in enumerate(PREDICT_CASES):
        path = DATA / rel
        d, tmpl, n = deck_line_for(path, tmp_path)
        write_matrix(tmp_path / f"m{k}.mat", Crystal(cell, "P1", U), 1.0)
        pngs.append(tmp_path / f"predict_{k}.png")
        lines = [f"DIRECTORY {d}", f"TEMPLATE {tmpl}", f"IMAGE {n}", f"MATRIX m{k}.mat", "MOSAIC 0.5"]
        lines += extra.splitlines() if extra else []
        lines += [f"PREDICT PNG {pngs[-1].name}", "GO"]
        deck += lines
    r = run_ipmosflm("\n".join(deck + ["EXIT", ""]), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    counts = [int(x) for x in re.findall(r"(\d+) Reflections generated", r.stdout)]
    assert len(counts) == len(PREDICT_CASES) and min(counts) > 0, counts
    assert r.stdout.count("Picture of the predictions written to") == len(PREDICT_CASES)
    for (rel, _, _), png in zip(PREDICT_CASES, pngs):
        px = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
        blue = np.all(px == (60, 120, 255), axis=1).any()
        yellow = np.all(px == (255, 220, 0), axis=1).any()
        assert blue or yellow, f"{rel}: no prediction drawn in {png.name}"
