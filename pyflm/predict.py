"""Reflection prediction: Ewald-sphere crossings, rocking widths, partiality, LP and detector positions.

For a setting matrix A (columns a*, b*, c*, MOSFLM lab frame at phi 0; see pyflm.geometry), the
reciprocal lattice vector of h at phi is r(phi) = R_z(phi) . A . h.  With r0 = A.h split along the
rotation axis e (= Z) and perpendicular to it, the diffracting condition |s0 + r|^2 = |s0|^2 becomes
    a cos(phi) + b sin(phi) = c,   a = s0x r0x + s0y r0y, b = s0x r0y - s0y r0x (for e = Z), c = -|r0|^2/2
(s0 = (1/lambda, 0, 0)), with 0 or 2 solutions.  The diffracted ray s1 = s0 + r(phi) meets the
detector at the predicted position.

Rocking width (full width, degrees): the angular spread of the lattice point (mosaic spread with the
beam divergence along the rotation axis, plus 2 tan(theta) dlambda/lambda from the dispersion) divided
by zeta = |e . (s1^ x s0^)|, the rate at which rotation carries it through the sphere (1/zeta is the
Lorentz factor), so widths grow without limit near the rotation axis (MAXWIDTH rejects those); the
divergence normal to the axis adds a width of its own (rocking_width_xds).
Partiality on an image [phi1, phi2]: the fraction of the rocking curve, a Gaussian of FWHM `width`
centred on the crossing (with the crystal's share `tail` of it in a Lorentzian of that FWHM, which
sparse sweeps fit from their pixels: pyflm.autoparams), inside the image's range.

Public API
    generate_hkl(A, dmin, dmax=None) -> (n, 3) int array of every h with dmax >= d >= dmin
    crossings(A, hkl, wavelength, axis_sign=1) -> (phi1, phi2, valid) degrees
    predict(crystal, beam, detector, goniometer, phi_start, phi_end, dmin, dmax=None, *, mosaic=None,
            use_cython=True) -> PRED_DTYPE array of crossings with phi in [phi_start - margin, phi_end + margin]
    fractions(phi, width, lo, hi) -> fraction of the rocking curve inside [lo, hi]
    image_parts(pred, phi0, osc, first, last, min_fraction) -> rows (index into pred, image, fraction)
    classify(pred, detector, separation, maxwidth, osc) -> flags
"""
from __future__ import annotations

import numpy as np

from . import geometry

PRED_DTYPE = np.dtype([
    ("h", "i4"), ("k", "i4"), ("l", "i4"),
    ("phi", "f8"),            # crossing, degrees
    ("fast", "f8"), ("slow", "f8"),
    ("x_mm", "f8"), ("y_mm", "f8"),
    ("d", "f8"),
    ("width", "f8"),          # full rocking width, degrees
    ("lorentz", "f8"), ("polar", "f8"),
    ("tail", "f8"),           # the crystal's rocking-curve tail (fraction_inside)
    ("on_detector", "?"),
])


def generate_hkl(A, dmin, dmax=None):
    """Every h with dmin <= d (<= dmax), h != 0, for setting matrix A (1/Angstrom)."""
    A = np.asarray(A, float)
    real = np.linalg.inv(A).T                       # columns a, b, c (Angstrom)
    lim = np.floor(np.linalg.norm(real, axis=0) / dmin).astype(int)
    h = np.arange(-lim[0], lim[0] + 1)
    k = np.arange(-lim[1], lim[1] + 1)
    l = np.arange(-lim[2], lim[2] + 1)
    hkl = np.stack(np.meshgrid(h, k, l, indexing="ij"), -1).reshape(-1, 3)
    r2 = np.einsum("ij,ij->i", hkl @ A.T, hkl @ A.T)
    keep = (r2 <= 1.0 / dmin ** 2) & (r2 > 0)
    if dmax:
        keep &= r2 >= 1.0 / dmax ** 2
    return hkl[keep].astype(np.int32)


def crossings(A, hkl, wavelength, reverse=False):
    """Both phi (degrees) at which h crosses the Ewald sphere, and whether it does."""
    return crossings_of(np.asarray(hkl, float) @ np.asarray(A, float).T, wavelength, reverse)


def crossings_of(r0, wavelength, reverse=False):
    """crossings for the reciprocal lattice vectors r0 = A.h (n, 3) at phi 0, for a caller that has them."""
    x, y = r0[:, 0], r0[:, 1]
    rho = np.hypot(x, y)
    r2 = np.einsum("ij,ij->i", r0, r0)
    with np.errstate(divide="ignore", invalid="ignore"):
        K = -wavelength * r2 / (2.0 * rho)
    ok = (np.abs(K) <= 1.0) & (rho > 0)
    alpha = np.arctan2(y, x)
    acos = np.arccos(np.clip(K, -1, 1))
    p1, p2 = np.degrees(-alpha + acos), np.degrees(-alpha - acos)
    if reverse:
        p1, p2 = -p1, -p2
    return p1, p2, ok


def _wrap_into(phi, lo):
    """Shift angles by multiples of 360 so they fall in [lo, lo + 360)."""
    return lo + np.mod(phi - lo, 360.0)


def lorentz_polar(s1_unit, axis, polarisation=0.95, model="SYNCHROTRON", mono_two_theta=0.0,
                  polarisation_angle=0.0):
    """Lorentz factor 1/|e.(s0^ x s1^)| and the polarisation factor for unit diffracted beams (n, 3).

    Synchrotron: a fraction p of the beam is polarised with its electric vector along the horizontal,
    which is MOSFLM's Z when the rotation axis lies horizontal, the rest along Y; a scan axis tilted
    about the beam (a kappa phi scan) turns the electric vector by polarisation_angle from Z towards Y
    (L-cysteine sweep 4, chi -54.7: LP factors 0.6-2.5 times DIALS's without it)."""
    s0u = geometry.BEAM_DIRECTION
    cross = geometry.cross_rows(s0u, s1_unit)
    with np.errstate(divide="ignore"):
        lor = 1.0 / np.abs(cross @ np.asarray(axis, float))
    cos2t = s1_unit[:, 0]
    if model == "PINHOLE" or model == "UNPOLARISED":
        pol = 0.5 * (1.0 + cos2t ** 2)
    elif model == "MONOCHROMATOR":
        c2m = np.cos(np.radians(mono_two_theta)) ** 2
        pol = (1.0 + c2m * cos2t ** 2) / (1.0 + c2m)
    else:
        p = float(polarisation)
        a = np.radians(polarisation_angle)
        along = s1_unit[:, 1] * np.sin(a) + s1_unit[:, 2] * np.cos(a)     # s1 . electric vector
        across = s1_unit[:, 1] * np.cos(a) - s1_unit[:, 2] * np.sin(a)
        pol = p * (1.0 - along ** 2) + (1.0 - p) * (1.0 - across ** 2)
    return lor, pol


# The rocking curve is a Gaussian whose FWHM is the rocking width (the mosaic blocks' orientations
# spread normally); parts are looked for out to EXTENT widths either side, where < 0.1 % remains.
# A crystal's `tail` puts that share of the curve into a Lorentzian of the same FWHM (a pseudo-Voigt):
# thin slices of a real crystal show a narrow core with tails far beyond a Gaussian's (L-cysteine:
# 1-2 % of a spot 0.3 degrees from its centre, three widths out), which the sparse-sweep parameters
# fit (autoparams); its parts are looked for further out, to TAIL_EXTENT widths.
EXTENT = 1.5
TAIL_EXTENT = 3.0


def extent(tail):
    """How many widths either side of its centre a reflection's parts are looked for."""
    return np.where(np.asarray(tail) > 0, TAIL_EXTENT, EXTENT)


def fraction_inside(phi, width, lo, hi, tail=0.0):
    """Fraction of a reflection's rocking curve (a Gaussian of FWHM `width` centred on phi, with the
    share `tail` in a Lorentzian of that FWHM) recorded between lo and hi degrees."""
    return _cum(hi, phi, width, tail) - _cum(lo, phi, width, tail)


def _cum(x, phi, width, tail=0.0):
    from scipy.special import erf
    w = np.maximum(width, 1e-9)
    t = np.asarray(x, float) - phi
    g = 0.5 * (1.0 + erf(t / (np.sqrt(2.0) * (w / 2.3548))))
    if np.any(tail):
        return (1.0 - tail) * g + tail * (0.5 + np.arctan(2.0 * t / w) / np.pi)
    return g


def _tail(pred):
    return pred["tail"] if "tail" in (pred.dtype.names or ()) else 0.0


def phi_extent(pred):
    """(lo, hi) phi beyond which a reflection records nothing."""
    e = extent(_tail(pred)) * pred["width"]
    return pred["phi"] - e, pred["phi"] + e


def predict_numpy(A, wavelength, frame, axis_sign, phi_lo, phi_hi, dmin, dmax=None):
    """Crossings of every reflection with phi in [phi_lo, phi_hi): (hkl, phi, s1 unit, x_mm, y_mm, hit, d)."""
    hkl = generate_hkl(A, dmin, dmax)
    p1, p2, ok = crossings(A, hkl, wavelength, reverse=axis_sign < 0)
    hh = np.concatenate([hkl[ok], hkl[ok]])
    ph = np.concatenate([_wrap_into(p1[ok], phi_lo), _wrap_into(p2[ok], phi_lo)])
    keep = ph < phi_hi
    hh, ph = hh[keep], ph[keep]
    r0 = hh @ np.asarray(A, float).T
    rot = geometry.rot_z_many(axis_sign * ph)
    r = np.einsum("nij,nj->ni", rot, r0)
    s1 = r + geometry.BEAM_DIRECTION / wavelength
    s1u = s1 * wavelength
    x, y, hit = geometry.lab_to_mm(s1u, frame)
    d = 1.0 / np.linalg.norm(r0, axis=1)
    return hh, ph, s1u, x, y, hit, d


try:
    from ._ext import _predict as _ext
except ImportError:     # not built (a source checkout without build_ext): the numpy twin serves
    _ext = None


def hkl_limits(A, dmin):
    real = np.linalg.inv(np.asarray(A, float)).T
    return np.floor(np.linalg.norm(real, axis=0) / dmin).astype(int)


def predict_window_cython(A, wavelength, frame, axis_sign, phi_lo, phi_hi, dmin, dmax=None, prune=True,
                          reach=None):
    """The Cython kernel with predict_numpy's signature and results (in another order).  prune=False
    turns off its quick rejection of reflections crossing outside the window (for the test that it
    changes nothing); reach (predict's) leaves out crossings whose rocking curve cannot reach a window
    inside this one (see the kernel)."""
    lim = hkl_limits(A, dmin)
    origin, ex, ey, n = (np.ascontiguousarray(v, float) for v in frame)
    return _ext.predict_window(np.ascontiguousarray(A, float), float(wavelength), origin, ex, ey, n,
                               int(axis_sign), float(phi_lo), float(phi_hi), float(dmin),
                               float(dmax or 0.0), int(lim[0]), int(lim[1]), int(lim[2]), bool(prune),
                               reach=None if reach is None else tuple(float(v) for v in reach))


def predict(crystal, beam, detector, goniometer, phi_start, phi_end, dmin, dmax=None, *, mosaic=None,
            margin=None, use_cython=True):
    """Every Ewald-sphere crossing whose rocking curve overlaps [phi_start, phi_end] (degrees).

    Returns a PRED_DTYPE array.  `margin` (degrees) widens the search so that partials starting on
    earlier images are found (default: MAXWIDTH-like 5 degrees)."""
    A = crystal.A
    mosaic = crystal.mosaic if mosaic is None else mosaic
    margin = 5.0 if margin is None else margin
    # nothing finer than lambda/2 reaches the Ewald sphere; a finer RESOLUTION would only swell the hkl list
    dmin = max(float(dmin), 0.5 * beam.wavelength)
    frame = detector.frame()
    sign = -1 if goniometer.reverse_phi else 1
    tail = float(getattr(crystal, "tail", 0.0) or 0.0)
    if use_cython and _ext is not None:
        # the kernel leaves out the margin's crossings that rock too little to reach the window (on
        # the sim sweep 16 000 of a block's 29 000); the keep test below decides the rest, as before
        axis = np.asarray(goniometer.axis, float)
        u = np.cross(axis, geometry.BEAM_DIRECTION)
        u = u / max(np.linalg.norm(u), 1e-12)
        dh, dv = (float(v) for v in beam.divergence)
        reach = None if np.ndim(mosaic) else (
            phi_start, phi_end, float(extent(tail)), float(mosaic), dh, dv, float(beam.dispersion), *axis, *u)
        hh, ph, s1u, x, y, hit, d = predict_window_cython(A, beam.wavelength, frame, sign, phi_start - margin,
                                                          phi_end + margin, dmin, dmax, reach=reach)
    else:
        hh, ph, s1u, x, y, hit, d = predict_numpy(A, beam.wavelength, frame, sign, phi_start - margin,
                                                  phi_end + margin, dmin, dmax)
    width = rocking_width_xds(s1u, goniometer.axis, mosaic, beam)
    lo = ph - extent(tail) * width
    hi = ph + extent(tail) * width
    keep = (hi > phi_start) & (lo < phi_end)
    # Lorentz and polarisation factors row by row, so only of the reflections kept (the margin's
    # crossings are most of those found)
    lor, pol = lorentz_polar(s1u[keep], goniometer.axis, beam.polarisation, beam.polarisation_model,
                             beam.monochromator_two_theta, getattr(beam, "polarisation_angle", 0.0))
    out = np.zeros(int(keep.sum()), PRED_DTYPE)
    out["h"], out["k"], out["l"] = hh[keep].T
    out["phi"] = ph[keep]
    out["x_mm"], out["y_mm"] = x[keep], y[keep]
    fast, slow = detector.mm_to_pixel(x[keep], y[keep])
    out["fast"], out["slow"] = fast, slow
    out["d"] = d[keep]
    out["width"] = width[keep]
    out["lorentz"], out["polar"] = lor, pol
    out["tail"] = tail
    out["on_detector"] = hit[keep] & (fast >= 0) & (fast < detector.n_fast) & (slow >= 0) & \
        (slow < detector.n_slow)
    return out


def rocking_width_xds(s1u, axis, mosaic, beam):
    """Full rocking width in phi (degrees).

    A mosaic block (or the beam) turned by a small angle about a unit axis u moves the lattice point
    off the sphere by that angle times u . (s0^ x s1^) (in units of 1/lambda); rotation about the
    scan axis e moves it by zeta = |e . (s0^ x s1^)| per radian.  A mosaic spread eta about random
    axes: eta sin(2theta) / zeta (= eta on the equator, growing without limit near the axis).  The
    beam's divergence is not about random axes (Greenhough & Helliwell 1982): s0^ x s1^ lies in the
    plane normal to the beam, along e (component zeta) and along e x s0^ (component w), so the
    divergence in the plane normal to e (MOSFLM's vertical, the beam turned about e) shifts every
    crossing by its own angle (a width dv, the same for all reflections), while the divergence
    along e (horizontal, the beam turned about e x s0^) gives dh w / zeta, which near the axis
    (w ~ sin 2theta) grows as the mosaic term does and on the equator (w = 0) vanishes.  Plus the
    dispersion's (dlambda/lambda)(1 - cos 2theta)/zeta (tan(theta) dlambda/lambda on the equator)."""
    return width_from_terms(rocking_width_terms(s1u, axis, beam), mosaic)


def rocking_width_terms(s1u, axis, beam):
    """What rocking_width_xds's widths need besides the mosaic spread (refinement steps the mosaic
    alone and keeps these): (sin 2theta, dispersion term, zeta, squared divergence term)."""
    axis = np.asarray(axis, float)
    cross = geometry.cross_rows(geometry.BEAM_DIRECTION, s1u)
    zeta = np.maximum(np.abs(cross @ axis), 1e-6)
    # np.linalg.norm's sum of squares in its order (to the bit), without its 8x slower reduction
    c0, c1, c2 = cross[:, 0], cross[:, 1], cross[:, 2]
    sin2t = np.sqrt((c0 * c0 + c1 * c1) + c2 * c2)
    cos2t = s1u[:, 0]
    dh, dv = (float(v) for v in beam.divergence)
    u = np.cross(axis, geometry.BEAM_DIRECTION)          # e x s0^: the horizontal tilt's axis
    w = cross @ (u / max(np.linalg.norm(u), 1e-12))
    div2 = (dv * zeta) ** 2 + (dh * w) ** 2
    disp = np.degrees(beam.dispersion * (1.0 - cos2t))
    return sin2t, disp, zeta, div2


def width_from_terms(terms, mosaic):
    sin2t, disp, zeta, div2 = terms
    return (np.sqrt((mosaic * sin2t) ** 2 + div2) + disp) / zeta


def fields(pred, index, names):
    """{name: pred[name][index]}: the fields a caller needs of some reflections (a gather of whole
    PRED_DTYPE records is ten times slower than of their fields one by one, and take is three times
    faster than indexing a field's strided view)."""
    return {n: pred[n].take(index) for n in names}


PART_DTYPE = np.dtype([("index", "i8"), ("image", "i4"), ("fraction", "f8"), ("n_parts", "i4"),
                       ("part", "i4")])


def image_parts(pred, phi0, osc, first, last, min_fraction=0.0, *, only=None, use_cython=True):
    """Split each predicted reflection over the images it touches: rows (index into pred, image,
    fraction on that image, number of images it spans inside [first, last], which part this is).

    only=(i0, i1): the parts on images i0..i1 alone (each the same as without it); n_parts and part
    then count those alone, right for a reflection with no part outside them.

    Gaussian rocking curves (no tail) go to the kernel (ext/_predict.pyx: the candidates and erf's
    arguments, scipy's erf, then the fractions and rows), which forms the same numbers in the same
    order as the numpy below, its twin (tested to the bit): a sim block's 1.9 -> 1.25 ms, half of it
    scipy's erf (29 000 candidates, twice)."""
    tail = _tail(pred)
    img_lo = first if only is None else max(first, only[0])
    img_hi = last if only is None else min(last, only[1])
    if use_cython and hasattr(_ext, "part_rows") and not np.any(tail):
        phi = np.ascontiguousarray(pred["phi"], float)
        width = np.ascontiguousarray(pred["width"], float)
        if np.isfinite(phi).all() and np.isfinite(width).all():     # (the kernel casts image numbers)
            from scipy.special import erf
            idx, img, x_lo, x_hi = _ext.part_arguments(phi, width, EXTENT, float(phi0), float(osc),
                                                       int(first), int(img_lo), int(img_hi))
            return _ext.part_rows(idx, img, erf(x_lo), erf(x_hi), float(min_fraction), PART_DTYPE)
    lo, hi = phi_extent(pred)
    i_lo = np.floor((lo - phi0) / osc).astype(np.int64) + first
    i_hi = np.floor((hi - phi0) / osc).astype(np.int64) + first
    i_lo = np.maximum(i_lo, img_lo)
    i_hi = np.minimum(i_hi, img_hi)
    n = np.maximum(i_hi - i_lo + 1, 0)
    idx = np.repeat(np.arange(len(pred)), n)
    offs = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    img = np.repeat(i_lo, n) + offs
    a = phi0 + (img - first) * osc
    # (the reflections' fields repeated for their parts, not gathered: a structured array's fields
    # gather slowly)
    f = fraction_inside(np.repeat(pred["phi"], n), np.repeat(pred["width"], n), a, a + osc,
                        np.repeat(tail, n) if np.ndim(tail) else tail)
    keep = np.flatnonzero(f > min_fraction)
    out = np.zeros(len(keep), PART_DTYPE)
    out["index"], out["image"], out["fraction"] = idx[keep], img[keep], f[keep]
    # renumber parts after dropping negligible slivers
    if len(out):
        start = np.ones(len(out), bool)
        start[1:] = out["index"][1:] != out["index"][:-1]
        gid = np.cumsum(start) - 1
        first_pos = np.flatnonzero(start)
        out["part"] = np.arange(len(out)) - first_pos[gid] + 1
        out["n_parts"] = np.bincount(gid)[gid]
    return out


def part_phi(pred, parts, phi0, osc, first):
    """Centroid phi (degrees) of each part: the mean of the Gaussian rocking curve over the part's image."""
    from scipy.special import erf
    p = fields(pred, parts["index"], ("width", "phi"))
    a = phi0 + (parts["image"] - first) * osc
    sigma = np.maximum(p["width"], 1e-9) / 2.3548
    lo, hi = (a - p["phi"]) / sigma, (a + osc - p["phi"]) / sigma
    gauss = lambda t: np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    mass = 0.5 * (erf(hi / np.sqrt(2)) - erf(lo / np.sqrt(2)))
    shift = sigma * (gauss(lo) - gauss(hi)) / np.maximum(mass, 1e-12)
    return np.clip(p["phi"] + shift, a, a + osc)


def positions_at(crystal, beam, detector, goniometer, pred, phi):
    """Detector pixel (fast, slow) of each reflection's diffracted ray with the crystal turned to `phi`
    (degrees) rather than to its crossing: where the part of a wide reflection recorded on an image away
    from its crossing lies (near the rotation axis a spot moves across the detector as it rocks)."""
    hkl = np.stack([pred["h"], pred["k"], pred["l"]], 1).astype(float)
    sign = -1 if goniometer.reverse_phi else 1
    # (rotate_z_many: einsum's products and sums with rot_z_many's matrices, to the bit, without them)
    r = geometry.rotate_z_many(sign * np.asarray(phi, float), hkl @ crystal.A.T)
    s1 = r + geometry.BEAM_DIRECTION / beam.wavelength
    x, y, _ = geometry.lab_to_mm(s1, detector.frame())
    return detector.mm_to_pixel(x, y)


# classification bits (MOSFLM's colours in pictures: blue full, yellow partial, red overlap, green wide)
FULL, PARTIAL, OVERLAP, TOO_WIDE, EXCLUDED = 1, 2, 4, 8, 16


def classify(pred, parts, detector, *, separation=None, maxwidth=5.0, osc=1.0, dmin=None, dmax=None,
             mask_fn=None):
    """Flags per part row: FULL or PARTIAL, plus OVERLAP (closer than SEPARATION x, y mm to another
    reflection on the same image), TOO_WIDE (wider than MAXWIDTH degrees) and EXCLUDED (off the detector,
    behind the backstop, outside the limits or the resolution range)."""
    p = fields(pred, parts["index"], ("width", "on_detector", "d", "x_mm", "y_mm"))
    flags = np.where(parts["n_parts"] == 1, FULL, PARTIAL)
    flags = np.where(p["width"] > maxwidth, flags | TOO_WIDE, flags)
    excl = ~p["on_detector"]
    if dmin is not None:
        excl |= p["d"] < dmin
    if dmax is not None:
        excl |= p["d"] > dmax
    if detector.backstop:
        bx, by, br = detector.backstop
        excl |= np.hypot(p["x_mm"] - bx, p["y_mm"] - by) < br
    if mask_fn is not None:
        excl |= mask_fn(p["x_mm"], p["y_mm"])
    flags = np.where(excl, flags | EXCLUDED, flags)
    if separation is not None and len(parts):
        sx, sy = separation
        # rays scattered backwards (a RESOLUTION finer than the detector) meet no plane: no x, y
        sel = np.flatnonzero(np.isfinite(p["x_mm"]) & np.isfinite(p["y_mm"]))
        ov = np.zeros(len(parts), bool)
        ov[sel] = overlaps(parts["image"][sel], p["x_mm"][sel] / sx, p["y_mm"][sel] / sy)
        flags = np.where(ov, flags | OVERLAP, flags)
    return flags.astype(np.int32)


def overlaps(image, u, v, r=1.0 - 1e-9, use_cython=True):
    """Which points (u, v: positions over the separation, all finite) have another on the same image
    closer than r along both: the kernel (ext/_predict.pyx, a strip search) when built, else
    _overlaps_numpy (its twin, a KD-tree per image)."""
    image = np.ascontiguousarray(image, np.int64)
    u, v = np.ascontiguousarray(u, float), np.ascontiguousarray(v, float)
    # the strips cover the points' extent: rays that graze the detector plane land far out, the tree copes
    # (a build older than the kernel has no overlaps: its twin then)
    if use_cython and hasattr(_ext, "overlaps") and (not len(v) or np.ptp(v) < 1e6):
        return _ext.overlaps(image, u, v, float(r))
    return _overlaps_numpy(image, u, v, r)


def _overlaps_numpy(image, u, v, r=1.0 - 1e-9):
    from scipy.spatial import cKDTree
    ov = np.zeros(len(u), bool)
    for img in np.unique(image):
        sel = np.flatnonzero(image == img)
        pairs = cKDTree(np.stack([u[sel], v[sel]], 1)).query_pairs(r, p=np.inf, output_type="ndarray")
        if len(pairs):
            ov[sel[pairs[:, 0]]] = True
            ov[sel[pairs[:, 1]]] = True
    return ov


def corner_resolution(detector, wavelength):
    """The highest resolution (Angstrom) recorded anywhere on the detector (its farthest corner)."""
    xs = np.array([0, detector.size_mm[0], 0, detector.size_mm[0]])
    ys = np.array([0, 0, detector.size_mm[1], detector.size_mm[1]])
    return float(np.min(geometry.resolution_of(xs, ys, detector.frame(), wavelength)))


# ---- the PREDICT action ---------------------------------------------------------------------------

def run_predict(job, args):
    """PREDICT: reflections of the current image by class, and a picture when asked for."""
    from .errors import ProcessingError
    crystal = job.crystal
    if crystal is None or getattr(crystal, "U", None) is None:
        raise ProcessingError("PREDICT needs an orientation: give MATRIX or run AUTOINDEX first")
    beam, det, gonio, scan = job.experiment(job.image)
    image = job.image if job.image is not None else scan.first
    a, b = scan.phi_range(image)
    res = (job.kw.get("RESOLUTION") or {}).get("_args") or []
    dmin = float(min(res)) if res else corner_resolution(det, beam.wavelength)
    dmax = float(max(res)) if len(res) > 1 else None
    sep = (job.kw.get("SEPARATION") or {}).get("_args")
    sep = (sep[0], sep[-1]) if sep else (4 * det.pixel_slow, 4 * det.pixel_fast)
    maxwidth = float(((job.kw.get("MAXWIDTH") or {}).get("_args") or [5.0])[0])
    if not crystal.mosaic:
        crystal.mosaic = 0.3
    pred = predict(crystal, beam, det, gonio, a, b, dmin, dmax, margin=maxwidth)
    parts = image_parts(pred, scan.phi_start, scan.osc, scan.first, max(scan.last, image), 0.01)
    parts = parts[parts["image"] == image]
    flags = classify(pred, parts, det, separation=sep, maxwidth=maxwidth, osc=scan.osc, dmin=dmin,
                     dmax=dmax)
    inc = (flags & EXCLUDED) == 0
    log = job.log
    log.line("")
    log.line(f" Prediction for image {image:5d}  Phi {a:8.2f} to {b:8.2f}  resolution {dmin:.2f} A")
    log.line(f" {int(inc.sum()):7d} Reflections generated:")
    log.line(f" {int(np.sum(inc & (flags & FULL != 0))):7d} Fully recorded")
    log.line(f" {int(np.sum(inc & (flags & PARTIAL != 0))):7d} Partials")
    log.line(f" {int(np.sum(inc & (flags & OVERLAP != 0))):7d} Overlapped reflections")
    log.line(f" {int(np.sum(inc & (flags & TOO_WIDE != 0))):7d} Too wide in phi")
    log.line(f" {int(np.sum(~inc)):7d} Excluded (off the detector, backstop or resolution)")
    job.results.setdefault("predictions", {})[image] = (pred, parts, flags)
    pic = job.kw.get("PICTURE") or {}
    png = args.get("PNG")
    if png or pic.get("ON") or (pic.get("_args") or [""])[0] == "ON":
        import os
        from .images import current_path, read_image
        from .pictures import save_overlay
        path = png if isinstance(png, str) else os.path.join(pic.get("DIRECTORY", "."),
                                                             f"predict_{image:05d}.png")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        data = read_image(current_path(job, image))[0]
        save_overlay(path, data, prediction_marks(pred, parts, flags), title=f"image {image}")
        log.line(f" Picture of the predictions written to {path}")


def prediction_marks(pred, parts, flags, half=4):
    """Marks in MOSFLM's colours: blue full, yellow partial, red overlap, green too wide."""
    p = pred[parts["index"]]
    marks = []
    for f, s, fl in zip(p["fast"], p["slow"], flags):
        if fl & EXCLUDED:
            continue
        colour = "wide" if fl & TOO_WIDE else "overlap" if fl & OVERLAP else \
            "full" if fl & FULL else "partial"
        marks.append((f, s, colour, half))
    return marks
