"""STRATEGY and TESTGEN (algorithms.md 1g).

STRATEGY: every reflection to the resolution limit is predicted once over a full turn (its Ewald
crossings, on the detector); a phi range measures the reflections whose crossing falls inside it.
Completeness = unique reflections measured (asymmetric unit of the Laue group, gemmi) / unique
reflections possible to that resolution (systematic absences left out); anomalous completeness counts
Bijvoet mates apart (centric reflections once); multiplicity = measurements / unique measured.  AUTO
scans start angles (5-degree steps, then 1-degree steps around the best) for a total rotation in 1 to 3
equal segments spread over 180 degrees.

TESTGEN: for each phi, the largest oscillation (MINOSC..MAXOSC in 0.1-degree steps) whose image has at
most OVERLAP percent of its reflections spatially overlapped (closer than SEPARATION), using the
current mosaic spread.
"""
from __future__ import annotations

from dataclasses import dataclass

import gemmi
import numpy as np

from . import predict
from .errors import ProcessingError


@dataclass
class Coverage:
    keys: np.ndarray          # ASU key per predicted crossing
    bij: np.ndarray           # Bijvoet key (ASU key * 2 + minus flag, centrics folded)
    phi: np.ndarray           # crossing phi in [0, 360)
    d: np.ndarray
    n_unique: int
    n_bijvoet: int
    d_possible: np.ndarray    # d of every unique possible reflection (for shells)


def _asu_keys(hkl, sg):
    asu = gemmi.ReciprocalAsu(sg)
    ops = sg.operations()
    out = np.empty((len(hkl), 3), np.int64)
    minus = np.zeros(len(hkl), bool)
    cache = {}
    for i, h in enumerate(map(tuple, hkl.tolist())):
        r = cache.get(h)
        if r is None:
            red, isym = asu.to_asu(list(h), ops)
            r = cache[h] = (tuple(red), isym % 2 == 0)
        out[i], minus[i] = r
    key = (out[:, 0] + 512) * 1048576 + (out[:, 1] + 512) * 1024 + (out[:, 2] + 512)
    return key, minus


def coverage(crystal, beam, detector, goniometer, dmin, dmax=None):
    """Crossings of every reflection over a full turn, with their ASU and Bijvoet keys."""
    sg = gemmi.SpaceGroup(crystal.space_group)
    pred = predict.predict(crystal, beam, detector, goniometer, 0.0, 360.0, dmin, dmax, margin=0.0)
    pred = pred[pred["on_detector"]]
    phi = np.mod(pred["phi"], 360.0)
    hkl = np.stack([pred["h"], pred["k"], pred["l"]], 1)
    key, minus = _asu_keys(hkl, sg)
    centric = np.array([sg.operations().is_reflection_centric(list(h)) for h in hkl.tolist()], bool) \
        if len(hkl) else np.zeros(0, bool)
    bij = key * 2 + (minus & ~centric)
    # every possible unique reflection to dmin (not only those that reach the detector)
    allh = predict.generate_hkl(crystal.A, dmin, dmax)
    absent = np.array([sg.operations().is_systematically_absent(list(h)) for h in allh.tolist()], bool)
    allh = allh[~absent]
    akey, aminus = _asu_keys(allh, sg)
    acen = np.array([sg.operations().is_reflection_centric(list(h)) for h in allh.tolist()], bool)
    uniq, first = np.unique(akey, return_index=True)
    d_all = 1.0 / np.linalg.norm(allh[first] @ crystal.A.T, axis=1)
    n_bij = len(np.unique(akey * 2 + (aminus & ~acen)))
    keep = ~np.array([sg.operations().is_systematically_absent(list(h)) for h in hkl.tolist()], bool) \
        if len(hkl) else np.zeros(0, bool)
    return Coverage(key[keep], bij[keep], phi[keep], pred["d"][keep], len(uniq), n_bij, d_all)


def _in_ranges(phi, ranges):
    sel = np.zeros(len(phi), bool)
    for a, b in ranges:
        if b - a >= 360:
            return np.ones(len(phi), bool)
        lo = np.mod(a, 360.0)
        hi = lo + (b - a)
        sel |= ((phi >= lo) & (phi < hi)) | ((phi + 360 >= lo) & (phi + 360 < hi))
    return sel


def completeness(cov, ranges, shells=8):
    """Figures for phi ranges [(start, end), ...]."""
    sel = _in_ranges(cov.phi, ranges)
    uk = np.unique(cov.keys[sel])
    ub = np.unique(cov.bij[sel])
    out = {"measured": int(len(uk)), "possible": int(cov.n_unique),
           "completeness": len(uk) / max(cov.n_unique, 1),
           "anomalous": len(ub) / max(cov.n_bijvoet, 1),
           "multiplicity": float(sel.sum() / max(len(uk), 1))}
    edges = np.quantile(1 / cov.d_possible ** 2, np.linspace(0, 1, shells + 1))
    rows = []
    s_meas = 1 / cov.d[sel] ** 2
    meas_keys = cov.keys[sel]
    for lo, hi in zip(edges[:-1], edges[1:]):
        poss = np.sum((1 / cov.d_possible ** 2 >= lo) & (1 / cov.d_possible ** 2 <= hi))
        m = len(np.unique(meas_keys[(s_meas >= lo) & (s_meas <= hi)]))
        rows.append((1 / np.sqrt(lo) if lo > 0 else 999.0, 1 / np.sqrt(hi), m, int(poss), m / max(poss, 1)))
    out["shells"] = rows
    return out


def best_start(cov, total, segments=1, anomalous=False, step=5.0):
    """The start angle maximising completeness for `total` degrees in `segments` equal parts spread
    over 180 degrees; returns (start, figures, [(start, completeness) scanned])."""
    seg = total / segments
    gap = 180.0 / segments

    def ranges(s):
        return [(s + i * gap, s + i * gap + seg) for i in range(segments)]

    key = "anomalous" if anomalous else "completeness"
    scan = [(s, completeness(cov, ranges(s))[key]) for s in np.arange(0.0, 180.0, step)]
    s0 = max(scan, key=lambda t: t[1])[0]
    fine = [(s, completeness(cov, ranges(s))[key]) for s in np.arange(s0 - step, s0 + step + 0.5, 1.0)]
    s_best = max(fine, key=lambda t: t[1])[0] % 360.0
    return s_best, completeness(cov, ranges(s_best)), scan, ranges(s_best)


def axis_angles(crystal):
    """Angles (degrees) between the real axes a, b, c and MOSFLM's X (beam), Y and Z (rotation axis)."""
    real = np.linalg.inv(crystal.A).T        # columns a, b, c at phi 0
    out = []
    for i in range(3):
        v = real[:, i] / np.linalg.norm(real[:, i])
        out.append(np.degrees(np.arccos(np.clip(np.abs(v), -1, 1))))
    return np.array(out)                      # rows a, b, c; columns X, Y, Z


def _unique_axis(space_group):
    sg = gemmi.SpaceGroup(space_group)
    system = sg.crystal_system_str()
    return {"monoclinic": 1, "tetragonal": 2, "trigonal": 2, "hexagonal": 2}.get(system)


def run_strategy(job, args):
    """STRATEGY [START s END e] [AUTO] [ANOMALOUS] [SEGMENTS n] [ROTATE r]."""
    crystal = job.crystal
    if crystal is None or getattr(crystal, "U", None) is None:
        raise ProcessingError("STRATEGY needs an orientation: give MATRIX or run AUTOINDEX first")
    beam, det, gonio, scan = job.experiment(job.image)
    res = (job.kw.get("RESOLUTION") or {}).get("_args") or []
    dmin = float(min(res)) if res else predict.corner_resolution(det, beam.wavelength)
    cov = coverage(crystal, beam, det, gonio, dmin)
    log = job.log
    log.line("")
    log.line(f" Strategy for space group {crystal.space_group}, resolution {dmin:.2f} A")
    ang = axis_angles(crystal)
    log.line("          X (beam)   Y     Z (rotation axis)")
    for name, row in zip("abc", ang):
        log.line(f"  {name} axis {row[0]:7.1f} {row[1]:7.1f} {row[2]:7.1f}")
    ua = _unique_axis(crystal.space_group)
    if ua is not None and ang[ua][2] < 10.0:
        log.line(f" ***** WARNING ***** the unique axis ({'abc'[ua]}) is within {ang[ua][2]:.1f} degrees of the "
                 "rotation axis: reflections in the cusp around it will not be measured")
    if args.get("AUTO"):
        total = float(args.get("ROTATE", {"triclinic": 180, "monoclinic": 180}.get(
            gemmi.SpaceGroup(crystal.space_group).crystal_system_str(), 90)))
        segs = int(args.get("SEGMENTS", 1))
        start, figs, scan_list, ranges = best_start(cov, total, segs, bool(args.get("ANOMALOUS")))
        log.line(f" Optimum rotation of {total:.1f} degrees in {segs} segment(s):")
        for a, b in ranges:
            log.line(f"   Start phi {a:8.2f}  End phi {b:8.2f}")
    else:
        a = float(args.get("START", scan.phi_start))
        b = float(args.get("END", scan.phi_start + (scan.last - scan.first + 1) * scan.osc))
        ranges = [(a, b)]
        figs = completeness(cov, ranges)
        log.line(f" Phi range {a:8.2f} to {b:8.2f} degrees")
    log.line(f" Number of unique reflections possible {figs['possible']:8d}, measured {figs['measured']:8d}")
    log.line(f" Completeness of unique data {100 * figs['completeness']:6.1f}%;"
             f" of anomalous pairs {100 * figs['anomalous']:6.1f}%;"
             f" multiplicity {figs['multiplicity']:5.2f}")
    log.line("   Dmax    Dmin  measured possible  %complete")
    for dmx, dmn, m, p, c in figs["shells"]:
        log.line(f" {min(dmx, 999.99):6.2f} {dmn:6.2f} {m:9d} {p:8d} {100 * c:9.1f}")
    job.results["strategy"] = (ranges, figs)


def overlap_fraction(crystal, beam, detector, goniometer, phi, osc, dmin, separation):
    """Fraction of the reflections recorded on an image [phi, phi+osc] that are spatially overlapped."""
    pred = predict.predict(crystal, beam, detector, goniometer, phi, phi + osc, dmin, margin=2.0)
    lo, hi = predict.phi_extent(pred)
    pred = pred[(hi > phi) & (lo < phi + osc) & pred["on_detector"]]
    if not len(pred):
        return 0.0
    parts = np.zeros(len(pred), predict.PART_DTYPE)
    parts["index"] = np.arange(len(pred))
    parts["image"] = 1
    parts["n_parts"] = 1
    flags = predict.classify(pred, parts, detector, separation=separation)
    return float(np.mean(flags & predict.OVERLAP != 0))


def testgen(crystal, beam, detector, goniometer, start, end, step, minosc, maxosc, overlap_pct, dmin,
            separation):
    """[(phi, largest oscillation with overlaps <= overlap_pct %, that percentage)]."""
    rows = []
    for phi in np.arange(start, end + 1e-9, step):
        best, best_pct = None, None
        for osc in np.arange(maxosc, minosc - 1e-9, -0.1):
            pct = 100 * overlap_fraction(crystal, beam, detector, goniometer, phi, osc, dmin, separation)
            if pct <= overlap_pct:
                best, best_pct = float(osc), pct
                break
        rows.append((float(phi), best, best_pct))
    return rows


def run_testgen(job, args):
    """TESTGEN START s END e STEP t [MINOSC a] [MAXOSC b] [OVERLAP p]."""
    crystal = job.crystal
    if crystal is None or getattr(crystal, "U", None) is None:
        raise ProcessingError("TESTGEN needs an orientation: give MATRIX or run AUTOINDEX first")
    beam, det, gonio, scan = job.experiment(job.image)
    if not crystal.mosaic:
        crystal.mosaic = 0.3
    res = (job.kw.get("RESOLUTION") or {}).get("_args") or []
    dmin = float(min(res)) if res else predict.corner_resolution(det, beam.wavelength)
    sep = (job.kw.get("SEPARATION") or {}).get("_args")
    sep = (sep[0], sep[-1]) if sep else (4 * det.pixel_slow, 4 * det.pixel_fast)
    start, end = float(args.get("START", 0.0)), float(args.get("END", 180.0))
    step = float(args.get("STEP", 5.0))
    minosc, maxosc = float(args.get("MINOSC", 0.2)), float(args.get("MAXOSC", 2.0))
    pct = float(args.get("OVERLAP", 2.0))
    rows = testgen(crystal, beam, det, gonio, start, end, step, minosc, maxosc, pct, dmin, sep)
    log = job.log
    log.line("")
    log.line(f" TESTGEN: largest oscillation with at most {pct:.1f}% spatial overlaps"
             f" (separation {sep[0]:.2f} {sep[1]:.2f} mm, mosaic {crystal.mosaic:.2f})")
    log.line("   Phi start   Max oscillation   % overlapped")
    for phi, osc, p in rows:
        if osc is None:
            log.line(f"   {phi:8.2f}     below {minosc:5.2f}")
        else:
            log.line(f"   {phi:8.2f}       {osc:6.2f}          {p:5.2f}")
    job.results["testgen"] = rows
