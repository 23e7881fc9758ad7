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


def test_crossings_that_cannot_reach_the_window_left_out_change_no_prediction():
    """predict's kernel leaves out the margin's crossings whose rocking curve cannot reach the window
    (reach): the predictions are those of the numpy twin's window, all of it, to the bit, for blocks
    across the sweep, either sense of rotation, a wide and a narrow mosaic, with and without tails."""
    from pyflm.model import Beam, Detector, Goniometer
    c = read_matrix(str(SIM / "truth.mat"))
    beam = Beam(0.9795)
    det = Detector(120.0, 89.66, 84.73, 0.172, 0.172, 981, 1043)
    n_left = 0
    for reverse in (False, True):
        gonio = Goniometer(reverse_phi=reverse)
        for lo, mosaic, tail in ((0.0, 0.3, 0.0), (27.0, 0.05, 0.0), (133.5, 0.8, 0.0), (58.0, 0.3, 0.02)):
            c.mosaic, c.tail = mosaic, tail
            a = predict.predict(c, beam, det, gonio, lo, lo + 5.0, 1.3, margin=5.0)
            b = predict.predict(c, beam, det, gonio, lo, lo + 5.0, 1.3, margin=5.0, use_cython=False)
            assert len(a) > 1000 and len(a) == len(b)
            ka = np.lexsort((a["phi"], a["l"], a["k"], a["h"]))
            kb = np.lexsort((b["phi"], b["l"], b["k"], b["h"]))
            for n in ("h", "k", "l", "on_detector"):
                assert np.array_equal(a[n][ka], b[n][kb])
            for n in ("phi", "width", "d", "lorentz", "polar"):
                assert np.allclose(a[n][ka], b[n][kb], rtol=1e-12, atol=1e-12)
            # and to the bit against the kernel's whole window, the reach test off
            full = predict.predict_window_cython
            try:
                predict.predict_window_cython = lambda *args, reach=None, **kw: full(*args, **kw)
                w = predict.predict(c, beam, det, gonio, lo, lo + 5.0, 1.3, margin=5.0)
            finally:
                predict.predict_window_cython = full
            assert w.tobytes() == a.tobytes()
            sign = -1 if reverse else 1
            window = full(c.A, 0.9795, det.frame(), sign, lo - 5.0, lo + 10.0, 1.3)
            n_left += len(window[1]) - len(a)
            # some of the margin's crossings reach the window: the wide ones, near the rotation axis
            margin = (a["phi"] < lo - 0.5) | (a["phi"] > lo + 5.5)
            assert np.any(margin) and np.all(a["width"][margin] > 0.5 / predict.extent(tail) - 1e-9)
    assert n_left > 50000


def test_parts_kernel_gives_the_numpy_twins_rows_to_the_bit():
    """image_parts' kernel (the candidates and erf's arguments, then the fractions and rows) against its
    numpy twin: the same rows to the bit, for the sim sweep's predictions with every min_fraction the
    passes use, images clipped (only), an oscillation and start that are not whole numbers, a mosaic of
    nothing (widths from the divergence alone) and one wide enough for parts over many images."""
    from pyflm.model import Beam, Detector, Goniometer
    assert hasattr(predict._ext, "part_rows"), "the Cython kernel is not built"
    c = read_matrix(str(SIM / "truth.mat"))
    beam = Beam(0.9795)
    det = Detector(120.0, 89.66, 84.73, 0.172, 0.172, 981, 1043)
    n_multi = 0
    for mosaic in (0.3, 0.0, 2.5):
        c.mosaic = mosaic
        pred = predict.predict(c, beam, det, Goniometer(), 10.0, 30.0, 1.3, margin=5.0)
        for phi0, osc, first, last in ((0.0, 1.0, 1, 60), (0.3, 0.7, 1, 80), (-2.1, 0.25, 5, 300)):
            mid = int((20.0 - phi0) / osc) + first          # images about phi 20 for `only`
            for min_fraction, only in ((0.0, None), (0.005, None), (0.01, None), (0.005, (mid, mid + 6))):
                a = predict.image_parts(pred, phi0, osc, first, last, min_fraction, only=only)
                b = predict.image_parts(pred, phi0, osc, first, last, min_fraction, only=only,
                                        use_cython=False)
                assert a.dtype == b.dtype and len(a) > 1000 and a.tobytes() == b.tobytes()
                n_multi += int(np.sum(a["n_parts"] > 3))
    assert n_multi > 1000
