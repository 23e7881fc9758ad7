# cython: boundscheck=False, wraparound=False, cdivision=True
"""Refinement kernel: every reflection's predicted position, crossing angle and rocking width and their
derivatives with respect to the refined parameters, in one pass.  The numpy twin is
pyflm.refine._Predictions (use_cython=False); tests/test_refinement.py compares them."""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt, atan2, acos, cos, sin, floor, fabs, M_PI, NAN

cnp.import_array()


cdef inline double _wrap(double a) noexcept nogil:
    """(a + 180) mod 360 - 180, the modulo floored as numpy's."""
    cdef double m = (a + 180.0) - 360.0 * floor((a + 180.0) / 360.0)
    return m - 180.0


def predictions(const double[:, ::1] hkl, const double[::1] phi_ref, const double[:, ::1] A,
                double wavelength, bint reverse, const double[:, ::1] frame, const double[::1] beam_dir,
                const double[::1] axis, const double[::1] u, double dh, double dv, double dispersion,
                double mosaic, const double[:, :, ::1] dA, const cnp.int64_t[::1] cry_cols,
                const double[:, :, ::1] dframe, const cnp.int64_t[::1] det_cols, long mos_col, int n_par):
    """frame: rows origin, ex, ey, normal.  dA (k, 3, 3): dA/dx for the parameters in columns cry_cols;
    dframe (kd, 4, 3): the frame's derivatives for those in det_cols; mos_col: the mosaic's column or -1.
    Returns xm, ym, phi, width, ok (bool) and D (4, n, n_par): d(xm, ym, phi, width)/dx."""
    cdef Py_ssize_t n = hkl.shape[0], i, q, j, kc = cry_cols.shape[0], kd = det_cols.shape[0]
    out = np.empty((4, n))
    okv = np.empty(n, np.uint8)
    D_arr = np.zeros((4, n, n_par))
    cdef double[:, ::1] O = out
    cdef unsigned char[::1] OK = okv
    cdef double[:, :, ::1] D = D_arr
    cdef double deg = 180.0 / M_PI, rad = M_PI / 180.0
    cdef double sign = -1.0 if reverse else 1.0
    cdef double o0 = frame[0, 0], o1 = frame[0, 1], o2 = frame[0, 2]
    cdef double on = o0 * frame[3, 0] + o1 * frame[3, 1] + o2 * frame[3, 2]
    cdef double h0, h1, h2, x0, y0, z0, rho, r2, K, alpha, ac, p1, p2, d1, d2, phi, th, c, s
    cdef double rx, ry, rz, s0, s1, s2, den, t, px, py, pz, cx, cy, cz, zeta, zraw, sin2t, wdiv, div2
    cdef double disp, Q, width, zs, e0 = beam_dir[0], e1 = beam_dir[1], e2 = beam_dir[2]
    cdef double a0, a1, a2, R0, R1, da, ds0, ds1, ds2, dt, dp0, dp1, dp2, dc0, dc1, dc2, dsin, dz, dQ
    cdef double do0, do1, do2, dn0, dn1, dn2, dsn
    cdef bint good
    with nogil:
        for i in range(n):
            h0, h1, h2 = hkl[i, 0], hkl[i, 1], hkl[i, 2]
            x0 = h0 * A[0, 0] + h1 * A[0, 1] + h2 * A[0, 2]
            y0 = h0 * A[1, 0] + h1 * A[1, 1] + h2 * A[1, 2]
            z0 = h0 * A[2, 0] + h1 * A[2, 1] + h2 * A[2, 2]
            # the crossings (predict.crossings_of) and the one nearer phi_ref (refine._Model.rotated)
            rho = sqrt(x0 * x0 + y0 * y0)
            r2 = x0 * x0 + y0 * y0 + z0 * z0
            good = rho > 0
            K = -wavelength * r2 / (2.0 * rho) if good else 0.0
            good = good and fabs(K) <= 1.0
            alpha = atan2(y0, x0)
            ac = acos(-1.0 if K < -1.0 else (1.0 if K > 1.0 else K))
            p1 = (-alpha + ac) * deg
            p2 = (-alpha - ac) * deg
            if reverse:
                p1, p2 = -p1, -p2
            d1 = fabs(_wrap(p1 - phi_ref[i]))
            d2 = fabs(_wrap(p2 - phi_ref[i]))
            phi = p1 if d1 <= d2 else p2
            phi = phi_ref[i] + _wrap(phi - phi_ref[i])
            th = sign * phi * rad
            c, s = cos(th), sin(th)
            rx, ry, rz = c * x0 - s * y0, s * x0 + c * y0, z0
            s0 = (rx + e0 / wavelength) * wavelength
            s1 = (ry + e1 / wavelength) * wavelength
            s2 = (rz + e2 / wavelength) * wavelength
            # where the ray meets the detector (geometry.lab_to_mm)
            den = s0 * frame[3, 0] + s1 * frame[3, 1] + s2 * frame[3, 2]
            t = on / den
            px, py, pz = s0 * t - o0, s1 * t - o1, s2 * t - o2
            if den > 1e-12:
                O[0, i] = px * frame[1, 0] + py * frame[1, 1] + pz * frame[1, 2]
                O[1, i] = px * frame[2, 0] + py * frame[2, 1] + pz * frame[2, 2]
            else:                       # the ray misses the detector (lab_to_mm's NaN)
                O[0, i] = NAN
                O[1, i] = NAN
            O[2, i] = phi
            # the rocking width (predict.rocking_width_terms, width_from_terms)
            cx, cy, cz = e1 * s2 - e2 * s1, e2 * s0 - e0 * s2, e0 * s1 - e1 * s0
            zraw = cx * axis[0] + cy * axis[1] + cz * axis[2]
            zeta = fabs(zraw) if fabs(zraw) > 1e-6 else 1e-6
            zs = (1.0 if zraw > 0 else -1.0) if fabs(zraw) > 1e-6 else 0.0
            sin2t = sqrt(cx * cx + cy * cy + cz * cz)
            wdiv = cx * u[0] + cy * u[1] + cz * u[2]
            div2 = (dv * zeta) * (dv * zeta) + (dh * wdiv) * (dh * wdiv)
            disp = (dispersion * (1.0 - s0)) * deg
            Q = sqrt((mosaic * sin2t) * (mosaic * sin2t) + div2)
            width = (Q + disp) / zeta
            O[3, i] = width
            OK[i] = good and den > 1e-12
            if not good:                # no crossing: no derivatives (the twin's zeros)
                continue
            # the detector's parameters: the frame moves, the ray is held
            for q in range(kd if den > 1e-12 else 0):
                j = det_cols[q]
                do0, do1, do2 = dframe[q, 0, 0], dframe[q, 0, 1], dframe[q, 0, 2]
                dn0, dn1, dn2 = dframe[q, 3, 0], dframe[q, 3, 1], dframe[q, 3, 2]
                dsn = s0 * dn0 + s1 * dn1 + s2 * dn2
                dt = (do0 * frame[3, 0] + do1 * frame[3, 1] + do2 * frame[3, 2] +
                      o0 * dn0 + o1 * dn1 + o2 * dn2) / den - t * dsn / den
                dp0, dp1, dp2 = s0 * dt - do0, s1 * dt - do1, s2 * dt - do2
                D[0, i, j] = (dp0 * frame[1, 0] + dp1 * frame[1, 1] + dp2 * frame[1, 2] +
                              px * dframe[q, 1, 0] + py * dframe[q, 1, 1] + pz * dframe[q, 1, 2])
                D[1, i, j] = (dp0 * frame[2, 0] + dp1 * frame[2, 1] + dp2 * frame[2, 2] +
                              px * dframe[q, 2, 0] + py * dframe[q, 2, 1] + pz * dframe[q, 2, 2])
            # the crystal's: r0 moves, the crossing with it (the Ewald condition 2 s0.r + r.r = 0 held)
            for q in range(kc):
                j = cry_cols[q]
                a0 = h0 * dA[q, 0, 0] + h1 * dA[q, 0, 1] + h2 * dA[q, 0, 2]
                a1 = h0 * dA[q, 1, 0] + h1 * dA[q, 1, 1] + h2 * dA[q, 1, 2]
                a2 = h0 * dA[q, 2, 0] + h1 * dA[q, 2, 1] + h2 * dA[q, 2, 2]
                R0, R1 = c * a0 - s * a1, s * a0 + c * a1
                da = (R0 + wavelength * (x0 * a0 + y0 * a1 + z0 * a2)) / (sign * ry)
                ds0 = wavelength * (R0 - sign * da * ry)
                ds1 = wavelength * (R1 + sign * da * rx)
                ds2 = wavelength * a2
                D[2, i, j] = da * deg
                if den > 1e-12:
                    dt = -t * (ds0 * frame[3, 0] + ds1 * frame[3, 1] + ds2 * frame[3, 2]) / den
                    dp0, dp1, dp2 = ds0 * t + s0 * dt, ds1 * t + s1 * dt, ds2 * t + s2 * dt
                    D[0, i, j] = dp0 * frame[1, 0] + dp1 * frame[1, 1] + dp2 * frame[1, 2]
                    D[1, i, j] = dp0 * frame[2, 0] + dp1 * frame[2, 1] + dp2 * frame[2, 2]
                dc0, dc1, dc2 = e1 * ds2 - e2 * ds1, e2 * ds0 - e0 * ds2, e0 * ds1 - e1 * ds0
                dsin = (cx * dc0 + cy * dc1 + cz * dc2) / (sin2t if sin2t > 1e-300 else 1e-300)
                dz = zs * (dc0 * axis[0] + dc1 * axis[1] + dc2 * axis[2])
                dQ = (mosaic * mosaic * sin2t * dsin + dv * dv * zeta * dz +
                      dh * dh * wdiv * (dc0 * u[0] + dc1 * u[1] + dc2 * u[2])) / Q
                D[3, i, j] = (dQ - dispersion * ds0 * deg) / zeta - width / zeta * dz
            if mos_col >= 0:
                D[3, i, mos_col] = mosaic * sin2t * sin2t / (Q * zeta)
    return out[0], out[1], out[2], out[3], okv.view(np.bool_), D_arr


def fraction_rows(const double[::1] d_phi, const double[::1] d_w, const double[:, ::1] dphi,
                  const double[:, ::1] dW, const cnp.int64_t[::1] refl, const double[::1] f,
                  const double[::1] tot, const double[::1] sig):
    """The fraction rows of refine_parameters' Jacobian (pyflm.refine._fraction_rows_numpy is the twin,
    to the bit): row i of reflection r = refl[i], with df = d_phi[i] dphi[r] + d_w[i] dW[r] (the part's
    calculated fraction's derivatives) and dtot the sum of its reflection's df in the rows' order,
    (df / tot[r] - f[i] dtot / tot[r]^2) / sig[i].  One pass to sum, one to form the rows, without the
    twin's (n, p) temporaries."""
    cdef Py_ssize_t n = refl.shape[0], p = dphi.shape[1], i, j, r
    out = np.empty((n, p))
    dtot_arr = np.zeros((dphi.shape[0], p))
    cdef double[:, ::1] O = out
    cdef double[:, ::1] S = dtot_arr
    cdef double T, TT
    for i in range(n):
        r = refl[i]
        for j in range(p):
            O[i, j] = d_phi[i] * dphi[r, j] + d_w[i] * dW[r, j]
            S[r, j] += O[i, j]
    for i in range(n):
        r = refl[i]
        T = tot[r]
        TT = T * T
        for j in range(p):
            O[i, j] = (O[i, j] / T - f[i] * S[r, j] / TT) / sig[i]
    return out


def dps_histogram(const double[:, ::1] proj, double pmax, Py_ssize_t n_bins):
    """indexing.dps_scan's histograms of the spots' projections: (n_dir, n_bins) counts, as floats
    (what the FFT takes), from proj (n_spots, n_dir).  Each projection's bin is the twin's:
    ((p + pmax) / (2 pmax) * n_bins) truncated, clipped to the histogram (a NaN to bin 0).  Directions
    are taken a block at a time: their bins formed together (in SIMD lanes), then counted into their
    histograms' rows, which stay in cache while every spot is binned into them."""
    cdef Py_ssize_t ns = proj.shape[0], nd = proj.shape[1], i, d, d0, n, k
    out = np.zeros((nd, n_bins))
    if nd == 0 or n_bins <= 0:
        return out
    cdef double[:, ::1] H = out
    cdef double two = 2 * pmax, nb = <double>n_bins, top = <double>(n_bins - 1), v
    # 64 directions at a time (6M sweep's 522 spots, 5249 directions: 8.6 ms; 16 at a time 13.8,
    # 256 11.3: fewer rows in cache, or each spot's row read in shorter runs)
    cdef int[64] idx
    cdef Py_ssize_t blk = 64
    cdef const double *row
    cdef double *h0 = &H[0, 0]
    with nogil:
        d0 = 0
        while d0 < nd:
            n = nd - d0 if nd - d0 < blk else blk
            for i in range(ns):
                row = &proj[i, d0]
                for k in range(n):
                    v = (row[k] + pmax) / two * nb
                    v = v if v > 0.0 else 0.0           # (a NaN too)
                    v = v if v < top else top
                    idx[k] = <int>v
                for k in range(n):
                    h0[(d0 + k) * n_bins + idx[k]] += 1.0
            d0 += n
    return out
