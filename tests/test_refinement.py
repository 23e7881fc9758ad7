"""Refinement (issue 5) on the simulated sweep, checked against its truth.

A user indexes, refines the cell on two segments far apart, then integrates; the log and the SUMMARY
tables (detector parameters, then post-refinement, as xia2 reads them) must show the true geometry:
cell within 0.1 %, missets steady along the sweep, mosaic near the simulated one, spots predicted to
a fraction of a pixel, and a wrong distance or beam centre put right.
"""
import json
import re

import numpy as np
import pytest

from conftest import SIM, run_ipmosflm
from pyflm.summary import parse_loggraph

TRUTH = json.loads((SIM / "truth.json").read_text())
XCEN_TRUE, YCEN_TRUE = TRUTH["mosflm_beam_mm"]          # MOSFLM's BEAM: slow then fast, mm
DIST_TRUE = TRUTH["distance_mm"]
CELL_TRUE = TRUTH["cell"]
# the simulated mosaic blocks spread with this FWHM; MOSFLM's MOSAIC (full width) corresponds to it
MOSAIC_TRUE = TRUTH["mosaic_fwhm_deg"]
PIXEL = TRUTH["pixel_mm"]

HEAD = f'template "sim_####.cbf"\ndirectory "{SIM}"\n'
INDEX = ("autoindex dps refine image 1 thresh 20\nautoindex dps refine image 45 thresh 20\n"
         "mosaic estimate 1\ngo\n")
CELL_REFINEMENT = ("symmetry P212121\npostref multi segments 2\nprocess 1 3\ngo\nprocess 58 60\ngo\n"
                   "postref nosegment\n")


def summary_tables(path):
    """The SUMMARY's detector and post-refinement tables as {column: array}."""
    t = parse_loggraph(path.read_text())
    out = []
    for title in ("Refined detector parameters", "Post-refinement"):
        cols, rows = t[title]
        a = np.array(rows, float)
        out.append({c: a[:, i] for i, c in enumerate(cols)})
    return out


def log_detector(out):
    """(XCEN, YCEN, XTOFD) of every image's block in the log."""
    return [tuple(float(v) for v in (m.group(1), m.group(2), m.group(3))) for m in
            re.finditer(r"XCEN +YCEN +XTOFRA +XTOFD +YSCALE +TILT +TWIST\n +(\S+) +(\S+) +\S+ +(\S+)", out)]


def cell_lines(out):
    out = out.split("Cell refinement is complete", 1)[1]
    start = [float(x) for x in re.search(r"Starting cell\s+(.*)", out).group(1).split()]
    refined = [float(x) for x in re.search(r"Refined cell\s+(.*)", out).group(1).split()]
    esd = [float(x) for x in re.search(r"\n Error\s+(.*)", out).group(1).split()]
    return start, refined, esd


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The autoindexing result (images 1 and 45) as xia2 keeps it: a matrix file."""
    d = tmp_path_factory.mktemp("index")
    r = run_ipmosflm(HEAD + "newmat index.mat\n" + INDEX, cwd=d)
    assert r.returncode == 0, r.stdout[-2000:]
    return d / "index.mat"


@pytest.mark.slow
def test_sweep_from_autoindexing_refines_to_the_truth(workdir):
    """Index, refine the cell on 1-3 and 58-60, integrate 1-60: every refined figure against the truth."""
    deck = HEAD + INDEX + CELL_REFINEMENT + "nproc 2\nprocess 1 60\ngo\n"
    r = run_ipmosflm(deck, "HKLOUT", "sweep.mtz", "SUMMARY", "sweep.sum", cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    out = r.stdout
    start, cell, esd = cell_lines(out)
    for got, true in zip(cell[:3], CELL_TRUE[:3]):
        assert abs(got / true - 1) < 0.001                       # within 0.1 %
    assert len(esd) == 6 and all(0 < e < 0.02 for e in esd[:3])   # esds printed, and small
    mosaic = float(re.search(r"Refined mosaic spread \(excluding safety factor\):\s+(\S+)", out).group(1))
    assert abs(mosaic / MOSAIC_TRUE - 1) < 0.2
    det, post = summary_tables(workdir / "sweep.sum")
    assert list(det["Image"]) == list(range(1, 61)) == list(post["Image"])
    for name in ("PHIX", "PHIY", "PHIZ"):
        assert np.ptp(post[name]) < 0.05                         # missets steady along the sweep
    assert np.all(np.abs(post["MOSAIC"] / MOSAIC_TRUE - 1) < 0.2)
    assert np.all(det["RESID"] > 0) and np.all(det["RESID"] < 0.3 * PIXEL)   # below 0.3 pixel
    rms_lines = [ln for ln in out.split("process 1 60")[1].splitlines() if "Final rms residual:" in ln]
    rms_log = [float(ln.replace("mm", " ").split()[3]) for ln in rms_lines]    # as xia2 reads them
    assert len(rms_log) == 60 and max(rms_log) < 0.3 * PIXEL
    assert all(0 < float(ln.split()[-1]) < 10 for ln in rms_lines)             # the weighted residual
    assert np.all(np.abs(det["XTOFD"] - DIST_TRUE) < 0.1)
    assert np.all(np.abs(det["XCEN"] - XCEN_TRUE) < 0.02) and np.all(np.abs(det["YCEN"] - YCEN_TRUE) < 0.02)
    for got, true in zip(post["A"], [CELL_TRUE[0]] * 60):
        assert abs(got / true - 1) < 0.001


@pytest.mark.slow
def test_distance_wrong_by_1mm_is_recovered_by_cell_refinement(workdir):
    """DISTANCE 121 (the header says 120) from the start: cell refinement puts back the distance and
    the cell, and later processing uses them."""
    deck = HEAD + "distance 121.0\n" + INDEX + CELL_REFINEMENT + "process 30 31\ngo\n"
    r = run_ipmosflm(deck, "SUMMARY", "d.sum", cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    out = r.stdout
    start, cell, esd = cell_lines(out)
    assert all(abs(g / t - 1) < 0.001 for g, t in zip(cell[:3], CELL_TRUE[:3]))
    table = out.split("Detector distance as a function of cycle for each image:\n")[1].split("\n\n")[0]
    dist = [float(v) for v in table.splitlines()[-1].split()[2:]]     # the last cycle, for each image
    assert len(dist) == 6
    assert all(abs(d - DIST_TRUE) < 0.1 for d in dist)          # the last cycle's distance
    m = re.search(r"Refined detector: XCEN\s+(\S+)\s+YCEN\s+(\S+)\s+distance\s+(\S+)", out)
    assert abs(float(m.group(3)) - DIST_TRUE) < 0.1
    det, _ = summary_tables(workdir / "d.sum")
    assert np.all(np.abs(det["XTOFD"] - DIST_TRUE) < 0.1)
    assert all(abs(d[2] - DIST_TRUE) < 0.1 for d in log_detector(out)[-2:])


@pytest.mark.parametrize("keyword,start", [("distance 121.0", (XCEN_TRUE, YCEN_TRUE, DIST_TRUE + 1)),
                                           (f"beam {XCEN_TRUE + 0.3:.4f} {YCEN_TRUE:.4f}",
                                            (XCEN_TRUE + 0.3, YCEN_TRUE, DIST_TRUE)),
                                           (f"beam {XCEN_TRUE:.4f} {YCEN_TRUE - 0.3:.4f}",
                                            (XCEN_TRUE, YCEN_TRUE - 0.3, DIST_TRUE))])
def test_positional_refinement_in_process_recovers_a_wrong_start(workdir, indexed, keyword, start):
    """The indexed matrix with a wrong distance or beam: PROCESS's own refinement finds the true ones."""
    deck = HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\n{keyword}\nprocess 21 23\ngo\n"
    r = run_ipmosflm(deck, "SUMMARY", "p.sum", cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    det, _ = summary_tables(workdir / "p.sum")
    assert np.all(np.abs(det["XTOFD"] - DIST_TRUE) < 0.1)
    assert np.all(np.abs(det["XCEN"] - XCEN_TRUE) < 0.02)
    assert np.all(np.abs(det["YCEN"] - YCEN_TRUE) < 0.02)
    assert np.all(det["RESID"] < 0.3 * PIXEL)
    xcen, ycen, dist = log_detector(r.stdout)[0]
    assert abs(dist - DIST_TRUE) < 0.1 and abs(xcen - XCEN_TRUE) < 0.02 and abs(ycen - YCEN_TRUE) < 0.02


def sections(out):
    """The log of each PROCESS line of a deck, in order."""
    return out.split(" ===> process")[1:]


def spots_used(section):
    return [int(n) for n in re.findall(r"Spots used in positional refinement:\s+(\d+)", section)]


def test_refinement_fix_holds_detector_parameters_and_free_releases_them(workdir, indexed):
    """REFINEMENT FIX DISTANCE XCEN YCEN keeps the (wrong) values given; FREE lets refinement correct them."""
    deck = (HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\ndistance 121.0\n"
            f"beam {XCEN_TRUE + 0.3:.4f} {YCEN_TRUE:.4f}\n"
            "refinement fix distance xcen ycen\nprocess 21 23\ngo\n"
            "refinement free distance xcen ycen\nprocess 21 23\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    fixed, free = (log_detector(s) for s in sections(r.stdout))
    assert len(fixed) == len(free) == 3
    assert all(d == (round(XCEN_TRUE + 0.3, 2), round(YCEN_TRUE, 2), 121.0) for d in fixed)
    assert all(abs(x - XCEN_TRUE) < 0.02 and abs(y - YCEN_TRUE) < 0.02 and abs(d - DIST_TRUE) < 0.1
               for x, y, d in free)


def test_refinement_residual_and_include_partials_choose_the_spots(workdir, indexed):
    """INCLUDE PARTIALS adds the partials' centroids to the fulls; a tight RESIDUAL rejects spots."""
    deck = (HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\nprocess 21 23\ngo\n"
            "refinement include partials\nprocess 21 23\ngo\n"
            "refinement exclude partials residual 0.5\nprocess 21 23\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    default, partials, tight = (spots_used(s) for s in sections(r.stdout))
    assert len(default) == len(partials) == len(tight) == 3
    assert default[0] > 200                     # strong fulls of the block
    assert partials[0] > 1.3 * default[0]
    assert tight[0] < 0.95 * default[0]
    rms = [float(v) for v in re.findall(r"Final rms residual:\s+(\S+)mm", r.stdout)]
    assert len(rms) == 9 and max(rms) < 0.3 * PIXEL


def test_postref_fix_mosaic_fix_all_and_off(workdir, indexed):
    """Post-refinement moves the mosaic from the 0.28 given towards the truth and refines the missets;
    FIX MOSAIC holds the mosaic; FIX ALL and OFF hold missets and mosaic (the detector is still refined)."""
    deck = (HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\nprocess 21 23\ngo\n"
            "postref fix mosaic\nprocess 21 23\ngo\npostref fix all\nprocess 21 23\ngo\n"
            "postref off\nprocess 21 23\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    free, fix_mosaic, fix_all, off = sections(r.stdout)

    def mosaic(s):
        return [float(v) for v in re.findall(r"Smoothed value for refined mosaic spread\s+(\S+)", s)]

    def missets(s):
        return [tuple(float(v) for v in m) for m in
                re.findall(r"PHIX\s+(\S+)\s+PHIY\s+(\S+)\s+PHIZ\s+(\S+)", s)]
    assert all(abs(m / MOSAIC_TRUE - 1) < 0.2 and abs(m - 0.28) > 0.01 for m in mosaic(free))
    assert len(missets(free)) == 3 and any(abs(v) > 0.005 for v in missets(free)[0])
    assert mosaic(fix_mosaic) == [0.28] * 3 and len(missets(fix_mosaic)) == 3
    for s in (fix_all, off):
        assert mosaic(s) == [0.28] * 3 and missets(s) == []
        assert len(spots_used(s)) == 3             # positional refinement still done


def test_postref_maxresidual_and_sdfac_choose_the_partials(workdir, indexed):
    """MAXRESIDUAL rejects partials whose fractions are off by more than that many sigma; SDFAC widens
    the sigmas, so fewer are rejected at the same MAXRESIDUAL."""
    deck = (HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\nprocess 21 23\ngo\n"
            "postref maxresidual 1.0\nprocess 21 23\ngo\npostref sdfac 3.0\nprocess 21 23\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    default, tight, wider = ([int(n) for n in re.findall(r"Post-refinement on (\d+) partials", s)]
                             for s in sections(r.stdout))
    assert len(default) == len(tight) == len(wider) == 3
    assert default[0] > 200
    assert tight[0] < 0.9 * default[0]
    assert tight[0] < wider[0] <= default[0]


def test_postref_fix_holds_a_cell_parameter_in_cell_refinement(workdir, indexed):
    """POSTREF FIX B: cell refinement leaves b as indexed (esd 0) and refines a and c to the truth."""
    deck = (HEAD + f"matrix {indexed}\nsymmetry P212121\nmosaic 0.28\npostref fix b\n"
            "postref multi segments 2\nprocess 1 3\ngo\nprocess 58 60\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    start, cell, esd = cell_lines(r.stdout)
    assert cell[1] == start[1] and esd[1] == 0.0
    assert cell[0] != start[0] and cell[2] != start[2] and esd[0] > 0 and esd[2] > 0
    assert abs(cell[0] / CELL_TRUE[0] - 1) < 0.001 and abs(cell[2] / CELL_TRUE[2] - 1) < 0.001


def test_postref_on_and_off_the_last_one_given_holds(workdir):
    """POSTREF OFF, ON, OFF: post-refinement is off; OFF then ON: on."""
    from pyflm import parser
    from pyflm.job import JobState, apply_statement
    from pyflm.refine import options_from
    for lines, on in ((["postref off", "postref on", "postref off"], False), (["postref off", "postref on"], True)):
        job = JobState()
        for st in parser.parse_lines(lines)[0]:
            apply_statement(job, st)
        assert options_from(job.kw).postref is on


def test_options_after_a_fix_list_on_the_same_line_still_count():
    """REFINEMENT FIX DISTANCE RESIDUAL 3 INCLUDE PARTIALS: the list does not swallow the options."""
    from pyflm import parser
    from pyflm.job import JobState, apply_statement
    from pyflm.refine import options_from
    job = JobState()
    for st in parser.parse_lines(["refinement fix distance tilt residual 3 include partials",
                                  "postref fix mosaic maxresidual 2.5 sdfac 1.5"])[0]:
        apply_statement(job, st)
    o = options_from(job.kw)
    assert o.detector_free == {"XCEN", "YCEN", "TWIST"}
    assert o.residual == 3.0 and o.include_partials
    assert not o.mosaic_free and o.maxresidual == 2.5 and o.sdfac == 1.5


# ---- the refinement's Jacobian, its fit and its predictions --------------------------------------------

@pytest.fixture(scope="module")
def block_problem():
    """Images 1-5 of the sim sweep measured from a start off the truth (missets, mosaic, distance, beam),
    as a PROCESS block's pass 1 measures them."""
    from pyflm import images, refine
    from pyflm.model import Beam, Crystal, Detector, Goniometer, Scan
    t = json.load(open(SIM / "truth.json"))
    crystal = Crystal(tuple(t["cell"]), "P212121", np.array(t["U_mosflm"]), (0.03, -0.02, 0.04), 0.4)
    beam = Beam(t["wavelength_A"], divergence=(0.02, 0.02), dispersion=t["dispersion_rel_sigma"],
                polarisation=t["polarisation_fraction"])
    x, y = t["mosflm_beam_mm"]
    det = Detector(t["distance_mm"] + 0.3, x + 0.05, y - 0.04, t["pixel_mm"], t["pixel_mm"],
                   *t["image_size_px"])
    gonio, scan = Goniometer(), Scan("sim_####.cbf", str(SIM), 1, 60, 0.0, 1.0)
    read = lambda i: images.read_image(str(SIM / f"sim_{i:04d}.cbf"))[0]
    parts = refine.measure_parts(crystal, beam, det, gonio, scan, range(1, 6), read)
    return parts, crystal, beam, det, gonio, scan


def _central(fun, x, j, h):
    y1, y2 = np.array(x, float), np.array(x, float)
    y1[j] += h
    y2[j] -= h
    return (np.asarray(fun(y1)) - np.asarray(fun(y2))) / (2 * h)


@pytest.mark.parametrize("use_cython", [True, False])
def test_closed_form_derivatives_are_the_predictions_derivatives(block_problem, use_cython):
    """The positions, crossing angles and rocking widths move with every free parameter (detector,
    missets, mosaic, cell) as their closed-form derivatives say, in the kernel and in its numpy twin:
    central differences agree to 1e-5 of each column's size; so does the rocking curve's share before
    a phi, Gaussian or with tails."""
    from pyflm import predict, refine
    parts, crystal, beam, det, gonio, scan = block_problem
    model = refine._Model(crystal, beam, det, gonio, set(refine.DETECTOR_PARAMS), set(refine.MISSETS), True,
                          {"A", "B", "C"})
    first = np.unique(parts["refl"], return_index=True)[1]
    hkl = np.stack([parts["h"][first], parts["k"][first], parts["l"][first]], 1).astype(float)
    calc = refine._Predictions(model, hkl, parts["phi_pred"][first], use_cython=use_cython)
    assert calc.use_cython == use_cython
    x = model.x0 + 0.3 * model.scale
    ok = calc(x)[4]
    D = calc.derivatives(x)
    for j, name in enumerate(model.names):
        h = 1e-6 * max(1.0, abs(x[j]))
        for q in range(4):          # xm, ym, phi, width
            fd = _central(lambda y: calc(y)[q], x, j, h)[ok]
            assert np.max(np.abs(D[q][ok, j] - fd)) <= 1e-5 * max(np.max(np.abs(fd)), 1e-2), (name, q)
    phi, width = np.linspace(-1, 1, 41), np.linspace(0.05, 1.5, 41)
    for tail in (0.0, 0.3):
        d_phi, d_w = refine._cum_derivatives(0.2, phi, width, tail)
        assert np.allclose(d_phi, _central(lambda p: predict._cum(0.2, p, width, tail), phi, slice(None), 1e-6),
                           atol=1e-7)
        assert np.allclose(d_w, _central(lambda w: predict._cum(0.2, phi, w, tail), width, slice(None), 1e-6),
                           atol=1e-7)


def test_the_detector_frames_derivatives_swung_and_tilted(block_problem):
    """The frame's derivatives in closed form (XCEN, YCEN, DISTANCE, TILT and TWIST, with the direct
    beam held where XCEN YCEN put it) are those of the frame the model builds (central differences),
    for a detector swung by two-theta either way, tilted and turned by DETECTOR OMEGA; so are the
    setting matrix's for the missets."""
    import copy
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    for two_theta, tilt, twist, omega in [(30.0, 0.2, -0.1, 0.0), (0.0, 0.2, -0.1, 0.0), (-20.0, 0.0, 0.3, 0.0),
                                          (0.0, -0.3, 0.15, 90.0), (15.0, 0.1, 0.2, 270.0)]:
        d = copy.copy(det)
        d.two_theta, d.tilt, d.twist, d.omega = two_theta, tilt, twist, omega
        model = refine._Model(crystal, beam, d, gonio, set(refine.DETECTOR_PARAMS), set(refine.MISSETS), False,
                              set())
        x = model.x0 + 0.3 * model.scale
        calc = refine._Predictions(model, np.zeros((1, 3)), np.zeros(1))
        dA, dF = calc._parameter_derivatives(x, model.unpack_detector(x).frame())
        for q, j in enumerate(calc.det_idx):
            fd = _central(lambda y: np.array(model.unpack_detector(y).frame()), x, j, 1e-5 * max(1.0, abs(x[j])))
            assert np.max(np.abs(fd - dF[q])) < 1e-8, (two_theta, omega, model.names[j])
        for q, j in enumerate(calc.cry_idx):
            fd = _central(lambda y: model.unpack_crystal(y).A, x, j, 1e-5)
            assert np.max(np.abs(fd - dA[q])) < 1e-10 * np.max(np.abs(fd)) + 1e-12, model.names[j]


def test_the_fit_ends_at_the_minimum_scipy_finds(block_problem, monkeypatch):
    """refine_parameters' own Levenberg-Marquardt fit: the Jacobian it is handed is that of its
    residuals (positions and fractions, central differences), and every fit ends where scipy's
    least_squares, with the same soft-L1 loss, bounds and Jacobian converged tightly, ends: within
    1e-4 of each parameter's standard error; the first (before the first rejection of outliers) within
    its looser tolerance, and the last is a tight one."""
    from scipy.optimize import least_squares
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    original, fits = refine._fit, []

    def both(fun, jac, x0, lb, ub, **kw):
        J = jac(x0)
        for j in range(len(x0)):
            fd = _central(fun, x0, j, 1e-6 * max(1.0, abs(x0[j])))
            assert np.max(np.abs(J[:, j] - fd)) <= 1e-5 * max(np.max(np.abs(fd)), 1e-2)
        x, r, Js = original(fun, jac, x0, lb, ub, **kw)
        theirs = least_squares(fun, x0, jac=jac, bounds=(lb, ub), loss="soft_l1", f_scale=refine.F_SCALE,
                               ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=500)
        esd = np.sqrt(np.diag(np.linalg.pinv(Js.T @ Js)) * (r @ r) / (len(r) - len(x)))
        tol = kw.get("tol", refine.FIT_TOL)
        assert np.all(np.abs(x - theirs.x) <= (1e-4 if tol <= refine.FIT_TOL else 2 * tol) * esd)
        fits.append(tol)
        return x, r, Js
    monkeypatch.setattr(refine, "_fit", both)
    ref = refine.refine_parameters(parts, crystal, beam, det, gonio, scan, refine.Options())
    assert len(fits) >= 2 and fits[0] == refine.REJECT_TOL and fits[-1] == refine.FIT_TOL
    assert ref.n_pos > 100 and ref.n_frac > 50
    # and the fit found the truth again (the block refines what it should)
    assert abs(ref.detector.distance - 120.0) < 0.1 and abs(ref.crystal.mosaic - 0.3) < 0.1


def test_the_kernel_is_its_numpy_twin(block_problem):
    """ext/_refine.pyx's predictions and derivatives are the numpy twin's (to 1e-9 of their size: the
    same formulas, summed in another order), reversed phi and a reflection that does not cross too."""
    from pyflm import refine
    from pyflm.model import Goniometer
    parts, crystal, beam, det, gonio, scan = block_problem
    first = np.unique(parts["refl"], return_index=True)[1]
    hkl = np.stack([parts["h"][first], parts["k"][first], parts["l"][first]], 1).astype(float)
    hkl = np.concatenate([hkl, [[0.0, 0.0, 400.0]]])         # beyond the Ewald sphere: never crosses
    phi_ref = np.append(parts["phi_pred"][first], 3.0)
    for g in (gonio, Goniometer(reverse_phi=True)):
        model = refine._Model(crystal, beam, det, g, set(refine.DETECTOR_PARAMS), set(refine.MISSETS), True,
                              {"A", "B", "C"})
        x = model.x0 + 0.2 * model.scale
        k, t = (refine._Predictions(model, hkl, phi_ref, use_cython=c) for c in (True, False))
        assert k.use_cython and not t.use_cython
        for a, b in zip(k(x)[:4] + k.derivatives(x), t(x)[:4] + t.derivatives(x)):
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert np.allclose(a, b, rtol=1e-9, atol=1e-9 * np.nanmax(np.abs(b)), equal_nan=True)
        assert np.array_equal(k(x)[4], t(x)[4]) and not t(x)[4][-1] and t(x)[4].sum() > 100


def test_the_fraction_rows_kernel_is_its_numpy_twin_to_the_bit():
    """ext/_refine.pyx's fraction_rows gives _fraction_rows_numpy's Jacobian rows to the bit (the same
    products, quotients and sums in the same order): reflections of one to four parts in runs and out of
    order, some with none, derivatives of every size and zeros."""
    from pyflm import refine
    if refine._ref_ext is None:
        pytest.skip("the refinement kernel is not built")
    rng = np.random.default_rng(7)
    n_refl, p = 300, 9
    refl = np.repeat(rng.permutation(n_refl)[:200], rng.integers(1, 5, 200))
    refl = np.concatenate([np.sort(refl[:300]), refl[300:]]).astype(np.int64)
    n = len(refl)
    dphi = rng.normal(size=(n_refl, p)) * 10.0 ** rng.integers(-8, 3, (n_refl, p))
    dW = rng.normal(size=(n_refl, p))
    dphi[:, 2] = dW[:, 2] = 0.0                     # a parameter nothing depends on
    d_phi, d_w = rng.normal(size=n), rng.normal(size=n) * 1e-3
    f = rng.uniform(0, 1, n)
    tot = np.maximum(np.bincount(refl, f, minlength=n_refl), 1e-9)
    sig = rng.uniform(0.02, 0.2, n)
    args = (d_phi, d_w, dphi, dW, refl, f, tot, sig)
    a, b = refine._ref_ext.fraction_rows(*args), refine._fraction_rows_numpy(*args)
    assert a.shape == (n, p) and a.tobytes() == b.tobytes()
    assert np.abs(b).max() > 0 and not b[:, 2].any()


def test_cached_predictions_are_calc_to_the_bit(block_problem):
    """_Predictions' numpy twin gives model.calc's numbers for steps of each parameter alone and of all
    together."""
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    model = refine._Model(crystal, beam, det, gonio, set(refine.DETECTOR_PARAMS), set(refine.MISSETS), True,
                          {"A", "B", "C"})
    first = np.unique(parts["refl"], return_index=True)[1]
    hkl = np.stack([parts["h"][first], parts["k"][first], parts["l"][first]], 1).astype(float)
    phi_ref = parts["phi_pred"][first]
    calc = refine._Predictions(model, hkl, phi_ref, use_cython=False)
    rng = np.random.default_rng(1)
    steps = [np.eye(len(model.x0))[i] for i in range(len(model.x0))] + [rng.normal(size=len(model.x0))]
    for x in [model.x0] + [model.x0 + 0.01 * model.scale * s for s in steps] + [model.x0]:
        for a, b in zip(calc(x), model.calc(x, hkl, phi_ref)):
            assert np.array_equal(a, b, equal_nan=True)


def test_the_models_shortcuts_are_unpack_to_the_bit(block_problem):
    """The kernel's path takes the setting matrix, the frame and the mosaic at x without building the
    model's crystal and detector (setting_matrix, frame_at, mosaic_at): the same numbers, to the bit,
    for steps of every parameter, a tilted detector, a swung one and a free cell."""
    import copy
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    rng = np.random.default_rng(2)
    for two_theta, tilt, twist, cell in [(0.0, 0.0, 0.0, set()), (0.0, 0.2, -0.1, set()),
                                         (25.0, 0.1, 0.1, set()), (0.0, 0.1, 0.0, {"A", "C"})]:
        d = copy.copy(det)
        d.two_theta, d.tilt, d.twist = two_theta, tilt, twist
        model = refine._Model(crystal, beam, d, gonio, set(refine.DETECTOR_PARAMS), set(refine.MISSETS), True, cell)
        for x in [model.x0] + [model.x0 + model.scale * rng.normal(size=len(model.x0)) for _ in range(5)]:
            det_x, cr_x = model.unpack(x)
            assert np.array_equal(model.setting_matrix(x), cr_x.A)
            assert model.mosaic_at(x) == cr_x.mosaic
            for a, b in zip(model.frame_at(x), det_x.frame()):
                assert np.array_equal(a, b)
    held = refine._Model(crystal, beam, det, gonio, {"XCEN"}, set(), False, set())
    assert held.mosaic_at(held.x0) == held.unpack_crystal(held.x0).mosaic


def test_pass_1_refines_from_a_bounded_list_of_the_strongest_spots_spread_over_the_detector(block_problem):
    """PROCESS's pass 1 measures at most REFINE_PER_IMAGE reflections an image (measure_parts' limit):
    the strongest by the quick look, from every part of the detector, each with all its parts.  From
    half of them the block refines to what all of them give: beam, distance, missets and mosaic within
    2 esds (the detector's) or the scatter between blocks (missets and mosaic: 0.002 degrees),
    esds at most 1.6 times as large."""
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    from pyflm import images
    read = lambda i: images.read_image(str(SIM / f"sim_{i:04d}.cbf"))[0]
    n_all = len(np.unique(parts["refl"]))
    limit = n_all // 2
    few = refine.measure_parts(crystal, beam, det, gonio, scan, range(1, 6), read, limit=limit)
    # (with a limit only the reflections inside its resolution are predicted, and `refl` numbers those:
    # the list's reflections numbered as in the whole measurement, by their indices and crossing)
    number = {(*hkl, phi): r for *hkl, phi, r in zip(parts["h"], parts["k"], parts["l"], parts["phi_pred"],
                                                      parts["refl"])}
    few["refl"] = [number.get((*hkl, phi), -1) for *hkl, phi in zip(few["h"], few["k"], few["l"], few["phi_pred"])]
    refl = np.unique(few["refl"])
    assert len(refl) == limit
    assert np.all(np.bincount(few["refl"])[few["refl"]] == few["n_parts"])       # every part kept
    assert np.isin(refl, parts["refl"]).all()
    # the strongest: their parts as measured with the others
    isig = lambda p: np.bincount(p["refl"], np.maximum(p["I"], 0))[np.unique(p["refl"])] / \
        np.sqrt(np.bincount(p["refl"], p["sigI"] ** 2)[np.unique(p["refl"])])
    assert np.median(isig(few)) > 1.5 * np.median(isig(parts))
    # spread: the detector's four corner sixteenths (the highest resolution, weaker spots, none of them
    # among the strongest thousand) keep a twentieth of the list, and in it (nearly) every one of their
    # reflections that the whole measurement finds strong
    X, Y = det.size_mm

    def corner(p):
        xs, ys = det.pixel_to_mm(p["fast"], p["slow"])
        return np.unique(p["refl"][(np.abs(xs / X - 0.5) > 0.25) & (np.abs(ys / Y - 0.5) > 0.25)])
    assert len(corner(few)) > limit / 20
    g = refine._reflections(parts, 10.0)
    strong_corner = np.intersect1d(corner(parts), np.unique(parts["refl"])[g["strong"]])
    assert len(strong_corner) > 20 and np.isin(strong_corner, few["refl"]).mean() >= 0.9
    a = refine.refine_parameters(parts, crystal, beam, det, gonio, scan, refine.Options())
    b = refine.refine_parameters(few, crystal, beam, det, gonio, scan, refine.Options())
    ax, bx = refine.direct_beam(a.detector), refine.direct_beam(b.detector)
    for name, va, vb in [("XCEN", ax[0], bx[0]), ("YCEN", ax[1], bx[1]),
                         ("DISTANCE", a.detector.distance, b.detector.distance)]:
        assert abs(vb - va) < 2 * b.esd[name], name
    for name, va, vb in zip(refine.MISSETS + ("MOSAIC",), a.crystal.missets + (a.crystal.mosaic,),
                            b.crystal.missets + (b.crystal.mosaic,)):
        assert abs(vb - va) < max(2 * b.esd[name], 0.002), name
    for name in a.esd:
        assert a.esd[name] <= b.esd[name] < 1.6 * a.esd[name], name


def test_rotate_z_many_is_the_matrices_product_to_the_bit():
    """The refinement turns its reflections with geometry.rotate_z_many: the numbers of rot_z_many's
    matrices applied by einsum, to the bit (a zero's sign aside: angles over several turns, zero components)."""
    from pyflm import geometry
    rng = np.random.default_rng(0)
    phi = np.concatenate([rng.uniform(-400, 400, 20000), [0.0, 90, 180, -90, 270, 360, 45, 1e-300]])
    v = np.concatenate([rng.normal(size=(20000, 3)) * 0.3, rng.normal(size=(8, 3))])
    v[:50, 1], v[50:100, 0], v[100:150, 2] = 0.0, -0.0, 0.0
    for sign in (1, -1):
        ref = np.einsum("nij,nj->ni", geometry.rot_z_many(sign * phi), v)
        assert np.array_equal(geometry.rotate_z_many(sign * phi, v) + 0.0, ref + 0.0)



def test_refinement_measures_only_reflections_recorded_wholly_on_the_block(block_problem):
    """measure_parts leaves out the reflections with a part on another image: refinement could not use
    them (their fractions are not all there).  Every reflection it returns has all its parts; given
    some incomplete ones as well, refinement refines exactly the same."""
    from pyflm import refine
    parts, crystal, beam, det, gonio, scan = block_problem
    count = np.bincount(parts["refl"])
    assert np.all(count[parts["refl"]] == parts["n_parts"]) and set(parts["image"]) == set(range(1, 6))
    # the strongest reflections, made to look as if they had a part on image 6 too
    strong = np.argsort(-parts["I"])[:200]
    extra = parts[np.isin(parts["refl"], parts["refl"][strong])].copy()
    extra["refl"] += parts["refl"].max() + 1
    extra["n_parts"] += 1
    a = refine.refine_parameters(parts, crystal, beam, det, gonio, scan, refine.Options())
    b = refine.refine_parameters(np.concatenate([parts, extra]), crystal, beam, det, gonio, scan,
                                 refine.Options())
    assert a.n_pos == b.n_pos and a.n_frac == b.n_frac and a.crystal.missets == b.crystal.missets
    assert a.detector.distance == b.detector.distance and a.esd == b.esd


def test_the_strong_reflections_grouping_is_that_of_their_parts(block_problem):
    """refine_parameters groups the parts once: the strong reflections' grouping taken from it
    (_kept_reflections) is _reflections of their parts, to the bit, numbering and dtypes included."""
    from pyflm import refine
    parts = block_problem[0]
    g = refine._reflections(parts, 10.0)
    assert 0 < g["strong"].sum() < len(g["W"])
    rows = np.flatnonzero(g["strong"][g["inv"]])
    want, got = refine._reflections(parts.take(rows), 10.0), refine._kept_reflections(g, g["strong"], rows)
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k


def test_pass_1_looks_no_further_out_than_spots_stand_out(block_problem):
    """Pass 1 (measure_parts with a limit) leaves out the reflections past the resolution where the
    block's middle image has no spot standing out (_standing_resolution): every strong reflection of the
    whole detector is inside it, and it is well inside the corners; a blank image sets no limit."""
    from pyflm import geometry, images, predict, refine
    parts, crystal, beam, det, gonio, scan = block_problem
    read = lambda i: images.read_image(str(SIM / f"sim_{i:04d}.cbf"))[0]
    dmin = predict.corner_resolution(det, beam.wavelength)
    pred = predict.predict(crystal, beam, det, gonio, 0.0, 5.0, dmin, mosaic=0.6, margin=2.5)
    d_lim, probe = refine._standing_resolution(pred, range(1, 6), scan, read, det, refine.RASTER)
    assert d_lim is not None and d_lim > 1.1 * dmin
    g = refine._reflections(parts, 10.0)          # every reflection of the block measured, no limit
    d = geometry.d_spacing(crystal.A, np.stack([parts["h"], parts["k"], parts["l"]], 1)[g["first"]])
    assert g["strong"].sum() > 500 and d[g["strong"]].min() > d_lim
    few = refine.measure_parts(crystal, beam, det, gonio, scan, range(1, 6), read, limit=1000)
    assert geometry.d_spacing(crystal.A, np.stack([few["h"], few["k"], few["l"]], 1)).min() >= d_lim
    blank = lambda i: np.zeros((det.n_slow, det.n_fast))
    assert refine._standing_resolution(pred, range(1, 6), scan, blank, det, refine.RASTER)[0] is None


def test_the_quick_look_takes_the_probes_boxes_as_they_were(block_problem, monkeypatch):
    """measure_parts takes the middle image's boxes the probe looked at (_standing_resolution) instead
    of looking again: the same parts, to the bit, as when every box is looked at anew, from fewer looks."""
    from pyflm import images, refine, shoebox
    parts, crystal, beam, det, gonio, scan = block_problem
    read = lambda i: images.read_image(str(SIM / f"sim_{i:04d}.cbf"))[0]
    looked, quick = [], shoebox.quick_sums

    def counting(data, fast, slow, *a, **k):
        looked.append(len(fast))
        return quick(data, fast, slow, *a, **k)
    monkeypatch.setattr(shoebox, "quick_sums", counting)
    reused = refine.measure_parts(crystal, beam, det, gonio, scan, range(1, 6), read, limit=1000)
    n_reused = sum(looked)
    probe = refine._standing_resolution
    monkeypatch.setattr(refine, "_standing_resolution", lambda *a: (probe(*a)[0], None))
    looked.clear()
    anew = refine.measure_parts(crystal, beam, det, gonio, scan, range(1, 6), read, limit=1000)
    assert reused.tobytes() == anew.tobytes()
    assert n_reused < sum(looked) - 200
