"""integrate_block's per-image statistics: the outer shell's limit from integrate._quantile is
np.quantile's, to the bit."""
import numpy as np

from pyflm.integrate import _quantile


def test_quantile_is_numpys_to_the_bit():
    rng = np.random.default_rng(7)
    n_cases = 0
    for n in list(range(0, 40)) + [1999, 2000, 2153]:
        for kind in range(3):
            v = rng.random(n) * 3.0 + 1.2
            if kind == 1:
                v = np.round(v, 1)                    # ties, as d-spacings of equivalent reflections
            if kind == 2 and n > 3:
                v[rng.integers(0, n)] = np.nan        # np.quantile's NaN answer too
            for q in (0.1, 0.0, 0.5, 0.37, 0.9, 1.0):
                if n == 0:
                    continue
                a, b = np.quantile(v, q), _quantile(v, q)
                assert type(a) is type(b) and (a == b or (np.isnan(a) and np.isnan(b))), (n, kind, q)
                n_cases += 1
    assert n_cases > 600


def test_record_helpers_give_numpys_results():
    """concat_rows gives np.concatenate's bytes; lexsort_ints np.lexsort's order (ties, negative keys,
    one key, keys too wide to pack)."""
    from pyflm.integrate import concat_rows
    from pyflm.mtz import lexsort_ints
    from pyflm.mtz import RECORD_DTYPE
    from pyflm.refine import PART_OBS
    rng = np.random.default_rng(3)
    for dtype in (RECORD_DTYPE, PART_OBS):
        parts = []
        for n in (0, 5, 1000, 1):
            a = np.zeros(n, dtype)
            for f in dtype.names:
                a[f] = rng.integers(-50, 50, n)
            parts.append(a)
        parts.append(parts[2][::3])                   # a strided one
        assert concat_rows(parts, dtype).tobytes() == np.concatenate(parts).tobytes()
        assert concat_rows([], dtype).dtype == dtype and len(concat_rows([], dtype)) == 0
    for n in (0, 1, 7, 5000):
        keys = [rng.integers(-30, 30, n).astype(np.int32), rng.integers(0, 3, n).astype(np.int32),
                rng.integers(-200, 200, n).astype(np.int64)]
        for ks in (keys, keys[:1], keys + [rng.integers(-2 ** 40, 2 ** 40, n)]):
            assert np.array_equal(lexsort_ints(tuple(ks)), np.lexsort(tuple(ks)))


def test_profile_region_helpers_to_the_bit():
    """mm_to_lab's points and spot_spread's ray lengths are broadcasting's and np.linalg.norm's (its sum of squares in its order); ring_regions
    with one sector (no arctan2) gives the rings that two sectors are cut from."""
    from pyflm import geometry
    from pyflm.shoebox import ring_regions
    rng = np.random.default_rng(11)
    for frame in (geometry.detector_frame(150.0, 160.0, 158.0),
                  geometry.detector_frame(90.0, 100.0, 110.0, two_theta=25.0, tilt=0.4, twist=-0.3)):
        x, y = rng.uniform(-20.0, 340.0, 20000), rng.uniform(-20.0, 340.0, 20000)
        p = geometry.mm_to_lab(x, y, frame)
        origin, ex, ey, _ = frame                     # mm_to_lab's sums are broadcasting's
        assert p.tobytes() == (origin + x[:, None] * ex + y[:, None] * ey).tobytes()
        assert geometry.mm_to_lab(x[:6].reshape(2, 3), 7.5, frame).tobytes() == \
            (origin + x[:6].reshape(2, 3, 1) * ex + 7.5 * ey).tobytes()
        assert geometry.mm_to_lab(3.0, -2.0, frame).tobytes() == (origin + 3.0 * ex - 2.0 * ey).tobytes()
        L = np.linalg.norm(p, axis=-1)
        two_sin = 2.0 * np.sqrt(np.maximum(0.5 * (1.0 - np.clip(p[..., 0] / L, -1.0, 1.0)), 0.0))
        t = two_sin * L / 0.172
        radial, tangential = geometry.spot_spread(x, y, frame, 0.172)
        assert np.array_equal(tangential, t)
        assert np.array_equal(radial, t / np.maximum(np.abs(p @ frame[3]) / L, 1e-3))
    f, s = rng.uniform(-50.0, 2500.0, 5000), rng.uniform(-50.0, 2500.0, 5000)
    f[:3], s[3:5] = np.nan, np.inf
    one, two = ring_regions(f, s, (1230.5, 1260.2), 1800.0), ring_regions(f, s, (1230.5, 1260.2), 1800.0, 4, 2)
    assert one.dtype == two.dtype and np.array_equal(one, two // 2) and len(np.unique(one)) == 4
