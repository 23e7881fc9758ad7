"""AUTOINDEX (DPS) and MOSAIC ESTIMATE (algorithms.md 1b).

1. Spots (x, y mm, phi) become reciprocal-lattice vectors at phi 0: s1 = unit(detector point)/lambda,
   r = s1 - s0, rotated back by -phi about the rotation axis (pyflm.geometry conventions).
2. DPS (Steller, Bolotovsky & Rossmann 1997): for directions t over a hemisphere, the projections r.t
   are quantised at multiples of 1/|a| when t lies along a real-space lattice vector a; the FFT of their
   histogram peaks at frequency |a|.  The strongest directions give candidate vectors, each refined by
   linear least squares (r.a = integer for the spots it indexes).
3. The three non-coplanar candidates of smallest cell volume that index the most spots form a basis; the
   cell is reduced (pyflm.lattice.reduce_basis) and the orientation, cell and beam centre refined by
   least squares on spot positions and phi (scipy.optimize.least_squares).
4. The lattice characters (pyflm.lattice) are listed with penalties; the preferred solution is refined
   again with its lattice's constraints and becomes job.crystal (and the NEWMAT file).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import geometry, lattice, predict
from .errors import ProcessingError

try:
    from ._ext import _refine as _ref_ext
except ImportError:            # not built: the numpy twins
    _ref_ext = None


# ---- reciprocal space -----------------------------------------------------------------------------

def spots_to_reciprocal(x_mm, y_mm, phi, wavelength, frame, reverse_phi=False):
    """Reciprocal-lattice vectors (n, 3) at phi = 0 for spots at detector (x, y) mm and phi (deg)."""
    p = geometry.mm_to_lab(x_mm, y_mm, frame)
    s1 = p / np.linalg.norm(p, axis=1)[:, None] / wavelength
    r = s1 - geometry.BEAM_DIRECTION / wavelength
    sign = 1.0 if reverse_phi else -1.0
    rot = geometry.rot_z_many(sign * np.asarray(phi, float))
    return np.einsum("nij,nj->ni", rot, r)


def hemisphere(step_deg):
    """Unit vectors over a hemisphere (z >= 0) about step_deg apart."""
    out = []
    n_theta = int(np.ceil(90.0 / step_deg))
    for i in range(n_theta + 1):
        th = np.radians(i * 90.0 / n_theta)
        n_phi = max(1, int(round(360.0 * np.sin(th) / step_deg)))
        ph = np.radians(np.arange(n_phi) * 360.0 / n_phi)
        out.append(np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph),
                             np.full(n_phi, np.cos(th))], 1))
    return np.concatenate(out)


def dps_histogram(proj, pmax, n_bins, use_cython=True):
    """The histograms of the spots' projections on each direction, (n_dir, n_bins) counts: the kernel
    (ext/_refine.pyx, as floats) when built, else numpy's bincount (its twin; the same counts)."""
    if use_cython and hasattr(_ref_ext, "dps_histogram"):
        return _ref_ext.dps_histogram(np.ascontiguousarray(proj, float), float(pmax), int(n_bins))
    bins = np.clip(((proj + pmax) / (2 * pmax) * n_bins).astype(np.int64), 0, n_bins - 1)
    flat = bins + np.arange(proj.shape[1])[None, :] * n_bins
    return np.bincount(flat.ravel(), minlength=proj.shape[1] * n_bins).reshape(-1, n_bins)


def dps_scan(r, directions, max_cell, n_bins=None, use_cython=True):
    """For each direction, the strongest FFT peak of the projection histogram: (score, length Å)."""
    pmax = np.max(np.linalg.norm(r, axis=1)) * 1.001
    if n_bins is None:
        n_bins = int(2 ** np.ceil(np.log2(max(4 * pmax * max_cell * 2, 256))))
    proj = r @ directions.T                                       # (n_spots, n_dir)
    # (the FFT of the counts as floats is the FFT of them as integers, which it converts first)
    amp = np.abs(np.fft.rfft(dps_histogram(proj, pmax, n_bins, use_cython), axis=1))
    freq_len = np.arange(amp.shape[1]) / (2 * pmax)               # Å per cycle
    # a period must repeat several times across the projections to be trusted (and 2.5 Å is no cell edge)
    lo = np.searchsorted(freq_len, max(2.5, 6.0 / (2 * pmax)))
    hi = np.searchsorted(freq_len, max_cell, side="right")
    amp[:, :lo] = 0
    amp[:, hi:] = 0
    k = np.argmax(amp, axis=1)
    return amp[np.arange(len(k)), k] / max(len(r), 1), freq_len[k]


def refine_vector(r, a, hkldev=0.15, n_iter=3):
    """Least-squares real-space vector a with r.a integer for the spots it indexes."""
    for _ in range(n_iter):
        p = r @ a
        h = np.round(p)
        ok = (np.abs(p - h) < hkldev) & (h != 0)     # index 0 would pull a towards the null vector
        if ok.sum() < 6:
            break
        new, *_ = np.linalg.lstsq(r[ok], h[ok], rcond=None)
        if not 0.8 < np.linalg.norm(new) / np.linalg.norm(a) < 1.25:
            break
        a = new
    p = r @ a
    return a, float(np.mean(np.abs(p - np.round(p)) < hkldev))


def candidate_vectors(r, max_cell, n_keep=30, step=2.0):
    dirs = hemisphere(step)
    pmax = np.max(np.linalg.norm(r, axis=1))
    score, length = dps_scan(r, dirs, max_cell)
    order = np.argsort(-score)
    cands = []
    for i in order[: n_keep * 8]:
        v = dirs[i] * length[i]
        v, frac = refine_vector(r, v)
        L = np.linalg.norm(v)
        if L < max(2.5, 6.0 / (2 * pmax)) or L > max_cell * 1.05 or frac < 0.3:
            continue
        dup = False
        for j, (w, f) in enumerate(cands):
            c = abs(v @ w) / (L * np.linalg.norm(w))
            if c > 0.995:
                ratio = L / np.linalg.norm(w)
                if abs(ratio - round(ratio)) < 0.05 or abs(1 / ratio - round(1 / ratio)) < 0.05:
                    dup = True
                    if np.linalg.norm(w) > L * 1.5 and frac >= f - 0.05:   # keep the basic vector
                        cands[j] = (v, frac)
                    break
        if not dup:
            cands.append((v, frac))
        if len(cands) >= n_keep:
            break
    return cands


def choose_basis(r, cands, hkldev=0.15):
    """Three non-coplanar candidates indexing the most spots (to 1 %), then of smallest cell volume."""
    from itertools import combinations
    vecs = np.array([c[0] for c in cands], float).reshape(-1, 3)
    triples = np.array(list(combinations(range(len(vecs)), 3)), int).reshape(-1, 3)
    if not len(triples):
        raise ProcessingError("no three independent lattice vectors were found among the spots")
    Bs = vecs[triples]                                            # (n_triples, 3, 3), rows the vectors
    vol = np.abs(np.linalg.det(Bs))
    L = np.linalg.norm(vecs, axis=1)[triples]
    # nearly coplanar triples (any angle to the plane of the other two under ~6 degrees) have a
    # volume that is mostly noise, and reduce to a nonsense cell
    keep = ~(vol < 0.1 * (L[:, 0] * L[:, 1] * L[:, 2]))
    if not keep.any():
        raise ProcessingError("no three independent lattice vectors were found among the spots")
    triples, vol, Bs = triples[keep], vol[keep], Bs[keep]
    # which spots each candidate indexes, once; a triple indexes the spots all three of its vectors do
    p = r @ vecs.T
    ok = (np.abs(p - np.round(p)) < hkldev).astype(np.float64)
    m = len(vecs)
    counts = np.empty((m, m, m))                  # spots indexed by vectors i, j and k: exact integers
    for i in range(m):
        counts[i] = (ok * ok[:, i:i + 1]).T @ ok
    frac = counts[triples[:, 0], triples[:, 1], triples[:, 2]] / max(len(r), 1)
    # every sum of lattice vectors is a lattice vector that indexes as well: among the triples that
    # index as many spots (to one spot in 30, or two spots when there are few) take the smallest cell
    best = frac.max()
    tol = max(0.034, 2.0 / max(len(r), 1))
    near = np.flatnonzero(frac >= best - tol)
    i = near[np.lexsort((-frac[near], vol[near]))[0]]             # smallest volume, then most spots
    return Bs[i], float(frac[i])


# ---- refinement on spot positions ------------------------------------------------------------------

@dataclass
class Fit:
    A: np.ndarray              # reciprocal setting matrix (columns a*, b*, c*) at phi 0
    beam_x: float
    beam_y: float
    rms_mm: float
    rms_phi: float
    n_used: int
    hkl: np.ndarray = None
    used: np.ndarray = None
    detector: object = None    # the detector with any refined parameters
    esd: dict = None           # standard uncertainties of the refined detector parameters


_FRAMES = {}


def _frame(*key):
    """geometry.detector_frame, kept for the parameters seen: a fit's finite-difference steps move one
    parameter at a time, so most of its evaluations have the detector of the one before (the same
    arrays, not recomputed: the same numbers)."""
    f = _FRAMES.get(key)
    if f is None:
        if len(_FRAMES) > 256:
            _FRAMES.clear()
        f = _FRAMES[key] = geometry.detector_frame(*key)
    return f


def _predict_spots(A, hkl, phi_obs, wavelength, detector, beam_xy, reverse, rocking=None):
    """Predicted (x mm, y mm, phi) of indexed spots: the crossing nearer the observed phi.  With
    rocking (RockingCentroids), where the recorded part of each rocking curve is centred instead:
    its phi centroid over the images and the position the spot has there (the lattice point turned
    to that phi, its ray through the nearest point of the sphere), as a 3D spot's centroids are
    measured; near the rotation axis a spot runs across the detector while it crosses, so cutting
    its curve off moves its x, y centroid too."""
    return _predict_r0(np.asarray(hkl, float) @ np.asarray(A, float).T, phi_obs, wavelength, detector, beam_xy,
                       reverse, rocking)


def _predict_r0(r0, phi_obs, wavelength, detector, beam_xy, reverse, rocking=None):
    """_predict_spots for the lattice points r0 = A.h (n, 3) at phi 0: each row on its own, so a
    fit's Jacobian moves every spot's r0 at once (refine_orientation)."""
    s1, phi, ok = _rays_r0(r0, phi_obs, wavelength, reverse, rocking)
    x, y, hit = _on_detector(s1, detector, beam_xy)
    return x, y, phi, ok & hit


def _rays_r0(r0, phi_obs, wavelength, reverse, rocking=None):
    """The diffracted rays s1 of lattice points r0 at their phi (nearer the observed), and whether they cross."""
    p1, p2, ok = predict.crossings_of(r0, wavelength, reverse)
    d1 = np.abs((p1 - phi_obs + 180) % 360 - 180)
    d2 = np.abs((p2 - phi_obs + 180) % 360 - 180)
    phi = np.where(d1 <= d2, p1, p2)
    phi = phi_obs + ((phi - phi_obs + 180) % 360 - 180)
    sign = -1 if reverse else 1
    s1 = np.einsum("nij,nj->ni", geometry.rot_z_many(sign * phi), r0) + geometry.BEAM_DIRECTION / wavelength
    if rocking is not None:
        phi = rocking.seen(phi, s1)
        s1 = np.einsum("nij,nj->ni", geometry.rot_z_many(sign * phi), r0) + geometry.BEAM_DIRECTION / wavelength
    return s1, phi, ok


def _on_detector(s1, detector, beam_xy):
    frame = _frame(float(detector.distance), float(beam_xy[0]), float(beam_xy[1]), float(detector.two_theta),
                   float(detector.tilt), float(detector.twist), float(detector.omega))
    return geometry.lab_to_mm(s1, frame)


class RockingCentroids:
    """The phi centroid merge_3d gives a reflection crossing the sphere at phi: the mean of the
    searched images' midpoints weighted by the share of its rocking curve on each (pyflm.predict's
    Gaussian of FWHM rocking_width_xds at spread eta).  A curve running on beyond the first or last
    image is pulled inwards, as the observed centroid is, by up to half its width; near the rotation
    axis, where the width is a degree or more and the crossing's phi is most sensitive to the cell,
    that is most of the spots' phi information, which fitting cut spots on x, y alone threw away.
    lo, hi: the images' phi ranges (scan degrees).
    AUTOINDEX does not use it yet: on L-cysteine it brings the cells of sweeps 1 and 4 within 0.1 %
    of each other and of DIALS's (0.6 % apart before) and fits the spot positions 20 % better, and
    puts sweep 4's (-1 -7 -3), the one strong near-axis reflection whose whole rocking curve is on
    the images (peak on image 9, light centre 0.895 degrees from the scan's start in a 13 x 13 box
    that holds the spot as it runs 5 pixels across the detector), at 0.891-0.896 (1.132 without it).
    (0 3 7) and (1 -7 -5) still brighten at image 15, so the images do not fix their centres (a
    fit of fixed width puts them at the scan's end); it moves (1 -7 -5) from 2.22 to 2.69 degrees,
    where the Gaussian of its width leaves under 1 % a part on the images and integration loses it.
    Their light rises more slowly than that Gaussian's flank: near the axis the widths are those of a
    spread of 0.22-0.28 degrees, near the equator 0.10-0.12 (with tails beyond a Gaussian's), which
    is the beam's divergence along the axis (rocking_width_xds; 0.15 degrees on both sweeps)."""

    def __init__(self, lo, hi, eta, beam, axis):
        self.lo, self.hi = np.asarray(lo, float), np.asarray(hi, float)
        self.mid = 0.5 * (self.lo + self.hi)
        self.eta, self.beam, self.axis = float(eta), beam, axis

    def seen(self, phi, s1):
        s1u = s1 / np.linalg.norm(s1, axis=1)[:, None]
        width = predict.rocking_width_xds(s1u, self.axis, self.eta, self.beam)
        f = predict.fraction_inside(phi[:, None], width[:, None], self.lo[None], self.hi[None])
        tot = f.sum(1)
        # a curve wholly off the images: the nearest end (only a bad start is there)
        c = np.clip(phi, self.mid[0], self.mid[-1])
        on = tot > 1e-12
        c[on] = (f[on] @ self.mid) / tot[on]
        return c


def refine_orientation(A, hkl, x_obs, y_obs, phi_obs, wavelength, detector, *, reverse=False,
                       refine_beam=True, cell_params=None, phi_weight=None, refine_detector=(),
                       phi_known=None, rocking=None, jacobian="closed"):
    """Least-squares refinement of A (9 free elements, or orientation + constrained cell given by
    cell_params = (lattice, cell)) and the beam centre on spot positions (mm) and phi; refine_detector
    names Detector attributes ('distance', 'omega', 'two_theta') refined as well (Fit.detector).
    phi_known (bool per spot, default all): spots whose phi centroid is an observation; the others
    (cut off by the first or last image of a sweep) are fitted on their positions alone.
    rocking (RockingCentroids): every spot's phi centroid is compared with what its rocking curve
    puts on the images (phi_known is then not needed: a cut centroid is modelled, not dropped).
    jacobian: "closed" (through r0 = A.h, below) or "2-point" (scipy's differences; the tests' check)."""
    import copy
    det_names = tuple(refine_detector)
    det0 = np.array([float(getattr(detector, k)) for k in det_names])
    det_scale = np.array([{"distance": 0.5}.get(k, 0.2) for k in det_names])
    base_det = detector
    beam0 = np.array([detector.beam_x, detector.beam_y])
    px = detector.pixel_fast
    phi_w = phi_weight or (px / np.radians(0.2) / detector.distance * 57.3 * 0.02)   # ~1 px per 0.2 deg
    if rocking is not None and phi_weight is None:
        # a 3D spot's phi centroid over thin images is known to a few hundredths of a degree, not to
        # an image's width: ~1 px per 0.067 degree (at 1 px per 0.2 the turn about the axis drifted
        # 0.04-0.07 degrees from the centroids of the uncut spots, for no better fit in x, y)
        phi_w *= 3.0
    all_pw = phi_w * (np.ones(len(hkl)) if phi_known is None or rocking is not None
                      else np.asarray(phi_known, float))

    def spots_at(*a):
        return _predict_spots(*a, rocking=rocking)
    if cell_params is None:
        x0 = np.concatenate([A.ravel(), beam0 if refine_beam else []])

        def unpack(x):
            return x[:9].reshape(3, 3), (x[9:11] if refine_beam else beam0)
        scale = np.concatenate([np.abs(A).ravel() * 0.01 + 1e-6, [0.1, 0.1] if refine_beam else []])
    else:
        lat, cell0 = cell_params
        U0 = A @ np.linalg.inv(geometry.b_matrix(cell0))
        uu, _, vv = np.linalg.svd(U0)
        U0 = uu @ vv
        free = _free_cell(lat, cell0)

        def rot_of(v):
            return geometry.rot_about(v / (np.linalg.norm(v) + 1e-30), np.degrees(np.linalg.norm(v))) \
                if np.linalg.norm(v) > 0 else np.eye(3)

        def unpack(x):
            cell = free(x[3:3 + free.n])
            Am = rot_of(x[:3]) @ U0 @ geometry.b_matrix(cell)
            return Am, (x[3 + free.n:5 + free.n] if refine_beam else beam0)
        x0 = np.concatenate([np.zeros(3), free.x0, beam0 if refine_beam else []])
        scale = np.concatenate([np.full(3, 1e-3), np.abs(free.x0) * 1e-3 + 1e-3,
                                [0.1, 0.1] if refine_beam else []])

    n_main = len(x0)
    x0 = np.concatenate([x0, det0])
    scale = np.concatenate([scale, det_scale])

    def det_of(x):
        if not det_names:
            return base_det
        d = copy.copy(base_det)
        for k, v in zip(det_names, x[n_main:]):
            setattr(d, k, float(v))
        return d

    def resid(x):
        try:
            Am, b = unpack(x[:n_main])
        except (ValueError, np.linalg.LinAlgError):      # a step into an impossible cell
            return np.full(3 * len(hkl), 1e3)
        xp, yp, pp, ok = spots_at(Am, hkl, phi_obs, wavelength, det_of(x), b, reverse)
        rx = np.where(ok, xp - x_obs, 1.0)
        ry = np.where(ok, yp - y_obs, 1.0)
        rp = np.where(ok, (pp - phi_obs) * pw, 1.0)
        return np.concatenate([rx, ry, rp])

    # The Jacobian in closed form through A: a spot's (x, y, phi) depend on A only through its own
    # r0 = A.h, so three central differences of r0 (every spot's at once, in one stacked prediction)
    # give d(x, y, phi)/d r0 for all spots, and d r0/dx = h.dA/dx (dA/dx by differences of unpack
    # alone: no predictions); the beam and detector parameters by one central difference each of
    # where the rays meet the detector.  With
    # scipy's 2-point differences every parameter cost a prediction (11-13 a Jacobian): 77 % of the
    # fit's time went there.
    H_R0 = 1e-7                                          # 1/A: r0 is 0.01-1, x, y 100s of mm
    EYE3 = np.eye(3)

    def jac(x):
        n_a = n_main - (2 if refine_beam else 0)         # the parameters of A
        try:
            Am, b = unpack(x[:n_main])
            if cell_params is not None:
                # A = R(v) U0 B(cell): dR/dv_k = [J(v) e_k]x R, J the rotation vector's (left) Jacobian;
                # dB/dcell by forward differences of the 3 x 3 B
                v, t = x[:3], float(np.linalg.norm(x[:3]))
                K = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
                if t < 1e-3:
                    c1, c2 = 0.5 - t * t / 24, 1 / 6 - t * t / 120
                else:
                    c1, c2 = (1 - np.cos(t)) / t ** 2, (t - np.sin(t)) / t ** 3
                Jv = np.eye(3) + c1 * K + c2 * (K @ K)
                dA = [np.cross(Jv[:, k], Am, axisa=0, axisb=0, axisc=0) for k in range(3)]
                RU = rot_of(v) @ U0
                xc = x[3:3 + free.n]
                B = geometry.b_matrix(free(xc))
                for k in range(free.n):
                    h = 1.5e-8 * max(1.0, abs(xc[k]))
                    xk = xc.copy()
                    xk[k] += h
                    dA.append(RU @ ((geometry.b_matrix(free(xk)) - B) / h))
        except (ValueError, np.linalg.LinAlgError):      # an impossible cell: differences of resid
            from scipy.optimize import approx_fprime
            return approx_fprime(x, resid)
        n = len(hkl)
        hf = np.asarray(hkl, float)
        r0 = hf @ Am.T
        det = det_of(x)
        stack = np.concatenate([r0] + [r0 + s * H_R0 * EYE3[i] for i in range(3) for s in (1, -1)])
        s1, ps, oks = _rays_r0(stack, np.tile(phi_obs, 7), wavelength, reverse, rocking)
        xs, ys, hit = _on_detector(s1, det, b)
        good = (oks & hit).reshape(7, n).all(0)
        P = np.stack([xs, ys, ps * np.tile(pw, 7)])[:, n:].reshape(3, 3, 2, n)  # (x|y|phi, r0_i, +|-, spot)
        D = np.where(good, (P[:, :, 0] - P[:, :, 1]) / (2 * H_R0), 0.0)       # (3, 3, n)
        J = np.empty((3 * n, len(x)))
        if cell_params is None:                          # x[3i + j] is A[i, j]: d r0_i / dA_ij = h_j
            J[:, :9] = (D[:, :, None, :] * hf.T[None, None]).reshape(3, 9, n).transpose(0, 2, 1).reshape(3 * n, 9)
        else:
            dr0 = np.einsum("nj,kij->kni", hf, np.array(dA))                    # (k, n, 3)
            J[:, :n_a] = np.einsum("cin,kni->cnk", D, dr0).reshape(3 * n, n_a)
        # beam centre, then detector parameters: they move where the rays meet the detector, not the rays
        s1 = s1[:n]
        for k in range(n_a, len(x)):
            h = 6e-6 * max(1.0, abs(x[k]))
            cols, gk = [], good.copy()
            for s in (1, -1):
                xk = x.copy()
                xk[k] += s * h
                xp_, yp_, hit = _on_detector(s1, det_of(xk), xk[n_main - 2:n_main] if k < n_main else b)
                gk &= hit
                cols.append(np.concatenate([xp_, yp_]))
            J[:2 * n, k] = np.where(np.tile(gk, 2), (cols[0] - cols[1]) / (2 * h), 0.0)
            J[2 * n:, k] = 0.0
        return J

    # imported here, not with the module: with NPROC > 1 run_autoindex imports it while a worker
    # searches an image (a sixth of a second, on the path to the first result otherwise)
    from scipy.optimize import least_squares
    all_hkl, all_x, all_y, all_phi = hkl, x_obs, y_obs, phi_obs
    use = np.ones(len(all_hkl), bool)
    for cycle in range(3):
        hkl, x_obs, y_obs, phi_obs, pw = all_hkl[use], all_x[use], all_y[use], all_phi[use], all_pw[use]
        res = least_squares(resid, x0, jac=jac if jacobian == "closed" else jacobian, x_scale=scale,
                            loss="soft_l1", f_scale=0.3, max_nfev=200)
        x0 = res.x
        Am, b = unpack(res.x[:n_main])
        detector = det_of(res.x)
        xp, yp, pp, ok = spots_at(Am, all_hkl, all_phi, wavelength, detector, b, reverse)
        err = np.where(ok, np.sqrt((xp - all_x) ** 2 + (yp - all_y) ** 2 + ((pp - all_phi) * all_pw) ** 2),
                       np.inf)
        # outliers (fragments of split spots, a second lattice, zingers) would bend a fit of a few
        # dozen spots: drop those far beyond the typical error (robust scale: the median) and refit
        lim = max(4.0 * np.median(err[use & ok]) if (use & ok).any() else 1.0, 1.5 * px)
        new_use = err < lim
        if new_use.sum() < max(6, 0.5 * len(all_hkl)) or np.array_equal(new_use, use):
            break
        use = new_use
    hkl, x_obs, y_obs, phi_obs = all_hkl, all_x, all_y, all_phi
    xp, yp, pp, ok = spots_at(Am, hkl, phi_obs, wavelength, detector, b, reverse)
    dxy = np.hypot(xp - x_obs, yp - y_obs)
    good = ok & use & (dxy < max(3 * np.median(dxy[ok & use]) if (ok & use).any() else 1.0, 0.05))
    rms = float(np.sqrt(np.mean(dxy[good] ** 2))) if good.any() else float("nan")
    gp = good & (all_pw > 0)
    rphi = float(np.sqrt(np.mean((pp - phi_obs)[gp] ** 2))) if gp.any() else float("nan")
    esd = {}
    if det_names:
        # from the Gauss-Newton normal matrix at the solution, scaled by the fit's own residual
        J = res.jac
        dof = max(J.shape[0] - J.shape[1], 1)
        try:
            cov = np.linalg.pinv(J.T @ J) * (2 * res.cost / dof)
            esd = {k: float(np.sqrt(max(cov[n_main + i, n_main + i], 0.0))) for i, k in enumerate(det_names)}
        except np.linalg.LinAlgError:
            esd = {k: float("inf") for k in det_names}
    return Fit(Am, float(b[0]), float(b[1]), rms, rphi, int(good.sum()), hkl, good, detector, esd)


class _free_cell:
    """Free parameters of a cell under a lattice's constraints."""

    def __init__(self, lat, cell):
        a, b, c, al, be, ga = cell
        k = lat[0]
        self.k = k
        if k == "a":
            self.x0 = np.array(cell, float)
        elif k == "m":
            self.x0 = np.array([a, b, c, be])
        elif k == "o":
            self.x0 = np.array([a, b, c])
        elif k in "th":
            self.x0 = np.array([(a + b) / 2, c])
        else:
            self.x0 = np.array([(a + b + c) / 3])
        self.n = len(self.x0)

    def __call__(self, x):
        k = self.k
        if k == "a":
            return tuple(x)
        if k == "m":
            return (x[0], x[1], x[2], 90.0, x[3], 90.0)
        if k == "o":
            return (x[0], x[1], x[2], 90.0, 90.0, 90.0)
        if k == "t":
            return (x[0], x[0], x[1], 90.0, 90.0, 90.0)
        if k == "h":
            return (x[0], x[0], x[1], 90.0, 90.0, 120.0)
        return (x[0], x[0], x[0], 90.0, 90.0, 90.0)


# ---- the whole indexing ----------------------------------------------------------------------------

@dataclass
class IndexingResult:
    solutions: list
    chosen: lattice.Solution
    crystal: object
    beam_x: float
    beam_y: float
    beam_start: tuple
    rms_mm: float
    rms_phi: float
    n_indexed: int
    n_spots: int
    initial_cell: tuple
    lines: list = field(default_factory=list)
    detector: object = None        # the detector as refined (distance, tilt, twist), or as given


def _assign(r, red, hkldev):
    """Indices of reciprocal vectors r on the real basis rows red: (hkl, which spots index), one spot
    per index (the fragments of a split reflection would be fitted twice)."""
    p = r @ red.T
    hkl = np.round(p)
    dev = np.abs(p - hkl).max(axis=1)
    good = (dev < hkldev) & np.any(hkl != 0, axis=1)
    order = np.lexsort((dev, hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    same = np.zeros(len(hkl), bool)
    same[order[1:]] = np.all(hkl[order[1:]] == hkl[order[:-1]], axis=1)
    return hkl, good & ~same


def index_spots(spots, beam, detector, goniometer, *, max_cell=None, hkldev=0.15, refine_beam=True,
                known_cell=None, known_symmetry=None, solution=None, refine_detector="auto", rocking=None):
    """Index a spot list (pyflm.spots.SPOT_DTYPE).  Returns IndexingResult; raises ProcessingError.
    rocking (RockingCentroids): the spots' phi centroids are modelled by their rocking curves."""
    from .model import Crystal
    ok = spots[spots["flag"] == 0] if "flag" in spots.dtype.names else spots
    if len(ok) < 10:
        raise ProcessingError(f"only {len(ok)} spots to index: too few (at least 10 are needed). Lower "
                              "THRESHOLD, add images (AUTOINDEX IMAGE n), or check the beam centre and "
                              "distance")
    frame = detector.frame()
    r = spots_to_reciprocal(ok["x_mm"], ok["y_mm"], ok["phi"], beam.wavelength, frame,
                            goniometer.reverse_phi)
    dmin = 1.0 / np.max(np.linalg.norm(r, axis=1))
    if max_cell is None:
        # the longest cell edge a spot separation on this detector can resolve, capped, and no longer
        # than the spots' own spacing suggests (as DIALS estimates it: 1.3 / the 5th percentile of the
        # nearest-neighbour distances in reciprocal space).  Long trial vectors index a sparse spot set
        # by chance, and would be taken for a cell edge.
        from scipy.spatial import cKDTree
        max_cell = min(400.0, detector.distance * beam.wavelength / (3 * detector.pixel_fast))
        nn = cKDTree(r).query(r, k=2)[0][:, 1]
        nn = nn[nn > 0]
        if len(nn) >= 10:
            max_cell = min(max_cell, max(1.3 / np.percentile(nn, 5), 20.0))
    cands = candidate_vectors(r, max_cell)
    if len(cands) < 3:
        raise ProcessingError("DPS found fewer than three lattice directions: the spots do not form a "
                              "lattice with this geometry. Check the beam centre, distance and wavelength")
    basis, frac = choose_basis(r, cands, hkldev)
    red, _ = lattice.reduce_basis(basis)
    Astar = np.linalg.inv(red)                     # columns: reciprocal axes of the reduced cell
    hkl, good = _assign(r, red, hkldev)
    xyz = (ok["x_mm"], ok["y_mm"], ok["phi"])
    # 3D spots cut off by the first or last image: fitted on their positions, not their phi, unless
    # that would leave too few phi centroids to fix the turn about the axis
    phi_known = ok["phi_cut"] == 0
    if phi_known.sum() < 3:
        phi_known[:] = True
    fit = refine_orientation(Astar, hkl[good], *(v[good] for v in xyz), beam.wavelength, detector,
                             reverse=goniometer.reverse_phi, refine_beam=refine_beam,
                             phi_known=phi_known[good], rocking=rocking)
    # the DPS basis indexes the low-resolution spots; the refined one reaches further out, where
    # the Ewald sphere's curvature separates the distance from the cell: index again with it (and
    # the refined beam centre) while that adds spots, as DIALS's macro-cycles do
    det_cur = detector
    for _ in range(3):
        det_try = copy.copy(detector)
        det_try.beam_x, det_try.beam_y = fit.beam_x, fit.beam_y
        r_try = spots_to_reciprocal(ok["x_mm"], ok["y_mm"], ok["phi"], beam.wavelength, det_try.frame(),
                                    goniometer.reverse_phi)
        hkl_try, good_try = _assign(r_try, np.linalg.inv(fit.A), hkldev)
        if good_try.sum() < good.sum() + max(2, 0.05 * good.sum()):
            break
        fit_try = refine_orientation(fit.A, hkl_try[good_try], *(v[good_try] for v in xyz), beam.wavelength,
                                     det_try, reverse=goniometer.reverse_phi, refine_beam=refine_beam,
                                     phi_known=phi_known[good_try], rocking=rocking)
        if not np.isfinite(fit_try.rms_mm) or fit_try.rms_mm > 1.5 * fit.rms_mm:
            break
        hkl, good, fit, det_cur = hkl_try, good_try, fit_try, det_try
    red = np.linalg.inv(fit.A)
    sols = lattice.lattice_solutions(red)
    if known_cell is not None:
        for s in sols:
            dev = np.abs(np.array(s.reg_cell[:3]) - np.array(known_cell[:3])) / np.array(known_cell[:3])
            if dev.max() > 0.03:
                s.penalty = max(s.penalty, 999.0)
    if solution:
        chosen = next((s for s in sols if s.number == int(solution)), None)
        if chosen is None:
            raise ProcessingError(f"there is no solution {solution} in the table")
    else:
        chosen = lattice.preferred(sols)
    conv = chosen.transform @ red                # conventional real basis rows
    A_conv = np.linalg.inv(conv)
    # keep the conventional cell's own order but make its axes right-handed (det of conv > 0)
    hkl_c = np.round(hkl[good] @ chosen.transform.T)    # indices transform like the basis rows
    initial_cell = chosen.reg_cell
    args = (A_conv, hkl_c, ok["x_mm"][good], ok["y_mm"][good], ok["phi"][good], beam.wavelength, det_cur)
    kw = dict(reverse=goniometer.reverse_phi, refine_beam=refine_beam,
              cell_params=(chosen.lattice, chosen.reg_cell), phi_known=phi_known[good], rocking=rocking)
    if refine_detector == "auto":
        # the distance and the detector's tilts, as DIALS refines them while indexing: a header's
        # distance can be 1 % out (L-cysteine: 157.9 mm refined, 160 in the header), and the cell
        # scales with it.  With few spots the fit could wander: keep it only near the header's values.
        refine_detector = ("distance", "tilt", "twist") if good.sum() >= 15 else ()
        if refine_detector and np.ptp(ok["phi"]) < 0.5:
            # all spots at one phi (one thin image): a tilt of the detector is then nearly a shift
            # of the beam with a turn of the crystal, and a fit of both walks the beam off by a
            # millimetre (example_009: 1.1 mm, DIALS keeps it within 0.2); the distance alone
            refine_detector = ("distance",)
    fit2 = refine_orientation(*args, **kw, refine_detector=refine_detector)
    d2 = fit2.detector
    # one thin image fixes the distance only through the Ewald sphere's curvature (spots far out
    # against spots near the beam): keep the refined detector only when its esd says it is known
    # to a quarter of a percent (the cell scales with it), and near the header's values
    esd_d = (fit2.esd or {}).get("distance", 0.0)
    if refine_detector and (abs(d2.distance / detector.distance - 1) > 0.03 or
                            max(abs(d2.tilt - detector.tilt), abs(d2.twist - detector.twist)) > 3.0 or
                            not esd_d < 0.0025 * detector.distance):
        fit2 = refine_orientation(*args, **kw)
    cell = tuple(geometry.cell_from_a(fit2.A))
    B = geometry.b_matrix(cell)
    U = fit2.A @ np.linalg.inv(B)
    uu, _, vv = np.linalg.svd(U)
    U = uu @ vv
    sg = known_symmetry or chosen.space_group
    from .job import space_group_name
    crystal = Crystal(cell, space_group_name(sg), U, (0.0, 0.0, 0.0))
    res = IndexingResult(sols, chosen, crystal, fit2.beam_x, fit2.beam_y,
                         (detector.beam_x, detector.beam_y), fit2.rms_mm, fit2.rms_phi, fit2.n_used,
                         len(ok), tuple(initial_cell), detector=fit2.detector)
    res.detector_esd = fit2.esd or {}
    res.fraction_indexed = float(np.mean(good))
    # what pre-refining the other solutions of the table needs (prerefine_solutions)
    res.fit_data = (red, hkl[good], ok["x_mm"][good], ok["y_mm"][good], ok["phi"][good], len(ok),
                    beam.wavelength, fit2.detector, goniometer.reverse_phi, fit2.beam_x, fit2.beam_y)
    return res


def prerefine_solutions(res, max_penalty=200.0, nproc=1, scheduler=None):
    """MOSFLM's pre-refinement: every solution better than max_penalty refined with its lattice's
    constraints (orientation and cell, the detector and beam as refined for the chosen one), for the
    table's "ref" cell, its sd in spot positions (SDCELL) and the fraction of spots it fits (FRACN).
    The solutions' fits are independent: with nproc > 1 they are shared out to worker processes."""
    import copy
    data = getattr(res, "fit_data", None)
    if data is None:
        return
    red, hkl, x, y, phi, n_spots, wavelength, det, reverse, bx, by = data
    det = copy.copy(det)
    det.beam_x, det.beam_y = bx, by
    # a table's figures, not the final fit: 150 spots spread over the list are plenty, and rows
    # that are the same cell in the same lattice (several characters can give one) are fitted once
    pick = np.linspace(0, len(hkl) - 1, min(len(hkl), 150)).round().astype(int)
    frac_scale = len(hkl) / max(n_spots, 1) / len(pick)
    todo = {}
    for s in res.solutions:
        key = (s.lattice, tuple(np.round(s.reg_cell, 1)))
        if s.penalty < max_penalty and key not in todo:
            todo[key] = (s.transform, red, hkl[pick], x[pick], y[pick], phi[pick], wavelength, det, reverse,
                         s.lattice, s.reg_cell)
    from .distributed import run_tasks
    done = dict(zip(todo, run_tasks(_prerefine_one, list(todo.values()), nproc, scheduler)))
    for s in res.solutions:
        if s.penalty >= max_penalty:
            continue
        fit = done[(s.lattice, tuple(np.round(s.reg_cell, 1)))]
        if fit is not None and np.isfinite(fit.rms_mm):
            s.ref_cell = tuple(geometry.cell_from_a(fit.A))
            s.sd_mm, s.fraction = fit.rms_mm, fit.n_used * frac_scale


def _prerefine_one(transform, red, hkl, x, y, phi, wavelength, det, reverse, lat, reg_cell):
    """One solution's constrained fit for prerefine_solutions (None when its cell cannot be fitted)."""
    try:
        A_conv = np.linalg.inv(transform @ red)
        return refine_orientation(A_conv, np.round(hkl @ transform.T), x, y, phi, wavelength, det,
                                  reverse=reverse, refine_beam=False, cell_params=(lat, reg_cell))
    except (ValueError, np.linalg.LinAlgError):
        return None


def _good(res, detector):
    """Good enough not to search other beam centres: most spots indexed, well fitted; or (a second
    lattice taking the rest) at least 40 % fitted to well under a pixel in a lattice of orthorhombic
    or higher symmetry with a low penalty, which a wrong beam centre does not give."""
    px = detector.pixel_fast
    if res is None or res.rms_mm >= 4 * px:
        return False
    if res.fraction_indexed > 0.6:
        return True
    return (res.fraction_indexed >= 0.4 and res.rms_mm < 0.6 * px and res.chosen.penalty < 10 and
            lattice.SYMMETRY_ORDER[res.chosen.lattice] >= 4)


def _better(r, best):
    """Does trial r index better than best?  More spots without a much larger cell (a supercell
    indexes every spot of the true one and more by chance), or as many with a clearly smaller cell,
    or as many as well with a smaller error."""
    if best is None:
        return True
    vol = lambda x: abs(np.linalg.det(np.linalg.inv(x.crystal.A)))
    vr, vb = vol(r), vol(best)
    fr, fb = r.fraction_indexed, best.fraction_indexed
    if fr >= fb + 0.03 and vr <= 1.5 * vb:
        return True
    if fr >= fb - 0.03 and vr < vb / 1.5:
        return True
    return abs(fr - fb) < 0.03 and r.rms_mm < best.rms_mm and vr <= 1.5 * vb


def _plausible(res, detector):
    """A solution worth reporting at all: finite residuals, real cell edges, the beam still near, and
    either most spots indexed or the indexed ones fitted well.  (A second lattice leaves half the spots
    unindexed but fits the rest to half a pixel; a distance 10-20 % wrong indexes a third of them at a
    pixel or worse.)"""
    px = detector.pixel_fast
    return (res is not None and np.isfinite(res.rms_mm) and res.rms_mm < 10 * px
            and min(res.crystal.cell[:3]) > 2.0 and
            np.hypot(res.beam_x - detector.beam_x, res.beam_y - detector.beam_y) < 3.0 and
            (res.fraction_indexed >= 0.6 or res.rms_mm < 0.75 * px))


def _index_refining_beam(spots, beam, detector, goniometer, n_rounds=3, **kw):
    """Index, then index again from the refined beam centre while it keeps moving."""
    import copy
    det = detector
    res = index_spots(spots, beam, det, goniometer, **kw)
    for _ in range(n_rounds):
        if abs(res.beam_x - det.beam_x) < 0.02 and abs(res.beam_y - det.beam_y) < 0.02:
            break
        det = copy.copy(det)
        det.beam_x, det.beam_y = res.beam_x, res.beam_y
        try:
            nxt = index_spots(spots, beam, det, goniometer, **kw)
        except ProcessingError:
            break
        if (nxt.fraction_indexed, -nxt.rms_mm) < (res.fraction_indexed, -res.rms_mm):
            break
        res = nxt
    return res


def index_with_beam_search(spots, beam, detector, goniometer, log=None, **kw):
    """Index; if that fails or fits badly, search beam centres within +/- 2 mm (1 mm grid, then the
    refinement moves the beam the rest of the way) and keep the best-indexing one."""
    import copy
    first_err, res = None, None
    try:
        res = _index_refining_beam(spots, beam, detector, goniometer, **kw)
    except ProcessingError as e:
        first_err = e
    best = res
    if not _good(res, detector):
        offsets = sorted(((dx, dy) for dx in (-2, -1, 0, 1, 2) for dy in (-2, -1, 0, 1, 2) if dx or dy),
                         key=lambda o: np.hypot(*o))
        # the trials keep the detector as given (refining it too would triple the search's time);
        # the one kept is refined in full below
        trial_kw = dict(kw, refine_detector=())
        for dx, dy in offsets:
            det = copy.copy(detector)
            det.beam_x, det.beam_y = detector.beam_x + dx, detector.beam_y + dy
            try:
                r = _index_refining_beam(spots, beam, det, goniometer, n_rounds=1, **trial_kw)
            except ProcessingError:
                continue
            if _better(r, best):
                best = r
            if _good(best, detector):
                break
        if best is not None and best is not res and kw.get("refine_detector", "auto") != ():
            det = copy.copy(detector)
            det.beam_x, det.beam_y = best.beam_x, best.beam_y
            try:
                full = index_spots(spots, beam, det, goniometer, **kw)
                same = (full.chosen.lattice == best.chosen.lattice and np.allclose(
                    sorted(full.crystal.cell[:3]), sorted(best.crystal.cell[:3]), rtol=0.01))
                if same and full.fraction_indexed >= best.fraction_indexed - 0.02 and full.rms_mm <= best.rms_mm * 1.1:
                    best = full
            except ProcessingError:
                pass
    if best is None:
        raise first_err or ProcessingError("indexing failed")
    if not _plausible(best, detector):
        raise ProcessingError(f"no solution fits the spots (best sd in positions {best.rms_mm:.2f} mm, "
                              f"beam moved to {best.beam_x:.1f} {best.beam_y:.1f} mm)")
    if log is not None and (abs(best.beam_x - detector.beam_x) > 0.3 or abs(best.beam_y - detector.beam_y) > 0.3):
        log.line(f" Beam centre search: the direct beam has been moved from {detector.beam_x:.2f} "
                 f"{detector.beam_y:.2f} to {best.beam_x:.2f} {best.beam_y:.2f} mm")
    best.beam_start = (detector.beam_x, detector.beam_y)
    return best


def format_result(res, wavelength):
    c = res.chosen
    cell = res.crystal.cell
    L = []
    L += lattice.format_table(res.solutions)
    L.append("")
    L.append(f" Suggested Solution: {c.number:2d}  {c.space_group}")
    L.append(f"            penalty: {c.penalty:3.0f}")
    L.append("               cell: " + " ".join(f"{v:8.3f}" for v in c.cell[:3]) + " " +
             " ".join(f"{v:6.2f}" for v in c.cell[3:]))
    L.append("   regularized cell: " + " ".join(f"{v:8.3f}" for v in c.reg_cell[:3]) + " " +
             " ".join(f"{v:6.2f}" for v in c.reg_cell[3:]))
    L.append(f"           Symmetry: {c.lattice} ({lattice.LATTICE_NAMES[c.lattice]})")
    L.append("")
    sgn = lattice.SG_NUMBER.get(c.space_group, 0)
    L.append(f"Refining solution #{c.number:2d} with {c.space_group} (number {sgn:4d}) symmetry imposed")
    L.append("")
    L.append("Initial cell (before refinement) is " + "".join(f"{v:10.4f}" for v in res.initial_cell[:3])
             + "".join(f"{v:8.3f}" for v in res.initial_cell[3:]))
    L.append(f"Using {res.n_indexed:4d} indexed reflections (out of {res.n_spots:4d} spots used in indexing)")
    L.append(f"final sd in spot positions is {res.rms_mm:4.2f}mm and in phi {res.rms_phi:4.2f} degrees")
    L.append("Refined cell parameters " + "".join(f"{v:8.2f}" for v in cell))
    bx0, by0 = res.beam_start
    L.append(f"Beam coordinates of {bx0:6.2f} {by0:6.2f} have been refined to {res.beam_x:6.2f} "
             f"{res.beam_y:6.2f}")
    L.append("  Final cell (after refinement) is " + "".join(f"{v:10.4f}" for v in cell[:3]) +
             "".join(f"{v:8.3f}" for v in cell[3:]))
    L.append(f"           Symmetry: {c.lattice} ({lattice.LATTICE_NAMES[c.lattice]})")
    return L


# ---- mosaicity ------------------------------------------------------------------------------------

def estimate_mosaic(crystal, beam, detector, goniometer, spots, phi_range, dmin, grid=None):
    """Mosaic spread (full width, degrees): the smallest spread at which the reflections predicted on
    the image account for (all but 0.2 % of the plateau of) the found spots near a predicted position."""
    from scipy.spatial import cKDTree
    import copy
    ok = spots[spots["flag"] == 0]
    if len(ok) < 10:
        return None
    grid = np.arange(0.02, 2.01, 0.02) if grid is None else grid
    a, b = phi_range
    # predict.predict at each spread, with the search window (the image +/- 3 degrees) done once: only
    # the rocking widths, and so which crossings reach the image, depend on the spread.  A crossing's
    # nearest spot does not depend on the others, so each is looked up once too.
    c = copy.copy(crystal)
    dmin = max(float(dmin), 0.5 * beam.wavelength)
    window = predict.predict_window_cython if predict._ext is not None else predict.predict_numpy
    _, ph, s1u, x, y, _, _ = window(c.A, beam.wavelength, detector.frame(), -1 if goniometer.reverse_phi
                                    else 1, a - 3.0, b + 3.0, dmin, None)
    # a ray parallel to (or away from) a swung detector meets it nowhere: no position to look up
    pos = np.stack([x, y], 1)
    fin = np.all(np.isfinite(pos), axis=1)
    dist, near = np.full(len(pos), np.inf), np.full(len(pos), len(ok))
    if fin.any():
        dist[fin], near[fin] = cKDTree(np.stack([ok["x_mm"], ok["y_mm"]], 1)).query(
            pos[fin], distance_upper_bound=3 * detector.pixel_fast)
    found = np.isfinite(dist)
    # only crossings with a spot near count, and only the spread changes between the grid's steps:
    # the widths' other terms once, for those crossings alone (rocking_width_xds's arithmetic)
    terms = predict.rocking_width_terms(s1u[found], goniometer.axis, beam)
    ph, near = ph[found], near[found]
    fracs = []
    for eta in grid:
        width = predict.width_from_terms(terms, float(eta))
        on = (ph + predict.EXTENT * width > a) & (ph - predict.EXTENT * width < b)
        fracs.append(len(np.unique(near[on])) / len(ok))
    fracs = np.array(fracs)
    plateau = fracs.max()
    if plateau < 0.3:
        return None
    # the spread at which (all but one in five hundred of) the matched spots are predicted
    tol = max(1.0, 0.002 * len(ok)) / len(ok)
    i = int(np.argmax(fracs >= plateau - tol))
    return float(grid[i])


# ---- actions --------------------------------------------------------------------------------------

def _find_kwargs(job, image, keep_weak):
    """(image path, detector, find_spots keywords) of one image's spot search for indexing."""
    from .images import current_path
    beam, det, gonio, scan = job.experiment(image)
    a, b = scan.phi_range(image)
    return current_path(job, image), det, dict(image=image, phi=0.5 * (a + b),
                                               threshold=0.0 if keep_weak else 3.0,
                                               min_pix=1 if keep_weak else None, wavelength=beam.wavelength)


def _spots_for(job, image, threshold, keep_weak=False, found=None):
    """Spots of one image, logged as MOSFLM logs them.  keep_weak keeps every connected group of
    spot pixels (threshold 0, one pixel) for merging into 3D spots; the log still counts the spots
    that pass on their own.  `found`: the same search's result from a worker process, if there is one."""
    from .images import read_pixels
    from .spotfinder import TOO_SMALL, find_spots, log_spot_search
    beam, det, gonio, scan = job.experiment(image)
    a, b = scan.phi_range(image)
    spots = found
    if spots is None:
        path, det_, kw = _find_kwargs(job, image, keep_weak)
        spots = find_spots(read_pixels(path), det_, **kw)
    shown = spots
    if keep_weak:
        shown = spots.copy()
        small = (shown["npix"] < (3 if det.pixel_fast >= 0.1 else 4)) | \
            (shown["intensity"] < 3.0 * shown["sigma"])
        shown["flag"][small] |= TOO_SMALL
    log_spot_search(job.log, shown, det, beam.wavelength, image, 0.5 * (a + b))
    job.results.setdefault("spots", {})[image] = shown
    return spots, (beam, det, gonio, scan)


def _thin_consecutive(images, osc):
    """Images that are one run of consecutive thin (< 0.5 degree) images: their spots are slices of
    the same reflections and are merged into 3D spots before indexing."""
    return len(images) > 1 and abs(osc) < 0.5 and list(images) == list(range(images[0], images[0] + len(images)))


def _default_images(job):
    from .images import images_on_disk, sectors
    nums = images_on_disk(job.template, job.directory, job.extension)
    if not nums:
        raise ProcessingError(f"no images found for template {job.template} in {job.directory}")
    first, last = sectors(nums)[0]
    beam, det, gonio, scan = job.experiment(first)
    # two images as close to 90 degrees apart as the sector allows
    target = first + int(round(90.0 / scan.osc))
    second = min(last, target)
    return [first] if second == first else [first, second]


def _import_fitting():
    """What indexing's fits import (scipy.optimize), loaded while the workers search the images."""
    import scipy.optimize  # noqa: F401


def run_autoindex(job, args):
    """AUTOINDEX [DPS] [REFINE] [IMAGE n ...] [THRESH r] [MAXCELL r] [SOLU n]."""
    specs = args.get("IMAGES") or []
    images = []
    for s in specs:
        if "TO" in s:
            images += list(range(int(s["IMAGE"]), int(s["TO"]) + 1))
        else:
            images.append(int(s["IMAGE"]))
    if not images:
        images = _default_images(job)
    thresh = float(args.get("THRESHOLD", (job.kw.get("THRESHOLD") or {}).get("_args", [20])[0]))
    log = job.log
    log.line("")
    log.line(f" Autoindexing using {len(images):2d} images")
    log.line(" Image numbers: " + "".join(f"{i:6d}" for i in images))
    all_spots, models = [], None
    scan0 = job.experiment(images[0])[3]
    merge = _thin_consecutive(images, scan0.osc)
    found = {}
    from .distributed import scheduler_from
    from .integrate import nproc_from
    nproc, sched = nproc_from(job.kw), scheduler_from(job.kw)
    if len(images) > 1 and (nproc > 1 or sched):
        # the images' searches are independent: one per worker process, each decoding its own image
        from .spotfinder import find_spots_in_files
        lists, _ = find_spots_in_files([_find_kwargs(job, i, merge) for i in images], nproc, sched,
                                       meanwhile=_import_fitting)
        found = dict(zip(images, lists))
    for img in images:
        sp, m = _spots_for(job, img, thresh, keep_weak=merge, found=found.get(img))
        models = models or m
        all_spots.append(sp)
    beam, det, gonio, scan = models
    # the rest of indexing keeps this process busy on its own: the workers search the probe images of
    # the deck's PROCESS actions meanwhile
    from .autoparams import start_early_probes
    start_early_probes(job, det, scan)
    if merge:
        from .spotfinder import merge_3d
        spots = merge_3d(all_spots, scan.osc)
        log.line(f" Spots on the {len(images)} consecutive images merged into {int(np.sum(spots['flag'] == 0))}"
                 " spots in 3D (centroids in x, y and phi)")
    else:
        spots = np.concatenate(all_spots)
    ok = spots["flag"] == 0
    isig = spots["intensity"] / np.maximum(spots["sigma"], 1e-9)
    t = thresh
    while np.sum(ok & (isig >= t)) < 60 and t > 3:       # weak images: lower the threshold, as MOSFLM
        t = max(3.0, t * 0.6)
    if t != thresh:
        log.line(f" Threshold reduced from {thresh:.1f} to {t:.1f} to have enough spots for indexing")
    use = spots[ok & (isig >= t)]
    log.line(f" {len(use)} spots with I/sigma above {t:.1f} used for indexing")
    known = job.crystal.cell if (job.crystal is not None and "CELL" in job.kw) else None
    ksym = job.crystal.space_group if (job.crystal is not None and "SYMMETRY" in job.kw) else None
    sol = args.get("SOLUTION") or (job.kw.get("SOLUTION") or {}).get("_args", [None])[0]
    try:
        res = index_with_beam_search(use, beam, det, gonio, log=log, max_cell=args.get("MAXCELL"),
                                     hkldev=float(args.get("HKLDEV", (job.kw.get("HKLDEV") or {}).get(
                                         "_args", [0.15])[0])),
                                     refine_beam=not args.get("NOREFINE"), known_cell=known,
                                     known_symmetry=ksym, solution=sol)
    except ProcessingError as e:
        raise ProcessingError(f"Indexing failed: {e}. Likely causes: a wrong beam centre (check BEAM "
                              "against the backstop shadow), a wrong distance or wavelength, too few spots, "
                              "ice rings or several lattices. Try BEAM, DISTANCE, THRESHOLD, more images "
                              "(AUTOINDEX IMAGE n), RESOLUTION EXCLUDE for ice.") from None
    prerefine_solutions(res, nproc=nproc, scheduler=sched)
    for ln in format_result(res, beam.wavelength):
        log.line(ln)
    if job.crystal is not None and job.crystal.mosaic:
        res.crystal.mosaic = job.crystal.mosaic
    job.crystal = res.crystal
    job.kw.setdefault("BEAM", {})["_args"] = [res.beam_x, res.beam_y]
    d = res.detector
    if d is not None and (d.distance != det.distance or d.tilt != det.tilt or d.twist != det.twist):
        esd = getattr(res, "detector_esd", {}) or {}
        log.line(f" Detector refined with the crystal: distance {det.distance:8.3f} -> {d.distance:8.3f} mm"
                 f" (esd {esd.get('distance', 0.0):5.2f}),  TILT {d.tilt * 100:5.0f}  TWIST {d.twist * 100:5.0f}"
                 " (0.01 degrees; used from now on)")
        # carried to later lines through the keywords, as cell refinement carries its detector
        job.kw.setdefault("DISTANCE", {})["_args"] = [d.distance]
        dist = job.kw.setdefault("DISTORTION", {})
        dist["TILT"], dist["TWIST"] = d.tilt * 100, d.twist * 100
    job.results["indexing"] = res
    if "NEWMAT" in job.files:
        from .matrix import write_matrix
        write_matrix(job.files["NEWMAT"], res.crystal, beam.wavelength)
        log.line(f" Matrix written to {job.files['NEWMAT']}")


def run_mosaic_estimate(job, args):
    """MOSAIC ESTIMATE [n]: the mosaic spread from the spots of image n and the current orientation."""
    if job.crystal is None or getattr(job.crystal, "U", None) is None:
        raise ProcessingError("MOSAIC ESTIMATE needs an orientation: run AUTOINDEX or give MATRIX first")
    image = args.get("IMAGE") or job.image
    if image is None or image is True:
        idx = job.results.get("spots") or {}
        image = min(idx) if idx else _default_images(job)[0]
    image = int(image)
    spots = (job.results.get("spots") or {}).get(image)
    beam, det, gonio, scan = job.experiment(image)
    if spots is None:
        spots, _ = _spots_for(job, image, 20)
    dmin = predict.corner_resolution(det, beam.wavelength)
    eta = estimate_mosaic(job.crystal, beam, det, gonio, spots, scan.phi_range(image), dmin)
    if eta is None:
        job.log.line(" The mosaicity estimation has not worked for some reason")
        return
    job.crystal.mosaic = eta
    job.log.line(f" The mosaicity has been estimated as ---> {eta:.2f} <--- for this image only;")
