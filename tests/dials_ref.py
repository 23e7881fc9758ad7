"""DIALS reference results in MOSFLM's terms, for tests that compare pyflm with DIALS.

Reads DIALS's experiment JSON (no DIALS needed) and gives the crystal as a MOSFLM matrix and the
detector as the keywords (DISTANCE, BEAM, TWOTHETA, DETECTOR OMEGA, DISTORTION TILT/TWIST) that put
pyflm's detector where DIALS refined it.  MOSFLM has the beam exactly perpendicular to the rotation
axis; DIALS refines the beam freely, so the frame is turned to put DIALS's beam along MOSFLM's X and
the axis as close to Z as it can be (for a 1.5 degree sweep the residual tilt changes nothing measurable).
Also reads DIALS's integrated CSVs.
"""
import csv
import json

import numpy as np
from scipy.optimize import least_squares

from pyflm import geometry
from pyflm.model import Crystal


def _rot(axis, deg):
    return geometry.rot_about(np.asarray(axis, float), deg)


def load_expt(path, experiment=0):
    """(crystal, keywords dict, wavelength) for one experiment of a DIALS .expt."""
    e = json.load(open(path))
    ex = e["experiment"][experiment]
    beam, det, gon, scan, cr = (e[k][ex[k]] for k in ("beam", "detector", "goniometer", "scan", "crystal"))
    wl = beam["wavelength"]
    s0 = -np.asarray(beam["direction"], float)          # dxtbx's direction points to the source
    s0 /= np.linalg.norm(s0)
    axes, angles, iscan = gon["axes"], gon["angles"], gon["scan_axis"]
    F = np.eye(3)                                       # axes inside the scan axis (first listed innermost)
    for ax, ang in zip(axes[:iscan], angles[:iscan]):
        F = _rot(ax, ang) @ F
    S = np.eye(3)                                       # axes outside it
    for ax, ang in zip(axes[iscan + 1:], angles[iscan + 1:]):
        S = _rot(ax, ang) @ S
    axis = S @ np.asarray(axes[iscan], float)
    # P takes DIALS's lab to an imgCIF frame with the beam along -z and the axis in the x-z plane
    w = axis - (axis @ s0) * s0
    w /= np.linalg.norm(w)
    P = np.array([w, np.cross(w, s0), s0])
    P[2] = -s0
    M = geometry.IMGCIF_TO_MOSFLM @ P
    phi0, osc = scan["oscillation"]
    nimg = min(scan["image_range"][1] - scan["image_range"][0] + 1, 15)   # the images held here
    if cr.get("A_at_scan_points"):
        # scan-varying refinement: its static matrix is only the starting point; take the middle one
        k = len(cr["A_at_scan_points"]) // 2
        A = np.array(cr["A_at_scan_points"][k], float).reshape(3, 3)
        phim = phi0 + k * osc
    else:
        real = np.array([cr["real_space_a"], cr["real_space_b"], cr["real_space_c"]])
        A = np.linalg.inv(real)                         # columns a*, b*, c*
        phim = phi0 + 0.5 * nimg * osc                  # match exactly in the middle of the sweep
    r_mid = M @ S @ _rot(axes[iscan], phim) @ F @ A
    A_mos = geometry.rot_z(-phim) @ r_mid
    cell = geometry.cell_from_a(A_mos)
    U = A_mos @ np.linalg.inv(geometry.b_matrix(cell))
    u, _, vt = np.linalg.svd(U)                         # exactly orthonormal
    crystal = Crystal(tuple(cell), "P1", u @ vt)
    p = det["panels"][0]
    origin = M @ np.asarray(p["origin"], float)
    ey = M @ np.asarray(p["fast_axis"], float)          # MOSFLM Y runs along fast, X along slow
    ex = M @ np.asarray(p["slow_axis"], float)
    kw = _fit_detector(origin, ex, ey)
    kw["WAVELENGTH"] = wl
    return crystal, kw, wl


def _fit_detector(origin, ex, ey):
    """pyflm detector parameters whose frame (geometry.detector_frame) is DIALS's panel."""
    n = np.cross(ey, ex)
    dist = float(origin @ n)
    tt0 = np.degrees(np.arctan2(n[1], n[0]))
    # start from the swing that takes the normal there and the omega that lines up fast
    best = None
    for om in (0.0, 90.0, 180.0, 270.0):
        x0 = [dist, 0.0, 0.0, tt0, om, 0.0, 0.0]
        o0, ex0, ey0, n0 = geometry.detector_frame(dist, 0, 0, tt0, 0, 0, om)
        foot = dist * n
        x0[1], x0[2] = float((foot - origin) @ ex), float((foot - origin) @ ey)

        def resid(x):
            o, a, b, _ = geometry.detector_frame(*x[:4], x[5], x[6], x[4])
            return np.concatenate([o - origin, 100 * (a - ex), 100 * (b - ey)])
        lo = [dist - 50, -1e4, -1e4, tt0 - 20, om - 60, -10, -10]    # small tilt and twist only
        hi = [dist + 50, 1e4, 1e4, tt0 + 20, om + 60, 10, 10]
        r = least_squares(resid, x0, bounds=(lo, hi))
        if best is None or r.cost < best.cost:
            best = r
    d, bx, by, tt, om, tilt, twist = best.x
    if np.max(np.abs(best.fun)) > 1e-3:
        raise ValueError(f"DIALS's detector does not fit pyflm's model: residual {np.max(np.abs(best.fun))}")
    return {"DISTANCE": d, "BEAM": (bx, by), "TWOTHETA": tt, "OMEGA": om % 360, "TILT": tilt,
            "TWIST": twist}


def deck_lines(kw):
    """Keyword lines for a deck from load_expt's keywords (TILT/TWIST in MOSFLM's 0.01 degree units)."""
    return [f"WAVELENGTH {kw['WAVELENGTH']:.5f}", f"DISTANCE {kw['DISTANCE']:.3f}",
            f"BEAM {kw['BEAM'][0]:.3f} {kw['BEAM'][1]:.3f}", f"TWOTHETA {kw['TWOTHETA']:.3f}",
            f"DETECTOR OMEGA {kw['OMEGA']:.3f}",
            f"DISTORTION TILT {100 * kw['TILT']:.1f} TWIST {100 * kw['TWIST']:.1f}"]


def lp_factors(path, experiment, x_px, y_px, fraction=0.99):
    """DIALS's Lorentz-polarisation correction (its reflection tables' "lp": zeta / P, with the electric
    vector along the lab x, polarization normal y) at detector pixels (x fast, y slow) of one
    experiment of a .expt: to compare the LP factors of another model with it."""
    e = json.load(open(path))
    ex = e["experiment"][experiment]
    panel = e["detector"][ex["detector"]]["panels"][0]
    gon, beam = e["goniometer"][ex["goniometer"]], e["beam"][ex["beam"]]
    o, f, sl = (np.asarray(panel[k], float) for k in ("origin", "fast_axis", "slow_axis"))
    px = panel["pixel_size"][0]
    pos = o + np.asarray(x_px, float)[:, None] * px * f + np.asarray(y_px, float)[:, None] * px * sl
    s1 = pos / np.linalg.norm(pos, axis=1)[:, None]
    s0 = -np.asarray(beam["direction"], float)
    s0 /= np.linalg.norm(s0)
    axes, angles, i = gon["axes"], gon["angles"], gon["scan_axis"]
    S = np.eye(3)
    for ax, ang in zip(axes[i + 1:], angles[i + 1:]):
        S = _rot(ax, ang) @ S
    m2 = S @ np.asarray(axes[i], float)
    zeta = np.abs(s1 @ np.cross(m2 / np.linalg.norm(m2), s0))
    P = fraction * (1 - s1[:, 0] ** 2) + (1 - fraction) * (1 - s1[:, 1] ** 2)
    return zeta / P


def read_integrated_csv(path):
    """DIALS's integrated reflections: a dict of numpy arrays by column name."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
