# cython: boundscheck=False, wraparound=False, cdivision=True
"""Background-plane kernel: a least-squares plane per shoebox over its background pixels, rejecting
outliers, one box at a time (numpy's twin works on every box at once and makes ~20 passes over all
of them per iteration; this makes one).  The numpy twin is pyflm.shoebox.fit_background_numpy."""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt, fabs

cnp.import_array()


include "solve3.pxi"


def fit_background(const double[:, :, ::1] boxes, const unsigned char[:, ::1] bg_mask,
                   const unsigned char[:, :, ::1] valid, double gain=1.0, int n_iter=3, double cutoff=3.0):
    """Same arguments and results as pyflm.shoebox.fit_background_numpy (masks as uint8)."""
    cdef Py_ssize_t n = boxes.shape[0], nxs = boxes.shape[1], nys = boxes.shape[2]
    plane_a = np.empty((n, nxs, nys), np.float64)
    coef_a = np.zeros((n, 3), np.float64)
    use_a = np.empty((n, nxs, nys), np.uint8)
    rms_a = np.empty(n, np.float64)
    cdef double[:, :, ::1] P = plane_a
    cdef double[:, ::1] C = coef_a
    cdef unsigned char[:, :, ::1] U = use_a
    cdef double[::1] R = rms_a
    cdef Py_ssize_t b, i, j
    cdef int it, changed, nnew
    cdef unsigned char nw
    cdef double x, y, v, w, pl, sg, res, ss
    cdef double sw, sx, sy, sxx, sxy, syy, sc, sxc, syc
    cdef double[3][3] M
    cdef double[3] rhs
    cdef double[3] cf
    cdef double x0 = (nxs - 1) / 2.0, y0 = (nys - 1) / 2.0
    with nogil:
        for b in range(n):
            for i in range(nxs):
                for j in range(nys):
                    U[b, i, j] = bg_mask[i, j] & valid[b, i, j]
            for it in range(n_iter + 1):
                sw = sx = sy = sxx = sxy = syy = sc = sxc = syc = 0.0
                for i in range(nxs):
                    x = i - x0
                    for j in range(nys):
                        if U[b, i, j]:
                            y = j - y0
                            v = boxes[b, i, j]
                            sw += 1.0
                            sx += x
                            sy += y
                            sxx += x * x
                            sxy += x * y
                            syy += y * y
                            sc += v
                            sxc += x * v
                            syc += y * v
                cf[0] = cf[1] = cf[2] = 0.0
                if sw >= 6:
                    M[0][0] = sw
                    M[0][1] = sx
                    M[0][2] = sy
                    M[1][0] = sx
                    M[1][1] = sxx + 1e-3     # the twin's small ridge
                    M[1][2] = sxy
                    M[2][0] = sy
                    M[2][1] = sxy
                    M[2][2] = syy + 1e-3
                    rhs[0] = sc
                    rhs[1] = sxc
                    rhs[2] = syc
                    if not _solve3(M, rhs, cf):
                        cf[0] = cf[1] = cf[2] = 0.0
                C[b, 0] = cf[0]
                C[b, 1] = cf[1]
                C[b, 2] = cf[2]
                changed = 0
                ss = 0.0
                nnew = 0
                for i in range(nxs):
                    x = i - x0
                    for j in range(nys):
                        y = j - y0
                        pl = cf[0] + cf[1] * x + cf[2] * y
                        P[b, i, j] = pl
                        sg = sqrt((pl if pl > 1.0 else 1.0) * gain)
                        res = (boxes[b, i, j] - pl) / sg
                        nw = bg_mask[i, j] & valid[b, i, j] & (fabs(res) <= cutoff + 1e-9)
                        if nw:
                            ss += res * res
                            nnew += 1
                        if nw != U[b, i, j]:
                            changed = 1
                            U[b, i, j] = nw
                # the twin's rms is over the final mask with the last plane's residuals
                R[b] = sqrt(ss / (nnew if nnew > 1 else 1))
                if not changed:
                    break
    return plane_a, coef_a, use_a.view(np.bool_), rms_a
