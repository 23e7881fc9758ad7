"""Integration quality: the whole job in one deck on the simulated sweep, scored against its truth and
against what DIALS 3.12 reaches on the same images (../shared/data/README.md); the measurement kernels
on synthetic spots; shadows of the beamstop and its arm kept out of the MTZ."""
import json
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from conftest import SHARED, SIM, run_ipmosflm
from pyflm import shoebox

ONE_DECK = f"""template "sim_####.cbf"
directory "{SIM}"
autoindex dps refine image 1 thresh 20
autoindex dps refine image 45 thresh 20
mosaic estimate 1
go
symmetry P212121
postref multi segments 2
process 1 3
go
process 58 60
go
postref nosegment
process 1 60
go
"""

# DIALS 3.12 on the same 60 images, profile-fitted, per shell of equal reciprocal volume (README)
DIALS_CC_TRUTH = [0.9999, 0.9998, 0.9990, 0.9968, 0.9909, 0.9563, 0.8595, 0.5794, 0.2973, 0.1631]
DIALS_CC_HALF = [0.9999, 0.9995, 0.9972, 0.9899, 0.9715, 0.8999, 0.6723, 0.3330, 0.1539, 0.4518]
DIALS_COMPLETENESS = 0.647
# single_observation_cc of DIALS's MTZ of that run (README's pipeline, rerun: its score table is the
# README's to the digit)
DIALS_CC_SINGLE = [0.9999, 0.9996, 0.9981, 0.9936, 0.9827, 0.9333, 0.8166, 0.5408, 0.2905, 0.1747]


def score(mtz, *extra):
    r = subprocess.run([sys.executable, str(SHARED / "tools" / "score_mtz.py"), str(mtz), str(SIM),
                        "--json", *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def single_observation_cc(mtz):
    """Per shell of score_mtz.py (the same observations, joined partials and shells), the Pearson CC of
    single observations with the truth: what one measurement is worth, free of the luck of which
    observations a half-split pairs (score_mtz's cc_half in a shell of ~300 pairs has a spread of 0.08)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("score_mtz", SHARED / "tools" / "score_mtz.py")
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    truth, t_sg, t_cell, t_hkl, t_I, t_d = sm.load_truth(str(SIM))
    m, hkl, I, _, _ = sm.read_observations(str(mtz), "IPR", False)
    hkl = hkl[:, sm.matching_permutation(m.cell.parameters, t_cell.parameters)]
    t_index = {int(k): i for i, k in enumerate(sm.encode(t_hkl))}
    idx = np.array([t_index.get(int(k), -1) for k in sm.encode(sm.asu_keys(hkl, t_sg))])
    I, idx = I[idx >= 0], idx[idx >= 0]
    d = t_d[idx]
    dmin = max(d.min(), truth.get("max_resolution_A", 0))
    in_t = (t_d >= dmin) & (t_d <= 10.0)
    edges = np.linspace(1.0 / min(10.0, t_d[in_t].max()) ** 3, 1.0 / dmin ** 3, 11)
    s3 = 1.0 / d ** 3
    inside = (d >= dmin) & (d <= 10.0)
    return [float(np.corrcoef(I[sel], t_I[idx][sel])[0, 1]) for sel in
            (inside & (s3 >= a) & (s3 <= b) for a, b in zip(edges[:-1], edges[1:]))]


@pytest.fixture(scope="module")
def one_deck_job(tmp_path_factory):
    wd = tmp_path_factory.mktemp("onedeck")
    r = run_ipmosflm(ONE_DECK, "HKLOUT", "all.mtz", "SUMMARY", "all.sum", cwd=wd)
    assert r.returncode == 0, r.stdout[-3000:]
    return wd, r


@pytest.mark.slow
def test_one_deck_from_autoindexing_to_mtz_scores_against_truth_and_dials(one_deck_job):
    wd, r = one_deck_job
    assert "WRITTEN OUTPUT MTZ FILE" in r.stdout
    s = score(wd / "all.mtz", "--dmax", "10")
    shells, overall = s["shells"], s["overall"]
    table = "\n".join(f"{x['d_min']:.2f} cc_truth {x['cc_truth']:.4f} cc_half {x['cc_half']:.4f} "
                      f"z_sd {x['z_sd']:.2f}" for x in shells)
    # sigmas: counting statistics plus a 1 % error-model term are honest in every shell
    for x in shells:
        assert 0.8 <= x["z_sd"] <= 1.5, table
    assert 0.8 <= overall["z_sd"] <= 1.5, table
    assert overall["completeness"] >= DIALS_COMPLETENESS, overall
    assert round(overall["cc_truth"], 4) >= 0.9999 and round(overall["cc_half"], 4) >= 0.9999, overall
    # DIALS's figures are given to 4 decimals: compare at that precision.  Reached: both figures in
    # shells 1-8 (10-1.37 A), cc_truth in 9 and 10.  Not reached: cc_half in shells 9 and 10.  Over
    # 500 random half-splits of the observations (score_mtz's split with seeds 0-499) shell 9's
    # cc_half is 0.077 +- 0.048 here and 0.156 +- 0.049 for DIALS (the score split: 0.10 and 0.154),
    # shell 10 0.35 +- 0.16 and 0.21 +- 0.14, shell 8 0.367 +- 0.034 and 0.342 +- 0.032: shell 9's gap is
    # not the split's luck.  Nor is it accuracy: a single observation there correlates with the truth
    # as well here as in DIALS (0.295 and 0.291; below), but the errors (I - k.I_true) of DIALS's two
    # observations of a reflection correlate, +0.058 at 1.37-1.32 A (here -0.016), and cc_half counts
    # an error both halves share as agreement; on the 289 pairs both programs measure there the
    # difference is +0.067 +- 0.036 (bootstrap), in shells 6-8 it is 0.02 or less.  On the reflections
    # both measure, DIALS's fulls (one image) at 1.43-1.37 A are still better (0.61 vs 0.58).
    for i in range(8):
        assert round(shells[i]["cc_truth"], 4) >= DIALS_CC_TRUTH[i], table
        assert round(shells[i]["cc_half"], 4) >= DIALS_CC_HALF[i], table
    for i in (8, 9):
        assert round(shells[i]["cc_truth"], 4) >= DIALS_CC_TRUTH[i], table
    single = single_observation_cc(wd / "all.mtz")
    for i in range(10):
        assert round(single[i], 4) >= DIALS_CC_SINGLE[i], (single, DIALS_CC_SINGLE)


def _records_against_truth(mtz):
    """Each record of an MTZ with the truth of its part (predictions.csv: the counts I_true.L.P.scale
    times the fraction recorded on its image), matched by image and position (within 2 pixels)."""
    import csv
    from scipy.spatial import cKDTree
    scale = json.loads((SIM / "truth.json").read_text())["mean_counts_at_4A"] / 1000.0
    rows = []
    with open(SIM / "predictions.csv") as fh:
        for x in csv.DictReader(fh):
            if x["flags"]:
                continue
            fr = x["fractions"].split(";")
            full = float(x["I_true"]) * float(x["lorentz"]) * float(x["polarisation"]) * scale
            for j, f in enumerate(fr[1:]):
                if float(f) > 0:
                    rows.append((float(x["x_px"]), float(x["y_px"]), int(fr[0]) + j, float(x["d"]), full * float(f)))
    t = np.array(rows)
    m = gemmi.read_mtz_file(str(mtz))
    lab = [c.label for c in m.columns]
    a = np.array(m, copy=False)
    col = lambda n: a[:, lab.index(n)]
    # YDET is fast, XDET slow (pixels); images 1000 apart so only the same image's parts are near
    dist, idx = cKDTree(np.c_[t[:, 0], t[:, 1], t[:, 2] * 1000.0]).query(
        np.c_[col("YDET"), col("XDET"), col("BATCH") * 1000.0], distance_upper_bound=2.0)
    ok = np.isfinite(dist) & (col("FLAG") == 0)
    lp = col("LP")[ok]          # LP holds 1/(L.P): a record's I times L.P is its counts on the image
    return {"d": t[idx[ok], 3], "true": t[idx[ok], 4], "sum": col("I")[ok] / lp, "fit": col("IPR")[ok] / lp}


@pytest.mark.slow
def test_one_deck_weak_far_spots_profile_fitted_as_summed_against_the_truth(one_deck_job):
    # at 1.51-1.40 A no spot is strong enough to build a profile from; those regions' profiles are the
    # inner ones widened by the width model (block_profiles' spread).  Against the truth, per record,
    # the profile-fitted counts respond as the summation ones do (slope of a fit with intercept, which
    # takes out the background's small additive bias).  With the next region in's narrower profile the
    # slopes were 0.906 and 0.865 of summation's; now 1.016 and 0.991
    wd, _ = one_deck_job
    r = _records_against_truth(wd / "all.mtz")
    assert len(r["d"]) > 100000
    for lo, hi in ((1.45, 1.51), (1.40, 1.45)):
        s = (r["d"] > lo) & (r["d"] <= hi)
        A = np.c_[np.ones(s.sum()), r["true"][s]]
        k_fit = np.linalg.lstsq(A, r["fit"][s], rcond=None)[0][1]
        k_sum = np.linalg.lstsq(A, r["sum"][s], rcond=None)[0][1]
        assert abs(k_fit / k_sum - 1) < 0.05, (lo, hi, k_fit, k_sum)


@pytest.mark.slow
def test_one_deck_mtz_reads_as_unmerged_data(one_deck_job):
    wd, _ = one_deck_job
    m = gemmi.read_mtz_file(str(wd / "all.mtz"))
    lab = [c.label for c in m.columns]
    assert "M/ISYM" in lab and len(m.batches) == 60
    assert m.switch_to_original_hkl()
    a = np.array(m, copy=False)
    batch = a[:, lab.index("BATCH")]
    assert set(np.unique(batch).astype(int)) == set(range(1, 61))
    # no record's 7 x 7 peak touches the shadow of the beamstop's arm (towards the top of the image from
    # the beam at fast 492.6, slow 521.3 pixels; 1.4 mm = 8 pixels wide) or of its 2.2 mm disc: nothing
    # in the deck says where they are (before the shadow was found from the images, 213 records there
    # were written, some with 40 % of their intensity)
    fast, slow = a[:, lab.index("YDET")], a[:, lab.index("XDET")]
    arm = (np.abs(fast - 492.6) < 4 + 3.5) & (slow < 521.3 - 14)
    disc = np.hypot(fast - 492.6, slow - 521.3) < 2.2 / 0.172 + 3.5
    assert not np.any(arm | disc), (int(arm.sum()), int(disc.sum()))
    # reciprocalspaceship (in the test extras) reads it as unmerged data too
    import reciprocalspaceship as rs
    ds = rs.read_mtz(str(wd / "all.mtz"))
    assert ds.merged is False and len(ds) == m.nreflections
    assert set(ds["BATCH"].unique()) == set(range(1, 61))


def gaussian_spots(rng, n, shape, sigma, intensities, background):
    """An image of Gaussian spots (integrated over pixels) at random sub-pixel positions, Poisson noise."""
    from scipy.special import erf
    ns, nf = shape
    # on a 25-pixel grid (no overlaps), each at a random sub-pixel offset
    gs, gf = np.meshgrid(np.arange(20, ns - 20, 25), np.arange(20, nf - 20, 25), indexing="ij")
    slow = gs.ravel()[:n] + rng.uniform(0, 1, n)
    fast = gf.ravel()[:n] + rng.uniform(0, 1, n)
    img = np.full(shape, float(background))
    cdf = lambda x, c: 0.5 * (1 + erf((x - c) / (np.sqrt(2) * sigma)))
    for s, f, I in zip(slow, fast, intensities):
        i0, j0 = int(s) - 6, int(f) - 6
        ys = np.arange(i0, i0 + 13)
        xs = np.arange(j0, j0 + 13)
        ps = cdf(ys + 1, s) - cdf(ys, s)
        pf = cdf(xs + 1, f) - cdf(xs, f)
        img[i0:i0 + 13, j0:j0 + 13] += I * ps[:, None] * pf[None, :]
    return rng.poisson(img).astype(float), fast, slow


def test_profile_fitting_is_unbiased_for_weak_and_strong_spots_at_any_subpixel_position():
    # spots 1.2 pixels wide (sigma) at random sub-pixel offsets: profiles formed from the strong ones
    # and read off at each spot's own offset give weak and strong intensities without bias (shifting
    # whole-pixel profiles by interpolation blurred them and biased weak spots by +3 %)
    rng = np.random.default_rng(5)
    n = 1600
    I_true = np.where(np.arange(n) % 4 == 0, 20000.0, 300.0)
    img, fast, slow = gaussian_spots(rng, n, (1300, 1300), 1.2, I_true, 5.0)
    res, _ = shoebox.integrate_image(img, fast, slow, raster=(15, 15, 3, 4, 4))
    ok = res["flag"] == 0
    strong, weak = ok & (I_true > 1000), ok & (I_true < 1000)
    assert strong.sum() > 300 and weak.sum() > 900
    # what the 7 x 7 peak holds of a strong spot is what summation measures; the profile-fitted value
    # must be the same fraction of the intensity for weak spots as for strong ones (no bias with I)
    k = np.median(res["IPR"][strong] / I_true[strong])
    assert abs(np.median(res["IPR"][strong] / res["I"][strong]) - 1) < 0.003
    # (weights that depend on the fitted intensity leave about +1 % on spots of I/sigma 4)
    ratio = res["IPR"][weak] / (k * I_true[weak])
    assert abs(ratio.mean() - 1) < 0.02, ratio.mean()
    for sel in (strong, weak):
        z = (res["IPR"][sel] - k * I_true[sel]) / res["SIGIPR"][sel]
        assert 0.85 < z.std() < 1.2, z.std()
    # profile fitting beats summation on weak spots: that is what it is for
    zs = res["I"][weak] - I_true[weak]
    zp = res["IPR"][weak] - I_true[weak]
    assert zp.std() < 0.9 * zs.std()


def test_background_from_the_neighbouring_images_makes_weak_spots_less_noisy_and_no_worse_elsewhere():
    # the same weak spots (one image) over a flat background of 2 counts, with the images either side
    # given for the background: the planes come from three times the pixels, so profile-fitted
    # intensities scatter less about the truth, without bias; a bright spot on a neighbouring image,
    # in a rim, is kept out by bg_exclude
    rng = np.random.default_rng(11)
    n = 1600
    I_true = np.where(np.arange(n) % 4 == 0, 20000.0, 60.0)
    img, fast, slow = gaussian_spots(rng, n, (1300, 1300), 1.2, I_true, 2.0)
    side = [rng.poisson(np.full(img.shape, 2.0)).astype(float) for _ in range(2)]
    side[0][np.floor(slow[1::4]).astype(int) - 6, np.floor(fast[1::4]).astype(int)] += 400
    raster = (15, 15, 3, 4, 4)
    _, prof = shoebox.integrate_image(img, fast, slow, raster=raster)
    one, _ = shoebox.integrate_image(img, fast, slow, raster=raster, profiles=prof)
    spot = np.zeros(img.shape, bool)
    spot[np.floor(slow[1::4]).astype(int) - 6, np.floor(fast[1::4]).astype(int)] = True
    three, _ = shoebox.integrate_image(img, fast, slow, raster=raster, profiles=prof, bg_images=side,
                                       bg_exclude=spot)
    weak = (I_true < 1000) & (one["flag"] == 0) & (three["flag"] == 0)
    strong = (I_true > 1000) & (one["flag"] == 0) & (three["flag"] == 0)
    assert weak.sum() > 1000
    k = np.median(one["IPR"][strong] / I_true[strong])
    e1 = one["IPR"][weak] - k * I_true[weak]
    e3 = three["IPR"][weak] - k * I_true[weak]
    assert e3.std() < 0.98 * e1.std(), (e3.std(), e1.std())          # 11.1 -> 10.7 counts
    s1, s3 = one["I"][weak] - k * I_true[weak], three["I"][weak] - k * I_true[weak]
    assert s3.std() < 0.95 * s1.std(), (s3.std(), s1.std())          # summation: 14.4 -> 13.3
    assert abs(e3.mean()) < 0.02 * k * 60 + 3 * e3.std() / np.sqrt(weak.sum())
    assert np.median(three["IPR"][strong] / one["IPR"][strong]) == pytest.approx(1, abs=0.002)
    for r in (one, three):
        assert 0.85 < ((r["IPR"][weak] - k * I_true[weak]) / r["SIGIPR"][weak]).std() < 1.2
        assert 0.85 < ((r["I"][weak] - k * I_true[weak]) / r["SIGI"][weak]).std() < 1.2


def test_shadow_mask_finds_a_beamstop_and_its_arm_and_nothing_else():
    rng = np.random.default_rng(3)
    shape = (400, 380)
    stack = []
    for k in range(5):
        level = 4.0 + 2.0 * np.linspace(0, 1, shape[1])[None, :] * np.ones((shape[0], 1))
        level[:, 100:104] = -1 if k == 0 else level[:, 100:104]    # a module gap is not a shadow
        shadow = np.zeros(shape, bool)
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        shadow |= np.hypot(yy - 200, xx - 190) < 12
        shadow |= (np.abs(xx - 190) < 4) & (yy < 200)
        lam = np.where(shadow, 0.02 * level, level)
        img = rng.poisson(np.maximum(lam, 0)).astype(float)
        img[:, 100:104] = -1
        # a bright spot crossing the arm on one image must not open a hole in the mask
        if k == 2:
            img[95:100, 186:194] += 500
        stack.append(img)
    mask = shoebox.shadow_mask(stack, nullpix=-1)
    truth = (np.hypot(yy - 200, xx - 190) < 12) | ((np.abs(xx - 190) < 4) & (yy < 200))
    assert mask[truth].mean() > 0.99
    grown = np.zeros_like(truth)
    from scipy import ndimage
    grown = ndimage.binary_dilation(truth, iterations=4)
    assert mask[~grown].sum() == 0


def test_backstop_keyword_keeps_reflections_in_its_shadow_out_of_the_mtz(workdir):
    # a BACKSTOP disc of 15 mm about the beam (MOSFLM X, Y = slow, fast in mm): nothing whose predicted
    # position lies inside it is written; without it the same images give records there
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.30\n'
            f"symmetry 19\n{{backstop}}process 1 2\ngo\n")
    centre = (521.3 * 0.172, 492.6 * 0.172)
    inside = {}
    with_line = f"backstop centre {centre[0]:.3f} {centre[1]:.3f} radius 15\n"
    for name, line in (("without", ""), ("with", with_line)):
        r = run_ipmosflm(deck.format(backstop=line), "HKLOUT", f"{name}.mtz", cwd=workdir)
        assert r.returncode == 0, r.stdout[-2000:]
        m = gemmi.read_mtz_file(str(workdir / f"{name}.mtz"))
        lab = [c.label for c in m.columns]
        a = np.array(m, copy=False)
        x_mm, y_mm = a[:, lab.index("XDET")] * 0.172, a[:, lab.index("YDET")] * 0.172
        inside[name] = int(np.sum(np.hypot(x_mm - centre[0], y_mm - centre[1]) < 15.0 - 0.2))
    assert inside["without"] > 20 and inside["with"] == 0, inside


def test_weak_partials_combined_over_their_images_are_unbiased():
    # weak reflections (I/sigma ~0.5-3) split over two images with fractions f and 1-f, each part fitted
    # with the true profile over a known background: the joint estimate is unbiased and less noisy than
    # the plain sum of the parts.  (Weights from each part's own fitted variance, which grows with the
    # intensity fitted, gave a part fitted high by noise less weight: 12 % low at 5 counts.)
    from pyflm.integrate import RECORD_DTYPE, combine_weak_partials
    rng = np.random.default_rng(2)
    raster = (17, 17, 4, 5, 5)
    pk, _ = shoebox.box_masks(raster)
    yy, xx = np.mgrid[:17, :17] - 8
    P = np.exp(-0.5 * (xx ** 2 + yy ** 2) / 1.2 ** 2)
    P = np.where(pk, P / P[pk].sum(), 0.0)
    n, bg = 6000, 2.0
    for I0 in (5.0, 15.0):
        f = rng.uniform(0.2, 0.8, n)
        rec = np.zeros(2 * n, RECORD_DTYPE)
        rec["h"], rec["k"], rec["l"] = np.tile(np.arange(n) % 100, 2), np.tile(np.arange(n) // 100, 2), 1
        rec["batch"], rec["fractioncalc"], rec["lp"] = np.repeat([1, 2], n), np.r_[f, 1 - f], 1.0
        fits = []
        for fr in (f, 1 - f):
            boxes = rng.poisson(bg + (I0 * fr)[:, None, None] * P).astype(float)
            plane = np.full_like(boxes, bg)
            start = np.where(pk, boxes - bg, 0).sum((1, 2))
            fits.append(shoebox.fit_profiles(boxes, plane, np.broadcast_to(P, boxes.shape), pk,
                                             np.ones(boxes.shape, bool), start))
        rec["ipr"], rec["sigipr"] = np.r_[fits[0][0], fits[1][0]], np.r_[fits[0][1], fits[1][1]]
        plain = rec["ipr"][:n] + rec["ipr"][n:]
        combine_weak_partials(rec)
        joint = rec["ipr"][:n] + rec["ipr"][n:]
        sig = np.hypot(rec["sigipr"][:n], rec["sigipr"][n:])
        assert abs(joint.mean() / I0 - 1) < 0.03, (I0, joint.mean() / I0)
        assert joint.std() < 0.985 * plain.std(), (joint.std(), plain.std())
        assert 0.9 < ((joint - I0) / sig).std() < 1.1


def test_a_dim_image_does_not_lend_its_background_to_its_neighbours(tmp_path):
    # images 1-5 of the sweep, image 3 recorded at a third of the dose (a shutter fault): the
    # backgrounds of images 2 and 4 come from their own pixels and the other neighbour's, so their
    # intensities are what they are in the sweep as recorded (taking image 3's rims into the planes
    # would have lowered them by a quarter and raised every summation intensity by ~30 counts)
    import shutil
    import fabio
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(1, 6):
        shutil.copy(SIM / f"sim_{i:04d}.cbf", d / f"sim_{i:04d}.cbf")
    img = fabio.open(str(SIM / "sim_0003.cbf"))
    img.data = np.where(img.data >= 0, np.random.default_rng(1).binomial(np.maximum(img.data, 0), 1 / 3),
                        img.data).astype(np.int32)
    img.write(str(d / "sim_0003.cbf"))
    out = {}
    for name, where in (("as recorded", SIM), ("dim 3", d)):
        deck = (f'template "sim_####.cbf"\ndirectory "{where}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
                "symmetry 19\nprocess 1 5\ngo\n")
        r = run_ipmosflm(deck, "HKLOUT", f"{name[:3]}.mtz", cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:]
        m = gemmi.read_mtz_file(str(tmp_path / f"{name[:3]}.mtz"))
        lab = [c.label for c in m.columns]
        a = np.array(m, copy=False)
        keep = np.isin(a[:, lab.index("BATCH")], (2, 4))
        out[name] = {tuple(row[[0, 1, 2, lab.index("M/ISYM"), lab.index("BATCH")]]): row[lab.index("I")] / row[lab.index("LP")]
                     for row in a[keep]}
    common = sorted(set(out["as recorded"]) & set(out["dim 3"]))
    assert len(common) > 500
    diff = np.array([out["dim 3"][k] - out["as recorded"][k] for k in common])
    assert abs(np.median(diff)) < 1.0, np.median(diff)


def test_spots_wider_than_any_strong_spot_are_fitted_with_a_widened_profile_without_bias():
    # spots widen towards the detector's corners, where none is strong: regions 0 and 1 (sigma 1.0 and
    # 1.25 pixels) have strong spots, region 2 (sigma 1.5) only weak ones of 300 counts.  With each
    # region's spread (var = 0.5 + 1e-5 x spread: the sim sweep's point spread plus mosaic spread) its
    # profile is region 1's widened to the width the other two regions imply, and its weak spots are
    # fitted without bias; given region 1's profile as it is they come out several % low
    rng = np.random.default_rng(8)
    raster = (17, 17, 4, 5, 5)
    n = 400
    acc, images = None, []
    for reg, sigma in enumerate((1.0, 1.25, 1.5)):
        I_true = np.where(np.arange(n) % 4 == 0, 20000.0, 300.0)
        img, fast, slow = gaussian_spots(rng, n, (520, 520), sigma, I_true, 5.0)
        regions = np.full(n, reg)
        strong_ok = np.full(n, reg < 2)          # region 2's strong spots only tell the fraction measured
        s = shoebox.profile_sums(img, fast, slow, raster=raster, regions=regions, n_regions=3,
                                 strong_mask=strong_ok)
        acc = s if acc is None else tuple(a + b for a, b in zip(acc, s))
        images.append((img, fast, slow, I_true, regions))
    assert acc[2][2] == 0 and min(acc[2][:2]) >= 10
    spread = (np.array([1.0, 1.25, 1.5]) ** 2 - 0.5) / 1e-5
    widened = shoebox.block_profiles(*acc, raster, spread=spread)
    assert shoebox.profile_variance(widened["fine"][2], raster) == pytest.approx(1.5 ** 2, rel=0.06)
    pooled = shoebox.block_profiles(*acc, raster)        # the region next in (1) lends its profile
    img, fast, slow, I_true, regions = images[2]
    ratios = {}
    for name, prof in (("widened", widened), ("pooled", pooled)):
        res, _ = shoebox.integrate_image(img, fast, slow, raster=raster, profiles=prof, regions=regions)
        ok = res["flag"] == 0
        strong, weak = ok & (I_true > 1000), ok & (I_true < 1000)
        k = np.median(res["I"][strong] / I_true[strong])     # what the 7 x 7 peak holds of a spot
        ratios[name] = res["IPR"][weak].mean() / (k * 300.0)
        ratios[name + " strong"] = np.median(res["IPR"][strong] / res["I"][strong])
        se = res["SIGIPR"][weak].mean() / np.sqrt(weak.sum()) / (k * 300.0)
    assert abs(ratios["widened"] - 1) < 0.02 + 2 * se, ratios
    assert ratios["pooled"] < 0.96, ratios                             # 0.907; widened 0.983 +- 0.004
    # and on the strong spots there profile fitting and summation agree (pooled: 0.993)
    assert abs(ratios["widened strong"] - 1) < 0.003, ratios
