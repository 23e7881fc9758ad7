"""Every geometric convention pyflm uses, in one place.

MOSFLM's laboratory frame
    X along the X-ray beam (source towards crystal), Z along the rotation axis, Y = Z x X.
    The crystal turns right-handedly about Z as phi increases (DETECTOR REVERSEPHI reverses it).
    s0 = (1/lambda, 0, 0); a reciprocal lattice vector at phi is r = R_z(phi) . A . h, with A = M . U . B
    and M the missetting rotation.

imgCIF / dxtbx frame (DIALS, and the truth of the simulated data)
    beam along -z, rotation axis +x.  A vector v there is (-v_z, v_y, v_x) in MOSFLM's frame.

MOSFLM detector coordinates
    (X, Y) in mm from the corner of the image.  For every format pyflm reads, X runs along the SLOW
    pixel axis and Y along the FAST one, so a pixel position (fast, slow), counted from the outer edge
    of the first pixel (pixel i spans [i, i+1)), is X = slow * pixel_slow, Y = fast * pixel_fast.
    BEAM x y is the direct beam in these mm.  For a detector perpendicular to the beam (two-theta 0)
    the point (X, Y) lies in the lab at (D, Xb - X, Y - Yb): detector Y is parallel to the rotation
    axis and detector X runs opposite to lab Y.

Format beam centres (see header_beam_to_mosflm)
    Pilatus miniCBF  Beam_xy (fast px, slow px)            -> (slow*p, fast*p)
    ADSC SMV         BEAM_CENTER_X / _Y mm                -> used as MOSFLM X, Y directly
    Timepix SMV      BEAM_CENTER_X / _Y pixels (fast, slow) -> (slow*p, fast*p), as dxtbx reads it
    Mar345           header centre not trusted            -> the image centre (with a warning)
    MarCCD           beam_x / beam_y in pixels (fast, slow) -> (slow*p, fast*p)
    Eiger HDF5       beam_center_x / _y (fast px, slow px)  -> (slow*p, fast*p)
    R-AXIS           beam position (fast px, slow px)     -> (slow*p, fast*p)

Units: lengths mm (detector) and Angstrom (crystal, wavelength); angles degrees at every interface,
radians only inside functions.
"""
from __future__ import annotations

import numpy as np

# imgCIF (dxtbx) -> MOSFLM: v_mosflm = IMGCIF_TO_MOSFLM @ v_imgcif ; a proper rotation (det +1).
IMGCIF_TO_MOSFLM = np.array([[0.0, 0.0, -1.0],
                             [0.0, 1.0, 0.0],
                             [1.0, 0.0, 0.0]])
MOSFLM_TO_IMGCIF = IMGCIF_TO_MOSFLM.T

BEAM_DIRECTION = np.array([1.0, 0.0, 0.0])   # MOSFLM lab: unit vector of s0
ROTATION_AXIS = np.array([0.0, 0.0, 1.0])    # MOSFLM lab: phi axis


def imgcif_to_mosflm(v):
    """Vectors (..., 3) from the imgCIF/dxtbx lab frame to MOSFLM's."""
    return np.asarray(v, float) @ IMGCIF_TO_MOSFLM.T


def mosflm_to_imgcif(v):
    """Vectors (..., 3) from MOSFLM's lab frame to imgCIF/dxtbx's."""
    return np.asarray(v, float) @ MOSFLM_TO_IMGCIF.T


def rot_x(deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_z(deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rot_z_many(deg):
    """Stack of rotations about Z for an array of angles (degrees): shape (n, 3, 3)."""
    t = np.radians(np.asarray(deg, float))
    c, s = np.cos(t), np.sin(t)
    out = np.zeros(t.shape + (3, 3))
    out[..., 0, 0] = c
    out[..., 0, 1] = -s
    out[..., 1, 0] = s
    out[..., 1, 1] = c
    out[..., 2, 2] = 1.0
    return out


def rotate_z_many(deg, v):
    """rot_z_many(deg) applied to the vectors v (n, 3), row by row, without building the matrices: the
    same products and sums as einsum("nij,nj->ni", rot_z_many(deg), v), so the same numbers to the bit
    (tests/test_refinement.py), at a fifth of the cost."""
    t = np.radians(np.asarray(deg, float))
    c, s = np.cos(t), np.sin(t)
    v = np.asarray(v, float)
    return np.stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], v[:, 2]], 1)


def cross_rows(a, v):
    """np.cross(a, v) of one vector a with the rows of v (n, 3): numpy's products and differences in
    its order, so the same numbers to the bit (tests/test_prediction_truth.py), formed as whole columns
    (np.cross writes each component through a strided view: 1.8 ms for 36 000 rows against 0.2)."""
    a0, a1, a2 = (float(x) for x in np.asarray(a, float))
    v = np.asarray(v, float)
    v0, v1, v2 = v[:, 0], v[:, 1], v[:, 2]
    return np.stack([a1 * v2 - a2 * v1, a2 * v0 - a0 * v2, a0 * v1 - a1 * v0], 1)


def misset_matrix(phix, phiy, phiz):
    """MOSFLM's missetting rotation [PHIZ][PHIY][PHIX]: applied in front of U.B (angles in degrees)."""
    return rot_z(phiz) @ rot_y(phiy) @ rot_x(phix)


def _skew(a):
    """[a]x: the matrix of v -> a x v."""
    return np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])


def misset_rates(phix, phiy, phiz):
    """d misset_matrix / d(PHIX, PHIY, PHIZ), per degree: a right-handed rotation R about a unit axis a
    grows as [a]x R per radian, in its place in the product."""
    rx, ry, rz = rot_x(phix), rot_y(phiy), rot_z(phiz)
    k = np.radians(1.0)
    e = np.eye(3)
    return (k * (rz @ ry @ _skew(e[0]) @ rx), k * (rz @ _skew(e[1]) @ ry @ rx), k * (_skew(e[2]) @ rz @ ry @ rx))


def b_matrix(cell):
    """Busing & Levy B (a* along x, b* in the xy plane), in 1/Angstrom, from (a, b, c, al, be, ga)."""
    a, b, c, al, be, ga = [float(x) for x in cell]
    al, be, ga = np.radians([al, be, ga])
    ca, cb, cg = np.cos(al), np.cos(be), np.cos(ga)
    sa, sb, sg = np.sin(al), np.sin(be), np.sin(ga)
    vol = a * b * c * np.sqrt(max(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg, 0.0))
    if vol <= 0:
        raise ValueError(f"cell {cell} has no volume")
    ast, bst, cst = b * c * sa / vol, a * c * sb / vol, a * b * sg / vol
    cbs = (ca * cg - cb) / (sa * sg)   # cos(beta*)
    cgs = (ca * cb - cg) / (sa * sb)   # cos(gamma*)
    sbs, sgs = np.sqrt(1 - cbs * cbs), np.sqrt(1 - cgs * cgs)
    return np.array([[ast, bst * cgs, cst * cbs],
                     [0.0, bst * sgs, -cst * sbs * ca],
                     [0.0, 0.0, 1.0 / c]])


def cell_from_a(a_matrix):
    """Real cell (a, b, c, al, be, ga) from a reciprocal setting matrix (columns a*, b*, c*, 1/Angstrom)."""
    real = np.linalg.inv(np.asarray(a_matrix, float)).T   # columns a, b, c
    lens = np.linalg.norm(real, axis=0)
    ang = lambda i, j: np.degrees(np.arccos(np.clip(real[:, i] @ real[:, j] / (lens[i] * lens[j]), -1, 1)))
    return np.array([lens[0], lens[1], lens[2], ang(1, 2), ang(0, 2), ang(0, 1)])


def d_spacing(a_matrix, hkl):
    """Resolution (Angstrom) of indices (n, 3) for setting matrix A (1/Angstrom)."""
    r = np.asarray(hkl, float) @ np.asarray(a_matrix, float).T
    return 1.0 / np.linalg.norm(r, axis=-1)


# ---- detector pixels <-> MOSFLM detector mm --------------------------------------------------------

def pixel_to_mm(fast, slow, pixel_fast, pixel_slow):
    """Pixel coordinates (fast, slow; outer edge of first pixel = 0) -> MOSFLM (X, Y) mm."""
    return np.asarray(slow, float) * pixel_slow, np.asarray(fast, float) * pixel_fast


def mm_to_pixel(x_mm, y_mm, pixel_fast, pixel_slow):
    """MOSFLM (X, Y) mm -> pixel coordinates (fast, slow)."""
    return np.asarray(y_mm, float) / pixel_fast, np.asarray(x_mm, float) / pixel_slow


def header_beam_to_mosflm(kind, header_beam, pixel_fast, pixel_slow, image_size=None):
    """The direct beam of a header in MOSFLM mm (X along slow, Y along fast).

    kind        'pixels_fast_slow' (Pilatus Beam_xy, MarCCD, Eiger, R-AXIS),
                'mm_slow_fast' (ADSC BEAM_CENTER_X/_Y), or 'image_centre' (Mar345: header not trusted).
    header_beam the two numbers as the header gives them.
    image_size  (n_fast, n_slow), needed for 'image_centre'.
    Returns (X, Y) mm.
    """
    if kind == "pixels_fast_slow":
        bf, bs = header_beam
        return float(bs) * pixel_slow, float(bf) * pixel_fast
    if kind == "mm_slow_fast":
        return float(header_beam[0]), float(header_beam[1])
    if kind == "image_centre":
        nf, ns = image_size
        return ns * pixel_slow / 2.0, nf * pixel_fast / 2.0
    raise ValueError(f"unknown beam-centre convention {kind!r}")


# ---- lab <-> detector ------------------------------------------------------------------------------

def detector_axes(distance, tilt=0.0, twist=0.0, omega=0.0):
    """The unswung detector's foot of the normal (the beam position for two-theta 0) and its unit
    vectors along X (slow), Y (fast) and the normal: detector_frame's, before the BEAM point places
    the origin (frame_through) and two_theta swings it."""
    ex, ey, n = _untilted_axes(omega)
    if tilt or twist:
        r = rot_about(ex, tilt) @ rot_about(ey, twist)
        ex, ey, n = r @ ex, r @ ey, r @ n
    return distance * n, ex, ey, n


def _untilted_axes(omega):
    ex = np.array([0.0, -1.0, 0.0])   # detector X direction (along slow)
    ey = np.array([0.0, 0.0, 1.0])    # detector Y direction (along fast), parallel to the rotation axis
    n = np.array([1.0, 0.0, 0.0])     # normal, towards the detector from the crystal
    if omega:
        r = rot_about(n, omega)
        ex, ey = r @ ex, r @ ey
    return ex, ey, n


def tilt_twist_axes(tilt=0.0, omega=0.0, two_theta=0.0):
    """The unit lab axes about which detector_frame's vectors turn as TILT and as TWIST grow (its
    rotations about detector X, then Y, swung by two_theta): with the BEAM point held, each of the
    frame's vectors v (the origin too) moves by (pi/180) a x v per degree."""
    ex, ey, _ = _untilted_axes(omega)
    a_tilt, a_twist = ex, rot_about(ex, tilt) @ ey
    if two_theta:
        r = rot_z(two_theta)
        a_tilt, a_twist = r @ a_tilt, r @ a_twist
    return a_tilt, a_twist


def frame_through(axes, beam_x, beam_y):
    """The unswung frame (origin, ex, ey, n) of detector_axes' axes with the point (beam_x, beam_y) at
    the foot of the normal: moving the BEAM point moves the origin within the plane, nothing else."""
    centre, ex, ey, n = axes
    return centre - beam_x * ex - beam_y * ey, ex, ey, n


def detector_frame(distance, beam_x, beam_y, two_theta=0.0, tilt=0.0, twist=0.0, omega=0.0):
    """Origin (corner of the image, mm) and unit vectors along detector X (slow) and Y (fast) and the
    normal, all in MOSFLM's lab frame.

    The untilted detector stands at lab x = distance, normal along the beam, with the point (beam_x,
    beam_y) on the beam.  two_theta swings it about the rotation axis (Z) through the crystal; tilt and
    twist (degrees) are small rotations about detector X and Y applied before the swing.  omega (MOSFLM's
    DETECTOR OMEGA) turns the detector about the beam: 0 puts detector Y (fast) along the rotation axis,
    90 puts detector X (slow) along -Z (a vertical goniometer on a standard Pilatus mounting), 270 along
    +Z.
    """
    origin, ex, ey, n = frame_through(detector_axes(distance, tilt, twist, omega), beam_x, beam_y)
    if two_theta:
        r = rot_z(two_theta)
        origin, ex, ey, n = r @ origin, r @ ex, r @ ey, r @ n
    return origin, ex, ey, n


def imgcif_to_mosflm_frame(rotation_axis):
    """Rows: MOSFLM's X (the beam), Y and Z (the scan axis, made perpendicular to the beam) in the
    imgCIF lab of a goniometer whose scan axis is rotation_axis (with the axes it sits on applied)."""
    e = np.asarray(rotation_axis, float)
    e = e / np.linalg.norm(e)
    X = np.array([0.0, 0.0, -1.0])                # the beam, source to crystal
    Z = e - X * (e @ X)
    Z /= np.linalg.norm(Z)
    return np.array([X, np.cross(Z, X), Z])


def polarisation_angle(rotation_axis, electric=(1.0, 0.0, 0.0)):
    """Angle (degrees, about the beam from MOSFLM's Z towards Y) of a synchrotron beam's electric vector,
    which lies along the imgCIF lab's x (horizontal, in the orbit plane; DIALS's polarization normal is
    y), for a scan about rotation_axis: 0 when the axis is horizontal, 54.7 for I19's phi scan at chi
    -54.7, +-90 (the same) for a vertical goniometer (MOSFLM itself assumes 0).  Of the headers in
    shared/data only miniCBF ones say where the axis is: imgCIF axes, or an Oscillation_axis line
    ("X.CW +SLOW": vertical, example_004/009 and the thaumatin stills; "X.CW": horizontal)."""
    E = imgcif_to_mosflm_frame(rotation_axis) @ np.asarray(electric, float)
    return float(np.degrees(np.arctan2(E[1], E[2])))


def imgcif_detector_to_mosflm(rotation_axis, fast, slow, two_theta=0.0, two_theta_axis=(1.0, 0.0, 0.0)):
    """MOSFLM's (two_theta, DETECTOR OMEGA) for a detector described by imgCIF axes.

    rotation_axis  the scan axis in the imgCIF lab (beam along -z), with the axes it depends on applied.
    fast, slow     unit vectors of the pixel axes before the two-theta swing (imgCIF lab).
    two_theta      the swing (degrees) about two_theta_axis.
    MOSFLM's frame puts Z along the scan axis, so a goniometer whose axis is not imgCIF x (a kappa
    phi scan, a vertical goniometer) turns the detector about the beam: that angle is the omega that
    makes detector_frame's slow and fast directions equal these.  The swing must be about the scan
    axis (MOSFLM's model); it is signed by their relative sense.  Returns (two_theta, omega, problem):
    problem is None, or a few words why MOSFLM's model cannot represent this detector (mirrored
    axes, two-theta about another axis), in which case the angles are the nearest it can.
    """
    M = imgcif_to_mosflm_frame(rotation_axis)
    ex, ey = M @ np.asarray(slow, float), M @ np.asarray(fast, float)
    # detector_frame: ex = R_x(omega) (0, -1, 0) = (0, -cos w, -sin w), ey = (0, -sin w, cos w)
    omega = float(np.degrees(np.arctan2(-ex[2], -ex[1]))) % 360.0
    problem = None
    w = np.radians(omega)
    if np.hypot(ey[1] + np.sin(w), ey[2] - np.cos(w)) > 0.05 or abs(ex[0]) > 0.05 or abs(ey[0]) > 0.05:
        problem = "the pixel axes are mirrored or not perpendicular to the beam"
    tt = float(two_theta or 0.0)
    if tt:
        t = M @ np.asarray(two_theta_axis, float)
        t = t / np.linalg.norm(t)
        if abs(abs(t[2]) - 1.0) > 1e-3:
            problem = "the two-theta axis is not the rotation axis"
        tt = tt if t[2] > 0 else -tt
    return tt, round(omega, 3), problem


def rot_about(axis, deg):
    """Right-handed rotation matrix about a unit axis (degrees)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def mm_to_lab(x_mm, y_mm, frame):
    """MOSFLM detector (X, Y) mm -> lab points (n, 3) mm, for frame = detector_frame(...)."""
    origin, ex, ey, _ = frame
    x = np.asarray(x_mm, float)
    y = np.asarray(y_mm, float)
    # origin + x ex + y ey a coordinate at a time: the same sums, 8 times faster than broadcasting
    # against the 3-vectors (numpy's inner loops of length 3)
    p = np.empty(np.broadcast_shapes(x.shape, y.shape) + (3,))
    for j in range(3):
        np.add(origin[j] + x * ex[j], y * ey[j], out=p[..., j])
    return p


def lab_to_mm(s1, frame):
    """Where rays along s1 (n, 3, any length) from the crystal meet the detector: (X, Y) mm and a mask
    of rays that hit the detector plane in front of the crystal."""
    origin, ex, ey, n = frame
    s1 = np.asarray(s1, float)
    denom = s1 @ n
    ok = denom > 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(ok, (origin @ n) / np.where(ok, denom, 1.0), np.nan)
    p = s1 * t[..., None] - origin
    return p @ ex, p @ ey, ok


def two_theta_of(x_mm, y_mm, frame):
    """Scattering angle (degrees) of detector points."""
    p = mm_to_lab(x_mm, y_mm, frame)
    cos2t = p[..., 0] / np.linalg.norm(p, axis=-1)
    return np.degrees(np.arccos(np.clip(cos2t, -1, 1)))


def spot_spread(x_mm, y_mm, frame, pixel_mm):
    """How far (pixels per radian) a diffracted ray at detector points moves on the detector when the
    reflection's reciprocal lattice point moves by a small angle (mosaic spread): the ray turns by
    2 sin(theta) times that angle and travels L (crystal to pixel) to the detector, met at obliquity
    cos(alpha) to its normal.  Returns (radial, tangential): radial (in the plane of the ray and the
    normal) L / cos(alpha), tangential L, both times 2 sin(theta) / pixel_mm.  On the sim sweep the
    tangential spot widths follow sqrt(psf^2 + (0.108 deg * tangential)^2) to 2 % from 3.2 to 1.4 A."""
    p = mm_to_lab(x_mm, y_mm, frame)
    # np.linalg.norm's own sum of squares, (x^2 + y^2) + z^2 (a reduction over 3 adds in order), so
    # the same numbers to the bit, without its 3 temporary arrays and a reduction's set-up
    px, py, pz = p[..., 0], p[..., 1], p[..., 2]
    L = np.sqrt(px * px + py * py + pz * pz)
    cos2t = np.clip(px / L, -1.0, 1.0)
    two_sin = 2.0 * np.sqrt(np.maximum(0.5 * (1.0 - cos2t), 0.0))
    cos_a = np.maximum(np.abs(p @ frame[3]) / L, 1e-3)
    t = two_sin * L / pixel_mm
    return t / cos_a, t


def resolution_of(x_mm, y_mm, frame, wavelength):
    """d-spacing (Angstrom) of detector points."""
    tt = np.radians(two_theta_of(x_mm, y_mm, frame))
    with np.errstate(divide="ignore"):
        return wavelength / (2.0 * np.sin(tt / 2.0))
