"""Refinement: positional refinement of the detector, post-refinement of the crystal, cell refinement.

Observations come from a quick measurement of the images (``measure_parts``): every predicted part of
every reflection not overlapped, excluded or too wide that a quick peak-over-rim look (on its largest
part) finds gets a background plane, a summation intensity and the centroid of its net peak; in
PROCESS at most REFINE_PER_IMAGE reflections an image, the strongest by that look, spread over the
detector (MOSFLM's refinement too takes a bounded list).  Only strong reflections (I/sigma > 10
summed over their parts) whose every part was measured are used.  From them

* positional refinement (algorithms 1e): strong fully recorded reflections (and, with REFINEMENT
  INCLUDE PARTIALS, partials whose every part was measured; centroid = intensity-weighted mean of the
  parts') against the positions predicted at their crossings.  Free: beam centre XCEN YCEN, distance
  XTOFD, TILT, TWIST; XCEN YCEN are where the direct beam meets the detector (``direct_beam``), so
  they do not trade against tilt and twist.  YSCALE, CCOMEGA, ROFF and TOFF are not in pyflm's
  detector model (pyflm.geometry) and are held at their values.  Spots beyond RESIDUAL, or beyond 5
  robust sigma of the others, are rejected.
* post-refinement (algorithms 1d, Rossmann/Winkler): the observed fractions p_i = I_i / sum_j I_j of
  strong partials spread over consecutive images against the calculated ones (Gaussian rocking curve
  of pyflm.predict, renormalised over the measured parts).  Free: missets PHIX PHIY PHIZ, the mosaic
  spread and, in cell refinement (or POSTREF UNFIX), the cell under the lattice's constraints.

Both sets of residuals (positions in units of their sigma, fractions in units of theirs) are
minimised together with a soft-L1 loss, so a parameter seen by both (the missets move spots as well as
fractions) is refined once, consistently.  The fit (``_fit``: Levenberg-Marquardt on the Gauss-Newton
Hessian, as scipy's least_squares weighs a robust loss) takes the residuals' derivatives in closed form
(``_Predictions.derivatives``) and runs to the minimum itself (a last step under 1e-5 of the esds), so
a small problem of ~10 parameters and a few thousand residuals costs a few evaluations.

PROCESS refines once per block, before the block is integrated (``refine_block``, called by
pyflm.integrate): each block starts from the job's model, so results do not depend on the number of
worker processes; values reported per image are the block's (MOSFLM smooths per-image values over a
few images; a block of 5 images is that smoothing).  After a large shift the block is measured again
where the refined model puts its spots (boxes off the spots bias the centroids).

Cell refinement (POSTREF MULTI SEGMENTS n; PROCESS a b + GO per segment): the segments' images are
measured with the current model, everything free is refined over all segments together, and the cycle
(measure again, refine again) repeats while any cell parameter moves by more than 2.5 esd, at most 5
cycles (POSTREF REPEAT m).  The log follows MOSFLM's layout line for line where xia2 reads it (per
cycle the post-refinement banner and each image's `Final rms residual`; `Cell refinement is complete`
with the cells and esds on the next lines; the rms, YSCALE and distance tables; `Refined mosaic
spread`; the XCEN..TWIST block).  The crystal and the detector parameters are carried forward to
later PROCESS lines (as BEAM, DISTANCE, DISTORTION TILT/TWIST), and NEWMAT is written.

Keyword options (job.kw): REFINEMENT FIX/FREE <params> (XCEN YCEN BEAM DISTANCE TILT TWIST YSCALE
CCOMEGA ROFF TOFF ALL), RESIDUAL r (spots whose weighted positional residual exceeds r are rejected),
INCLUDE/EXCLUDE PARTIALS; POSTREF FIX/UNFIX <params> (ALL, MOSAIC, A B C ALPHA BETA GAMMA, PHIX PHIY
PHIZ), MAXRESIDUAL r (fractions off by more than r sigma are rejected), SDFAC f (scales the fractions'
sigmas), OFF (no post-refinement: missets, mosaic and cell held).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import geometry, predict
from .errors import ProcessingError

try:
    from ._ext import _refine as _ref_ext
except ImportError:            # not built: the numpy twin
    _ref_ext = None

DETECTOR_PARAMS = ("XCEN", "YCEN", "DISTANCE", "TILT", "TWIST")
HELD_DETECTOR = ("YSCALE", "CCOMEGA", "ROFF", "TOFF")
CELL_NAMES = ("A", "B", "C", "ALPHA", "BETA", "GAMMA")
MISSETS = ("PHIX", "PHIY", "PHIZ")

_ALIASES = {"XTOFD": "DISTANCE", "DIST": "DISTANCE", "DISTANCE": "DISTANCE", "XCEN": "XCEN",
            "YCEN": "YCEN", "TILT": "TILT", "TWIST": "TWIST", "YSCALE": "YSCALE", "CCOMEGA": "CCOMEGA",
            "CCOM": "CCOMEGA", "ROFF": "ROFF", "TOFF": "TOFF", "MOSAIC": "MOSAIC", "MOSA": "MOSAIC",
            "PHIX": "PHIX", "PHIY": "PHIY", "PHIZ": "PHIZ", "A": "A", "B": "B", "C": "C",
            "ALPHA": "ALPHA", "BETA": "BETA", "GAMMA": "GAMMA"}

POS_SIGMA_PX = 0.1           # positional sigma of a strong spot's centroid, pixels (weights)
FRACTION_SIGMA = 0.02        # model error added to every observed fraction's sigma


def _names(text):
    """Parameter names in a FIX/FREE/UNFIX list ('dist yscale', 'all', 'beam'); other words ignored
    (the parser hands the rest of the line to the list)."""
    out = set()
    for w in str(text or "").upper().replace(",", " ").split():
        if w == "ALL":
            out.add("ALL")
        elif w == "BEAM":
            out.update(("XCEN", "YCEN"))
        elif w in _ALIASES:
            out.add(_ALIASES[w])
        elif len(w) >= 4 and any(k.startswith(w) for k in _ALIASES):
            out.add(next(_ALIASES[k] for k in _ALIASES if k.startswith(w)))
    return out


@dataclass
class Options:
    detector_free: set = field(default_factory=lambda: set(DETECTOR_PARAMS))
    include_partials: bool = False
    fullfrac: float = 0.9             # REFINEMENT FULLFRAC: a part this large makes a full
    residual: float = 10.0            # REFINEMENT RESIDUAL: max weighted positional residual
    postref: bool = True              # POSTREF OFF -> False
    missets_free: set = field(default_factory=lambda: set(MISSETS))
    mosaic_free: bool = True
    cell_fixed: set = field(default_factory=set)   # cell parameters POSTREF FIX holds
    cell_unfixed: set = field(default_factory=set)  # POSTREF UNFIX: refined in PROCESS too
    maxresidual: float = 10.0         # POSTREF MAXRESIDUAL, in sigma of the fraction
    sdfac: float = 1.0                # POSTREF SDFAC
    cell_refinement: bool = False     # POSTREF MULTI/SEGMENTS: PROCESS lines are cell-refinement segments


def _trailing(*texts):
    """Sub-keywords that a FIX/FREE/UNFIX list swallowed with the rest of its line
    ('REFINEMENT FIX DISTANCE RESIDUAL 15'): {name: value}."""
    out = {}
    words = " ".join(str(t or "") for t in texts).upper().split()
    for i, w in enumerate(words[:-1]):
        if w in ("RESIDUAL", "FULLFRAC", "MAXRESIDUAL", "SDFAC"):
            try:
                out[w] = float(words[i + 1])
            except ValueError:
                pass
        elif w in ("INCLUDE", "EXCLUDE"):
            out[w] = words[i + 1]
    return out


def options_from(kw):
    """Refinement options from the job's REFINEMENT and POSTREF settings."""
    o = Options()
    r = kw.get("REFINEMENT") or {}
    r = {**_trailing(r.get("FIX"), r.get("FREE")), **r}
    fix, free = _names(r.get("FIX")), _names(r.get("FREE"))
    if "ALL" in fix:
        fix = set(DETECTOR_PARAMS) | set(HELD_DETECTOR)
    o.detector_free = (set(DETECTOR_PARAMS) - fix) | (free & set(DETECTOR_PARAMS))
    if "ALL" in free:
        o.detector_free = set(DETECTOR_PARAMS)
    if r.get("RESIDUAL"):
        o.residual = float(r["RESIDUAL"])
    if r.get("FULLFRAC"):
        o.fullfrac = float(r["FULLFRAC"])
    inc = str(r.get("INCLUDE") or "").upper()
    exc = str(r.get("EXCLUDE") or "").upper()
    o.include_partials = inc.startswith("PART") and not exc.startswith("PART")
    p = kw.get("POSTREF") or {}
    p = {**_trailing(p.get("FIX"), p.get("UNFIX")), **p}
    o.cell_refinement = bool(p.get("MULTI") or p.get("SEGMENTS"))
    if p.get("OFF") and not p.get("ON"):
        o.postref = False
    pfix, punfix = _names(p.get("FIX")), _names(p.get("UNFIX"))
    if "ALL" in pfix:
        pfix = set(CELL_NAMES) | {"MOSAIC"} | set(MISSETS)
    pfix -= punfix
    o.mosaic_free = "MOSAIC" not in pfix
    o.missets_free = set(MISSETS) - pfix
    o.cell_fixed = pfix & set(CELL_NAMES)
    o.cell_unfixed = punfix & set(CELL_NAMES)
    if p.get("MAXRESIDUAL"):
        o.maxresidual = float(p["MAXRESIDUAL"])
    if p.get("SDFAC"):
        o.sdfac = float(p["SDFAC"])
    if not o.postref:
        o.missets_free, o.mosaic_free = set(), False
        o.cell_fixed, o.cell_unfixed = set(CELL_NAMES), set()
    return o


def lattice_of(space_group):
    import gemmi
    sg = gemmi.SpaceGroup(space_group)
    k = {"triclinic": "a", "monoclinic": "m", "orthorhombic": "o", "tetragonal": "t", "trigonal": "h",
         "hexagonal": "h", "cubic": "c"}[sg.crystal_system_str()]
    return k + ("R" if sg.hm[0] in "HR" else sg.hm[0])


# ---- measuring the parts ---------------------------------------------------------------------------

PART_OBS = np.dtype([("refl", "i8"), ("h", "i4"), ("k", "i4"), ("l", "i4"), ("image", "i4"),
                     ("fast", "f8"), ("slow", "f8"), ("I", "f8"), ("sigI", "f8"), ("phi_pred", "f8"),
                     ("n_parts", "i4"), ("ok", "?")])

RASTER = (15, 15, 3, 4, 4)


def measure_parts(crystal, beam, detector, goniometer, scan, images, read_image, *, dmin=None, dmax=None,
                  raster=None, separation=None, limit=None):
    """Summation intensity and centroid of every measurable part of the reflections recorded wholly on
    `images` (a contiguous list): those refinement can use.

    Predicted with a generous mosaic so a part the current model would miss (mosaic too small) is
    still measured.  Returns PART_OBS rows; `refl` numbers the reflections, `n_parts` counts the
    images each one touches inside the scan, `ok` marks parts measured cleanly (no edge, overload or
    bad pixel).  `limit`: at most that many reflections are measured, the strongest by the quick look,
    spread over the detector (_strongest_spread)."""
    from .shoebox import measure, quick_sums
    images = list(images)
    raster = raster or RASTER
    dmin = dmin or predict.corner_resolution(detector, beam.wavelength)
    lo, hi = scan.phi_range(images[0])[0], scan.phi_range(images[-1])[1]
    wide = max(1.5 * (crystal.mosaic or 0.3), (crystal.mosaic or 0.3) + 0.3)
    # the search's margin beyond the block: a reflection centred d past it puts more than 0.005 of itself
    # (image_parts' least part) on the block only if its width exceeds d / 1.09, and any such is dropped
    # whole (it has a part off the block; at an end of the scan it is not recorded whole); the margin finds
    # those up to 3.7 times as wide as an equatorial one (~wide), kept as neighbours for the overlap test,
    # and is at most MAXWIDTH-like 5
    margin = min(5.0, max(2.5, 4.0 * wide))
    probe = None
    d_pred = dmin
    if limit is not None:
        # a bounded list of strong reflections has none beyond the resolution where the spots stop
        # standing out: those are neither looked at nor measured (nor, far from any that is, neighbours),
        # nor predicted (a sim block: 2.4 ms to that resolution, 3.9 to the corners, the probe 1.2).  The
        # probe predicts its image alone: the same crossings of that image (to the rounding of its ends),
        # their positions and d to the bit (a crossing's ray does not depend on the window searched)
        a, b = scan.phi_range(images[len(images) // 2])
        d_lim, probe = _standing_resolution(
            predict.predict(crystal, beam, detector, goniometer, a, b, dmin, dmax, mosaic=wide, margin=0.0),
            images, scan, read_image, detector, raster)
        if d_lim is not None:
            # (a hair finer than the limit, which is applied below as before: no reflection at it is lost
            # to the rounding of the prediction's resolution test)
            d_pred = max(dmin, d_lim * (1.0 - 1e-6))
    pred = predict.predict(crystal, beam, detector, goniometer, lo, hi, d_pred, dmax, mosaic=wide, margin=margin)
    if d_pred != dmin:
        pred = pred.take(np.flatnonzero(pred["d"] >= d_lim))
    # the parts on the block's images and on the one either side of it: a reflection's share per image
    # falls away from its centre (a single-peaked rocking curve), so one with a part on any other image
    # has one on those two or none on the block (either way it is not measured: dropped whole below)
    parts = predict.image_parts(pred, scan.phi_start, scan.osc, scan.first, scan.last, 0.005,
                                only=(images[0] - 1, images[-1] + 1))
    if separation is None:
        separation = (4 * detector.pixel_slow, 4 * detector.pixel_fast)
    # refinement uses only reflections recorded wholly on these images (complete: _reflections), so the
    # others are not measured; their parts here still count as neighbours.  A part's flags depend on the
    # parts on its own image alone: those on other images need no classifying
    if images == list(range(images[0], images[-1] + 1)):      # (the usual contiguous run: no isin's sort)
        here = (parts["image"] >= images[0]) & (parts["image"] <= images[-1])
    else:
        here = np.isin(parts["image"], images)
    elsewhere = np.zeros(len(pred), bool)
    elsewhere[parts["index"][~here]] = True
    parts = parts.take(np.flatnonzero(here))      # (take: ~15x faster than a mask on a record array)
    flags = predict.classify(pred, parts, detector, separation=separation, maxwidth=5.0, osc=scan.osc,
                             dmin=dmin, dmax=dmax)
    bad = (flags & (predict.EXCLUDED | predict.OVERLAP | predict.TOO_WIDE)) != 0
    # a reflection with any unusable part cannot give fractions; drop it whole
    bad_refl = elsewhere.copy()
    bad_refl[parts["index"][bad]] = True
    parts = parts.take(np.flatnonzero(~bad_refl[parts["index"]]))
    out = np.zeros(len(parts), PART_OBS)
    p = predict.fields(pred, parts["index"], ("h", "k", "l", "phi", "fast", "slow"))
    out["refl"] = parts["index"]
    out["h"], out["k"], out["l"] = p["h"], p["k"], p["l"]
    out["image"], out["n_parts"], out["phi_pred"] = parts["image"], parts["n_parts"], p["phi"]
    kw = dict(raster=raster, gain=detector.gain, overload=detector.overload, nullpix=detector.nullpix)
    # a quick look (peak sum against the rim's mean) finds the reflections worth measuring: only strong
    # ones are used, and fitting every weak box's background would cost most of the time.  Each
    # reflection is looked at once, on its largest part (a strong reflection stands out there if anywhere)
    # (image_parts gives a reflection's parts in consecutive rows; of equal ones the first is taken)
    frac = parts["fraction"]
    start = np.flatnonzero(np.r_[True, out["refl"][1:] != out["refl"][:-1]]) if len(out) else np.zeros(0, int)
    gid = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(out)]))
    top = frac == np.maximum.reduceat(frac, start)[gid] if len(out) else np.zeros(0, bool)
    largest = top & (np.cumsum(top) - np.r_[0, np.cumsum(top)][start][gid] == 1)
    score = np.full(len(pred), -np.inf)           # quick I/sigma of the reflections that stand out
    datas = {}
    for img in images:
        sel = np.flatnonzero(out["image"] == img)
        if len(sel) == 0:
            continue
        try:
            data = read_image(img)
        except Exception:          # a bad image is reported by PROCESS itself; nothing to measure here
            continue
        if data.shape != (detector.n_slow, detector.n_fast):
            continue
        datas[img] = (sel, data)
        look = sel[largest[sel]]
        fast, slow = p["fast"][look], p["slow"][look]
        if probe is not None and img == probe[0]:
            # the probe looked at these boxes already (the same image and raster): a box at the very same
            # position (fast, slow) has the same sums
            at = np.minimum(np.searchsorted(probe[1], fast), len(probe[1]) - 1)
            done = (probe[1][at] == fast) & (probe[2][at] == slow)
            sums = np.empty((len(look), 4))
            sums[done] = probe[3][at[done]]
            rest = np.flatnonzero(~done)
            sums[rest] = quick_sums(data, fast[rest], slow[rest], raster, detector.nullpix)
        else:
            sums = quick_sums(data, fast, slow, raster, detector.nullpix)
        pk, n_pk, rim, n_rim = sums.T
        quick = pk - rim / np.maximum(n_rim, 1) * n_pk
        root = np.sqrt(np.maximum(pk, 1.0))
        # a bounded list (pass 1) is spent on reflections that can be strong: those standing out
        up = quick > (4.0 if limit is None else STANDING) * root
        score[out["refl"][look][up]] = quick[up] / root[up]
    seen = np.isfinite(score)
    if limit is not None and seen.sum() > limit:
        seen = _strongest_spread(seen, score, pred["x_mm"], pred["y_mm"], detector, int(limit))
    for img, (sel, data) in datas.items():
        sel = sel[seen[out["refl"][sel]]]
        # the integration kernel's measurement from this image alone (background plane, summation, centroid)
        m = measure(data, p["fast"][sel], p["slow"][sel], **kw)
        out["slow"][sel], out["fast"][sel] = m["slow_obs"], m["fast_obs"]
        out["I"][sel], out["sigI"][sel] = m["I"], m["SIGI"]
        out["ok"][sel] = m["on"] & ~m["over"] & ~m["bad_peak"] & (m["n_bg"] >= 6)
    # reflections not worth measuring are left out whole, so every kept one keeps all its parts
    return out.take(np.flatnonzero(seen[out["refl"]]))


GRID = 4        # _strongest_spread's cells along each side of the detector

# the quick look's I/sigma (on a reflection's largest part) below which a reflection is hardly ever strong
# (I/sigma > 10 over all its parts): sim blocks, 2 % of those at 4-8 were, 80 % of those at 12-15
STANDING = 8.0
PROBE_MIN = 50      # reflections standing out on the probed image needed to trust its limit
D_MARGIN = 0.95     # the limit is this fraction of the highest-resolution standing reflection's d


def _standing_resolution(pred, images, scan, read_image, detector, raster):
    """(d, probe): the resolution d (A) past which pass 1 need not look, D_MARGIN x the d of the
    highest-resolution reflection that stands out (quick I/sigma > STANDING at its predicted centre) on
    the block's middle image, None (no limit) when fewer than PROBE_MIN stand out there or the image
    cannot be read; probe (image, fast, slow, quick_sums rows; by fast) what was looked at, or None.  One
    bright spot far out (an ice ring, a zinger) only takes the limit out to it.  The margin keeps every
    reflection within 5 % in d of the standing ones, their overlapping neighbours among them (5 % of d is
    millimetres on the detector, a separation a fraction of one)."""
    from .shoebox import quick_sums
    img = images[len(images) // 2]
    a, b = scan.phi_range(img)
    on = np.flatnonzero((pred["phi"] >= a) & (pred["phi"] < b) & pred["on_detector"])
    try:
        data = read_image(img)
    except Exception:
        return None, None
    if len(on) < PROBE_MIN or data.shape != (detector.n_slow, detector.n_fast):
        return None, None
    fast, slow = pred["fast"].take(on), pred["slow"].take(on)
    sums = quick_sums(data, fast, slow, raster, detector.nullpix)
    pk, n_pk, rim, n_rim = sums.T
    standing = pk - rim / np.maximum(n_rim, 1) * n_pk > STANDING * np.sqrt(np.maximum(pk, 1.0))
    by_fast = np.argsort(fast, kind="stable")
    probe = (img, fast[by_fast], slow[by_fast], sums[by_fast])
    if standing.sum() < PROBE_MIN:
        return None, probe
    return D_MARGIN * float(pred["d"].take(on)[standing].min()), probe


def _strongest_spread(seen, score, x_mm, y_mm, detector, limit):
    """At most `limit` of the reflections `seen`: the strongest by the quick look's I/sigma (`score`),
    taken in turns from GRID x GRID cells of the detector so they stay spread over it (the outer cells
    hold the high-resolution spots that pin the distance, tilt and twist; the strongest alone would be
    mostly low-resolution ones)."""
    idx = np.flatnonzero(seen)
    X, Y = detector.size_mm
    cx = np.clip((x_mm[idx] / X * GRID).astype(int), 0, GRID - 1)
    cy = np.clip((y_mm[idx] / Y * GRID).astype(int), 0, GRID - 1)
    cell = cx * GRID + cy
    # each one's rank within its cell, strongest first: rank 0 of every cell, then rank 1, ...
    key = -score[idx]
    o = np.lexsort((key, cell))
    start = np.flatnonzero(np.r_[True, cell[o][1:] != cell[o][:-1]])
    rank = np.empty(len(idx), np.int64)
    rank[o] = np.arange(len(idx)) - np.repeat(start, np.diff(np.r_[start, len(idx)]))
    take = idx[np.lexsort((key, rank))[:limit]]
    out = np.zeros_like(seen)
    out[take] = True
    return out


def direct_beam(detector):
    """Where the direct beam meets the detector (MOSFLM's XCEN, YCEN), mm.  pyflm.geometry puts the
    BEAM point at the foot of the detector normal, which a TILT or TWIST moves off the direct beam
    (by distance x tilt: 0.02 mm for 0.01 degree at 120 mm); refining and reporting the direct beam
    keeps the beam centre from trading against tilt and twist."""
    if detector.two_theta:          # a swung detector: MOSFLM's BEAM is that of the unswung one
        return float(detector.beam_x), float(detector.beam_y)
    hit = _beam_hit(detector.frame())
    return hit if hit is not None else (float(detector.beam_x), float(detector.beam_y))


def _beam_hit(frame):
    """Where the direct beam meets a detector frame (mm), or None where it misses it."""
    x, y, ok = geometry.lab_to_mm(geometry.BEAM_DIRECTION[None], frame)
    if not (ok[0] and np.isfinite(x[0]) and np.isfinite(y[0])):
        return None
    return float(x[0]), float(y[0])


def _beam_point(frame_at, x, y):
    """The BEAM point that puts the direct beam at (x, y) mm on an unswung detector whose frame with
    the BEAM point at (bx, by) is frame_at(bx, by).  Exact in one step: a shift of the BEAM point
    moves the frame's origin within the plane."""
    hit = _beam_hit(frame_at(x, y))
    return (x, y) if hit is None else (2 * x - hit[0], 2 * y - hit[1])


def set_direct_beam(detector, x, y):
    """Move the detector in its plane so the direct beam meets it at (x, y) mm."""
    detector.beam_x, detector.beam_y = x, y
    if detector.two_theta:
        return
    axes = geometry.detector_axes(detector.distance, detector.tilt, detector.twist, detector.omega)
    detector.beam_x, detector.beam_y = _beam_point(lambda bx, by: geometry.frame_through(axes, bx, by), x, y)


# ---- the model being refined -----------------------------------------------------------------------

class _Model:
    """Parameter vector <-> (detector, crystal); predictions for a fixed list of reflections."""

    def __init__(self, crystal, beam, detector, goniometer, free_det, free_missets, free_mosaic,
                 free_cell):
        self.c0, self.beam, self.d0, self.gonio = crystal, beam, detector, goniometer
        self.lat = lattice_of(crystal.space_group)
        self.cellfun, self._UB = None, None
        if free_cell:
            # only for a free cell: a PROCESS with the cell held need not import indexing (~50 ms)
            from .indexing import _free_cell
            self.cellfun = _free_cell(self.lat, crystal.cell)
        self.names, x0, scale = [], [], []
        self.beam0 = direct_beam(detector)
        base = {"XCEN": self.beam0[0], "YCEN": self.beam0[1], "DISTANCE": detector.distance,
                "TILT": detector.tilt, "TWIST": detector.twist}
        sc = {"XCEN": 0.05, "YCEN": 0.05, "DISTANCE": 0.5, "TILT": 0.05, "TWIST": 0.05}
        for n in DETECTOR_PARAMS:
            if n in free_det:
                self.names.append(n), x0.append(base[n]), scale.append(sc[n])
        for i, n in enumerate(MISSETS):
            if n in free_missets:
                self.names.append(n), x0.append(crystal.missets[i]), scale.append(0.02)
        if free_mosaic:
            self.names.append("MOSAIC"), x0.append(crystal.mosaic or 0.3), scale.append(0.05)
        self.cell_idx = []
        if free_cell:
            # free cell parameters under the lattice; those POSTREF FIX holds are left out
            for j, v in enumerate(self.cellfun.x0):
                if self._cell_name(j) in free_cell:
                    self.cell_idx.append(j)
                    self.names.append(f"CELL{j}"), x0.append(v), scale.append(1e-3 * abs(v) + 1e-4)
        self.x0, self.scale = np.array(x0, float), np.array(scale, float)

    def _cell_name(self, j):
        k = self.lat[0]
        return {"a": CELL_NAMES, "m": ("A", "B", "C", "BETA"), "o": ("A", "B", "C"),
                "t": ("A", "C"), "h": ("A", "C")}.get(k, ("A",))[j]

    def unpack(self, x):
        return self.unpack_detector(x), self.unpack_crystal(x)

    def unpack_detector(self, x):
        """The detector at x: it depends on XCEN YCEN DISTANCE TILT TWIST only."""
        v = dict(zip(self.names, x))
        det = copy.copy(self.d0)
        det.distance = v.get("DISTANCE", det.distance)
        det.tilt = v.get("TILT", det.tilt)
        det.twist = v.get("TWIST", det.twist)
        bx, by = v.get("XCEN", self.beam0[0]), v.get("YCEN", self.beam0[1])
        set_direct_beam(det, bx, by)
        return det

    def setting_matrix(self, x):
        """unpack_crystal(x).A, without the crystal's copy when the cell is held (its B then the same
        for every x; the product is the property's, in its order, so the same to the bit)."""
        if self.cell_idx:
            return self.unpack_crystal(x).A
        if self._UB is None:
            self._UB = (self.c0.U, self.c0.B)
        v = dict(zip(self.names, x))
        m = [v.get(n, self.c0.missets[i]) for i, n in enumerate(MISSETS)]
        return geometry.misset_matrix(*m) @ self._UB[0] @ self._UB[1]

    def value(self, x, name, held):
        """Parameter `name` at x, or `held` where it is not refined."""
        return x[self.names.index(name)] if name in self.names else held

    def missets_at(self, x):
        return tuple(self.value(x, n, self.c0.missets[i]) for i, n in enumerate(MISSETS))

    def orientation(self, x):
        """(U, B) at x: B that of the cell at x."""
        if self.cell_idx:
            cr = self.unpack_crystal(x)
            return cr.U, cr.B
        if self._UB is None:
            self._UB = (self.c0.U, self.c0.B)
        return self._UB

    def mosaic_at(self, x):
        """unpack_crystal(x).mosaic"""
        if "MOSAIC" not in self.names:
            return max(self.c0.mosaic or 0.3, 1e-3)
        return max(x[self.names.index("MOSAIC")], 1e-3)

    def frame_at(self, x):
        """unpack_detector(x).frame() without the detector's copy, the plane's axes computed once
        (set_direct_beam's frames differ only in where the BEAM point puts the origin)."""
        d0 = self.d0
        if d0.two_theta:
            return self.unpack_detector(x).frame()
        v = dict(zip(self.names, x))
        axes = geometry.detector_axes(v.get("DISTANCE", d0.distance), v.get("TILT", d0.tilt),
                                      v.get("TWIST", d0.twist), d0.omega)

        def at(bx, by):
            return geometry.frame_through(axes, bx, by)
        return at(*_beam_point(at, v.get("XCEN", self.beam0[0]), v.get("YCEN", self.beam0[1])))

    def unpack_crystal(self, x):
        """The crystal at x: missets, mosaic and cell."""
        v = dict(zip(self.names, x))
        cr = copy.copy(self.c0)
        cr.missets = tuple(v.get(n, cr.missets[i]) for i, n in enumerate(MISSETS))
        cr.mosaic = max(v.get("MOSAIC", cr.mosaic or 0.3), 1e-3)
        if self.cell_idx:
            cx = np.array(self.cellfun.x0, float)
            for j in self.cell_idx:
                cx[j] = v[f"CELL{j}"]
            cr.cell = tuple(float(c) for c in self.cellfun(cx))
        return cr

    def calc(self, x, hkl, phi_ref):
        """Predicted (x mm, y mm, phi, width) of reflections at the crossing nearer phi_ref (what
        _Predictions computes, piece by piece)."""
        det, cr = self.unpack(x)
        phi, s1u, ok = self.rotated(cr, hkl, phi_ref)
        xm, ym, hit = geometry.lab_to_mm(s1u, det.frame())
        width = predict.rocking_width_xds(s1u, self.gonio.axis, cr.mosaic, self.beam)
        return xm, ym, phi, width, ok & hit

    def rotated(self, cr, hkl, phi_ref):
        """Crossing nearer phi_ref, the unit diffracted beam there, and whether h crosses at all."""
        reverse = self.gonio.reverse_phi
        r0 = hkl @ cr.A.T
        p1, p2, ok = predict.crossings_of(r0, self.beam.wavelength, reverse)
        d1 = np.abs((p1 - phi_ref + 180) % 360 - 180)
        d2 = np.abs((p2 - phi_ref + 180) % 360 - 180)
        phi = np.where(d1 <= d2, p1, p2)
        phi = phi_ref + ((phi - phi_ref + 180) % 360 - 180)
        sign = -1 if reverse else 1
        r = geometry.rotate_z_many(sign * phi, r0)
        s1u = (r + geometry.BEAM_DIRECTION / self.beam.wavelength) * self.beam.wavelength
        return phi, s1u, ok


class _Predictions:
    """model.calc(x) for a fixed list of reflections, and its derivatives with respect to the free
    parameters in closed form (``derivatives``): the crossing angle by implicit differentiation of the
    Ewald condition, the spot position by that of the ray's meeting with the detector plane, the
    rocking width by the chain rule through s1.  Only the setting matrix A (3 x 3) and the detector
    frame (four vectors) are differenced numerically (centrally), which costs nothing beside the
    reflections.  The kernel (ext/_refine.pyx) computes both in one pass when built; the numpy code
    here is its twin (use_cython=False).  The last point asked for is kept (the fit asks for values,
    then their derivatives)."""

    def __init__(self, model, hkl, phi_ref, use_cython=True):
        self.model, self.hkl, self.phi_ref = model, np.ascontiguousarray(hkl, float), \
            np.ascontiguousarray(phi_ref, float)
        names = model.names
        self.det_idx = [i for i, n in enumerate(names) if n in DETECTOR_PARAMS]
        self.cry_idx = [i for i, n in enumerate(names) if n in MISSETS or n.startswith("CELL")]
        self.mos_idx = [i for i, n in enumerate(names) if n == "MOSAIC"]
        self.use_cython = use_cython and _ref_ext is not None
        self._last = (None, None)
        axis = np.asarray(model.gonio.axis, float)
        u = np.cross(axis, geometry.BEAM_DIRECTION)
        self._axes = axis, u / max(np.linalg.norm(u), 1e-12)
        self._cry_idx, self._det_idx = np.array(self.cry_idx, np.int64), np.array(self.det_idx, np.int64)

    def _parameter_derivatives(self, x, frame):
        """dA/dx (k, 3, 3) for the crystal's parameters and d(frame)/dx (kd, 4, 3) for the detector's."""
        m = self.model
        dA = np.zeros((len(self.cry_idx), 3, 3))
        rates = None
        for q, j in enumerate(self.cry_idx):
            if m.names[j] in MISSETS:
                # A = M(missets) U B: the missets' rotations' rates in the product (the cell's B held)
                if rates is None:
                    U, B = m.orientation(x)
                    rates = [r @ U @ B for r in geometry.misset_rates(*m.missets_at(x))]
                dA[q] = rates[MISSETS.index(m.names[j])]
                continue
            h = 1e-5 * max(1.0, abs(x[j]))
            dA[q] = (m.setting_matrix(_stepped(x, j, h)) - m.setting_matrix(_stepped(x, j, -h))) / (2 * h)
        dF = np.zeros((len(self.det_idx), 4, 3))
        turns = None
        for q, j in enumerate(self.det_idx):
            if m.names[j] in ("XCEN", "YCEN"):
                # the direct beam's point moves in the detector plane, the origin with it (set_direct_beam)
                dF[q, 0] = -frame[1 if m.names[j] == "XCEN" else 2]
                continue
            if m.names[j] == "DISTANCE":
                # the plane moves along its normal; set_direct_beam keeps the direct beam at (XCEN, YCEN),
                # which for a tilted plane moves the origin within it by distance x (b.e)/(b.n) along e
                _, ex, ey, nrm = frame
                dF[q, 0] = nrm
                if not m.d0.two_theta:
                    b = geometry.BEAM_DIRECTION
                    dF[q, 0] += ((b @ ex) * ex + (b @ ey) * ey) / (b @ nrm)
                continue
            # TILT, TWIST: the frame turns about the crystal (geometry.tilt_twist_axes), and set_direct_beam
            # moves the origin within the plane to keep the direct beam at (XCEN, YCEN): by distance x
            # d((b.e)/(b.n)) along each in-plane axis e
            d0 = m.d0
            if turns is None:
                turns = geometry.tilt_twist_axes(m.value(x, "TILT", d0.tilt), d0.omega, d0.two_theta)
            dF[q] = geometry.cross_rows(np.radians(1.0) * turns[m.names[j] == "TWIST"], np.array(frame))
            if not d0.two_theta:
                b = geometry.BEAM_DIRECTION
                origin, ex, ey, nrm = frame
                dex, dey, dn = dF[q, 1], dF[q, 2], dF[q, 3]
                bn, dist = b @ nrm, origin @ nrm
                dF[q, 0] += dist * (((b @ dex) / bn - (b @ ex) * (b @ dn) / (bn * bn)) * ex +
                                    ((b @ dey) / bn - (b @ ey) * (b @ dn) / (bn * bn)) * ey)
        return dA, dF

    def _state(self, x):
        x = np.asarray(x, float)
        key = x.tobytes()
        if self._last[0] == key:
            return self._last[1]
        m = self.model
        if self.use_cython:
            # the kernel needs the setting matrix, the frame and the mosaic only: no model copies
            frame = m.frame_at(x)
            mosaic = m.mosaic_at(x)
            st = dict(x=x, frame=frame, mosaic=mosaic)
            dA, dF = self._parameter_derivatives(x, frame)
            axis, u = self._axes
            dh, dv = (float(v) for v in m.beam.divergence)
            *vals, D = _ref_ext.predictions(
                self.hkl, self.phi_ref, np.ascontiguousarray(m.setting_matrix(x)), m.beam.wavelength,
                m.gonio.reverse_phi, np.ascontiguousarray(frame), geometry.BEAM_DIRECTION, axis, u,
                dh, dv, float(m.beam.dispersion), float(mosaic), dA, self._cry_idx, dF,
                self._det_idx, self.mos_idx[0] if self.mos_idx else -1, len(x))
            st.update(vals=tuple(vals), D=tuple(D))
        else:
            det, cr = m.unpack(x)
            frame = det.frame()
            st = dict(x=x, frame=frame, mosaic=cr.mosaic, cr=cr)
            phi, s1u, ok = m.rotated(cr, self.hkl, self.phi_ref)
            xm, ym, hit = geometry.lab_to_mm(s1u, frame)
            terms = predict.rocking_width_terms(s1u, m.gonio.axis, m.beam)
            width = predict.width_from_terms(terms, cr.mosaic)
            st.update(s1u=s1u, terms=terms, crossing=ok, vals=(xm, ym, phi, width, ok & hit))
        self._last = (key, st)
        return st

    def __call__(self, x):
        return self._state(x)["vals"]

    def derivatives(self, x):
        """d(xm, ym, phi, width)/dx, each (n reflections, n parameters); zero where a reflection does
        not cross (and, for xm and ym, where its ray misses the detector)."""
        st = self._state(x)
        if "D" in st:
            return st["D"]
        with np.errstate(divide="ignore", invalid="ignore"):     # a ray that misses: zeroed below
            return self._derivatives_numpy(st)

    def _derivatives_numpy(self, st):
        m, x, cr = self.model, st["x"], st["cr"]
        lam = m.beam.wavelength
        n, p = len(self.hkl), len(x)
        dX, dY, dphi, dW = (np.zeros((n, p)) for _ in range(4))
        origin, ex, ey, nrm = st["frame"]
        s1u, phi = st["s1u"], st["vals"][2]
        r0 = self.hkl @ cr.A.T                  # at phi 0, and at the crossing:
        r = s1u / lam - geometry.BEAM_DIRECTION / lam
        dA, dF = self._parameter_derivatives(x, st["frame"])
        sn = s1u @ nrm
        t = (origin @ nrm) / sn
        pvec = s1u * t[:, None] - origin
        sign = -1.0 if m.gonio.reverse_phi else 1.0
        # the detector's parameters: the frame moves, the ray is held
        for q, j in enumerate(self.det_idx):
            do, dex, dey, dn = dF[q]
            dt = (do @ nrm + origin @ dn) / sn - t * (s1u @ dn) / sn
            dp = s1u * dt[:, None] - do
            dX[:, j], dY[:, j] = dp @ ex + pvec @ dex, dp @ ey + pvec @ dey
        sin2t, disp, zeta, div2 = st["terms"]
        axis = np.asarray(m.gonio.axis, float)
        cross = np.cross(geometry.BEAM_DIRECTION, s1u)
        u = np.cross(axis, geometry.BEAM_DIRECTION)
        u = u / max(np.linalg.norm(u), 1e-12)
        wdiv = cross @ u
        dh, dv = (float(v) for v in m.beam.divergence)
        mos = st["mosaic"]
        Q = np.sqrt((mos * sin2t) ** 2 + div2)
        width = st["vals"][3]
        zsign = np.where(np.abs(cross @ axis) > 1e-6, np.sign(cross @ axis), 0.0)
        if self.cry_idx:
            ci = self.cry_idx
            c, s = np.cos(np.radians(sign * phi)), np.sin(np.radians(sign * phi))
            # every free crystal parameter at once: (n reflections, k parameters) per component
            d0 = np.einsum("nc,krc->rnk", self.hkl, dA)                 # dr0 components
            R0 = c[:, None] * d0[0] - s[:, None] * d0[1]
            R1 = s[:, None] * d0[0] + c[:, None] * d0[1]
            # the Ewald condition 2 s0.r + r.r = 0 held as r0 moves: the crossing's shift (radians)
            da = (R0 + lam * (r0[:, 0:1] * d0[0] + r0[:, 1:2] * d0[1] + r0[:, 2:3] * d0[2])) / (sign * r[:, 1:2])
            ds = [lam * (R0 - sign * da * r[:, 1:2]), lam * (R1 + sign * da * r[:, 0:1]), lam * d0[2]]
            dphi[:, ci] = np.degrees(da)
            dt = -t[:, None] * (ds[0] * nrm[0] + ds[1] * nrm[1] + ds[2] * nrm[2]) / sn[:, None]
            dp = [ds[q] * t[:, None] + s1u[:, q:q + 1] * dt for q in range(3)]
            dX[:, ci] = dp[0] * ex[0] + dp[1] * ex[1] + dp[2] * ex[2]
            dY[:, ci] = dp[0] * ey[0] + dp[1] * ey[1] + dp[2] * ey[2]
            # the width through s1: cross = s0^ x s1 moves by s0^ x ds
            e = geometry.BEAM_DIRECTION
            dc = [e[1] * ds[2] - e[2] * ds[1], e[2] * ds[0] - e[0] * ds[2], e[0] * ds[1] - e[1] * ds[0]]
            dsin = (cross[:, 0:1] * dc[0] + cross[:, 1:2] * dc[1] + cross[:, 2:3] * dc[2]) / \
                np.maximum(sin2t, 1e-300)[:, None]
            dz = zsign[:, None] * (dc[0] * axis[0] + dc[1] * axis[1] + dc[2] * axis[2])
            dwd = dc[0] * u[0] + dc[1] * u[1] + dc[2] * u[2]
            dQ = ((mos * mos * sin2t)[:, None] * dsin + (dv * dv * zeta)[:, None] * dz +
                  (dh * dh * wdiv)[:, None] * dwd) / Q[:, None]
            ddisp = -np.degrees(m.beam.dispersion * ds[0])
            dW[:, ci] = (dQ + ddisp) / zeta[:, None] - (width / zeta)[:, None] * dz
        for j in self.mos_idx:
            dW[:, j] = mos * sin2t ** 2 / (Q * zeta)
        hit, crossing = st["vals"][4], st["crossing"]
        dX[~hit], dY[~hit], dphi[~crossing], dW[~crossing] = 0.0, 0.0, 0.0, 0.0
        return dX, dY, dphi, dW


def _stepped(x, j, h):
    y = np.array(x, float)
    y[j] += h
    return y


def _cum_derivatives(x, phi, width, tail=0.0):
    """d/dphi and d/dwidth of predict._cum (the rocking curve's share recorded before x)."""
    w = np.maximum(width, 1e-9)
    t = np.asarray(x, float) - phi
    k = 2.3548 / np.sqrt(2.0)
    u = t * k / w
    dG = np.exp(-u * u) / np.sqrt(np.pi)         # dG/du
    d_phi, d_w = -dG * k / w, -dG * u / w
    if np.any(tail):
        v = 2.0 * t / w
        dL = 1.0 / (np.pi * (1.0 + v * v))
        d_phi = (1.0 - tail) * d_phi + tail * dL * (-2.0 / w)
        d_w = (1.0 - tail) * d_w + tail * dL * (-v / w)
    return d_phi, np.where(width > 1e-9, d_w, 0.0)


def _fraction_rows_numpy(d_phi, d_w, dphi, dW, refl, f, tot, sig):
    """The fraction rows of refine_parameters' Jacobian, each part's (its calculated fraction f / tot of
    its reflection's total, less the observed, over sig) derivatives: the twin of
    ext/_refine.pyx's fraction_rows.  d_phi, d_w: d f / d(phi, width) of each row; dphi, dW: the
    reflections' d(phi, width)/dx; refl: each row's reflection."""
    df = d_phi[:, None] * dphi.take(refl, 0) + d_w[:, None] * dW.take(refl, 0)
    p = dphi.shape[1]
    bins = (refl[:, None] * p + np.arange(p)).ravel()         # (reflection, parameter) of each df
    dtot = np.bincount(bins, df.ravel(), minlength=len(dphi) * p).reshape(-1, p)
    T = tot[refl][:, None]
    dp = df / T - f[:, None] * dtot[refl] / (T * T)
    return dp / sig[:, None]


FIT_TOL = 1e-5
REJECT_TOL = 0.25             # the first fit's, before the first rejection of outliers (refine_parameters)
F_SCALE = 3.0                 # soft-L1 loss: residuals (in sigma) beyond this count less and less


def _robust(r):
    """The soft-L1 cost of residuals r and its weights: the gradient's (rho') and the Gauss-Newton
    Hessian's (rho' + 2 rho'' r^2, which for soft-L1 is (1 + z)^-1.5), as scipy's least_squares has them."""
    t = 1.0 + (r / F_SCALE) ** 2
    q = np.sqrt(t)
    w1 = 1.0 / q
    return F_SCALE ** 2 * float(np.sum(q - 1.0)), w1, w1 / t


def _fit(fun, jac, x0, lb, ub, max_iter=100, tol=FIT_TOL):
    """Minimise the soft-L1 cost of fun(x) from x0 within bounds (lb, ub) by Levenberg-Marquardt steps
    on the Gauss-Newton Hessian; returns (x, residuals, Jacobian scaled by the Hessian's weights).
    Stops when the Gauss-Newton step is shorter than `tol` of the parameters' standard errors (its
    length in the Hessian's metric, residuals being in units of their sigma): the minimum itself, not
    a point near it, so the result does not depend on where the fit began or how it went."""
    x = np.clip(np.asarray(x0, float), lb, ub)
    r = fun(x)
    if not np.all(np.isfinite(r)):
        raise ValueError("residuals are not finite at the starting point")
    cost, w1, w2 = _robust(r)
    J = jac(x)
    mu = 1e-6
    for _ in range(max_iter):
        g = J.T @ (w1 * r)
        H = J.T @ (w2[:, None] * J)
        # the Gauss-Newton step's length in esds (the Newton decrement): below tol, x is the minimum
        # (a step that small changes the cost by less than its rounding, so it is not taken)
        gn = np.linalg.lstsq(H, -g, rcond=None)[0]
        if float(gn @ H @ gn) < tol * tol:
            break
        d = np.diag(H).copy()
        d[d <= 0] = 1.0
        accepted = False
        while mu < 1e12:
            try:
                dx = -np.linalg.solve(H + mu * np.diag(d), g)
            except np.linalg.LinAlgError:
                mu *= 10
                continue
            xn = np.clip(x + dx, lb, ub)
            rn = fun(xn)
            cn = _robust(rn)[0] if np.all(np.isfinite(rn)) else np.inf
            if cn <= cost:
                accepted = True
                break
            mu *= 10
        if not accepted:
            break
        x, r = xn, rn
        cost, w1, w2 = _robust(r)
        mu = max(mu / 10, 1e-9)
        J = jac(x)
    return x, r, J * np.sqrt(w2)[:, None]


@dataclass
class Refined:
    detector: object
    crystal: object
    rms_mm: float                      # rms positional residual of the spots used
    wresid: float                      # weighted positional residual
    per_image_rms: dict                # image -> rms (mm)
    n_pos: int
    n_frac: int
    rms_frac: float
    esd: dict                          # parameter name -> esd
    cell_esd: np.ndarray = None        # (6,) esds of a b c alpha beta gamma


def _reflections(parts, min_isig):
    """Group the parts by reflection: totals, centroid (mm later), and which are complete & strong."""
    uniq, inv = np.unique(parts["refl"], return_inverse=True)
    n_meas = np.bincount(inv)
    okc = np.bincount(inv, (~parts["ok"]).astype(float)) == 0
    w = np.maximum(parts["I"], 0)
    W = np.bincount(inv, w)
    S = np.sqrt(np.bincount(inv, parts["sigI"] ** 2))
    first = np.zeros(len(uniq), int)
    first[inv[::-1]] = np.arange(len(parts))[::-1]
    n_pred = parts["n_parts"][first]
    complete = okc & (n_meas == n_pred)
    strong = complete & (W > min_isig * np.maximum(S, 1e-9))
    fast = np.bincount(inv, w * parts["fast"]) / np.maximum(W, 1e-9)
    slow = np.bincount(inv, w * parts["slow"]) / np.maximum(W, 1e-9)
    # the image holding most of each reflection (where its residual is reported)
    order = np.lexsort((-w, inv))
    best = np.zeros(len(uniq), int)
    best[inv[order][::-1]] = parts["image"][order][::-1]
    return dict(inv=inv, first=first, W=W, S=S, n=n_meas, complete=complete, strong=strong, fast=fast,
                slow=slow, image=best)


def _kept_reflections(g, keep, rows):
    """_reflections of the parts `rows` (in order), which hold every part of the reflections `keep` and
    no other: each reflection's sums are over the same parts in the same order, so they are taken as
    they are (the same numbers as _reflections of those parts), only the numbering is new."""
    renumber = np.cumsum(keep) - 1
    row_at = np.full(len(g["inv"]), -1)
    row_at[rows] = np.arange(len(rows))
    out = {k: v[keep] for k, v in g.items() if k not in ("inv", "first")}
    out.update(inv=renumber[g["inv"][rows]], first=row_at[g["first"][keep]])
    return out


def refine_parameters(parts, crystal, beam, detector, goniometer, scan, opts, *, free_cell=(),
                      min_isig=10.0):
    """Positional and post-refinement on measured parts (measure_parts).  Returns Refined."""
    if len(parts) == 0:
        raise ProcessingError("no reflection could be measured for refinement")
    g = _reflections(parts, min_isig)
    rows = np.flatnonzero(g["strong"][g["inv"]])
    parts = parts.take(rows)     # only strong ones are used: predict no others
    if len(parts) == 0:
        raise ProcessingError("no strong reflection was measured: nothing to refine against")
    g = _kept_reflections(g, g["strong"], rows)
    first = g["first"]
    hkl_all = np.stack([parts["h"][first], parts["k"][first], parts["l"][first]], 1).astype(float)
    phi_ref = parts["phi_pred"][first]
    xo, yo = detector.pixel_to_mm(g["fast"], g["slow"])
    free_det = set(opts.detector_free)
    model = _Model(crystal, beam, detector, goniometer, free_det, opts.missets_free if opts.postref else (),
                   opts.mosaic_free and opts.postref, set(free_cell))
    # fractions depend on the crystal only: without a free crystal parameter they would change nothing
    postref = opts.postref and any(n in model.names for n in MISSETS + ("MOSAIC",)) or bool(model.cell_idx)
    # fully recorded and complete by the starting model's fractions: parts were measured with a
    # generous width, so the image count alone does not say it (nor at the ends of the sweep)
    calc = _Predictions(model, hkl_all, phi_ref)
    _, _, phi0, width0, _ = calc(model.x0)
    a_all = scan.phi_start + (parts["image"] - scan.first) * scan.osc
    tail = float(getattr(crystal, "tail", 0.0) or 0.0)     # the rocking curve's shape (predict)
    f0 = predict.fraction_inside(phi0[g["inv"]], width0[g["inv"]], a_all, a_all + scan.osc, tail)
    fsum = np.bincount(g["inv"], f0, minlength=len(hkl_all))
    fmax = np.zeros(len(hkl_all))
    np.maximum.at(fmax, g["inv"], f0)
    single = fmax >= opts.fullfrac
    inside = fsum >= 0.95
    pos_sel = g["strong"] & inside & (single | opts.include_partials)
    frac_sel = g["strong"] & inside & (g["n"] >= 2) & ~single
    if pos_sel.sum() < 10 and free_det:
        raise ProcessingError(f"only {int(pos_sel.sum())} strong fully recorded reflections: too few for "
                              "positional refinement (REFINEMENT INCLUDE PARTIALS, or more images)")
    # fraction rows: every part of the strong complete partials
    prow = np.flatnonzero(frac_sel[g["inv"]])
    pr_refl = g["inv"][prow]
    p_obs = np.maximum(parts["I"][prow], 0) / g["W"][pr_refl]
    p_sig = opts.sdfac * parts["sigI"][prow] / g["W"][pr_refl] + FRACTION_SIGMA
    a_img = scan.phi_start + (parts["image"][prow] - scan.first) * scan.osc
    pix = detector.pixel_fast
    isig = g["W"] / np.maximum(g["S"], 1e-9)
    pos_sig = pix * POS_SIGMA_PX * np.sqrt(1.0 + 100.0 / np.maximum(isig, 1.0))   # weaker: less weight
    use_pos = pos_sel.copy()
    use_frac = np.ones(len(prow), bool)

    last_f = {}

    def fractions(phi, width):
        """Each part's calculated share of the rocking curve and its reflection's total (kept for the
        Jacobian at the same point, which the fit asks for next)."""
        key = (phi.tobytes(), width.tobytes())
        if last_f.get("key") != key:
            f = predict.fraction_inside(phi[pr_refl], width[pr_refl], a_img, a_hi, tail)
            tot = np.maximum(np.bincount(pr_refl, f, minlength=len(hkl_all)), 1e-9)
            last_f.update(key=key, f=f, tot=tot)
        return last_f["f"], last_f["tot"]

    sel = {}

    def select(use_pos, use_frac):
        """The spots and fractions the residuals are of (each round of rejection chooses anew)."""
        i = np.flatnonzero(use_pos)
        sel.update(i=i, xo=xo[i], yo=yo[i], sig=pos_sig[i], sig_col=pos_sig[i][:, None], frac=use_frac)

    def masked(keep, v, other):
        """np.where(keep, v, other), without the copy when everything is kept (the usual case)."""
        return v if keep.all() else np.where(keep, v, other)

    a_hi = a_img + scan.osc
    pr_refl = np.ascontiguousarray(pr_refl, np.int64)      # (the fraction_rows kernel's index type)

    def positional(xm, ym, ok):
        i = sel["i"]
        keep = ok[i]
        return masked(keep, (xm[i] - sel["xo"]) / sel["sig"], 10.0), masked(keep, (ym[i] - sel["yo"]) / sel["sig"], 10.0)

    def resid(x):
        xm, ym, phi, width, ok = calc(x)
        out = list(positional(xm, ym, ok))
        if len(prow) and postref:
            f, tot = fractions(phi, width)
            out.append(masked(sel["frac"], (f / tot[pr_refl] - p_obs) / p_sig, 0.0))
        return np.concatenate(out)

    def jac(x):
        xm, ym, phi, width, ok = calc(x)
        dX, dY, dphi, dW = calc.derivatives(x)
        i = sel["i"]
        keep = ok[i][:, None]
        out = [masked(keep, dX[i] / sel["sig_col"], 0.0), masked(keep, dY[i] / sel["sig_col"], 0.0)]
        if len(prow) and postref:
            ph, wd = phi[pr_refl], width[pr_refl]
            f, tot = fractions(phi, width)
            hp, hw = _cum_derivatives(a_hi, ph, wd, tail)
            lp, lw = _cum_derivatives(a_img, ph, wd, tail)
            rows_of = _fraction_rows_numpy if _ref_ext is None else _ref_ext.fraction_rows
            dp = rows_of(hp - lp, hw - lw, dphi, dW, pr_refl, f, tot, p_sig)
            out.append(masked(sel["frac"][:, None], dp, 0.0))
        return np.concatenate(out, 0)

    res = None
    x = model.x0.copy()
    lb, ub = np.full(len(x), -np.inf), np.full(len(x), np.inf)
    if "MOSAIC" in model.names:
        lb[model.names.index("MOSAIC")] = 0.01
    if len(x):
        for rnd in range(4):
            select(use_pos, use_frac)
            # the first fit only comes within REJECT_TOL esd of the minimum, where the outliers are those
            # of the minimum (residuals of 5-10 sigma against shifts of a tenth of an esd): every fit after
            # the first rejection runs to the minimum itself (~2 of a block's ~9 evaluations saved)
            x, r_fit, J_fit = _fit(resid, jac, x, lb, ub, tol=FIT_TOL if rnd else REJECT_TOL)
            res = (r_fit, J_fit)
            # reject outliers (REFINEMENT RESIDUAL, POSTREF MAXRESIDUAL) and fit again
            xm, ym, phi, width, ok = calc(x)
            dd = np.hypot(xm - xo, ym - yo)
            wr = dd / pos_sig
            # beyond RESIDUAL, a spot far off the others (a neighbour in its box, a gap) is rejected too
            cut = max(5.0 * 1.4826 * float(np.median(dd[use_pos & ok])) if (use_pos & ok).any() else 1.0,
                      0.3 * pix)
            new_pos = pos_sel & ok & (wr <= opts.residual) & (dd <= cut)
            new_frac = use_frac
            if len(prow) and postref:
                f, tot = fractions(phi, width)
                off = np.abs(f / tot[pr_refl] - p_obs) / p_sig > opts.maxresidual
                # a reflection with one part off is off as a whole (its other fractions share the error)
                new_frac = np.bincount(pr_refl, off, minlength=len(hkl_all))[pr_refl] == 0
            if rnd and np.array_equal(new_pos, use_pos) and np.array_equal(new_frac, use_frac):
                break
            use_pos, use_frac = new_pos, new_frac
    det, cr = model.unpack(x)
    xm, ym, phi, width, ok = calc(x)
    d = np.hypot(xm - xo, ym - yo)
    used = use_pos & ok
    rms = float(np.sqrt(np.mean(d[used] ** 2))) if used.any() else float("nan")
    wres = float(np.sqrt(np.mean((d[used] / pos_sig[used]) ** 2) / 2)) if used.any() else float("nan")
    per_image = {}
    for i in np.unique(parts["image"]):
        m = used & (g["image"] == i)
        per_image[int(i)] = float(np.sqrt(np.mean(d[m] ** 2))) if m.any() else float("nan")
    rms_frac = float("nan")
    if len(prow) and postref:
        f, tot = fractions(phi, width)
        rms_frac = float(np.sqrt(np.mean((f / tot[pr_refl] - p_obs)[use_frac] ** 2)))
    esd = {}
    if res is not None and len(x):
        r, J = res
        dof = max(len(r) - len(x), 1)
        try:
            cov = np.linalg.pinv(J.T @ J) * float(r @ r) / dof
            esd = dict(zip(model.names, np.sqrt(np.maximum(np.diag(cov), 0))))
        except np.linalg.LinAlgError:
            esd = {}
    cell_esd = _cell_esd(model, esd)
    n_frac = int(len(np.unique(pr_refl[use_frac]))) if postref else 0
    return Refined(det, cr, rms, wres, per_image, int(used.sum()), n_frac, rms_frac, esd, cell_esd)


def _cell_esd(model, esd):
    full = np.zeros(6)
    k = model.lat[0]
    cols = {"a": [[0], [1], [2], [3], [4], [5]], "m": [[0], [1], [2], [4]], "o": [[0], [1], [2]],
            "t": [[0, 1], [2]], "h": [[0, 1], [2]]}.get(k, [[0, 1, 2]])
    for j, c in enumerate(cols):
        full[c] = esd.get(f"CELL{j}", 0.0)
    return full


# ---- PROCESS: one refinement per block -------------------------------------------------------------

# pass 1 measures at most this many reflections an image of a block (the strongest, spread over the
# detector: measure_parts' limit): ~10 parameters need hundreds, not the thousands a large detector
# records, and the measurement and the fit cost grows with them.  Sim sweep (~2 100 parts an image),
# 1 500 of a 5-image block's ~2 100 that stand out: esds 1.1-1.25 times larger, the refined values
# within the scatter between blocks, the MTZ's figures the same.  (200: little cheaper, 4 % of pass 1,
# and cc_1/2 at 2.2-2.7 A one rounding below DIALS's 0.9995.)  Since only reflections standing out
# (STANDING) are listed, 265 give as many strong ones as 300 of all that rose above 4 sigma did
# (1 110 a sim block; 11 % of those were weak), from 13 % fewer parts measured
REFINE_PER_IMAGE = 265

def refine_block(crystal, beam, detector, goniometer, scan, block_images, settings, read_image):
    """Pass 1 of a PROCESS block: measure the block's images with the current model, refine, and
    return (crystal, detector, {image: figures}) for predicting and integrating the block.

    On failure (too few spots, a diverging fit) the block keeps the starting model and says why."""
    opts = settings.refine
    if not opts.detector_free and not (opts.postref and (opts.missets_free or opts.mosaic_free
                                                          or opts.cell_unfixed)):
        return crystal, detector, {}             # everything fixed: nothing to measure for
    cr, det = crystal, detector
    try:
        # boxes placed off the spots bias the centroids towards the boxes' centres, so after a large
        # shift the spots are measured again where the refined model puts them
        for _ in range(3):
            parts = measure_parts(cr, beam, det, goniometer, scan, block_images, read_image,
                                  dmin=settings.dmin, dmax=settings.dmax, raster=settings.raster,
                                  separation=settings.separation, limit=REFINE_PER_IMAGE * len(block_images))
            ref = refine_parameters(parts, cr, beam, det, goniometer, scan, opts,
                                    free_cell=opts.cell_unfixed)
            moved = np.hypot(*np.subtract(direct_beam(ref.detector), direct_beam(det))) + \
                0.7 * abs(ref.detector.distance - det.distance)
            cr, det = ref.crystal, ref.detector
            if moved < 0.5 * detector.pixel_fast:
                break
    except ProcessingError as e:
        return crystal, detector, {i: {"error": str(e)} for i in block_images}
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as e:   # a fit that broke down
        return crystal, detector, {i: {"error": f"refinement failed ({e}); starting values kept"}
                                   for i in block_images}
    # a shift far beyond anything plausible means the fit ran away: keep the start
    if abs(det.distance - detector.distance) > 5 or np.hypot(det.beam_x - detector.beam_x,
                                                             det.beam_y - detector.beam_y) > 2:
        return crystal, detector, {i: {"error": "refinement diverged; starting values kept"}
                                   for i in block_images}
    out = {}
    for i in block_images:
        out[i] = {"rms": ref.per_image_rms.get(i, ref.rms_mm), "wresid": ref.wresid, "n_pos": ref.n_pos,
                  "n_frac": ref.n_frac, "detector": det, "missets": cr.missets, "mosaic": cr.mosaic,
                  "cell": cr.cell, "esd": ref.esd, "cellref": opts.cell_refinement}
    return cr, det, out


def image_lines(st, detector, crystal):
    """The refinement lines of one image's block in the PROCESS log (interface notes §5.5/§5.6)."""
    r = getattr(st, "refined", None) or {}
    det = r.get("detector", detector)
    L = []
    if r.get("error"):
        L.append(f" Refinement not done for this image: {r['error']}")
    elif r.get("cellref"):
        # the cell refinement's own cycles print MOSFLM's "Final rms residual" lines, which xia2
        # counts per cycle: the segments' integration must not add to them
        L.append(f" Positional refinement before cell refinement: rms residual {r['rms']:6.3f} mm"
                 f" ({r['n_pos']} spots)")
    elif r:
        # xia2 reads the weighted residual as the line's last word
        L.append(f" Final rms residual: {r['rms']:7.3f}mm; Weighted residual {r['wresid']:5.1f}")
        L.append(f" Spots used in positional refinement: {r['n_pos']:6d}")
    bx, by = direct_beam(det)
    L.append("   XCEN    YCEN  XTOFRA   XTOFD  YSCALE  TILT TWIST")
    L.append(f" {bx:7.2f} {by:7.2f}  1.0000 {det.distance:7.2f}  "
             f"{det.yscale:6.4f} {int(round(det.tilt * 100)):5d} {int(round(det.twist * 100)):5d}")
    if r and not r.get("error") and r["n_frac"]:
        m = r["missets"]
        L.append(f" Post-refinement on {r['n_frac']} partials:  Refined Orientation Angles "
                 f"PHIX {m[0]:8.3f}  PHIY {m[1]:8.3f}  PHIZ {m[2]:8.3f}")
        L.append(f" Refined mosaic spread {r['mosaic']:7.3f}")
    return L


def table_rows(st, detector, crystal):
    """Rows for the SUMMARY's detector and post-refinement tables for one image."""
    r = getattr(st, "refined", None) or {}
    det = r.get("detector", detector)
    rms = r.get("rms", 0.0) if not r.get("error") else 0.0
    wr = r.get("wresid", 0.0) if not r.get("error") else 0.0
    missets = r.get("missets", crystal.missets)
    mosaic = r.get("mosaic", crystal.mosaic)
    cell = r.get("cell", crystal.cell)
    bx, by = direct_beam(det)
    return ((st.image, bx, by, det.distance, det.yscale, round(det.tilt * 100) + 0.0,
             round(det.twist * 100) + 0.0,
             det.roff, det.toff, rms, wr),
            (st.image, *missets, *cell, mosaic))


# ---- cell refinement -------------------------------------------------------------------------------

def refine_cell(segments, crystal, beam, detector, goniometer, scan, read_image, opts, max_cycles=5,
                settings=None):
    """segments: [(first, last)].  Cycles of (measure, refine everything free) as MOSFLM's cell
    refinement, in this process (the segments' few images decoded once for every cycle).  Returns a
    dict of the refinement's figures."""
    cell_free = set(CELL_NAMES) - opts.cell_fixed if opts.postref else set()
    cycles = []
    cell0 = tuple(crystal.cell)
    cr, det = copy.copy(crystal), copy.copy(detector)
    kw = {} if settings is None else dict(dmin=settings.dmin, dmax=settings.dmax, raster=settings.raster,
                                          separation=settings.separation)
    ref = None
    # (with NPROC > 1 each segment was measured in a worker process of its own, which kept its images:
    # a new process's first decode page-faulted its heap in, 0.4 s of system time a segment on the 6M
    # sweep, twice what this process, its heap warm, takes for both segments' every cycle)
    from .integrate import decode_once, read_images
    segment_image, decoded = decode_once(read_image)
    # read together: their CBF checksums computed side by side (six 6M images' MD5s one by one were
    # 0.08 s of the refinement's 0.3)
    wanted = [i for a, b in segments for i in range(a, b + 1)]
    decoded.update(zip(wanted, read_images(read_image, wanted)))
    for cycle in range(1, max_cycles + 1):
        parts = np.concatenate([measure_parts(cr, beam, det, goniometer, scan, range(a, b + 1), segment_image,
                                              **kw) for a, b in segments])
        ref, done = _cycle(parts, segments, cr, beam, det, goniometer, scan, opts, cell_free, cycles, cycle)
        cr, det = ref.crystal, ref.detector
        if done:
            break
    # missets folded into U, as MOSFLM's NEWMAT carries them
    U = geometry.misset_matrix(*cr.missets) @ cr.U
    uu, _, vv = np.linalg.svd(U)
    return {"start": cell0, "cell": tuple(cr.cell), "esd": cycles[-1]["esd"], "U": uu @ vv,
            "cycles": cycles, "n": ref.n_pos, "detector": det, "mosaic": cr.mosaic,
            "missets": cr.missets, "rms": ref.rms_mm}


def _cycle(parts, segments, cr, beam, det, goniometer, scan, opts, cell_free, cycles, cycle):
    """One cycle of cell refinement on the segments' measured parts: (Refined, converged)."""
    # reflections of different segments must not be grouped together
    seg_of = np.zeros(len(parts), int)
    for s, (a, b) in enumerate(segments):
        seg_of[(parts["image"] >= a) & (parts["image"] <= b)] = s
    parts["refl"] = parts["refl"] * len(segments) + seg_of
    ref = refine_parameters(parts, cr, beam, det, goniometer, scan, opts, free_cell=cell_free)
    shift = np.abs(np.array(ref.crystal.cell) - np.array(cr.cell))
    cycles.append({"cell": ref.crystal.cell, "esd": ref.cell_esd, "rms_mm": ref.rms_mm,
                   "per_image": ref.per_image_rms, "distance": ref.detector.distance,
                   "yscale": ref.detector.yscale, "beam": direct_beam(ref.detector),
                   "mosaic": ref.crystal.mosaic, "missets": ref.crystal.missets, "n": ref.n_pos,
                   "wresid": ref.wresid,
                   "n_frac": ref.n_frac})
    return ref, cycle > 1 and np.all(shift <= 2.5 * np.maximum(ref.cell_esd, 1e-6))


def _task_key(args):
    """The arguments of a measurement as bytes: equal bytes, equal arguments (so the same parts)."""
    import pickle
    try:
        return pickle.dumps(args, protocol=4)
    except Exception:          # not picklable: never taken for another
        return object()


def cycle_lines(result, scan):
    """Per cycle, as MOSFLM's cell refinement prints it (and xia2 counts cycles and reads each image's
    residual from): the post-refinement banner, then each image's final rms residual."""
    L = []
    for n, c in enumerate(result["cycles"], 1):
        if n > 1:
            L.append(" Repeating the entire run, using the refined cell parameters as given above")
        L.append(" *** Post-refinement will use partials extending over several images ***")
        for i in sorted(c["per_image"]):
            a, b = scan.phi_range(i)
            L.append(f" Processing Image {i:4d}  Phi {a:7.2f} to {b:7.2f}")
            L.append(f" Final rms residual: {c['per_image'][i]:7.3f}mm; Weighted residual {c['wresid']:5.1f}")
    return L


def format_tables(result, detector=None):
    """`Cell refinement is complete`, the cells with esds and the per-cycle tables, laid out as
    MOSFLM does: xia2 reads the cells from the lines right after the banner, the rms table by 6-wide
    columns from column 11, and each table's last cycle from the line before its blank line."""
    images = sorted({i for c in result["cycles"] for i in c["per_image"]})
    head = "      Image" + "".join(f"{i:4d}  " for i in images)
    L = ["", " Cell refinement is complete",
         " Starting cell " + "".join(f"{v:9.3f}" for v in result["start"]),
         " Refined cell  " + "".join(f"{v:9.3f}" for v in result["cell"]),
         " Error         " + "".join(f"{v:9.3f}" for v in result["esd"]), ""]
    L += [" Rms positional error (mm) as a function of cycle for each image.", head]
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle{n:2d}   " + "".join(f"{c['per_image'].get(i, float('nan')):6.3f}" for i in images))
    L += ["", "", " YSCALE as a function of cycle for each image:", head]
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle{n:2d}   " + "".join(f"{c['yscale']:6.3f}" for _ in images))
    L += ["", "", " Detector distance as a function of cycle for each image:", head]
    for n, c in enumerate(result["cycles"], 1):
        L.append(f" Cycle{n:2d}   " + "".join(f"{c['distance']:7.2f}" for _ in images))
    L.append("")
    return L


def _refinement_args(job, segments, models):
    """What cell_refinement_segment refines the segments with, from the job as it is now:
    (segments, crystal, beam, detector, goniometer, scan, reader, options, cycles, settings)."""
    from .integrate import job_image_reader, settings_from_job
    beam, det, gonio, scan = models
    repeat = int((job.kw.get("POSTREF") or {}).get("REPEAT", 5))     # REPEAT m: at most m cycles
    return (list(segments), job.crystal, beam, det, gonio, scan, job_image_reader(job), options_from(job.kw),
            repeat, settings_from_job(job, det))


def _refine_with(args):
    segs, crystal, beam, det, gonio, scan, reader, opts, repeat, settings = args
    return refine_cell(segs, crystal, beam, det, gonio, scan, reader, opts, max_cycles=repeat, settings=settings)


def refinement_pending(job, segments, models):
    """True when the refinement of these segments was done early (refine_cell_early) with what the
    job would refine them with now."""
    early = job.results.get("cellref_early")
    return early is not None and early[0] == _task_key(_refinement_args(job, segments, models))


def refine_cell_early(job, segments, models):
    """With NPROC > 1, while a segment's PROCESS waits for its blocks on the workers: the whole
    refinement of `segments` as the last segment's PROCESS would do it if nothing changes before then
    (`models`: that PROCESS's geometry; pyflm.integrate._last_segment_early says when).  Kept with its
    arguments' bytes; cell_refinement_segment takes it only if its own are the same.  A failure is
    left for that PROCESS to meet and report."""
    try:
        args = _refinement_args(job, segments, models)
        key = _task_key(args)
        res = _refine_with(args)
    except Exception:
        return
    job.results["cellref_early"] = (key, res)


def apply_cell_refinement(job, res):
    """What a finished cell refinement changes for the PROCESS lines after it: the crystal's cell,
    orientation (missets folded in) and mosaic spread, and the refined detector, carried as MOSFLM
    does through its keywords."""
    d = res["detector"]
    job.crystal.cell = tuple(res["cell"])
    job.crystal.U = res["U"]
    job.crystal.missets = (0.0, 0.0, 0.0)
    job.crystal.mosaic = res["mosaic"]
    job.kw.setdefault("BEAM", {})["_args"] = [d.beam_x, d.beam_y]
    job.kw.setdefault("DISTANCE", {})["_args"] = [d.distance]
    dist = job.kw.setdefault("DISTORTION", {})
    dist["TILT"], dist["TWIST"] = d.tilt * 100, d.twist * 100


def cell_refinement_segment(job, result, models, first, last):
    """Collect one PROCESS segment; when POSTREF MULTI SEGMENTS n have been collected, refine."""
    beam, det, gonio, scan = models
    segs = job.results.setdefault("cellref_segments", [])
    segs.append((first, last))
    need = int((job.kw.get("POSTREF") or {}).get("SEGMENTS", 2))
    log = job.log
    if len(segs) < need:
        log.line(f" Cell refinement: segment {len(segs)} of {need} (images {first} to {last}) stored")
        return
    job.results["cellref_segments"] = []
    segs_args = _refinement_args(job, segs, models)
    early = job.results.pop("cellref_early", None)
    if early is not None and early[0] == _task_key(segs_args):     # refined already, from the very same
        res = dict(early[1], refined_early=True)
    else:
        res = dict(_refine_with(segs_args), refined_early=False)
    for ln in cycle_lines(res, scan) + format_tables(res):
        log.line(ln)
    log.line(f" Refined mosaic spread (excluding safety factor): {res['mosaic']:6.2f}")
    d = res["detector"]
    bx, by = direct_beam(d)
    log.line("")
    log.line("   XCEN    YCEN  XTOFRA   XTOFD  YSCALE  TILT TWIST")
    log.line(f" {bx:7.2f} {by:7.2f}  1.0000 {d.distance:7.2f}  {d.yscale:6.4f} {int(round(d.tilt * 100)):5d} "
             f"{int(round(d.twist * 100)):5d}")
    moved = np.abs(np.array(res["cell"]) - np.array(res["start"])) / np.maximum(np.array(res["start"]), 1)
    if np.any(moved[:3] > 0.02):
        log.line(" ***** WARNING ***** One or more cell parameters has changed by more than 2%")
    log.line(f" Refined detector: XCEN {bx:8.3f}  YCEN {by:8.3f}  distance {d.distance:8.3f}"
             f"  TILT {int(round(d.tilt * 100)):5d}  TWIST {int(round(d.twist * 100)):5d}  (used for later processing)")
    apply_cell_refinement(job, res)
    job.results["cell_refinement"] = res
    if "NEWMAT" in job.files:
        from .matrix import write_matrix
        write_matrix(job.files["NEWMAT"], job.crystal, beam.wavelength)
        log.line(f" Matrix written to {job.files['NEWMAT']}")
