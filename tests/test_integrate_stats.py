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
    from pyflm.integrate import OBS_DTYPE, concat_rows, lexsort_ints
    from pyflm.mtz import RECORD_DTYPE
    rng = np.random.default_rng(3)
    for dtype in (RECORD_DTYPE, OBS_DTYPE):
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
