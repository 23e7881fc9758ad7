"""Integration parameters chosen from the spots found on the images to be integrated.

MOSFLM's defaults (measurement box, spot separation, a 0.3 degree mosaic spread, profiles from fully
recorded spots) suit protein crystals: hundreds of spots per image, each on one or two images.  A small
molecule on thin slices is the opposite case (L-cysteine: 20-40 spots per 0.1 degree image, each spread
over ten images), and the defaults go wrong there: the box is far larger than the spots (its background
noise swamps the weak ones), the spread is too small (reflections seen on the first images are not
predicted there) and no spot is fully recorded on one image, so no standard profile can be formed.

So, before PROCESS, on a sparse sweep (fewer than SPARSE_SPOTS spots per image), and only for what the
deck does not set itself:
  * RASTER from the median spot size (pyflm.shoebox.choose_raster, as MOSFLM after a spot search);
  * SEPARATION from the spot size: the smallest that keeps two spots' peak areas apart;
  * MOSAIC, with an orientation, as the spread at which the predictions (out to EXTENT rocking widths
    either side, pyflm.predict's width eta.sin(2theta)/zeta) reach every image each strong spot is seen
    on; without one, from the rocking widths of the spots followed through consecutive images;
  * profile fitting only when at least MIN_PROFILE_SPOTS strong spots are fully recorded on one image;
    otherwise the profile-fitted columns carry the summation intensities and a warning says so.

Plain API: ``find_sweep_spots`` -> ``link_spots`` -> ``choose``; ``apply_to_process`` and
``summation_fallback`` are what PROCESS calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry

SPARSE_SPOTS = 150          # spots per image below which a sweep is treated as sparse
MIN_PROFILE_SPOTS = 10      # strong fully recorded spots needed to form standard profiles
MAX_SEARCH = 30             # consecutive images searched at most (the middle of a longer range)
STRONG_ISIG = 10.0          # as pyflm.shoebox's profile spots

LINK_DTYPE = np.dtype([("first", "i4"), ("last", "i4"), ("fast", "f8"), ("slow", "f8"), ("x_mm", "f8"),
                       ("y_mm", "f8"), ("phi", "f8"), ("phi_sd", "f8"), ("intensity", "f8"),
                       ("sigma", "f8"), ("size_fast", "f4"), ("size_slow", "f4")])


@dataclass
class AutoParams:
    sparse: bool = False
    spots_per_image: float = 0.0
    raster: tuple = None
    separation: tuple = None        # mm (x, y)
    mosaic: float = None            # full width, degrees
    n_mosaic_spots: int = 0
    n_strong_fulls: int = 0
    profiles: bool = True
    lines: list = field(default_factory=list)   # what was chosen and why, for the log


def find_sweep_spots(read_image, detector, scan, images, known=None, nproc=1, scheduler=None):
    """Spots (pyflm.spots lists) on each image, found as FINDSPOTS does with a low threshold so that the
    tails of a reflection on its outer images are kept.  `known` ({image: spots}, what AUTOINDEX or
    FINDSPOTS found already) saves searching those images again.  Unreadable images give an empty list.
    With nproc > 1 (or a scheduler) the images are searched on worker processes, or one image's search
    is shared out in bands of rows (pyflm.spotfinder.find_spots_split); the spots are the same."""
    import functools
    from . import spotfinder
    todo = [img for img in images if not (known and known.get(img) is not None)]
    found = {}
    if len(todo) > 1 and (nproc > 1 or scheduler):
        from .distributed import run_tasks
        found = dict(zip(todo, run_tasks(_search_image, [(read_image, detector, scan, img) for img in todo],
                                         nproc, scheduler)))
    elif len(todo) == 1 and (nproc > 1 or scheduler):
        img = todo[0]
        a, b = scan.phi_range(img)
        try:
            found[img] = spotfinder.find_spots_split(functools.partial(read_image, img), detector, nproc,
                                                     scheduler, image=img, phi=0.5 * (a + b), threshold=2.0,
                                                     min_pix=2)
        except Exception:           # PROCESS reports bad images itself
            found[img] = None
    out = []
    for img in images:
        if known and known.get(img) is not None:
            out.append(known[img])
            continue
        sp = found[img] if img in found else _search_image(read_image, detector, scan, img)
        out.append(_empty() if sp is None else sp)
    return out


def _empty():
    from .spots import empty
    return empty()


def _search_image(read_image, detector, scan, img):
    """One image's search for find_sweep_spots (None when the image cannot be read)."""
    from .spotfinder import find_spots
    try:
        data = read_image(img)
    except Exception:           # PROCESS reports bad images itself
        return None
    a, b = scan.phi_range(img)
    return find_spots(data, detector, image=img, phi=0.5 * (a + b), threshold=2.0, min_pix=2)


def link_spots(per_image, osc, radius=3.0):
    """Spots on consecutive images within `radius` pixels joined into one reflection each: its first
    and last image, intensity-weighted centroid and phi, the spread of phi (degrees, the image width's
    own spread osc^2/12 taken out), summed intensity and largest size.  LINK_DTYPE, brightest first."""
    from scipy.spatial import cKDTree
    from .spotfinder import TOO_BIG, OUTSIDE, BACKSTOP, chain_groups, chain_sums
    lists = [s[((s["flag"] & (TOO_BIG | OUTSIDE | BACKSTOP)) == 0) & (s["intensity"] > 0)]
             for s in per_image]
    if not lists or sum(len(s) for s in lists) == 0:
        return np.zeros(0, LINK_DTYPE)

    def linked(a, b):       # the nearest spot of the previous image within `radius`
        d, j = cKDTree(np.stack([a["fast"], a["slow"]], 1)).query(np.stack([b["fast"], b["slow"]], 1),
                                                                    distance_upper_bound=radius)
        return [(j[ib], ib) for ib in np.flatnonzero(np.isfinite(d))]
    allsp, group = chain_groups(lists, linked)
    out, w, sw = chain_sums(allsp, group, LINK_DTYPE)
    n = len(out)
    var = np.bincount(group, w * (allsp["phi"] - out["phi"][group]) ** 2, n) / sw - osc ** 2 / 12.0
    out["phi_sd"] = np.sqrt(np.maximum(var, 0.0))
    out["first"] = np.full(n, np.iinfo(np.int32).max)
    out["last"] = np.full(n, np.iinfo(np.int32).min)
    np.minimum.at(out["first"], group, allsp["image"])
    np.maximum.at(out["last"], group, allsp["image"])
    for col in ("size_fast", "size_slow"):
        v = np.zeros(n, np.float32)
        np.maximum.at(v, group, allsp[col])
        out[col] = v
    return out[np.argsort(-out["intensity"] / np.maximum(out["sigma"], 1e-9))]


def scan_phi(image, first_phi, osc, first):
    """phi at the start of an image (degrees)."""
    return first_phi + (np.asarray(image) - first) * osc


def mosaic_from_widths(linked, beam, detector, goniometer, scan, first, last, min_isig=STRONG_ISIG,
                       quantile=0.8):
    """(mosaic spread, number of spots used): over strong spots that begin and end inside images
    first..last, the spread whose rocking width (pyflm.predict.rocking_width_xds) lets prediction
    reach every image the spot is seen on; the `quantile` of those (MOSFLM's estimate likewise
    looks for the spread that accounts for nearly all spots).  None when fewer than 3 qualify."""
    first_phi, osc = scan.phi_range(first)[0], scan.osc
    ok = ((linked["first"] > first) & (linked["last"] < last) & (linked["last"] > linked["first"])
          & (linked["intensity"] > min_isig * linked["sigma"]))
    sp = linked[ok]
    if len(sp) < 3:
        return None, len(sp)
    p = geometry.mm_to_lab(sp["x_mm"], sp["y_mm"], detector.frame())
    s1u = p / np.linalg.norm(p, axis=1)[:, None]
    cross = np.cross(geometry.BEAM_DIRECTION, s1u)
    zeta = np.maximum(np.abs(cross @ goniometer.axis), 1e-6)
    sin2t = np.maximum(np.linalg.norm(cross, axis=1), 1e-6)
    disp = np.degrees(beam.dispersion * (1.0 - s1u[:, 0]))
    # the width (FWHM) whose predicted extent, EXTENT widths either side of the centre, reaches the
    # outer edges of the first and last images the spot is seen on: weak tails below the spot-search
    # threshold make the intensity-weighted spread alone too narrow to integrate with
    from .predict import EXTENT
    phi_first = scan_phi(sp["first"], first_phi, osc, first)
    phi_last = scan_phi(sp["last"] + 1, first_phi, osc, first)
    reach = np.maximum(sp["phi"] - phi_first, phi_last - sp["phi"])
    fwhm = np.maximum(2.3548 * sp["phi_sd"], reach / EXTENT)
    angular = np.maximum(fwhm * zeta - disp, 0.0) / sin2t
    div = float(np.hypot(*beam.divergence))
    eta = np.sqrt(np.maximum(angular ** 2 - div ** 2, 0.0))
    return float(np.quantile(eta, quantile)), len(sp)


def _n_spots(spots):
    from .spotfinder import TOO_SMALL
    return int(np.sum((spots["flag"] & TOO_SMALL) == 0)) if len(spots) else 0


def mosaic_from_predictions(linked, crystal, beam, detector, goniometer, scan, first, last,
                            min_isig=STRONG_ISIG, quantile=1.0, radius=3.0):
    """(mosaic spread, number of spots used) with an orientation: each strong spot is matched to the
    predicted reflection nearest it on the detector, and needs the spread whose rocking width lets
    that prediction, EXTENT widths either side of its phi, reach every image the spot is seen on.
    Near the rotation axis a small error of orientation moves a reflection's phi a long way; the
    spread then covers it, as MOSFLM's estimate (the spread at which the predictions account for the
    spots) does.  The `quantile` of the spots' needs (1: all of them); None when fewer than 3 match."""
    import copy
    from scipy.spatial import cKDTree
    from . import predict
    sp = linked[linked["intensity"] > min_isig * linked["sigma"]]
    if len(sp) < 3:
        return None, len(sp)
    c = copy.copy(crystal)
    c.mosaic = 2.0                   # generous, to find every reflection that could be on the images
    a, b = scan.phi_range(first)[0], scan.phi_range(last)[1]
    dmin = predict.corner_resolution(detector, beam.wavelength)
    pred = predict.predict(c, beam, detector, goniometer, a, b, dmin, margin=3.0)
    pred = pred[pred["on_detector"]]
    if len(pred) == 0:
        return None, 0
    d, j = cKDTree(np.stack([pred["fast"], pred["slow"]], 1)).query(np.stack([sp["fast"], sp["slow"]], 1),
                                                                      distance_upper_bound=radius)
    hit = np.isfinite(d)
    if hit.sum() < 3:
        return None, int(hit.sum())
    sp, p = sp[hit], pred[j[hit]]
    from .predict import EXTENT
    phi_first = scan_phi(sp["first"], a, scan.osc, first)
    phi_last = scan_phi(sp["last"] + 1, a, scan.osc, first)
    reach = np.maximum(np.abs(p["phi"] - phi_first), np.abs(phi_last - p["phi"]))
    # the width at this spread is linear in it (rocking_width_xds without divergence and dispersion)
    w1 = predict.rocking_width_xds(_s1u(sp, detector), goniometer.axis, 1.0,
                                   type(beam)(beam.wavelength, divergence=(0.0, 0.0), dispersion=0.0))
    eta = reach / EXTENT / np.maximum(w1, 1e-9)
    return float(np.quantile(eta, quantile)), len(sp)


def _s1u(sp, detector):
    p = geometry.mm_to_lab(sp["x_mm"], sp["y_mm"], detector.frame())
    return p / np.linalg.norm(p, axis=1)[:, None]


def choose(per_image, beam, detector, goniometer, scan, first, last, *, given=(), crystal=None):
    """AutoParams from the spots of images first..last (per_image: find_sweep_spots' lists).
    `given` names what the deck set itself (RASTER, SEPARATION, MOSAIC): those are left alone."""
    from .shoebox import choose_raster
    ap = AutoParams()
    counts = [_n_spots(s) for s in per_image]
    ap.spots_per_image = float(np.mean(counts)) if counts else 0.0
    ap.sparse = ap.spots_per_image < SPARSE_SPOTS
    if not ap.sparse:
        return ap
    ap.lines.append(f" Few spots per image ({ap.spots_per_image:.0f}): integration parameters are chosen "
                    "from the spots found on the images to be integrated")
    linked = link_spots(per_image, scan.osc)
    strong = linked[linked["intensity"] > STRONG_ISIG * linked["sigma"]]
    use = strong if len(strong) >= 3 else linked
    if len(use) == 0:
        ap.lines.append(" No spots found: MOSFLM's defaults are kept")
        return ap
    sx, sy = float(np.median(use["size_slow"])), float(np.median(use["size_fast"]))
    if "RASTER" not in given:
        ap.raster = choose_raster(sx, sy)
        ap.lines.append(f" Based on a median spot size of {sx:.0f} by {sy:.0f} pixels in X and Y, the "
                        f"measurement box parameters have been set to {' '.join(map(str, ap.raster))}")
    if "SEPARATION" not in given:
        # two reflections closer than a spot's size plus a pixel would share peak pixels
        ap.separation = ((sx + 1) * detector.pixel_slow, (sy + 1) * detector.pixel_fast)
        ap.lines.append(f" Spot separation set to {ap.separation[0]:.2f} {ap.separation[1]:.2f} mm "
                        "(from the spot size)")
    if "MOSAIC" not in given and crystal is not None:
        ap.mosaic, ap.n_mosaic_spots = mosaic_from_predictions(linked, crystal, beam, detector, goniometer,
                                                               scan, first, last)
        if ap.mosaic is not None:
            ap.lines.append(f" Mosaic spread set to {ap.mosaic:.2f} degrees: the predictions then reach "
                            f"every image each of {ap.n_mosaic_spots} strong spots is seen on")
    if "MOSAIC" not in given and ap.mosaic is None:
        ap.mosaic, ap.n_mosaic_spots = mosaic_from_widths(linked, beam, detector, goniometer, scan, first,
                                                          last)
        if ap.mosaic is not None:
            ap.lines.append(f" Mosaic spread set to {ap.mosaic:.2f} degrees from the rocking widths of "
                            f"{ap.n_mosaic_spots} spots seen from start to end within the images")
    # a spot is fully recorded on one image when all of it lies on that image
    ap.n_strong_fulls = int(np.sum(strong["first"] == strong["last"]))
    if ap.n_strong_fulls < MIN_PROFILE_SPOTS:
        ap.profiles = False
        ap.lines.append(f" ***** WARNING ***** only {ap.n_strong_fulls} strong spots are fully recorded on "
                        f"one image (at least {MIN_PROFILE_SPOTS} are needed to form standard profiles): "
                        "profile fitting is not used, the profile-fitted intensities (IPR) are the "
                        "summation intensities")
    return ap


def apply_to_process(job, crystal, beam, detector, goniometer, scan, first, last, read_image,
                     probe_nproc=None, on_sparse=None):
    """The PROCESS hook: find the spots of images first..last, choose, set the mosaic spread of
    `crystal` if the deck left it unset, and return the AutoParams (update_settings puts the box and
    separation into PROCESS's settings, summation_fallback the summation intensities into IPR).
    probe_nproc: processes for the probe image (default NPROC; 1 while the workers are busy with blocks
    started meanwhile); on_sparse() is called when the probe finds the sweep sparse, before its search."""
    given = {k for k in ("RASTER", "SEPARATION") if (job.kw.get(k) or {}).get("_args")}
    if crystal.mosaic or (job.kw.get("MOSAIC") or {}).get("_args"):
        given.add("MOSAIC")
    # one image says whether the sweep is sparse; only then are all its images searched
    from .distributed import scheduler_from
    from .integrate import nproc_from
    nproc, sched = nproc_from(job.kw), scheduler_from(job.kw)
    mid = (first + last) // 2
    probe = find_sweep_spots(read_image, detector, scan, [mid], nproc=probe_nproc or nproc,
                             scheduler=None if probe_nproc == 1 else sched)[0]
    n_probe = _n_spots(probe)
    known = job.results.get("spots") or {}
    if known and not _same_spots(known.get(mid), probe):
        known = {}           # found on another sweep's images (TEMPLATE changed since): not these
    if n_probe == 0 or n_probe >= SPARSE_SPOTS:
        return AutoParams(spots_per_image=n_probe)
    if on_sparse is not None:
        on_sparse()
    # a long sweep is judged on a run of consecutive images in its middle (spots are followed through
    # consecutive images; searching every image of a long sweep would cost more than integrating it)
    a = max(first, (first + last + 1) // 2 - MAX_SEARCH // 2)
    b = min(last, a + MAX_SEARCH - 1)
    per_image = find_sweep_spots(read_image, detector, scan, range(a, b + 1), known, nproc, sched)
    ap = choose(per_image, beam, detector, goniometer, scan, a, b, given=given, crystal=crystal)
    if ap.mosaic is not None:
        crystal.mosaic = ap.mosaic
    for ln in ap.lines:
        job.log.line(ln)
    return ap


def _same_spots(a, b, tol=1.5):
    """Whether two spot lists of one image number are of the same image: most of the strong spots of
    one lie within `tol` pixels of a spot of the other."""
    from scipy.spatial import cKDTree
    if a is None or not len(a) or not len(b):
        return False
    sa = a[np.argsort(-a["intensity"])][:20]
    d, _ = cKDTree(np.stack([b["fast"], b["slow"]], 1)).query(np.stack([sa["fast"], sa["slow"]], 1))
    return bool(np.mean(d < tol) > 0.8)


def update_settings(settings, ap):
    """Put the chosen box and separation into PROCESS's Settings (pyflm.integrate.Settings)."""
    if ap is not None and ap.raster is not None:
        settings.raster = ap.raster
    if ap is not None and ap.separation is not None:
        settings.separation = ap.separation
    return settings


def summation_fallback(records, ap):
    """Where there are too few spots for profiles, the profile-fitted columns take the summation
    intensities (so that a scaling program reading IPR gets the measured values, not zeros)."""
    if ap is not None and not ap.profiles and len(records):
        records["ipr"] = records["i"]
        records["sigipr"] = records["sigi"]
    return records
