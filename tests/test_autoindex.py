"""Autoindexing the simulated sweep: the right lattice, cell and orientation, also from a wrong beam."""
import copy
import json

import numpy as np
import pytest

from conftest import SIM, run_ipmosflm
from pyflm import indexing, lattice, geometry
from pyflm.job import JobState


@pytest.fixture(scope="module")
def sim_spots():
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    s1, models = indexing._spots_for(job, 1, 20)
    s2, _ = indexing._spots_for(job, 45, 20)
    spots = np.concatenate([s1, s2])
    isig = spots["intensity"] / spots["sigma"]
    return spots[(spots["flag"] == 0) & (isig > 20)], models


@pytest.fixture(scope="module")
def truth():
    return json.load(open(SIM / "truth.json"))


def axis_errors(A_fit, A_true):
    """Angle (deg) between each fitted reciprocal axis and the true one (either sign)."""
    out = []
    for i in range(3):
        u, v = A_fit[:, i], A_true[:, i]
        c = abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v)
        out.append(np.degrees(np.arccos(min(c, 1.0))))
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [(0, 0), (0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5),
                                   (1.0, 0), (-1.0, 0), (0, 1.0), (0, -1.0)])
def test_sim_sweep_indexes_to_the_true_cell_and_orientation(sim_spots, truth, shift):
    spots, (beam, det, gonio, scan) = sim_spots
    det = copy.copy(det)
    det.beam_x += shift[0]
    det.beam_y += shift[1]
    # the spots' mm positions do not depend on the beam; their reciprocal vectors do
    res = indexing.index_with_beam_search(spots, beam, det, gonio)
    assert res.chosen.lattice == "oP"
    cell = np.array(res.crystal.cell[:3])
    assert np.all(np.abs(cell / np.array(truth["cell"][:3]) - 1) < 0.003), cell
    A_true = np.array(truth["U_mosflm"]) @ geometry.b_matrix(truth["cell"])
    assert axis_errors(res.crystal.A, A_true).max() < 0.1
    bx, by = truth["mosflm_beam_mm"]
    assert abs(res.beam_x - bx) < 0.1 and abs(res.beam_y - by) < 0.1


def test_solution_n_selects_that_row_of_the_table(sim_spots, truth):
    spots, (beam, det, gonio, scan) = sim_spots
    first = indexing.index_spots(spots, beam, det, gonio, refine_detector=())
    assert first.chosen.lattice == "oP" and len(first.solutions) == 44
    mono = next(s for s in first.solutions if s.lattice == "mP")       # the best monoclinic row
    res = indexing.index_spots(spots, beam, det, gonio, refine_detector=(), solution=mono.number)
    assert res.chosen.number == mono.number and res.chosen.lattice == "mP"
    cell = res.crystal.cell
    assert abs(cell[3] - 90) < 1e-6 and abs(cell[5] - 90) < 1e-6 and abs(cell[4] - 90) < 0.2
    assert np.allclose(sorted(cell[:3]), sorted(truth["cell"][:3]), rtol=0.003)


def test_dps_histogram_kernel_counts_as_its_numpy_twin(sim_spots):
    # the DPS scan's histograms of the spots' projections on every direction: the kernel's counts are
    # numpy's bincount's, at the histogram's edges too, and the scan's scores and lengths the same bits
    from pyflm.indexing import dps_histogram, dps_scan, hemisphere
    spots, (beam, det, gonio, scan) = sim_spots
    rng = np.random.default_rng(5)
    dirs = hemisphere(2.0)
    for r in (rng.normal(size=(1, 3)), rng.normal(size=(700, 3)) * 0.3, rng.uniform(-1, 1, (50, 3))):
        pmax = np.max(np.linalg.norm(r, axis=1)) * 1.001
        proj = r @ dirs.T
        for n_bins in (256, 512, 1000):
            assert np.array_equal(dps_histogram(proj, pmax, n_bins), dps_histogram(proj, pmax, n_bins, False))
        a, b = dps_scan(r, dirs, 120.0), dps_scan(r, dirs, 120.0, use_cython=False)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    edges = np.array([[-1.0, 1.0, 0.0, 0.999999999, -1.0 + 1e-12, 1.0 - 1e-12]])
    for n_bins in (4, 7):
        assert np.array_equal(dps_histogram(edges, 1.0, n_bins), dps_histogram(edges, 1.0, n_bins, False))
    # and on the sweep's own spots, as indexing scans them
    r = indexing.spots_to_reciprocal(spots["x_mm"], spots["y_mm"], spots["phi"], beam.wavelength, det.frame(),
                                     gonio.reverse_phi)
    a, b = dps_scan(r, dirs, 150.0), dps_scan(r, dirs, 150.0, use_cython=False)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_mosaic_estimate_is_near_the_truth(sim_spots, truth):
    from pyflm.matrix import read_matrix
    spots, (beam, det, gonio, scan) = sim_spots
    crystal = read_matrix(str(SIM / "truth.mat"))
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    on1, _ = indexing._spots_for(job, 1, 20)
    eta = indexing.estimate_mosaic(crystal, beam, det, gonio, on1, scan.phi_range(1), 1.27)
    assert abs(eta - truth["mosaic_fwhm_deg"]) < 0.3 * truth["mosaic_fwhm_deg"]


def test_xia2_index_deck_prints_the_lines_xia2_parses(workdir):
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nnewmat xiaindex.mat\n'
            "autoindex dps refine image 1 thresh 20\nautoindex dps refine image 45 thresh 20\n"
            "mosaic estimate 1\ngo\nmosaic estimate 45\ngo\n")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout[-2000:]
    out = r.stdout.splitlines()
    final = [ln for ln in out if "Final cell (after refinement)" in ln][0]
    cell = [float(x) for x in final.split()[-6:]]
    assert abs(cell[0] - 42.3) < 0.13 and abs(cell[2] - 78.6) < 0.24
    assert [ln for ln in out if "Symmetry:" in ln][-1].split(":")[1].split()[0] == "oP"
    beam = [ln for ln in out if "Beam coordinates of" in ln][0].split()[-2:]
    assert abs(float(beam[0]) - 89.66) < 0.1
    refining = [ln for ln in out if "Refining solution #" in ln][0]
    assert refining.split("(number")[1].split(")")[0].strip() == "16"
    # the 44 lattice characters, highest penalty first, the suggested one pre-refined
    head = [i for i, ln in enumerate(out) if ln.startswith(" No PENALTY SDCELL FRACN LATT")][:2]
    rows = [ln.split() for ln in out[head[0] + 1:head[1]] if ln[:5].strip().isdigit()]
    assert [int(r[0]) for r in rows] == list(range(44, 0, -1))
    n = int([ln for ln in out if "Suggested Solution:" in ln][0].split(":")[1].split()[0])
    row = rows[44 - n]
    assert row[2] != "unrefined" and row[4] == "oP" and float(row[2]) < 0.1 and float(row[3]) > 0.8
    assert abs(float(row[5]) - 42.3) < 0.13 and abs(float(row[7]) - 78.6) < 0.24
    mos = [ln for ln in out if "The mosaicity has been estimated as" in ln]
    assert len(mos) == 2 and abs(float(mos[0].split(">")[1].split()[0]) - 0.3) < 0.09
    assert (workdir / "xiaindex.mat").exists()


def test_lattice_characters_of_known_cells():
    cases = {"oP": (42.3, 51.9, 78.6, 90, 90, 90), "cP": (50, 50, 50, 90, 90, 90),
             "hP": (91.4, 91.4, 45.9, 90, 90, 120), "tP": (50, 50, 70, 90, 90, 90),
             "mP": (40, 50, 60, 90, 100, 90), "aP": (40, 50, 60, 80, 95, 101)}
    centred = {"tI": ((60, 60, 100, 90, 90, 90), [[.5, .5, .5], [1, 0, 0], [0, 1, 0]]),
               "oC": ((40, 75, 60, 90, 90, 90), [[.5, .5, 0], [-.5, .5, 0], [0, 0, 1]]),
               "cF": ((100, 100, 100, 90, 90, 90), [[0, .5, .5], [.5, 0, .5], [.5, .5, 0]]),
               "cI": ((70, 70, 70, 90, 90, 90), [[.5, .5, .5], [1, 0, 0], [0, 1, 0]]),
               "hR": ((80, 80, 150, 90, 90, 120), [[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3],
                                                   [-1 / 3, -2 / 3, 1 / 3]])}
    rot = geometry.rot_about([0.3, -0.5, 0.8], 37)
    for lat, cell in list(cases.items()) + [(k, v[0]) for k, v in centred.items()]:
        basis = np.linalg.inv(geometry.b_matrix(cell))
        if lat in centred:
            basis = np.array(centred[lat][1]) @ basis
        red, _ = lattice.reduce_basis(basis @ rot.T)
        sols = lattice.lattice_solutions(red)
        best = lattice.preferred(sols)
        assert best.lattice == lat and best.penalty < 1, (lat, best)
        assert any(s.lattice == "aP" for s in sols)


def test_too_few_spots_is_one_clear_line():
    from pyflm.errors import ProcessingError
    from pyflm.model import Beam, Detector, Goniometer
    from pyflm.spots import empty
    with pytest.raises(ProcessingError, match="too few"):
        indexing.index_spots(empty(5), Beam(1.0), Detector(100, 50, 50, 0.1, 0.1, 1000, 1000), Goniometer())


def _write_like_sim(path, data):
    import fabio
    img = fabio.open(str(SIM / "sim_0001.cbf"))
    img.data = data.astype(np.int32)
    img.write(str(path))


@pytest.mark.parametrize("case", ["blank", "noise", "distance"])
def test_indexing_failures_are_one_clear_line(workdir, case):
    directory = SIM
    extra = ""
    if case in ("blank", "noise"):
        directory = workdir
        rng = np.random.default_rng(3)
        for i in (1, 2):
            data = np.zeros((1043, 981)) if case == "blank" else rng.poisson(4.0, (1043, 981))
            _write_like_sim(workdir / f"sim_{i:04d}.cbf", data)
    else:
        extra = "distance 144\n"                       # 20 % longer than the truth
    deck = (f'template "sim_####.cbf"\ndirectory "{directory}"\n{extra}'
            "autoindex dps refine image 1 thresh 20\nautoindex dps refine image 2 thresh 20\ngo\n")
    if case == "distance":
        deck = deck.replace("image 2 ", "image 45 ")
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith(" Error in AUTOINDEX")]
    assert len(errors) == 1 and "Indexing failed" in errors[0] and "Try" in errors[0]


@pytest.mark.parametrize("case", ["A and beam", "cell, beam and distance", "rocking curves"])
def test_closed_form_jacobian_fits_as_scipys_differences(sim_spots, truth, case):
    """refine_orientation's Jacobian (through each spot's r0 = A.h) ends the fit where scipy's 2-point
    differences do, from a start 0.3 % off in cell, 0.1 degree off in orientation and 0.3 mm in beam."""
    spots, (beam, det, gonio, scan) = sim_spots
    A_true = np.array(truth["U_mosflm"]) @ geometry.b_matrix(truth["cell"])
    r = indexing.spots_to_reciprocal(spots["x_mm"], spots["y_mm"], spots["phi"], beam.wavelength,
                                     det.frame(), gonio.reverse_phi)
    h = r @ np.linalg.inv(A_true).T
    keep = np.all(np.abs(h - np.round(h)) < 0.1, axis=1)
    hkl = np.round(h[keep])
    xyz = (spots["x_mm"][keep], spots["y_mm"][keep], spots["phi"][keep])
    assert len(hkl) > 200
    start_cell = np.array(truth["cell"], float) * [1.003, 0.997, 1.002, 1, 1, 1]
    A0 = geometry.rot_about(np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8]), 0.1) \
        @ np.array(truth["U_mosflm"]) @ geometry.b_matrix(start_cell)
    d0 = copy.copy(det)
    d0.beam_x += 0.3
    d0.beam_y -= 0.2
    kw = dict(reverse=gonio.reverse_phi)
    if case != "A and beam":
        kw.update(cell_params=("oP", start_cell), refine_detector=("distance",))
    if case == "rocking curves":
        kw["rocking"] = indexing.RockingCentroids([0.0, 44.0], [1.0, 45.0], 0.2, beam, gonio.axis)
    fits = [indexing.refine_orientation(A0, hkl, *xyz, beam.wavelength, d0, jacobian=j, **kw)
            for j in ("closed", "2-point")]
    cells = [np.linalg.norm(np.linalg.inv(f.A), axis=1) for f in fits]
    assert np.all(np.abs(cells[0] / np.array(truth["cell"][:3]) - 1) < 0.003)      # a real fit
    assert np.all(np.abs(cells[0] / cells[1] - 1) < 1e-6)
    assert axis_errors(fits[0].A, fits[1].A).max() < 1e-4
    assert abs(fits[0].beam_x - fits[1].beam_x) < 1e-4 and abs(fits[0].beam_y - fits[1].beam_y) < 1e-4
    assert abs(fits[0].detector.distance - fits[1].detector.distance) < 1e-4
    assert fits[0].n_used == fits[1].n_used and abs(fits[0].rms_mm - fits[1].rms_mm) < 1e-6
