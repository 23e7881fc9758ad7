"""The Cython background-plane kernel gives what its numpy twin gives, on the shoeboxes of a real image."""
import csv

import fabio
import numpy as np
import pytest

from pyflm import shoebox
from conftest import SIM


def boxes_of_image(n, raster=(15, 15, 3, 4, 4), limit=4000):
    """Shoeboxes around the true positions of the reflections on image n of the sim sweep."""
    data = fabio.open(str(SIM / f"sim_{n:04d}.cbf")).data
    rows = list(csv.DictReader(open(SIM / "predictions.csv")))
    f = np.array([float(r["x_px"]) for r in rows])
    s = np.array([float(r["y_px"]) for r in rows])
    ok = (f > 8) & (f < data.shape[1] - 8) & (s > 8) & (s < data.shape[0] - 8)
    boxes = shoebox.extract_boxes(data, f[ok][:limit], s[ok][:limit], raster)[0]
    return boxes, shoebox.box_masks(raster)[1]


def assert_same(a, b):
    plane_a, coef_a, use_a, rms_a = a
    plane_b, coef_b, use_b, rms_b = b
    assert np.array_equal(use_a, use_b)          # the same pixels rejected as outliers
    assert np.allclose(plane_a, plane_b, rtol=1e-9, atol=1e-8)
    assert np.allclose(coef_a, coef_b, rtol=1e-9, atol=1e-8)
    assert np.allclose(rms_a, rms_b, rtol=1e-9, atol=1e-12)


def test_kernel_equals_numpy_twin_on_an_image_with_gaps_zingers_and_empty_boxes():
    assert shoebox._bg_ext is not None, "the Cython background kernel is not built"
    boxes, bg = boxes_of_image(10)
    rng = np.random.default_rng(5)
    # zingers in a tenth of the boxes (rejected over several iterations), module gaps (-1) in others,
    # and boxes with too few background pixels for a plane
    z = rng.choice(len(boxes), len(boxes) // 10, replace=False)
    boxes[z, rng.integers(0, 15, len(z)), rng.integers(0, 3, len(z))] += rng.uniform(50, 5000, len(z))
    g = rng.choice(len(boxes), 50, replace=False)
    boxes[g, :, :7] = -1
    boxes[g[:5]] = -1
    valid = boxes > -1
    for gain in (1.0, 2.5):
        a = shoebox.fit_background(boxes, bg, valid, gain, use_cython=False)
        b = shoebox.fit_background(boxes, bg, valid, gain)
        assert_same(a, b)
    # the cases the test means to cover are there: outliers rejected, and empty boxes' zero planes
    assert (bg[None] & valid & ~a[2]).any(axis=(1, 2))[z].mean() > 0.5
    assert np.all(b[1][g[:5]] == 0)


@pytest.mark.parametrize("raster", [(15, 15, 3, 4, 4), (13, 17, 2, 3, 5)])
def test_kernel_equals_numpy_twin_for_other_rasters_and_iterations(raster):
    boxes, bg = boxes_of_image(30, raster, limit=1500)
    valid = boxes > -1
    for n_iter, cutoff in ((0, 3.0), (5, 2.0)):
        assert_same(shoebox.fit_background(boxes, bg, valid, 1.0, n_iter, cutoff, use_cython=False),
                    shoebox.fit_background(boxes, bg, valid, 1.0, n_iter, cutoff))
