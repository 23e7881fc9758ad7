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
