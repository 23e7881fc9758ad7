"""Spot finding against the truth of the simulated sweep and on real images."""
import csv

import numpy as np
import pytest
from scipy.spatial import cKDTree

from conftest import DATA, SIM
from pyflm import images, spotfinder
from pyflm.model import Detector


def detector_of(path):
    data, h = images.read_image(str(path))
    det = Detector(h.distance, *h.beam, h.pixel_fast, h.pixel_slow, h.n_fast, h.n_slow,
                   overload=h.overload, two_theta=h.two_theta)
    return data, det, h


@pytest.fixture(scope="module")
def truth_rows():
    with open(SIM / "predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("image", [1, 30])
def test_every_strong_reflection_is_found_and_few_spots_are_false(truth_rows, image):
    data, det, h = detector_of(SIM / f"sim_{image:04d}.cbf")
    spots = spotfinder.find_spots(data, det, image=image)
    ok = spots[spots["flag"] == 0]
    strong, anywhere = [], []
    for r in truth_rows:
        f = r["fractions"].split(";")
        first, fr = int(f[0]), [float(x) for x in f[1:]]
        if not first <= image < first + len(fr) or r["flags"]:
            continue
        xy = (float(r["x_px"]), float(r["y_px"]))
        if fr[image - first] > 0.02:
            anywhere.append(xy)
        counts = float(r["I_true"]) * float(r["lorentz"]) * float(r["polarisation"]) * 2.5 * fr[image - first]
        if counts > 200 and r["image"] == str(image):   # crossing on this image: its brightest part
            strong.append(xy)
    found = cKDTree(np.stack([ok["fast"], ok["slow"]], 1))
    dist, _ = found.query(np.array(strong))
    assert np.mean(dist < 1.5) > 0.98                 # recall of strong reflections
    assert np.median(dist) < 0.2                      # centroids to a fifth of a pixel
    near, _ = cKDTree(np.array(anywhere)).query(np.stack([ok["fast"], ok["slow"]], 1))
    assert np.mean(near < 2.0) > 0.9                  # precision


def test_pilatus6m_single_image_finds_as_many_spots_as_dials():
    data, det, h = detector_of(DATA / "real-pilatus6m-singles" / "example_004.cbf.gz")
    ok = spotfinder.find_spots(data, det, wavelength=h.wavelength)
    n = int(np.sum(ok["flag"] == 0))
    assert 300 < n < 500          # DIALS 3.12 finds 390


def test_blank_and_noise_images_give_no_spots():
    det = Detector(120, 50, 50, 0.172, 0.172, 500, 500)
    assert len(spotfinder.find_spots(np.zeros((500, 500), np.int32), det)) == 0
    rng = np.random.default_rng(1)
    noise = rng.poisson(5.0, (500, 500)).astype(np.int32)
    spots = spotfinder.find_spots(noise, det)
    assert np.sum(spots["flag"] == 0) <= 3


def test_findspots_deck_prints_the_lines_xia2_reads(workdir):
    from conftest import run_ipmosflm
    deck = f'template "sim_####.cbf"\ndirectory "{SIM}"\nimage 1\nfindspots\ngo\n'
    r = run_ipmosflm(deck, "SPOTOD", "x.spt", cwd=workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    line = [ln for ln in r.stdout.splitlines() if "99% have resolution less than" in ln][0]
    assert 1.2 < float(line.split()[-2]) < 2.5
    assert "Number stored as OK" in r.stdout and "parameters have been set to" in r.stdout
    assert (workdir / "x.spt").stat().st_size > 1000


@pytest.mark.parametrize("path", [SIM / "sim_0030.cbf", DATA / "real-pilatus6m-singles" / "example_004.cbf.gz"])
def test_a_band_of_rows_gives_the_whole_images_spots_that_lie_in_it(path):
    """PROCESS's probe asks a band of rows first: each spot found there is the whole search's spot
    (position, pixels, sums, TOO_SMALL), and every whole-image spot well inside the band is found."""
    data, det, h = detector_of(path)
    kw = dict(image=30, phi=1.0, threshold=2.0, min_pix=2)
    whole = spotfinder.find_spots(data, det, **kw)
    ny = data.shape[0]
    r0, r1 = 3 * ny // 8, 5 * ny // 8
    band = spotfinder.find_spots_in_rows(data, det, r0, r1, **kw)
    assert len(band) > 50
    key = lambda s: {(round(float(f), 9), round(float(sl), 9)): (int(n), float(i), float(sg), int(fl) & 1)
                     for f, sl, n, i, sg, fl in zip(s["fast"], s["slow"], s["npix"], s["intensity"],
                                                    s["sigma"], s["flag"])}
    kb, kwhole = key(band), key(whole)
    assert all(k in kwhole and kwhole[k] == v for k, v in kb.items())
    inside = [k for k in kwhole if r0 + 15 <= k[1] <= r1 - 15]
    assert len(inside) > 50 and all(k in kb for k in inside)
