# cython: boundscheck=False, wraparound=False, cdivision=True
"""Prediction kernel: every reflection inside the resolution sphere whose Ewald-sphere crossing lies in a
phi window, with its detector position.  The numpy twin is pyflm.predict.predict_numpy."""
import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt, atan2, acos, cos, sin, floor, ceil, fabs, M_PI, NAN, INFINITY

cnp.import_array()


def predict_window(double[:, ::1] A, double wavelength, double[::1] origin, double[::1] ex,
                   double[::1] ey, double[::1] nrm, int axis_sign, double phi_lo, double phi_hi,
                   double dmin, double dmax, int hmax, int kmax, int lmax, bint prune=True, reach=None):
    """Crossings with phi in [phi_lo, phi_hi) (phi_hi - phi_lo <= 360).

    Returns arrays (hkl int32 (n,3), phi deg, s1 unit (n,3), x mm, y mm, hit bool, d).
    prune=False: without the quick rejection of reflections that cross outside a narrow window (the
    same results, tested).
    reach=(lo, hi, extent, mosaic, dh, dv, dispersion, axis (3), unit e x s0^ (3)): only the crossings
    whose rocking curve, extent widths either side of phi, may reach [lo, hi]: the width as
    predict.rocking_width_xds forms it, to rounding, and a margin far beyond that rounding, so that
    every crossing predict keeps is among them (predict keeps a window's few crossings near the
    rotation axis, which rock far, and drops the rest of its margin)."""
    cdef Py_ssize_t cap = 1024, n = 0
    # an array per quantity, grown by doubling: whole-array copies (rows of a 2-D array were copied one
    # call at a time, and so were the strided columns handed back: 15 % of the kernel)
    hkl = np.empty((cap, 3), np.int32)
    out_f = np.empty((5, cap), np.float64)      # phi, x, y, hit, d
    out_s = np.empty((cap, 3), np.float64)      # s1
    cdef int[:, ::1] H = hkl
    cdef double[:, ::1] F = out_f
    cdef double[:, ::1] S1 = out_s
    cdef int h, k, l, sol
    cdef double rx, ry, rz, r2, rho, K, ca, sa, sq, sg, phi, c, s, qx, qy, sx, sy, sz, norm, dn, t, px, py, pz
    cdef double inv_lam = 1.0 / wavelength
    cdef double rmax2 = 1.0 / (dmin * dmin)
    cdef double rmin2 = 0.0 if dmax <= 0 else 1.0 / (dmax * dmax)
    cdef double on = origin[0] * nrm[0] + origin[1] * nrm[1] + origin[2] * nrm[2]
    cdef double rad = M_PI / 180.0
    cdef double a00 = A[0, 0], a01 = A[0, 1], a02 = A[0, 2], a10 = A[1, 0], a11 = A[1, 1]
    cdef double a12 = A[1, 2], a20 = A[2, 0], a21 = A[2, 1], a22 = A[2, 2]
    cdef double c2 = a02 * a02 + a12 * a12 + a22 * a22, bx, by, bz, bc, disc, lo_l, hi_l
    cdef int l0, l1
    # the window as rotation angles theta = axis_sign * phi
    cdef double th_lo = (phi_lo if axis_sign > 0 else -phi_hi) * M_PI / 180.0
    cdef double th_hi = (phi_hi if axis_sign > 0 else -phi_lo) * M_PI / 180.0
    cdef double clo = cos(th_lo), slo = sin(th_lo), chi = cos(th_hi), shi = sin(th_hi)
    cdef bint narrow = (phi_hi - phi_lo) < 179.0
    cdef double hlam = 0.5 * wavelength, f0, f1, q0, q1
    # f and (R r)_y are of order |r| <= 1/dmin: rounding leaves them ~1e-16 of that
    cdef double TINY = 1e-12 * (1.0 / dmin)
    # the sphere at the window's middle rotation (centre -R(-theta_m) s0) and the shell about it that
    # holds every point crossing during the window: delta = the most its centre moves, (2/lambda) sin(W/4)
    cdef double th_m = 0.5 * (th_lo + th_hi)
    cdef double cmx = -inv_lam * cos(th_m), cmy = inv_lam * sin(th_m)
    cdef double delta = 2.0 * inv_lam * sin(0.25 * (th_hi - th_lo)) * (1.0 + 1e-6) + 1e-9 * inv_lam
    cdef double ro2 = (inv_lam + delta) * (inv_lam + delta)
    cdef double ri2 = (inv_lam - delta) * (inv_lam - delta) if inv_lam > delta else 0.0
    cdef double pc, pp
    cdef int la0, lb0, la1, lb1, la, lb, seg
    cdef bint use_reach = reach is not None
    cdef double k_lo = 0, k_hi = 0, k_ext = 0, k_mos = 0, k_dh = 0, k_dv = 0, k_disp = 0
    cdef double k_ay = 0, k_az = 0, k_uy = 0, k_uz = 0, zeta, wv, width, far
    if use_reach:
        k_lo, k_hi, k_ext, k_mos, k_dh, k_dv, k_disp = (float(v) for v in reach[:7])
        # s0^ x s1^ = (0, -sz, sy) for s0^ along X: the axes' X components never enter
        k_ay, k_az, k_uy, k_uz = float(reach[8]), float(reach[9]), float(reach[11]), float(reach[12])
        k_disp = k_disp * 180.0 / M_PI
    # the inner window's ends as rotation angles (theta = axis_sign * phi), their cosines and sines
    cdef double tk_lo = (k_lo if axis_sign > 0 else -k_hi) * M_PI / 180.0
    cdef double tk_hi = (k_hi if axis_sign > 0 else -k_lo) * M_PI / 180.0
    cdef double kl_c = cos(tk_lo), kl_s = sin(tk_lo), kh_c = cos(tk_hi), kh_s = sin(tk_hi)
    for h in range(-hmax, hmax + 1):
        for k in range(-kmax, kmax + 1):
            # only the l inside the resolution sphere: |b + l c*|^2 <= rmax2, a quadratic in l
            bx = a00 * h + a01 * k
            by = a10 * h + a11 * k
            bz = a20 * h + a21 * k
            bc = bx * a02 + by * a12 + bz * a22
            disc = bc * bc - c2 * (bx * bx + by * by + bz * bz - rmax2)
            if disc < 0:
                continue
            disc = sqrt(disc)
            lo_l = (-bc - disc) / c2
            hi_l = (-bc + disc) / c2
            l0 = <int>floor(lo_l)
            l1 = <int>floor(hi_l) + 1
            if l0 < -lmax:
                l0 = -lmax
            if l1 > lmax:
                l1 = lmax
            # with a narrow window only the l whose point lies within delta of the sphere of the window's
            # middle rotation can cross it during the window (the sphere's centre moves less than delta
            # over it): along the line b + l c* that shell is at most two runs of l; the rest of the
            # column is not visited.  Bounds widened (delta by 1e-6, a whole l each way): a skipped l is one the
            # tests below would reject
            la0 = l0
            lb0 = l1
            la1 = 1
            lb1 = 0
            if narrow and prune:
                px = bx - cmx
                py = by - cmy
                pc = px * a02 + py * a12 + bz * a22
                pp = px * px + py * py + bz * bz
                disc = pc * pc - c2 * (pp - ro2)
                if disc < 0:
                    continue
                disc = sqrt(disc)
                lo_l = floor((-pc - disc) / c2) - 1
                hi_l = ceil((-pc + disc) / c2) + 1
                if lo_l > la0:
                    la0 = <int>lo_l
                if hi_l < lb0:
                    lb0 = <int>hi_l
                disc = pc * pc - c2 * (pp - ri2)
                if disc > 0:             # the line passes inside the inner sphere: two runs
                    disc = sqrt(disc)
                    lo_l = ceil((-pc - disc) / c2) + 1      # the gap's first and last l, shrunk by one
                    hi_l = floor((-pc + disc) / c2) - 1
                    if lo_l <= hi_l and lo_l > la0 and hi_l < lb0:
                        la1 = <int>hi_l + 1
                        lb1 = lb0
                        lb0 = <int>lo_l - 1
            for seg in range(2):
                la = la0 if seg == 0 else la1
                lb = lb0 if seg == 0 else lb1
                for l in range(la, lb + 1):
                    rx = bx + a02 * l
                    ry = by + a12 * l
                    rz = bz + a22 * l
                    r2 = rx * rx + ry * ry + rz * rz
                    if r2 > rmax2 or r2 <= 0 or r2 < rmin2:
                        continue
                    if narrow and prune:
                        # f(theta) = (R r)_x + lambda r^2 / 2 is zero where r meets the sphere, and its slope is
                        # -(R r)_y.  Of the window's ends, f of the same sign at both and (R r)_y too (no turn
                        # of f inside a window under 180 degrees): no crossing in the window, found without a
                        # square root or division.  Only decided well clear of zero (TINY: far above the
                        # rounding of these sums, far below any f of a crossing outside): anything nearer
                        # takes the exact test below, so the same reflections come out as without this.
                        f0 = rx * clo - ry * slo + hlam * r2
                        f1 = rx * chi - ry * shi + hlam * r2
                        q0 = rx * slo + ry * clo
                        q1 = rx * shi + ry * chi
                        if ((f0 > TINY and f1 > TINY) or (f0 < -TINY and f1 < -TINY)) and \
                                ((q0 > TINY and q1 > TINY) or (q0 < -TINY and q1 < -TINY)):
                            continue
                    rho = sqrt(rx * rx + ry * ry)
                    if rho <= 0:
                        continue
                    K = -wavelength * r2 / (2.0 * rho)
                    if K < -1.0 or K > 1.0:
                        continue
                    # cos(phi + alpha) = K with cos(alpha) = rx/rho, sin(alpha) = ry/rho: the two solutions'
                    # cos and sin follow algebraically, so only one atan2 per solution is needed
                    sq = sqrt(1.0 - K * K)
                    for sol in range(2):
                        sg = 1.0 if sol == 0 else -1.0
                        # rho * cos and rho * sin: the sign tests need no division
                        c = K * rx + sg * sq * ry
                        s = sg * sq * rx - K * ry
                        if narrow:
                            # inside the window iff sin(theta - theta_lo) >= 0 and sin(theta_hi - theta) > 0:
                            # no trigonometry for the many reflections that cross elsewhere
                            if s * clo - c * slo < 0 or shi * c - chi * s <= 0:
                                continue
                        c = c / rho
                        s = s / rho
                        # (c, s) are the cosine and sine of the rotation R_z that brings r onto the sphere
                        qx = c * rx - s * ry
                        qy = s * rx + c * ry
                        sx = (qx + inv_lam) * wavelength
                        sy = qy * wavelength
                        sz = rz * wavelength
                        if use_reach:
                            # rocking_width_terms and width_from_terms in C: zeta, sin 2theta, w, cos 2theta
                            zeta = fabs(sy * k_az - sz * k_ay)
                            if zeta < 1e-6:
                                zeta = 1e-6
                            wv = sy * k_uz - sz * k_uy
                            width = (sqrt(k_mos * k_mos * (sz * sz + sy * sy) + (k_dv * zeta) * (k_dv * zeta)
                                          + (k_dh * wv) * (k_dh * wv)) + k_disp * (1.0 - sx)) / zeta
                            far = k_ext * width * (1.0 + 1e-6) + 1e-9
                            # most of the margin's crossings go before their atan2: the sine of the angle
                            # to the inner window's nearer end above far (radians) puts the angle beyond
                            # far (sin d <= d), whichever side
                            if narrow and (c * kl_s - s * kl_c > far * rad or s * kh_c - c * kh_s > far * rad):
                                continue
                        phi = atan2(s, c) / rad
                        if axis_sign < 0:
                            phi = -phi
                        phi = phi_lo + (phi - phi_lo) - 360.0 * floor((phi - phi_lo) / 360.0)
                        if phi >= phi_hi:
                            continue
                        if use_reach and (phi + far <= k_lo or phi - far >= k_hi):
                            continue
                        if n == cap:
                            cap *= 2
                            grown = np.empty((cap, 3), np.int32)
                            grown[:n] = hkl
                            hkl = grown
                            grown = np.empty((5, cap), np.float64)
                            grown[:, :n] = out_f
                            out_f = grown
                            grown = np.empty((cap, 3), np.float64)
                            grown[:n] = out_s
                            out_s = grown
                            H = hkl
                            F = out_f
                            S1 = out_s
                        H[n, 0] = h
                        H[n, 1] = k
                        H[n, 2] = l
                        F[0, n] = phi
                        S1[n, 0] = sx
                        S1[n, 1] = sy
                        S1[n, 2] = sz
                        dn = sx * nrm[0] + sy * nrm[1] + sz * nrm[2]
                        if dn > 1e-12:
                            t = on / dn
                            px = sx * t - origin[0]
                            py = sy * t - origin[1]
                            pz = sz * t - origin[2]
                            F[1, n] = px * ex[0] + py * ex[1] + pz * ex[2]
                            F[2, n] = px * ey[0] + py * ey[1] + pz * ey[2]
                            F[3, n] = 1.0
                        else:
                            F[1, n] = NAN
                            F[2, n] = NAN
                            F[3, n] = 0.0
                        F[4, n] = 1.0 / sqrt(r2)
                        n += 1
    return (hkl[:n].copy(), out_f[0, :n].copy(), out_s[:n].copy(), out_f[1, :n].copy(), out_f[2, :n].copy(),
            out_f[3, :n] > 0.5, out_f[4, :n].copy())


def overlaps(const cnp.int64_t[::1] img, const double[::1] u, const double[::1] v, double r):
    """Which points lie within r (r < 1; Chebyshev distance, in units of the separation) of another point
    on the same image: pyflm.predict.classify's OVERLAP, as a KD-tree's query_pairs(r, p=inf) finds it
    (predict._overlaps_numpy is the twin).  All coordinates finite.  The points are bucketed by image and
    by strips one unit high along v (a counting sort), and each is compared with the rest of its strip and
    with the next strip: about ten points per strip on a crystal's images."""
    cdef Py_ssize_t n = u.shape[0], i, j, a, q, k, nb, b
    out = np.zeros(n, np.uint8)
    if n == 0:
        return out.view(np.bool_)
    cdef unsigned char[::1] O = out
    cdef cnp.int64_t i0 = np.min(img), i1 = np.max(img)
    cdef double v0 = np.min(v), v1 = np.max(v)
    cdef Py_ssize_t nv = <Py_ssize_t>floor(v1 - v0) + 2, ni = i1 - i0 + 1
    if ni * nv > 50_000_000:
        raise ValueError("too many strips for the overlap search")
    nb = ni * nv
    start_a = np.zeros(nb + 1, np.int64)
    order_a = np.empty(n, np.int64)
    key_a = np.empty(n, np.int64)
    cdef cnp.int64_t[::1] start = start_a, order = order_a, key = key_a
    cdef double du, dv
    with nogil:
        for i in range(n):
            key[i] = (img[i] - i0) * nv + <Py_ssize_t>floor(v[i] - v0)
            start[key[i] + 1] += 1
        for b in range(nb):
            start[b + 1] += start[b]
        for i in range(n):          # stable: a bucket's points in their input order
            k = key[i]
            order[start[k]] = i
            start[k] += 1
        for b in range(nb - 1, 0, -1):
            start[b] = start[b - 1]
        start[0] = 0
        for b in range(nb):
            for a in range(start[b], start[b + 1]):
                i = order[a]
                # the rest of this strip, then the next strip up (same image: nv - 1 is never filled)
                for q in range(a + 1, start[b + 2] if b + 2 <= nb else start[b + 1]):
                    j = order[q]
                    du = u[i] - u[j]
                    dv = v[i] - v[j]
                    if (du if du >= 0 else -du) <= r and (dv if dv >= 0 else -dv) <= r:
                        O[i] = 1
                        O[j] = 1
    return out.view(np.bool_)


cdef packed struct part_t:        # predict.PART_DTYPE, field for field
    cnp.int64_t index
    cnp.int32_t image
    double fraction
    cnp.int32_t n_parts
    cnp.int32_t part


def part_arguments(const double[::1] phi, const double[::1] width, double extent, double phi0, double osc,
                   Py_ssize_t first, Py_ssize_t img_lo, Py_ssize_t img_hi):
    """predict.image_parts' candidates, before its error functions (Gaussian rocking curves): every
    (reflection, image) whose range meets the curve out to `extent` widths either side, images clipped to
    [img_lo, img_hi], and the arguments of erf at the image's two ends, formed as image_parts forms them
    (the same operations in its order: the same numbers).  Returns (index, image, x_lo, x_hi); the
    caller takes erf of x_lo and x_hi (scipy's, as image_parts does) and hands them to part_rows."""
    cdef Py_ssize_t n = phi.shape[0], i, j, m = 0, lo, hi
    cdef double e, s, a, w
    cdef double SQ2 = sqrt(2.0)
    lo_a = np.empty(n, np.int64)
    cnt_a = np.empty(n, np.int64)
    cdef cnp.int64_t[::1] LO = lo_a, CNT = cnt_a
    for i in range(n):
        e = extent * width[i]
        lo = <Py_ssize_t>floor(((phi[i] - e) - phi0) / osc) + first
        hi = <Py_ssize_t>floor(((phi[i] + e) - phi0) / osc) + first
        if lo < img_lo:
            lo = img_lo
        if hi > img_hi:
            hi = img_hi
        LO[i] = lo
        CNT[i] = hi - lo + 1 if hi >= lo else 0
        m += CNT[i]
    idx_a = np.empty(m, np.int64)
    img_a = np.empty(m, np.int64)
    xlo_a = np.empty(m, np.float64)
    xhi_a = np.empty(m, np.float64)
    cdef cnp.int64_t[::1] IDX = idx_a, IMG = img_a
    cdef double[::1] XLO = xlo_a, XHI = xhi_a
    m = 0
    for i in range(n):
        w = width[i] if width[i] > 1e-9 else 1e-9
        s = SQ2 * (w / 2.3548)
        for j in range(LO[i], LO[i] + CNT[i]):
            a = phi0 + <double>(j - first) * osc
            IDX[m] = i
            IMG[m] = j
            XLO[m] = (a - phi[i]) / s
            XHI[m] = ((a + osc) - phi[i]) / s
            m += 1
    return idx_a, img_a, xlo_a, xhi_a


def part_rows(const cnp.int64_t[::1] idx, const cnp.int64_t[::1] img, const double[::1] erf_lo,
              const double[::1] erf_hi, double min_fraction, out_dtype):
    """image_parts' rows from part_arguments' candidates and erf of their arguments: the fraction on the
    image (the difference of the two ends' cumulative Gaussians, as image_parts forms it), the rows above
    min_fraction, each numbered within its reflection's kept rows (part, n_parts)."""
    cdef Py_ssize_t m = idx.shape[0], i, k = 0, g0, r
    frac_a = np.empty(m, np.float64)
    cdef double[::1] F = frac_a
    for i in range(m):
        F[i] = 0.5 * (1.0 + erf_hi[i]) - 0.5 * (1.0 + erf_lo[i])
        if F[i] > min_fraction:
            k += 1
    out = np.zeros(k, out_dtype)
    cdef part_t[::1] P = out
    k = 0
    for i in range(m):
        if F[i] > min_fraction:
            P[k].index = idx[i]
            P[k].image = <cnp.int32_t>img[i]
            P[k].fraction = F[i]
            k += 1
    g0 = 0                                   # the first row of the current reflection's kept rows
    for i in range(k + 1):
        if i == k or (i > 0 and P[i].index != P[i - 1].index):
            for r in range(g0, i):
                P[r].part = <cnp.int32_t>(r - g0 + 1)
                P[r].n_parts = <cnp.int32_t>(i - g0)
            g0 = i
    return out
