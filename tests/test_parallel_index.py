"""Indexing with NPROC 2: the images' spot searches on worker processes give the same spots, log and
cell as one process; the mosaic estimate (one prediction window for every trial spread) gives what
predicting at each spread gives; the basis chosen from all triples of DPS vectors at once is the one
trying each triple in turn chose."""
import copy

import numpy as np

from conftest import SIM, run_ipmosflm
from pyflm import geometry, indexing, predict
from pyflm.job import JobState
from pyflm.matrix import read_matrix
from pyflm.spotfinder import find_spots_in_files

DECK = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nnproc {{n}}\n'
        "autoindex dps refine image 1 thresh 20\nautoindex dps refine image 45 thresh 20\n"
        "mosaic estimate 1\ngo\n")


def test_spots_found_on_two_worker_processes_are_those_found_here():
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    tasks = [indexing._find_kwargs(job, i, keep_weak) for i, keep_weak in ((1, False), (45, True))]
    here = [indexing._spots_for(job, i, 20, keep_weak=k)[0] for i, k in ((1, False), (45, True))]
    there = find_spots_in_files(tasks, nproc=2)
    for a, b in zip(here, there):
        assert len(a) > 100 and a.dtype == b.dtype and np.array_equal(a, b)
    # and with work for this process meanwhile (AUTOINDEX imports its fitting there): its result beside
    lists, meanwhile = find_spots_in_files(tasks, nproc=2, meanwhile=lambda: "imported")
    assert meanwhile == "imported" and all(np.array_equal(a, b) for a, b in zip(here, lists))
    # an image that cannot be read comes back as None (the caller reads it again to say why)
    assert find_spots_in_files([("/nonexistent/x_0001.cbf",) + tasks[0][1:]] * 2, nproc=2) == [None, None]


def test_autoindex_on_two_processes_logs_what_one_process_logs(tmp_path):
    logs = []
    for n in (1, 2):
        d = tmp_path / f"np{n}"
        d.mkdir()
        r = run_ipmosflm(DECK.format(n=n), cwd=d)
        assert r.returncode == 0, r.stdout[-2000:]
        logs.append([ln for ln in r.stdout.splitlines() if "nproc" not in ln.lower()])   # the deck's echo
    assert any("Final cell (after refinement)" in ln for ln in logs[0])
    assert any("The mosaicity has been estimated as" in ln for ln in logs[0])
    assert logs[0] == logs[1]


def _mosaic_by_predicting_each_spread(crystal, beam, det, gonio, spots, phi_range, dmin, grid):
    """The estimate as it was written first: predict.predict at every spread of the grid."""
    from scipy.spatial import cKDTree
    ok = spots[spots["flag"] == 0]
    a, b = phi_range
    tree = cKDTree(np.stack([ok["x_mm"], ok["y_mm"]], 1))
    fracs = []
    for eta in grid:
        c = copy.copy(crystal)
        c.mosaic = float(eta)
        pred = predict.predict(c, beam, det, gonio, a, b, dmin, margin=3.0)
        lo, hi = predict.phi_extent(pred)
        on = (hi > a) & (lo < b)
        dist, j = tree.query(np.stack([pred["x_mm"][on], pred["y_mm"][on]], 1),
                             distance_upper_bound=3 * det.pixel_fast)
        fracs.append(len(np.unique(j[np.isfinite(dist)])) / len(ok))
    fracs = np.array(fracs)
    tol = max(1.0, 0.002 * len(ok)) / len(ok)
    return float(grid[int(np.argmax(fracs >= fracs.max() - tol))])


def test_mosaic_estimate_equals_predicting_at_each_spread():
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    crystal = read_matrix(str(SIM / "truth.mat"))
    for image in (1, 45):
        spots, (beam, det, gonio, scan) = indexing._spots_for(job, image, 20)
        for grid in (np.arange(0.02, 2.01, 0.02), np.arange(0.01, 0.6, 0.01)):
            # a slightly turned crystal too, so the plateau is not reached at once
            for turn in (0.0, 0.15):
                c = copy.copy(crystal)
                c.U = geometry.rot_about(np.array([1.0, 0.0, 0.0]), turn) @ crystal.U
                want = _mosaic_by_predicting_each_spread(c, beam, det, gonio, spots, scan.phi_range(image),
                                                         1.27, grid)
                got = indexing.estimate_mosaic(c, beam, det, gonio, spots, scan.phi_range(image), 1.27, grid)
                assert got == want, (image, turn, got, want)


def test_one_image_searched_in_bands_on_two_processes_gives_the_same_spots():
    import functools
    from scipy import ndimage
    from pyflm import spotfinder
    from pyflm.images import image_path, read_image
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    beam, det, gonio, scan = job.experiment(30)
    path = image_path(job.template, job.directory, 30)
    data = read_image(path)[0]
    read = functools.partial(_data_of, path)
    for kw in (dict(threshold=2.0, min_pix=2), dict(threshold=0.0, min_pix=1)):
        want = spotfinder.find_spots(data, det, image=30, phi=1.0, **kw)
        for n in (2, 3):
            got = spotfinder.find_spots_split(read, det, n, image=30, phi=1.0, **kw)
            assert len(want) > 100 and np.array_equal(want, got), n
    # every band's pixel mask and background are those of the whole image, to the bit
    strong, bg = spotfinder.dispersion_mask(data, (data > det.nullpix) & (data < det.overload), det.gain)
    valid = data > det.nullpix
    strong |= (data >= det.overload) & valid
    closed = ndimage.binary_closing(strong, structure=np.ones((2, 2))) & valid
    for r0, r1 in ((100, 211), (0, 57), (data.shape[0] - 40, data.shape[0])):
        band, idx, vals = spotfinder._band_pixels(read, det, r0, r1, 7, 6.0)
        assert np.array_equal(band, closed[r0:r1]) and np.array_equal(vals, bg[r0:r1].ravel()[idx])
        assert band.any()          # spot pixels in every band: the test is not of empty rows


def _data_of(path):
    from pyflm.images import read_image
    return read_image(path)[0]


def test_sparse_sweep_spots_on_two_processes_are_those_of_one(tmp_path):
    """PROCESS's spot search of a sparse sweep (L-cysteine): image by image on worker processes, and
    one image in bands, the same spot lists as on one process; an unreadable image an empty list."""
    import functools
    import shutil
    from conftest import DATA
    from pyflm import autoparams
    from pyflm.integrate import read_image_data
    lcys = DATA / "real-lcys-pilatus2m"
    for i in range(1, 5):
        shutil.copy(lcys / f"l-cyst_01_{i:05d}.cbf.gz", tmp_path)
    (tmp_path / "l-cyst_01_00005.cbf").write_bytes(b"not an image")   # beside .gz ones: read first
    job = JobState()
    job.template, job.directory = "l-cyst_01_#####.cbf", str(tmp_path)
    beam, det, gonio, scan = job.experiment(1)
    read = functools.partial(read_image_data, job.template, job.directory, None)
    one = autoparams.find_sweep_spots(read, det, scan, range(1, 6))
    two = autoparams.find_sweep_spots(read, det, scan, range(1, 6), nproc=2)
    assert [len(s) for s in one[:4]] == [len(s) for s in two[:4]] and min(len(s) for s in one[:4]) > 10
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and len(two[4]) == 0
    for img in (3, 5, 4):       # the workers kept for later searches still serve after a bad image
        assert np.array_equal(autoparams.find_sweep_spots(read, det, scan, [img], nproc=2)[0], one[img - 1])


def test_on_a_dask_cluster_the_searches_give_the_same_spots():
    import functools
    import pytest
    distributed = pytest.importorskip("distributed")
    from pyflm import spotfinder
    from pyflm.images import image_path
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    tasks = [indexing._find_kwargs(job, i, False) for i in (1, 45)]
    here = find_spots_in_files(tasks)
    det = tasks[0][1]
    read = functools.partial(_data_of, image_path(job.template, job.directory, 30))
    want = spotfinder.find_spots(read(), det, image=30, phi=1.0, threshold=2.0, min_pix=2)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as c:
        there = find_spots_in_files(tasks, scheduler=c.scheduler_address)
        split = spotfinder.find_spots_split(read, det, 2, c.scheduler_address, image=30, phi=1.0,
                                            threshold=2.0, min_pix=2)
    assert all(np.array_equal(a, b) for a, b in zip(here, there))
    assert np.array_equal(want, split)


def _basis_trying_each_triple(r, cands, hkldev=0.15):
    """choose_basis as it was written first: one triple at a time."""
    vecs, trials = [c[0] for c in cands], []
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            for k in range(j + 1, len(vecs)):
                B = np.array([vecs[i], vecs[j], vecs[k]])
                vol = abs(np.linalg.det(B))
                if vol < 0.1 * np.prod(np.linalg.norm(B, axis=1)):
                    continue
                p = r @ B.T
                trials.append((float(np.mean(np.all(np.abs(p - np.round(p)) < hkldev, axis=1))), vol, B))
    best = max(t[0] for t in trials)
    tol = max(0.034, 2.0 / max(len(r), 1))
    frac, vol, B = min((t for t in trials if t[0] >= best - tol), key=lambda t: (t[1], -t[0]))
    return B, frac


def test_basis_of_all_triples_at_once_is_the_one_of_each_in_turn():
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    (s1, (beam, det, gonio, scan)), (s2, _) = (indexing._spots_for(job, i, 20) for i in (1, 45))
    spots = np.concatenate([s1, s2])
    ok = spots[(spots["flag"] == 0) & (spots["intensity"] > 20 * spots["sigma"])]
    for shift in (0.0, 0.5, 1.0, -1.0, 2.0):       # a wrong beam centre: fewer spots indexed, other triples
        r = indexing.spots_to_reciprocal(ok["x_mm"], ok["y_mm"] + shift, ok["phi"], beam.wavelength,
                                         det.frame(), gonio.reverse_phi)
        cands = indexing.candidate_vectors(r, 150.0)
        for hkldev in (0.15, 0.3):
            want, wf = _basis_trying_each_triple(r, cands, hkldev)
            got, gf = indexing.choose_basis(r, cands, hkldev)
            assert np.array_equal(want, got) and wf == gf, (shift, hkldev)


def _dispersion_as_written_first(data, valid, gain, kernel=7, sigma_b=6.0, sigma_s=3.0, min_count=2):
    from scipy import ndimage
    d = np.where(valid, data, 0).astype(np.float64)
    k2 = kernel * kernel
    n = ndimage.uniform_filter(valid.astype(np.float64), kernel, mode="constant") * k2
    s1 = ndimage.uniform_filter(d, kernel, mode="constant") * k2
    s2 = ndimage.uniform_filter(d * d, kernel, mode="constant") * k2
    bgmean = s1 / np.maximum(n, 1)
    bgmean[n <= 1] = 0.0
    cand = bgmean + sigma_s * np.sqrt(np.maximum(bgmean * gain, 1e-9))
    ii = np.flatnonzero((d > cand) & valid & (d >= min_count) & (n >= k2 // 2) & (bgmean > 0))
    nn, a, b, mean = n.flat[ii], s1.flat[ii], s2.flat[ii], bgmean.flat[ii]
    var = (b - a * a / nn) / (nn - 1)
    strong = np.zeros(d.shape, bool)
    strong.flat[ii[var > (1.0 + sigma_b * np.sqrt(2.0 / (nn - 1))) * mean * gain]] = True
    return strong, bgmean


def test_dispersion_mask_in_place_is_the_mask_as_first_written():
    from pyflm import spotfinder
    from pyflm.images import read_image
    data = read_image(SIM / "sim_0030.cbf")[0]
    valid = data > -1
    valid[:40, :60] = False                      # a masked corner: windows partly valid
    for gain in (1.0, 1.7):
        want = _dispersion_as_written_first(data, valid, gain)
        got = spotfinder.dispersion_mask(data, valid, gain)
        assert want[0].sum() > 1000 and np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])


def test_an_image_searched_band_by_band_gives_the_spots_of_the_whole(monkeypatch):
    """Large images are searched in bands of rows (their arrays are then reused, not mapped afresh):
    the sim image in bands of 60 rows (and a last one of a few rows) gives the whole image's spots."""
    from pyflm import spotfinder
    from pyflm.images import read_image
    job = JobState()
    job.template, job.directory = "sim_####.cbf", str(SIM)
    beam, det, gonio, scan = job.experiment(30)
    data = read_image(SIM / "sim_0030.cbf")[0]
    monkeypatch.setattr(spotfinder, "BAND_PIXELS", data.size * 10)
    whole = [spotfinder.find_spots(data, det, threshold=t, min_pix=m) for t, m in ((2.0, 2), (0.0, 1))]
    monkeypatch.setattr(spotfinder, "BAND_PIXELS", 60 * data.shape[1])
    assert data.shape[0] % 60 not in (0, 1)
    for (t, m), want in zip(((2.0, 2), (0.0, 1)), whole):
        got = spotfinder.find_spots(data, det, threshold=t, min_pix=m)
        assert len(want) > 100 and np.array_equal(want, got)


def test_closing_by_shifts_is_scipys_binary_closing():
    from scipy import ndimage
    from pyflm.spotfinder import close_2x2
    rng = np.random.default_rng(7)
    for shape in ((1, 1), (1, 9), (9, 1), (2, 2), (5, 7), (40, 33), (301, 257)):
        for p in (0.0, 0.05, 0.3, 0.6, 0.9, 1.0):
            x = rng.random(shape) < p
            assert np.array_equal(close_2x2(x), ndimage.binary_closing(x, structure=np.ones((2, 2)))), (shape, p)


def test_process_probes_searched_during_indexing_are_the_ones_process_would_search(tmp_path, monkeypatch):
    """NPROC 2: while indexing keeps the main process busy, the workers search the probe image of each
    PROCESS the deck has still to run; PROCESS takes it rather than searching again.  What the probe
    decides with (spots not too small, their positions) is the pixels', so the probe searched before
    refinement moved the detector is the one PROCESS would find with the refined detector."""
    from pyflm import autoparams
    from pyflm.cli import run_batch
    from pyflm.integrate import job_image_reader
    calls = []
    real = autoparams._search_image
    monkeypatch.setattr(autoparams, "_search_image", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    monkeypatch.chdir(tmp_path)
    job = JobState()
    job.files["HKLOUT"] = "p.mtz"
    deck = DECK.format(n=2).replace("mosaic estimate 1\n", "") + "symmetry P212121\nprocess 1 4\ngo\n"
    assert run_batch(deck.splitlines(), job) == 0
    assert calls == []                                   # PROCESS did not search its probe image itself
    beam, det, gonio, scan = job.experiment(2)
    assert "DISTANCE" in job.kw and "BEAM" in job.kw     # indexing moved the detector after the probe
    reader = job_image_reader(job)
    early = autoparams.take_early_probe(job, reader, det, 2)
    here = autoparams._probe_view(real(reader, det, scan, 2, probe=True))
    assert len(here) > 100 and np.array_equal(early, here)
    assert autoparams.take_early_probe(job, reader, det, 3) is None      # not a probe PROCESS asked for
