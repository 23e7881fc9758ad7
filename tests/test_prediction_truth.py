"""Prediction against the exact truth of the simulated sweep (predictions.csv beside its images)."""
import csv
import json

import numpy as np
import pytest

from conftest import SIM
from pyflm import geometry, predict
from pyflm.model import Beam, Crystal, Detector, Goniometer


@pytest.fixture(scope="module")
def truth():
    return json.load(open(SIM / "truth.json"))


@pytest.fixture(scope="module")
def sim_models(truth):
    crystal = Crystal(tuple(truth["cell"]), "P212121", np.array(truth["U_mosflm"]), (0, 0, 0),
                      truth["mosaic_fwhm_deg"])
    beam = Beam(truth["wavelength_A"], divergence=(0.02, 0.02), dispersion=truth["dispersion_rel_sigma"],
                polarisation=truth["polarisation_fraction"])
    x, y = truth["mosflm_beam_mm"]
    nf, ns = truth["image_size_px"]
    det = Detector(truth["distance_mm"], x, y, truth["pixel_mm"], truth["pixel_mm"], nf, ns)
    return crystal, beam, det, Goniometer()


@pytest.fixture(scope="module")
def csv_rows():
    with open(SIM / "predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep_prediction(sim_models):
    crystal, beam, det, gonio = sim_models
    dmin = predict.corner_resolution(det, beam.wavelength)
    return predict.predict(crystal, beam, det, gonio, 0.0, 60.0, dmin)


def _match(pred, rows):
    index = {}
    for i, (h, k, l) in enumerate(zip(pred["h"], pred["k"], pred["l"])):
        index.setdefault((h, k, l), []).append(i)
    pairs = []
    for r in rows:
        phi = float(r["phi_deg"])
        if not 0.0 <= phi < 60.0:
            continue
        cand = index.get((int(r["h"]), int(r["k"]), int(r["l"])))
        j = None if not cand else min(cand, key=lambda j: abs(pred["phi"][j] - phi))
        pairs.append((r, j))
    return pairs


def test_predicted_positions_and_phi_match_the_truth(sweep_prediction, csv_rows):
    pairs = _match(sweep_prediction, csv_rows)
    found = [(r, j) for r, j in pairs if j is not None]
    pos = np.array([np.hypot(sweep_prediction["fast"][j] - float(r["x_px"]),
                             sweep_prediction["slow"][j] - float(r["y_px"])) for r, j in found])
    dphi = np.array([sweep_prediction["phi"][j] - float(r["phi_deg"]) for r, j in found])
    assert np.median(pos) < 0.1
    assert np.max(np.abs(dphi)) < 0.05
    # every recorded reflection on the detector is predicted (within the detector's corner resolution)
    missing = [r for r, j in pairs if j is None and not r["flags"]]
    assert not missing, f"{len(missing)} reflections of predictions.csv not predicted, e.g. {missing[0]}"


def test_each_reflection_is_predicted_on_its_image_or_a_neighbour(sweep_prediction, csv_rows):
    parts = predict.image_parts(sweep_prediction, 0.0, 1.0, 1, 60, min_fraction=0.0)
    on = set(zip(sweep_prediction["h"][parts["index"]], sweep_prediction["k"][parts["index"]],
                 sweep_prediction["l"][parts["index"]], parts["image"]))
    bad = 0
    n = 0
    for r in csv_rows:
        if not r["image"] or r["flags"]:
            continue
        n += 1
        h, img = (int(r["h"]), int(r["k"]), int(r["l"])), int(r["image"])
        if not any((*h, i) in on for i in (img - 1, img, img + 1)):
            bad += 1
    assert n > 50000 and bad == 0


def test_parts_of_a_block_and_its_two_neighbours_tell_which_reach_beyond(sweep_prediction):
    # pass 1 (refine.measure_parts) splits reflections over a block's images and the one either side only
    full = predict.image_parts(sweep_prediction, 0.0, 1.0, 1, 60, min_fraction=0.005)
    some = predict.image_parts(sweep_prediction, 0.0, 1.0, 1, 60, min_fraction=0.005, only=(20, 26))
    near = (full["image"] >= 20) & (full["image"] <= 26)
    for f in ("index", "image", "fraction"):
        assert np.array_equal(some[f], full[f][near])
    # a reflection on the block (21-25) with a part beyond 20-26 has one on 20 or 26 too
    block = np.unique(full["index"][(full["image"] >= 21) & (full["image"] <= 25)])
    beyond = np.unique(full["index"][~near])
    edge = np.unique(some["index"][(some["image"] == 20) | (some["image"] == 26)])
    reach = np.intersect1d(block, beyond)
    assert len(reach) > 100 and np.all(np.isin(reach, edge))


def test_lorentz_and_polarisation_match_the_simulation(sweep_prediction, csv_rows):
    pairs = [(r, j) for r, j in _match(sweep_prediction, csv_rows[:20000]) if j is not None]
    lor = np.array([sweep_prediction["lorentz"][j] / float(r["lorentz"]) for r, j in pairs])
    pol = np.array([sweep_prediction["polar"][j] / float(r["polarisation"]) for r, j in pairs])
    assert np.allclose(lor, 1, atol=1e-4) and np.allclose(pol, 1, atol=1e-4)


def test_fractions_follow_the_simulated_mosaic_blocks(sweep_prediction, csv_rows):
    pairs = [(r, j) for r, j in _match(sweep_prediction, csv_rows) if j is not None and not r["flags"]
             and 3 <= float(r["phi_deg"]) < 57]
    diffs = []
    for r, j in pairs:
        f = r["fractions"].split(";")
        first = int(f[0])
        for n, v in enumerate(f[1:]):
            lo = first + n - 1.0
            diffs.append(float(v) - predict.fraction_inside(sweep_prediction["phi"][j],
                                                            sweep_prediction["width"][j], lo, lo + 1))
    diffs = np.abs(diffs)
    # a Gaussian rocking curve of the mosaic width follows the 96 Monte Carlo blocks to ~0.02
    assert np.mean(diffs) < 0.03


def test_missets_predict_as_if_folded_into_u(sim_models):
    crystal, beam, det, gonio = sim_models
    mis = (0.3, -0.2, 0.15)
    with_missets = Crystal(crystal.cell, crystal.space_group, crystal.U, mis, crystal.mosaic)
    folded = Crystal(crystal.cell, crystal.space_group, geometry.misset_matrix(*mis) @ crystal.U,
                     (0, 0, 0), crystal.mosaic)
    a = predict.predict(with_missets, beam, det, gonio, 10, 12, 2.0)
    b = predict.predict(folded, beam, det, gonio, 10, 12, 2.0)
    assert len(a) == len(b) > 100
    assert np.allclose(a["phi"], b["phi"]) and np.allclose(a["fast"], b["fast"])


def test_reverse_phi_mirrors_the_crossings(sim_models):
    crystal, beam, det, gonio = sim_models
    fwd = predict.predict(crystal, beam, det, Goniometer(), 0, 90, 3.0)
    rev = predict.predict(crystal, beam, det, Goniometer(reverse_phi=True), -90, 0, 3.0)
    f = np.sort(fwd["phi"][(fwd["phi"] > 10) & (fwd["phi"] < 80)])
    r = np.sort(-rev["phi"][(-rev["phi"] > 10) & (-rev["phi"] < 80)])
    assert len(f) == len(r) > 1000 and np.allclose(f, r)


def test_two_theta_detector_round_trip():
    frame = geometry.detector_frame(160.0, 100.0, 110.0, two_theta=30.0)
    x = np.array([10.0, 100.0, 200.0])
    y = np.array([20.0, 110.0, 150.0])
    lab = geometry.mm_to_lab(x, y, frame)
    x2, y2, ok = geometry.lab_to_mm(lab / np.linalg.norm(lab, axis=1)[:, None], frame)
    assert ok.all() and np.allclose(x, x2) and np.allclose(y, y2)


def test_divergence_widens_the_rocking_curve_by_how_far_it_turns_each_crossing(sim_models):
    """The beam turned by a small angle d about a unit axis u moves a crossing by d.(dphi/d) in phi;
    the rocking width's divergence terms are those shifts: turned about the rotation axis (MOSFLM's
    vertical divergence) every crossing moves by d itself, turned about e x s0 (horizontal, along the
    axis) by d w/zeta, nothing on the equator and as much as the mosaic term near the axis.  (The
    beam turned by d is the crystal at its crossing turned by -d about the same lab axis.)"""
    crystal, beam, _, gonio = sim_models
    hkl = predict.generate_hkl(crystal.A, 2.0)[:4000]
    phi, _, ok = predict.crossings(crystal.A, hkl, beam.wavelength)
    hkl, phi = hkl[ok], phi[ok]
    s1 = np.einsum("nij,nj->ni", geometry.rot_z_many(phi), hkl @ crystal.A.T) \
        + geometry.BEAM_DIRECTION / beam.wavelength
    s1u = s1 / np.linalg.norm(s1, axis=1)[:, None]
    d = 1e-3                                                   # degrees
    r0 = hkl @ crystal.A.T
    shift = {}
    for name, u in (("vertical", [0.0, 0.0, 1.0]), ("horizontal", [0.0, 1.0, 0.0])):
        # the lab's axis u at the crossing is R_z(-phi) u in the crystal's frame at phi 0
        uc = np.einsum("nij,j->ni", geometry.rot_z_many(-phi), np.array(u))
        turned = np.array([geometry.rot_about(a, -d) @ v for a, v in zip(uc, r0)])
        p, _, _ = predict.crossings_of(turned, beam.wavelength)
        shift[name] = np.abs((p - phi + 180) % 360 - 180) / d
    terms = predict.rocking_width_terms(s1u, gonio.axis, Beam(beam.wavelength, divergence=(0.0, 0.3),
                                                              dispersion=0.0))
    assert np.allclose(predict.width_from_terms(terms, 0.0), 0.3 * shift["vertical"], rtol=1e-3)
    assert np.allclose(shift["vertical"], 1.0, rtol=1e-3)
    terms = predict.rocking_width_terms(s1u, gonio.axis, Beam(beam.wavelength, divergence=(0.3, 0.0),
                                                              dispersion=0.0))
    wide = predict.width_from_terms(terms, 0.0)
    lin = terms[2] > 0.03               # closer to the axis a finite turn is no longer a small one
    assert np.allclose(wide[lin], 0.3 * shift["horizontal"][lin], rtol=1e-3, atol=1e-4)
    # near the axis (zeta small) the horizontal term is the mosaic term's size; on the equator nothing
    mosaic_only = predict.width_from_terms(terms[:3] + (0.0,), 0.3)
    near = terms[2] < 0.15 * terms[0]
    assert near.sum() > 10 and np.allclose(wide[near], mosaic_only[near], rtol=0.012)
    # w is the diffracted ray's component along the axis: none on the equator
    assert np.allclose(wide * terms[2], 0.3 * np.abs(s1u[:, 2]))


def test_cross_rows_and_rocking_terms_are_numpys_to_the_bit():
    """Prediction's Lorentz factors and rocking widths take their cross products with geometry.cross_rows
    and the width's sin 2theta as a sum of the squares in np.linalg.norm's order: the same numbers as
    np.cross and np.linalg.norm to the bit (zeros' signs included), for the beam, either scan axis and
    a tilted one, over rows of every scale."""
    rng = np.random.default_rng(7)
    axes = (geometry.BEAM_DIRECTION, geometry.ROTATION_AXIS, -geometry.ROTATION_AXIS, rng.normal(size=3))
    for scale in (1e-3, 1.0, 1e3):
        v = rng.normal(size=(3000, 3)) * scale
        v[::7, 1], v[::11, 2], v[::13, 0] = 0.0, -0.0, np.nan
        for a in axes:
            ref, got = np.cross(a, v), geometry.cross_rows(a, v)
            assert np.array_equal(ref, got, equal_nan=True) and np.array_equal(np.signbit(ref), np.signbit(got))
    s = rng.normal(size=(3000, 3))
    s /= np.linalg.norm(s, axis=1)[:, None]
    sin2t = predict.rocking_width_terms(s, axes[3] / np.linalg.norm(axes[3]), Beam(wavelength=1.0))[0]
    assert np.array_equal(sin2t, np.linalg.norm(np.cross(geometry.BEAM_DIRECTION, s), axis=1))
