"""The Cython integration kernel (ext/_integrate.pyx) measures what its numpy twin in pyflm.shoebox
measures, on the sim sweep's images with its shadow and its neighbours' peaks masked: the same flags,
intensities and sigmas (summation and profile-fitted) to 1e-6, the same standard profiles."""
import csv

import fabio
import numpy as np
import pytest

from pyflm import shoebox
from conftest import SIM

RASTER = (17, 17, 4, 5, 5)


def block(first, n=5):
    return [fabio.open(str(SIM / f"sim_{i:04d}.cbf")).data for i in range(first, first + n)]


def spots_on(image):
    """Predicted (fast, slow) of the reflections recorded on an image (predictions.csv: first image;
    fraction on each), those far off the detector left out."""
    f, s = [], []
    for r in csv.DictReader(open(SIM / "predictions.csv")):
        fr = r["fractions"].split(";")
        k = image - int(fr[0])
        if 0 <= k < len(fr) - 1 and float(fr[k + 1]) > 0 and "off_detector" not in r["flags"]:
            f.append(float(r["x_px"]))
            s.append(float(r["y_px"]))
    return np.array(f), np.array(s)


@pytest.fixture(scope="module")
def scene():
    imgs = block(21)
    shadow = shoebox.shadow_mask(imgs)
    data = imgs[2]
    fast, slow = spots_on(23)
    fg = shoebox.foreground_mask(data.shape, fast, slow, RASTER)
    regions = shoebox.ring_regions(fast, slow, (data.shape[1] / 2, data.shape[0] / 2), 800.0)
    return data, fast, slow, shadow, fg, regions


@pytest.fixture(scope="module")
def neighbours(scene):
    """The 3-D background's images either side (22 and 24), and the peaks to keep out of it: theirs too."""
    data, fast, slow, shadow, fg, regions = scene
    fg3 = fg | shoebox.foreground_mask(data.shape, *spots_on(22), RASTER) | \
        shoebox.foreground_mask(data.shape, *spots_on(24), RASTER)
    return block(22, 1) + block(24, 1), fg3


def damaged(data, seed=4):
    """The image with module-gap pixels (-1) and overloads in some peaks and rims, and zingers."""
    rng = np.random.default_rng(seed)
    d = data.copy()
    ns, nf = d.shape
    d[rng.integers(0, ns, 3000), rng.integers(0, nf, 3000)] = -1
    d[rng.integers(0, ns, 300), rng.integers(0, nf, 300)] = 2 ** 20
    d[rng.integers(0, ns, 3000), rng.integers(0, nf, 3000)] += rng.integers(20, 5000, 3000).astype(d.dtype)
    return d


def assert_close(a, b, rtol=1e-6):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert a.shape == b.shape
    scale = np.maximum(np.abs(a), np.abs(b))
    bad = np.abs(a - b) > rtol * np.maximum(scale, 1e-3)
    assert not bad.any(), f"{bad.sum()} of {len(a)} differ, e.g. {a[bad][:3]} vs {b[bad][:3]}"


@pytest.mark.parametrize("variant", ["as recorded", "damaged", "float32", "uint16", "3-D background",
                                     "one neighbour"])
def test_kernel_measures_what_the_numpy_twin_measures_on_a_sim_image(scene, neighbours, variant):
    assert shoebox._int_ext is not None, "the Cython integration kernel is not built"
    data, fast, slow, shadow, fg, regions = scene
    nbs, fg3 = neighbours
    if variant == "damaged":
        data = damaged(data)
    elif variant == "float32":
        data = damaged(data, 7).astype(np.float32) + np.float32(0.25)
    elif variant == "uint16":                     # as SMV images are; neighbours of another type
        data = np.clip(damaged(data, 3), 0, 65535).astype(np.uint16)
    kw = dict(raster=RASTER, gain=1.0, overload=1e6, nullpix=-1.0, mask=shadow, bg_exclude=fg)
    if variant == "3-D background":
        kw.update(bg_exclude=fg3, bg_images=[damaged(nbs[0], 9), nbs[1]], gain=1.3)
    elif variant == "one neighbour":
        kw.update(bg_exclude=fg3, bg_images=nbs[1:])
    elif variant == "uint16":
        kw.update(bg_exclude=fg3, bg_images=nbs[:1], overload=60000)
    mk = shoebox.measure(data, fast, slow, **kw)
    mn = shoebox.measure_numpy(data, fast, slow, **kw)
    for key in ("on", "bad_peak", "over", "n_peak", "n_bg", "cs", "cf"):
        assert np.array_equal(mk[key], mn[key]), key
    for key in ("I", "SIGI", "rms", "slow_obs", "fast_obs"):
        assert_close(mk[key], mn[key])
    assert_close(mk["coef"].ravel(), mn["coef"].ravel())
    # the test can fail: every kind of box is there
    assert mk["on"].sum() > 1500 and (~mk["on"]).any() and mk["bad_peak"].any()
    if variant in ("damaged", "float32", "uint16"):
        assert mk["over"].any()

    big = np.arange(len(fast)) % 3 != 0          # as a block's fractions >= 0.5: a subset contributes
    ps = dict(kw, regions=regions, n_regions=4, strong_mask=big)
    ps.pop("bg_images", None)                    # profiles come from the image alone
    sk = shoebox.profile_sums(data, fast, slow, measured=None if "bg_images" in kw else mk, **ps)
    sn = shoebox.profile_sums(data, fast, slow, use_cython=False, **ps)
    assert np.array_equal(sk[2], sn[2]) and sk[2].sum() > 100
    for x, y in zip(sk[:2], sn[:2]):
        assert np.allclose(x, y, rtol=1e-9, atol=1e-9 * np.abs(y).max())
    profiles = shoebox.block_profiles(*sk, RASTER)

    ik, _ = shoebox.integrate_image(data, fast, slow, profiles=profiles, regions=regions, measured=mk, **kw)
    inn, _ = shoebox.integrate_image(data, fast, slow, profiles=profiles, regions=regions, use_cython=False,
                                     **kw)
    assert np.array_equal(ik["flag"], inn["flag"])
    assert np.array_equal(ik["n_peak"], inn["n_peak"]) and np.array_equal(ik["n_bg"], inn["n_bg"])
    for key in ("I", "SIGI", "IPR", "SIGIPR", "bg", "bgratio", "gradient", "slow_obs", "fast_obs"):
        assert_close(ik[key], inn[key])
    good = ik["flag"] == 0
    assert good.sum() > 1000 and np.median(ik["IPR"][good] / np.maximum(ik["I"][good], 1)) > 0.5


def test_kernel_forms_profiles_itself_as_the_twin_does_when_none_are_given(scene):
    data, fast, slow, shadow, fg, regions = scene
    kw = dict(raster=(15, 15, 3, 4, 4), overload=1e6, mask=shadow, strong_mask=np.arange(len(fast)) % 2 == 0)
    ik, pk = shoebox.integrate_image(data, fast, slow, **kw)
    inn, pn = shoebox.integrate_image(data, fast, slow, use_cython=False, **kw)
    assert np.allclose(pk["fine"], pn["fine"], rtol=1e-9, atol=1e-12)
    assert np.array_equal(ik["flag"], inn["flag"])
    for key in ("I", "SIGI", "IPR", "SIGIPR"):
        assert_close(ik[key], inn[key])


def test_profile_fit_with_avx2_is_sse2s_to_the_bit(scene):
    # the fit's sums four pixels at a time (AVX2) keep SSE2's two lane sums and their order
    from pyflm._ext import _integrate
    data, fast, slow, shadow, fg, regions = scene
    kw = dict(raster=(15, 15, 3, 4, 4), overload=1e6, mask=shadow, strong_mask=np.arange(len(fast)) % 2 == 0)
    out = []
    for simd in (-1, 0):
        old = _integrate._set_simd(simd)
        try:
            out.append(shoebox.integrate_image(data, fast, slow, **kw)[0])
        finally:
            _integrate._set_simd(old)
    for key in ("I", "SIGI", "IPR", "SIGIPR", "flag"):
        assert out[0][key].tobytes() == out[1][key].tobytes(), key
    assert np.isfinite(out[0]["IPR"]).sum() > 1000


def test_foreground_kernel_marks_the_peaks_the_twin_marks_at_the_edges_and_for_missing_positions(scene):
    data, fast, slow, *_ = scene
    f = np.concatenate([fast, [-3.2, 2.0, data.shape[1] - 1.5, np.nan, np.inf, 1e300]])
    s = np.concatenate([slow, [4.0, -2.7, data.shape[0] + 2.2, 5.0, 3.0, 7.0]])
    for raster in ((12, 10, 2, 3, 3), (15, 15, 3, 4, 4), RASTER):
        a = shoebox.foreground_mask(data.shape, f, s, raster)
        with np.errstate(invalid="ignore"):          # the twin casts 1e300 to an integer
            b = shoebox.foreground_mask(data.shape, f, s, raster, use_cython=False)
        assert np.array_equal(a, b) and a.sum() > 30000
    assert a[0, 0]                                   # a peak over the corner is cut to the image


@pytest.mark.parametrize("variant", ["as recorded", "damaged", "float32"])
def test_quick_look_kernel_sums_what_the_twin_sums_at_the_edges_too(scene, variant):
    """Refinement's quick look (which reflections stand above their rim): the same sums from the kernel
    as from the numpy boxes, boxes over the image's edges and module-gap pixels included."""
    data, fast, slow, *_ = scene
    data = damaged(data) if variant == "damaged" else data
    data = data.astype(np.float32) + 0.25 if variant == "float32" else data
    f = np.concatenate([fast, [-3.2, 2.0, data.shape[1] - 1.5]])
    s = np.concatenate([slow, [4.0, -2.7, data.shape[0] + 2.2]])
    for raster in ((15, 15, 3, 4, 4), RASTER):
        a = shoebox.quick_sums(data, f, s, raster)
        b = shoebox.quick_sums(data, f, s, raster, use_cython=False)
        assert a.shape == (len(f), 4)
        assert variant != "damaged" or a[:, 1].min() < a[:, 1].max()      # gaps take peak pixels
        if variant == "float32":
            assert np.allclose(a, b, rtol=1e-12, atol=1e-9)
        else:
            assert np.array_equal(a, b)




@pytest.mark.parametrize("variant", ["3-D background", "one neighbour", "float32", "uint16", "alone",
                                     "no masks", "any order"])
def test_kernel_measures_the_same_from_rows_of_background_candidates_as_box_by_box(scene, neighbours, variant):
    """measure's two ways of reading the rims (each image row's candidates formed once, for images the
    boxes cover densely; or each box's pixels from the images and masks), and AVX2 or SSE2, give the same
    numbers to the bit: boxes over the edges, dead and overloaded pixels, boxes out of row order included."""
    from pyflm._ext import _integrate
    data, fast, slow, shadow, fg, regions = scene
    nbs, fg3 = neighbours
    f = np.concatenate([fast, [-3.2, 2.0, data.shape[1] - 1.5, 5.0, np.nan]])
    s = np.concatenate([slow, [4.0, -2.7, data.shape[0] + 2.2, data.shape[0] - 3.1, 7.0]])
    data, nbs = damaged(data), [damaged(nbs[0], 9), nbs[1]]
    mask, excl = shadow, [fg, fg3]
    if variant == "one neighbour":
        nbs = nbs[1:]
    elif variant == "float32":
        data, nbs = data.astype(np.float32) + np.float32(0.25), [d.astype(np.float32) for d in nbs]
    elif variant == "uint16":
        data, nbs = np.clip(data, 0, 65535).astype(np.uint16), [np.clip(nbs[0], 0, 65535).astype(np.uint16)]
    elif variant == "alone":
        nbs, excl = [], fg
    elif variant == "no masks":
        mask, excl = None, None
    order = np.random.default_rng(5).permutation(len(f)) if variant == "any order" else np.lexsort((f, s))
    peak, bgm = shoebox.box_masks(RASTER)
    overload = 6e4 if variant == "uint16" else 1e6
    out = []
    for dense, simd in ((True, -1), (False, -1), (True, 0)):     # simd 0: SSE2 only, not AVX2
        old = _integrate._set_simd(simd)
        try:
            out.append(_integrate.measure(data, f, s, RASTER, peak, bgm, mask, excl, 1.3, overload, -1.0,
                                          bg_images=nbs, order=order, dense=dense))
        finally:
            _integrate._set_simd(old)
    for other in out[1:]:
        for key in out[0]:
            assert np.array_equal(out[0][key], other[key], equal_nan=True), key
    assert (~out[0]["on"]).sum() >= 5 and out[0]["bad_peak"].any() and out[0]["over"].any()


@pytest.mark.parametrize("variant", ["alone", "one neighbour", "3-D background", "uint16"])
def test_plane_sums_added_over_a_pass_are_the_pixel_by_pixel_sums_to_the_bit(scene, neighbours, variant):
    """For counts (the plane is fitted to the images' summed counts) the rejection passes add the plane's
    sums over the whole pass; a float image's values are taken pixel by pixel.  The same counts as int32 (or uint16) and as float64
    give the same numbers to the bit, rims read densely or box by box, with AVX2 or SSE2 alone."""
    from pyflm._ext import _integrate
    data, fast, slow, shadow, fg, regions = scene
    nbs, fg3 = neighbours
    data = damaged(data)
    nbs = {"alone": [], "one neighbour": [damaged(nbs[0], 9)]}.get(variant, [damaged(nbs[0], 9), nbs[1]])
    if variant == "uint16":
        data, nbs = np.clip(data, 0, 65535).astype(np.uint16), [np.clip(d, 0, 65535).astype(np.uint16) for d in nbs]
    peak, bgm = shoebox.box_masks(RASTER)
    order = np.lexsort((fast, slow))
    out = {}
    for dense, simd in ((True, -1), (False, -1), (True, 0), (False, 0)):
        old = _integrate._set_simd(simd)
        try:
            for kind in (data.dtype, np.float64):
                out[dense, simd, kind] = _integrate.measure(
                    data.astype(kind), fast, slow, RASTER, peak, bgm, shadow, fg if variant == "alone" else fg3,
                    1.0, 6e4, -1.0, bg_images=[d.astype(kind) for d in nbs], order=order, dense=dense)
        finally:
            _integrate._set_simd(old)
    ref = out[True, -1, np.float64]
    for m in out.values():
        for key in ref:
            assert np.array_equal(ref[key], m[key], equal_nan=True), key
    # (the test can fail: rejection changes the use of rim pixels of many boxes, strong spots' tails)
    assert (ref["n_bg"] < np.median(ref["n_bg"])).sum() > 100 and ref["over"].any()


def test_kernel_takes_a_block_s_peaks_as_separate_masks_as_their_union(scene, neighbours):
    # pass 2 gives the peaks of the image and of its two neighbours as three masks, not their union
    data, fast, slow, shadow, fg, regions = scene
    nbs, fg3 = neighbours
    parts = (fg, shoebox.foreground_mask(data.shape, *spots_on(22), RASTER),
             shoebox.foreground_mask(data.shape, *spots_on(24), RASTER))
    assert np.array_equal(shoebox.union(parts), fg3)
    kw = dict(raster=RASTER, gain=1.0, overload=1e6, nullpix=-1.0, mask=shadow, bg_images=nbs)
    one = shoebox.measure(data, fast, slow, bg_exclude=fg3, **kw)
    for use_cython in (True, False):
        three = shoebox.measure(data, fast, slow, bg_exclude=parts, use_cython=use_cython, **kw)
        for key in ("I", "SIGI", "n_bg", "on", "bad_peak"):
            if use_cython:
                assert np.array_equal(three[key], one[key]), key
            else:
                assert_close(three[key], one[key])
    assert (one["n_bg"] < shoebox.measure(data, fast, slow, bg_exclude=fg, **kw)["n_bg"]).any()


def test_background_level_of_16_bit_counts_is_that_of_the_same_counts_in_32_bits(scene):
    # SMV images come as uint16: the level's histogram caps counts beyond uint16's range
    from pyflm.integrate import background_level
    data = scene[0]
    d16 = np.clip(data, 0, 65535).astype(np.uint16)
    assert background_level(d16) == background_level(d16.astype(np.int32)) > 0
