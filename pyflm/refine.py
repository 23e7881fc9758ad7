"""Cell refinement from integrated segments (POSTREF MULTI SEGMENTS n; PROCESS a b + GO per segment).

The strong reflections of every segment give observed spot centroids (the intensity-weighted mean of
their measured parts' centroids) and phi (the intensity-weighted mean of the parts' image mid-points,
corrected by the calculated partiality); orientation, cell (with the lattice's constraints) and beam
centre are refined together by least squares on those positions and phi (pyflm.indexing's refinement).
Segments far apart in phi separate the cell from the orientation, as the MOSFLM tutorial explains.
Cycles repeat while any cell parameter moves by more than 2.5 esd (at most 5), then MOSFLM's tables
and `Cell refinement is complete` are printed, the crystal is updated and NEWMAT written.

What is not done yet: per-image detector refinement (distance, YSCALE, tilt, twist are held at their
starting values and printed as such) and post-refinement of the missets and mosaic from partials.
"""
from __future__ import annotations

import numpy as np

from . import geometry, lattice
from .errors import ProcessingError


def _lattice_of(space_group):
    import gemmi
    sg = gemmi.SpaceGroup(space_group)
    system = sg.crystal_system_str()
    centring = sg.hm[0]
    k = {"triclinic": "a", "monoclinic": "m", "orthorhombic": "o", "tetragonal": "t", "trigonal": "h",
         "hexagonal": "h", "cubic": "c"}[system]
    return k + ("R" if centring == "H" or centring == "R" else centring)


def strong_observations(obs, min_isig=10.0):
    """One observation per reflection of a segment: centroid (fast, slow) and phi, from its parts."""
    if len(obs) == 0:
        return obs[:0], np.zeros(0), np.zeros(0), np.zeros(0)
    key = (obs["h"].astype(np.int64) + 512) * 1048576 + (obs["k"] + 512) * 1024 + (obs["l"] + 512)
    uniq, inv = np.unique(key, return_inverse=True)
    w = np.maximum(obs["I"], 0)
    W = np.bincount(inv, w)
    S = np.sqrt(np.bincount(inv, obs["sigI"] ** 2))
    ok = (W > min_isig * np.maximum(S, 1e-9)) & (W > 0)
    f = np.bincount(inv, w * obs["fast"]) / np.maximum(W, 1e-9)
    s = np.bincount(inv, w * obs["slow"]) / np.maximum(W, 1e-9)
    phi = np.bincount(inv, w * obs["phi_mid"]) / np.maximum(W, 1e-9)
    first = np.zeros(len(uniq), int)
    first[inv[::-1]] = np.arange(len(obs))[::-1]
    rep = obs[first]
    return rep[ok], f[ok], s[ok], phi[ok]


def refine_cell(segments, crystal, beam, detector, goniometer, max_cycles=5):
    """segments: [(observations, first, last)].  Returns a dict of the refinement's figures."""
    from .indexing import refine_orientation
    hkl, xo, yo, po, img = [], [], [], [], []
    for obs, a, b in segments:
        rep, f, s, phi = strong_observations(obs)
        x, y = detector.pixel_to_mm(f, s)
        hkl.append(np.stack([rep["h"], rep["k"], rep["l"]], 1).astype(float))
        xo.append(x)
        yo.append(y)
        po.append(phi)
        img.append(rep["image"])
    hkl, xo, yo, po, img = (np.concatenate(v) for v in (hkl, xo, yo, po, img))
    if len(hkl) < 20:
        raise ProcessingError(f"only {len(hkl)} strong reflections in the segments: too few to refine the "
                              "cell (use more images per segment or a lower resolution limit)")
    lat = _lattice_of(crystal.space_group)
    cell0 = tuple(crystal.cell)
    A = crystal.A
    cycles = []
    cell = cell0
    for cycle in range(1, max_cycles + 1):
        fit = refine_orientation(A, hkl, xo, yo, po, beam.wavelength, detector,
                                 reverse=goniometer.reverse_phi, refine_beam=False,
                                 cell_params=(lat, cell), phi_weight=0.05)
        new_cell = tuple(geometry.cell_from_a(fit.A))
        esd = _cell_esd(fit, hkl, xo, yo, po, beam, detector, goniometer, lat, new_cell)
        per_image = _rms_per_image(fit, hkl, xo, yo, po, img, beam, detector, goniometer)
        cycles.append({"cell": new_cell, "esd": esd, "rms_mm": fit.rms_mm, "per_image": per_image})
        shift = np.abs(np.array(new_cell) - np.array(cell))
        A, cell = fit.A, new_cell
        if np.all(shift <= 2.5 * np.maximum(esd, 1e-6)):
            break
    U = A @ np.linalg.inv(geometry.b_matrix(cell))
    uu, _, vv = np.linalg.svd(U)
    return {"start": cell0, "cell": cell, "esd": cycles[-1]["esd"], "U": uu @ vv, "cycles": cycles,
            "n": len(hkl)}


def _rms_per_image(fit, hkl, xo, yo, po, img, beam, detector, goniometer):
    from .indexing import _predict_spots
    xp, yp, pp, ok = _predict_spots(fit.A, hkl, po, beam.wavelength, detector,
                                    (detector.beam_x, detector.beam_y), goniometer.reverse_phi)
    d = np.hypot(xp - xo, yp - yo)
    out = {}
    for i in np.unique(img):
        m = (img == i) & ok & (d < 1.0)
        out[int(i)] = float(np.sqrt(np.mean(d[m] ** 2))) if m.any() else float("nan")
    return out


def _cell_esd(fit, hkl, xo, yo, po, beam, detector, goniometer, lat, cell):
    """Cell esds by finite differences of the position residuals (Jacobian) at the solution."""
    from .indexing import _free_cell, _predict_spots
    free = _free_cell(lat, cell)
    U = fit.A @ np.linalg.inv(geometry.b_matrix(cell))
    uu, _, vv = np.linalg.svd(U)
    U = uu @ vv
    used = fit.used if fit.used is not None else np.ones(len(hkl), bool)

    def resid(x):
        A = U @ geometry.b_matrix(free(x))
        xp, yp, pp, ok = _predict_spots(A, hkl[used], po[used], beam.wavelength, detector,
                                        (detector.beam_x, detector.beam_y), goniometer.reverse_phi)
        return np.concatenate([xp - xo[used], yp - yo[used]])
    x0 = free.x0
    r0 = resid(x0)
    J = np.empty((len(r0), len(x0)))
    for j in range(len(x0)):
        dx = np.zeros(len(x0))
        dx[j] = 1e-4 * max(abs(x0[j]), 1.0)
        J[:, j] = (resid(x0 + dx) - r0) / dx[j]
    dof = max(len(r0) - len(x0) - 3, 1)
    s2 = float(r0 @ r0) / dof
    try:
        cov = np.linalg.inv(J.T @ J) * s2
    except np.linalg.LinAlgError:
        return np.full(6, np.nan)
    sd = np.sqrt(np.maximum(np.diag(cov), 0))
    full = np.zeros(6)
    k = lat[0]
    if k == "a":
        full[:] = sd
    elif k == "m":
        full[[0, 1, 2, 4]] = sd
    elif k == "o":
        full[:3] = sd
    elif k in "th":
        full[[0, 1]] = sd[0]
        full[2] = sd[1]
    else:
        full[:3] = sd[0]
    return full


def format_tables(result, detector):
    L = []
    images = sorted({i for c in result["cycles"] for i in c["per_image"]})
    L.append(" Rms positional error (mm) as a function of cycle for each image.")
    L.append("      Image" + "".join(f"{i:6d}" for i in images))
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle {n:2d}   " + "".join(f"{c['per_image'].get(i, float('nan')):6.3f}" for i in images))
    L.append(" Detector distance as a function of cycle for each image:")
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle {n:2d}   " + "".join(f"{detector.distance:7.2f}" for _ in images))
    L.append(" YSCALE as a function of cycle for each image:")
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle {n:2d}   " + "".join(f"{detector.yscale:7.4f}" for _ in images))
    L.append("")
    L.append(" Cell refinement is complete")
    L.append(" Starting cell " + "".join(f"{v:9.3f}" for v in result["start"]))
    L.append(" Refined cell  " + "".join(f"{v:9.3f}" for v in result["cell"]))
    L.append(" Error         " + "".join(f"{v:9.3f}" for v in result["esd"]))
    return L


def cell_refinement_segment(job, result, models, first, last):
    """Collect one PROCESS segment; when POSTREF MULTI SEGMENTS n have been collected, refine."""
    beam, det, gonio, scan = models
    segs = job.results.setdefault("cellref_segments", [])
    segs.append((result.observations, first, last))
    need = int((job.kw.get("POSTREF") or {}).get("SEGMENTS", 2))
    log = job.log
    if len(segs) < need:
        log.line(f" Cell refinement: segment {len(segs)} of {need} (images {first} to {last}) stored")
        return
    job.results["cellref_segments"] = []
    res = refine_cell(segs, job.crystal, beam, det, gonio)
    for ln in format_tables(res, det):
        log.line(ln)
    if job.crystal.mosaic:
        log.line(f" Refined mosaic spread (excluding safety factor): {job.crystal.mosaic:6.2f}")
    moved = np.abs(np.array(res["cell"]) - np.array(res["start"])) / np.maximum(np.array(res["start"]), 1)
    if np.any(moved[:3] > 0.02):
        log.line(" ***** WARNING ***** One or more cell parameters has changed by more than 2%")
    job.crystal.cell = tuple(res["cell"])
    job.crystal.U = res["U"]
    job.crystal.missets = (0.0, 0.0, 0.0)
    job.results["cell_refinement"] = res
    if "NEWMAT" in job.files:
        from .matrix import write_matrix
        write_matrix(job.files["NEWMAT"], job.crystal, beam.wavelength)
        log.line(f" Matrix written to {job.files['NEWMAT']}")
