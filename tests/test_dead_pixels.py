"""A dead pixel (a Pilatus writes -2) in a reflection's peak: the reflection is measured from its other
pixels, as a crystallographer masking the pixel would, not rejected; a module gap across the peak,
a shadow, or a dead pixel holding much of the spot still reject it (pyflm.shoebox._mend_dead_pixels)."""
import numpy as np
import pytest

from pyflm import shoebox

RASTER = (11, 11, 4, 3, 3)


def spots(n=40, sigma=0.9, I=3000.0, bg=2.0, seed=3):
    """n Gaussian spots on a grid of a 600 x 600 image, at random sub-pixel positions."""
    rng = np.random.default_rng(seed)
    img = np.full((600, 600), bg)
    yy, xx = np.mgrid[0:600, 0:600]
    g = np.stack(np.meshgrid(np.arange(40, 580, 60), np.arange(40, 580, 60)), -1).reshape(-1, 2)[:n]
    slow, fast = g[:, 0] + rng.uniform(0, 1, n), g[:, 1] + rng.uniform(0, 1, n)
    for s, f in zip(slow, fast):
        img += I * np.exp(-((yy + 0.5 - s) ** 2 + (xx + 0.5 - f) ** 2) / (2 * sigma ** 2)) / (2 * np.pi * sigma ** 2)
    return rng.poisson(img).astype(float), fast, slow


def measure(img, fast, slow, profile_image=None, mask=None):
    """Measure the spots with standard profiles from profile_image's spots, or with none (a sparse
    sweep's: too few strong spots to form them)."""
    kw = dict(raster=RASTER, nullpix=-1.0, mask=mask)
    src = (profile_image, fast, slow) if profile_image is not None else (img[:0, :0], [], [])
    prof = shoebox.block_profiles(*shoebox.profile_sums(*src, **kw), RASTER)
    return shoebox.integrate_image(img, fast, slow, profiles=prof, **kw)[0]


@pytest.mark.parametrize("with_profiles", [True, False])
def test_a_dead_pixel_in_the_peak_is_masked_not_the_reflection(with_profiles):
    img, fast, slow = spots()
    good = measure(img, fast, slow, img if with_profiles else None)
    assert np.all(good["flag"] & shoebox.F_EDGE == 0)
    bad = img.copy()
    s, f = np.floor(slow).astype(int), np.floor(fast).astype(int)
    # beside the centre, about 10 % of the spot: made good from the profile; without one only pixels
    # outside the spot's core can be (the pixel beyond is then ~2 %)
    bad[s, f + (1 if with_profiles else 2)] = -2
    bad[s[:10] + 2, f[:10] - 2] = -2   # and in the corner of the peak of a few: almost nothing
    res = measure(bad, fast, slow, img if with_profiles else None)
    assert np.all(res["flag"] & shoebox.F_EDGE == 0)
    # the summation made good by the missing fraction, the profile fit from the valid pixels
    assert np.median(res["I"] / good["I"]) == pytest.approx(1.0, abs=0.03)
    assert np.all(np.abs(res["I"] / good["I"] - 1) < 0.12)
    assert np.all(res["SIGI"] >= 0.97 * good["SIGI"])
    if with_profiles:
        assert np.median(res["IPR"] / good["IPR"]) == pytest.approx(1.0, abs=0.03)


def test_a_gap_shadow_or_dead_centre_still_rejects():
    img, fast, slow = spots(n=3, sigma=0.5)
    s, f = np.floor(slow).astype(int), np.floor(fast).astype(int)
    bad = img.copy()
    bad[s[0] - 2:s[0] + 3, f[0]] = -1          # a module gap across the peak: 5 of 25 pixels, the core
    bad[s[1], f[1]] = -2                       # the core of a sharp spot (~40 %), no profile
    mask = np.zeros(img.shape, bool)
    mask[s[2], f[2] + 2] = True                # a pixel of the peak in the beamstop's shadow
    res = measure(bad, fast, slow, mask=mask)
    assert np.all(res["flag"] & shoebox.F_EDGE != 0), res["flag"]
