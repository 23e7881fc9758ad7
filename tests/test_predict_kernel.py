"""The Cython prediction kernel gives exactly what its numpy twin gives."""
import numpy as np
import pytest

from pyflm import geometry, predict
from pyflm.matrix import read_matrix
from conftest import SIM


@pytest.mark.parametrize("two_theta,sign", [(0.0, 1), (30.0, 1), (0.0, -1)])
def test_cython_kernel_equals_numpy_twin(two_theta, sign):
    assert predict._ext is not None, "the Cython kernel is not built"
    c = read_matrix(str(SIM / "truth.mat"))
    A = c.A
    frame = geometry.detector_frame(120.0, 89.66, 84.73, two_theta)
    a = predict.predict_numpy(A, 0.9795, frame, sign, -3.0, 5.0, 1.3)
    b = predict.predict_window_cython(A, 0.9795, frame, sign, -3.0, 5.0, 1.3)
    ka = np.lexsort((a[1], a[0][:, 2], a[0][:, 1], a[0][:, 0]))
    kb = np.lexsort((b[1], b[0][:, 2], b[0][:, 1], b[0][:, 0]))
    assert len(ka) == len(kb) > 1000
    assert np.array_equal(a[0][ka], b[0][kb])
    for i in (1, 2, 6):
        assert np.allclose(a[i][ka], b[i][kb], rtol=0, atol=1e-9)
    hit = a[5][ka]
    assert np.array_equal(hit, b[5][kb])
    for i in (3, 4):
        assert np.allclose(a[i][ka][hit], b[i][kb][hit], rtol=0, atol=1e-9)


def test_overlap_kernel_finds_the_pairs_the_kd_tree_finds():
    """classify's OVERLAP: the strip search marks exactly the points the per-image KD-tree marks, with
    coincident points and pairs at the separation itself (multiples of 1/4) among random ones."""
    rng = np.random.default_rng(0)
    for n, n_img, span in ((30000, 12, 200.0), (2000, 1, 40.0), (5, 3, 1.0), (0, 1, 1.0)):
        img = rng.integers(0, n_img, n) - 3
        u, v = rng.uniform(-span, span, n), rng.uniform(-span, span, n)
        u[:n // 5], v[:n // 5] = np.round(u[:n // 5] * 4) / 4, np.round(v[:n // 5] * 4) / 4
        for r in (1.0 - 1e-9, 1.0, 0.3):
            a = predict.overlaps(img, u, v, r)
            b = predict.overlaps(img, u, v, r, use_cython=False)
            assert np.array_equal(a, b)
            assert n < 100 or 0 < a.sum() < n        # some overlap, not all



def test_quick_rejection_outside_the_window_drops_no_reflection():
    """The kernel's quick test of a narrow window (no crossing between its ends) gives the same reflections
    to the bit as the full test of every one, also for windows whose ends fall on a crossing itself."""
    c = read_matrix(str(SIM / "truth.mat"))
    frame = geometry.detector_frame(120.0, 89.66, 84.73, 0.0)
    wide = predict.predict_window_cython(c.A, 0.9795, frame, 1, 0.0, 360.0, 1.3)
    rng = np.random.default_rng(1)
    ends = list(rng.choice(wide[1], 6)) + [-7.25, 181.0]
    n_cut = 0
    for sign in (1, -1):
        for lo in ends:
            for width in (0.1, 1.0, 15.0, 100.0):
                args = (c.A, 0.9795, frame, sign, lo, lo + width, 1.3)
                a = predict.predict_window_cython(*args)
                b = predict.predict_window_cython(*args, prune=False)
                assert len(a[1]) > 0
                for x, y in zip(a, b):
                    assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
                # windows that start on a crossing: the reflection there is kept (phi_lo is inside)
                n_cut += int(np.any(a[1] == lo))
    assert n_cut >= 6
