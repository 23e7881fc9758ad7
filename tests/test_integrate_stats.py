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
