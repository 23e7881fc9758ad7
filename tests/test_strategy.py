"""STRATEGY and TESTGEN on the simulated sweep's true orientation."""
import gemmi
import numpy as np
import pytest

from conftest import SIM, run_ipmosflm
from pyflm import predict, strategy
from pyflm.matrix import read_matrix
from pyflm.model import Beam, Detector, Goniometer


@pytest.fixture(scope="module")
def models():
    c = read_matrix(str(SIM / "truth.mat"))
    c.space_group = "P 21 21 21"
    c.mosaic = 0.3
    return c, Beam(0.9795), Detector(120.0, 89.6636, 84.7272, 0.172, 0.172, 981, 1043), Goniometer()


@pytest.fixture(scope="module")
def cov(models):
    c, b, d, g = models
    return strategy.coverage(c, b, d, g, 1.5)


def _brute_force_completeness(c, b, d, g, start, end, dmin=1.5):
    """Predict degree by degree, reduce to the asymmetric unit with gemmi, count what is seen."""
    sg = gemmi.SpaceGroup("P 21 21 21")
    asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
    seen = set()
    for i in range(int(start), int(end)):
        p = predict.predict(c, b, d, g, float(i), float(i + 1), dmin, margin=0.0)
        p = p[p["on_detector"] & (p["phi"] >= i) & (p["phi"] < i + 1)]
        for h in zip(p["h"].tolist(), p["k"].tolist(), p["l"].tolist()):
            if not ops.is_systematically_absent(list(h)):
                seen.add(tuple(asu.to_asu(list(h), ops)[0]))
    allh = predict.generate_hkl(c.A, dmin)
    possible = {tuple(asu.to_asu(list(h), ops)[0]) for h in allh.tolist()
                if not ops.is_systematically_absent(list(h))}
    return len(seen) / len(possible)


def test_completeness_0_to_60_agrees_with_a_brute_force_count(models, cov):
    c, b, d, g = models
    figs = strategy.completeness(cov, [(0.0, 60.0)])
    brute = _brute_force_completeness(c, b, d, g, 0, 60)   # predict image by image, count in the ASU
    assert abs(figs["completeness"] - brute) < 0.01, (figs["completeness"], brute)


def test_auto_finds_a_start_as_good_as_a_5_degree_scan(models, cov):
    start, figs, _, ranges = strategy.best_start(cov, 90.0, 1)
    assert ranges[0][1] - ranges[0][0] == pytest.approx(90.0)
    # the scan the issue asks for, made here, not taken from the function under test
    scan = {s: strategy.completeness(cov, [(float(s), s + 90.0)])["completeness"] for s in range(0, 180, 5)}
    assert figs["completeness"] >= max(scan.values()) - 0.01, (start, figs, max(scan.items(), key=lambda t: t[1]))
    # and the completeness AUTO reports is what prediction really gives over that range
    c, b, d, g = models
    s0 = int(round(start))
    assert abs(strategy.completeness(cov, [(float(s0), s0 + 90.0)])["completeness"]
               - _brute_force_completeness(c, b, d, g, s0, s0 + 90)) < 0.01


def test_testgen_angle_is_consistent_with_the_overlaps_prediction_counts(models):
    c, b, d, g = models
    sep = (0.69, 0.69)
    rows = strategy.testgen(c, b, d, g, 10.0, 10.0, 5.0, 0.2, 2.0, 2.0, 1.5, sep)
    phi, osc, pct = rows[0]
    assert osc is not None and pct <= 2.0
    assert 100 * strategy.overlap_fraction(c, b, d, g, phi, osc, 1.5, sep) <= 2.0
    if osc < 2.0 - 1e-9:
        assert 100 * strategy.overlap_fraction(c, b, d, g, phi, osc + 0.1, 1.5, sep) > 2.0


def test_strategy_deck_prints_completeness(workdir):
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nresolution 2.0\n'
            "image 1\nstrategy start 0 end 60\ngo\nstrategy auto rotate 90 segments 2\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-1500:]
    assert r.stdout.count("Completeness of unique data") == 2
    assert "Optimum rotation of   90.0 degrees in 2 segment(s)" in r.stdout.replace("  90.0", "   90.0") \
        or "Optimum rotation of 90.0 degrees in 2 segment(s)" in r.stdout
