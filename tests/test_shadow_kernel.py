"""The Cython shadow-statistics kernel gives exactly what its numpy twin gives, and so the same mask."""
import fabio
import numpy as np
import pytest

from pyflm import shoebox
from conftest import SIM


def sim_images(first, n):
    return [fabio.open(str(SIM / f"sim_{i:04d}.cbf")).data for i in range(first, first + n)]


@pytest.mark.parametrize("n", [5, 4, 1])
def test_kernel_equals_numpy_twin_on_a_block_of_sim_images(n):
    assert shoebox._shadow_ext is not None, "the Cython shadow kernel is not built"
    imgs = sim_images(11, n)                        # int32, 1043 x 981: bins of 8 overhang both edges
    a = shoebox.shadow_stats_numpy(imgs, -1.0, 8)
    b = shoebox._shadow_ext.block_stats(imgs, -1.0, 8)
    for x, y in zip(a, b):
        assert x.shape == y.shape and np.array_equal(x, y)
    m_np = shoebox.shadow_mask(imgs, use_cython=False)
    m_cy = shoebox.shadow_mask(imgs)
    assert np.array_equal(m_np, m_cy)
    # the beamstop (radius 2.2 mm at the beam) and its arm are found: the test can fail
    assert m_cy[521, 492] and 1000 < m_cy.sum() < 0.05 * m_cy.size


def test_kernel_equals_numpy_twin_with_gaps_negatives_floats_and_empty_bins():
    rng = np.random.default_rng(3)
    imgs = [rng.poisson(3.0, (75, 61)).astype(np.int32) for _ in range(6)]
    for d in imgs[:3]:
        d[:, 20:27] = -1                             # a module gap on half the images: not valid
    imgs[4][10:30, :] = -2                           # below NULLPIX on one image only
    imgs[5][:16, :16] = -1
    imgs[0][:16, :16] = -1
    imgs[1][:16, :16] = -1
    imgs[2][:16, :16] = -1                           # 4 of 6: whole bins with no valid pixel
    # six images (the general path) and five (the default block: its own vectorised median)
    for images in (imgs, imgs[:5], [d.astype(np.float32) * 1.5 for d in imgs],
                   [d.astype(np.float32) * 1.5 for d in imgs[:5]], [d.astype(np.int16) for d in imgs]):
        for bin_ in (8, 5):
            a = shoebox.shadow_stats_numpy(images, -1.0, bin_)
            b = shoebox._shadow_ext.block_stats(images, -1.0, bin_)
            for x, y in zip(a, b):
                assert x.shape == y.shape and np.array_equal(x, y)
    assert (~a[0]).any() and (a[2] == 0).any()


def test_kernel_median_of_5_x_5_bins_is_scipys():
    from scipy import ndimage
    rng = np.random.default_rng(8)
    imgs = sim_images(31, 5)
    coarse = shoebox._shadow_ext.block_stats(imgs, -1.0, 8)[2]
    # counts of halves (the sliding counts), a few other values among them (those rows select), levels
    # beyond the counts' range, and values that are no counts at all
    mixed = rng.poisson(3.0, (17, 23)) / 2.0
    mixed[8, 5], mixed[2, 20] = 1.3, 400.0
    for c in (coarse, rng.poisson(2.0, (13, 7)) / 2.0, mixed, rng.normal(size=(3, 40)), rng.normal(size=(1, 1))):
        c = np.ascontiguousarray(c, float)
        assert np.array_equal(shoebox._shadow_ext.median5(c), ndimage.median_filter(c, 5, mode="nearest"))


def test_kernel_test_agrees_with_the_twin_at_the_limit_to_the_last_bit():
    # shadow_test divides only where num < lim.den.(1 + 2^-45): pixels whose 3 x 3 mean lies a few ulps
    # either side of ratio x level (and exactly on it) come out as the twin's division says
    ratio, level = 0.25, 3.7
    lim = ratio * level
    steps = np.r_[-40:41, 100:300:7, -300:-100:7]      # (the division is skipped beyond ~128 ulps)
    vals = np.array([lim * (1 + k * 2.0 ** -52) for k in steps] + [np.nextafter(lim, 0), lim,
                                                                  np.nextafter(lim, 2)])
    med = np.repeat(np.repeat(vals[:, None], 8, 0), 8, 1)       # blocks of one value: 3 x 3 means of it
    valid = np.ones(med.shape, bool)
    lv = np.full(((med.shape[0] + 7) // 8, 1), level)
    a = shoebox.shadow_test_numpy(valid, med, lv, 8, ratio, 0.5, 0)
    b = shoebox._shadow_ext.shadow_test(valid.view(np.uint8), med, lv, 8, ratio, 0.5, 0)
    assert np.array_equal(a, b)
    assert a.any() and not a.all()                              # both sides of the limit are there


def test_streamed_block_is_the_three_kernels_and_the_twin():
    # shadow_block (statistics, level and test through a ring of rows of bins) against block_stats,
    # median5 and shadow_test on whole arrays and against the numpy twin: sizes below, at and just
    # past a few rows of bins, one row, general k, floats, shadows near the edges
    from scipy import ndimage
    rng = np.random.default_rng(11)
    ext = shoebox._shadow_ext
    n_shadow = 0
    for ns, nf, k, bin_, dt in ((75, 61, 5, 8, np.int32), (75, 61, 6, 5, np.float32), (1, 40, 5, 8, np.int32),
                                (9, 9, 3, 8, np.float64), (33, 17, 5, 4, np.int32), (40, 3, 4, 1, np.int32)):
        imgs = [rng.poisson(6.0, (ns, nf)).astype(dt) for _ in range(k)]
        for d in imgs:
            d[: ns // 3, nf // 2:] = rng.poisson(0.5, d[: ns // 3, nf // 2:].shape)   # a shadow at an edge
            d[-3:, :2] = 0
        imgs[0][:, 5:7] = -1
        v, m, c = ext.block_stats(imgs, -1.0, bin_)
        level = ext.median5(c)
        a = ext.shadow_test(v.view(np.uint8), m, level, bin_, 0.25, 0.5, 2)
        b = ext.shadow_block(imgs, -1.0, bin_, 0.25, 0.5, 2)
        v2, m2, c2 = shoebox.shadow_stats_numpy(imgs, -1.0, bin_)
        t = shoebox.shadow_test_numpy(v2, m2, ndimage.median_filter(c2, 5, mode="nearest"), bin_, 0.25, 0.5, 2)
        assert b.shape == (ns, nf) and np.array_equal(a, b) and np.array_equal(b, t)
        n_shadow += b.sum()
    assert n_shadow > 0


def test_avx2_median_of_5_is_sse2s_to_the_bit():
    # block_stats' five-image pass four pixels at a time (AVX2, where the CPU has it) and two (SSE2):
    # the same validity and medians, tails of 1-3 pixels, negatives, NaN and every pixel type
    ext = shoebox._shadow_ext
    rng = np.random.default_rng(5)
    for ns, nf in ((37, 29), (8, 8), (3, 1)):
        base = [rng.normal(2.0, 3.0, (ns, nf)) for _ in range(5)]
        base[1][0, 0] = np.nan
        base[3][-1, -1] = np.nan
        for imgs in ([d.round().astype(np.int32) for d in base], [d.astype(np.float32) for d in base], base):
            old = ext.set_simd(0)
            try:
                a = ext.block_stats(imgs, -1.0, 8)
            finally:
                ext.set_simd(old)
            b = ext.block_stats(imgs, -1.0, 8)
            for x, y in zip(a, b):
                assert x.tobytes() == y.tobytes()
            assert a[0].any() and (ns < 30 or not a[0].all())       # some pixels not valid


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 7, 8, 9, 16, 17])
def test_every_block_size_has_the_twins_medians_on_avx2_and_sse2(k):
    # blocks other than five images (the last few of a sweep, cell refinement's 3-image segments,
    # another BLOCK): the vectorised sort of k values (up to 16; 17 is the scalar loop's) gives the
    # numpy twin's validity and medians to the bit, four pixels at a time and two, with tails,
    # negatives, -0 and each pixel type; with a NaN (which the twin's median keeps) AVX2 and SSE2 to the bit
    ext = shoebox._shadow_ext
    rng = np.random.default_rng(100 + k)
    for ns, nf in ((37, 29), (3, 1)):
        base = [rng.normal(2.0, 3.0, (ns, nf)) for _ in range(k)]
        base[-1][-1, -1] = -0.0
        for d in base[: k // 2 + 1]:
            d[ns // 2, :] = -5.0                     # below NULLPIX on most images: not valid
        nan = [d.copy() for d in base]
        nan[0][0, 0] = np.nan
        for imgs, twin in (([d.round().astype(np.int32) for d in base], True),
                           ([d.astype(np.float32) for d in base], True), (base, True),
                           ([d.astype(np.float32) for d in nan], False), (nan, False)):
            old = ext.set_simd(0)
            try:
                sse2 = ext.block_stats(imgs, -1.0, 8)
            finally:
                ext.set_simd(old)
            avx2 = ext.block_stats(imgs, -1.0, 8)
            for x, y in zip(sse2, avx2):
                assert x.tobytes() == y.tobytes()
            if twin:        # (to the value: the twin's np.maximum(-0.0, 0) may keep the sign of a zero)
                for x, y in zip(shoebox.shadow_stats_numpy(imgs, -1.0, 8), avx2):
                    assert x.shape == y.shape and np.array_equal(x, y)
            assert avx2[0].any() and (ns < 30 or not avx2[0].all())
