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
  * MOSAIC as the spread whose rocking curves (pyflm.predict's Gaussian of FWHM eta.sin(2theta)/zeta)
    best share each strong spot's intensity among the images, as it was found on them
    (fit_rocking_widths), centred on the predictions when there is an orientation, else on the spots'
    own phi; with an orientation, the curve's shape too: the share of it in tails beyond a Gaussian's
    (fit_rocking_shape; predict.fraction_inside), kept where it explains the light better;
  * profile fitting only when at least MIN_PROFILE_SPOTS strong spots are fully recorded on one image;
    otherwise the profile-fitted columns carry the summation intensities and a warning says so.

Plain API: ``find_sweep_spots`` -> ``link_spots`` -> ``choose``; ``apply_to_process`` and
``summation_fallback`` are what PROCESS calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry
from .shoebox import STRONG_ISIG     # the spots that make profiles

SPARSE_SPOTS = 150          # spots per image below which a sweep is treated as sparse
MIN_PROFILE_SPOTS = 10      # strong fully recorded spots needed to form standard profiles
MAX_SEARCH = 30             # consecutive images searched at most (the middle of a longer range)

LINK_DTYPE = np.dtype([("first", "i4"), ("last", "i4"), ("fast", "f8"), ("slow", "f8"), ("x_mm", "f8"),
                       ("y_mm", "f8"), ("phi", "f8"), ("phi_sd", "f8"), ("intensity", "f8"),
                       ("sigma", "f8"), ("size_fast", "f4"), ("size_slow", "f4")])
# one image's share of a linked reflection (link_spots(..., parts=True)): index into the linked array
PART_DTYPE = np.dtype([("spot", "i8"), ("image", "i4"), ("intensity", "f8")])


@dataclass
class AutoParams:
    sparse: bool = False
    spots_per_image: float = 0.0
    raster: tuple = None
    separation: tuple = None        # mm (x, y)
    mosaic: float = None            # full width, degrees
    tail: float = 0.0               # the rocking curve's share in Lorentzian tails (pyflm.predict)
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


def _search_image(read_image, detector, scan, img, probe=False):
    """One image's search for find_sweep_spots (None when the image cannot be read).  probe: for
    PROCESS's question only (is the sweep sparse?), answered from the middle quarter of the image's
    rows when they hold SPARSE_SPOTS spots that are not too small (those spots then, each as the whole
    search finds it: the answer is the whole search's), else the whole image's spots."""
    from .spotfinder import find_spots, find_spots_in_rows
    try:
        data = read_image(img)
    except Exception:           # PROCESS reports bad images itself
        return None
    a, b = scan.phi_range(img)
    kw = dict(image=img, phi=0.5 * (a + b), threshold=2.0, min_pix=2)
    ny = data.shape[0] if data.ndim == 2 else 0
    if probe and ny >= 64:
        # (a 6M image's whole search: 0.27-0.44 s, and a deck's PROCESS lines probe one image each)
        sp = find_spots_in_rows(data, detector, 3 * ny // 8, 5 * ny // 8, **kw)
        if _n_spots(sp) >= SPARSE_SPOTS:
            return sp
    return find_spots(data, detector, **kw)


def link_spots(per_image, osc, radius=3.0, parts=False):
    """Spots on consecutive images within `radius` pixels joined into one reflection each: its first
    and last image, intensity-weighted centroid and phi, the spread of phi (degrees, the image width's
    own spread osc^2/12 taken out), summed intensity and largest size.  LINK_DTYPE, brightest first.
    parts=True returns (linked, PART_DTYPE array): each reflection's intensity on each of its images,
    what the mosaic spread is fitted to."""
    from scipy.spatial import cKDTree
    from .spotfinder import TOO_BIG, OUTSIDE, BACKSTOP, chain_groups, chain_sums
    lists = [s[((s["flag"] & (TOO_BIG | OUTSIDE | BACKSTOP)) == 0) & (s["intensity"] > 0)]
             for s in per_image]
    if not lists or sum(len(s) for s in lists) == 0:
        return (np.zeros(0, LINK_DTYPE), np.zeros(0, PART_DTYPE)) if parts else np.zeros(0, LINK_DTYPE)

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
    order = np.argsort(-out["intensity"] / np.maximum(out["sigma"], 1e-9))
    if not parts:
        return out[order]
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    pt = np.zeros(len(allsp), PART_DTYPE)
    pt["spot"], pt["image"], pt["intensity"] = rank[group], allsp["image"], allsp["intensity"]
    return out[order], pt


def scan_phi(image, first_phi, osc, first):
    """phi at the start of an image (degrees)."""
    return first_phi + (np.asarray(image) - first) * osc


MOSAIC_GRID = np.arange(0.01, 2.0001, 0.005)    # full widths tried (degrees)
STRAY = 1e-3            # share of a spot's light allowed on any image (noise, a neighbour's tail)


def fit_rocking_widths(phi, s1u, observed, lo, hi, beam, goniometer, grid=MOSAIC_GRID, tail=0.0):
    """The mosaic spread (full width, pyflm.predict's convention) that best explains how each strong
    reflection's intensity is shared among the images it could be on.

    phi (n,): the reflections' centres; s1u (n, 3): their diffracted rays; observed (n, m): intensity
    found on each of m images (0 where none was found); lo, hi (m,): the images' phi ranges.  At a
    spread eta a reflection's rocking curve (Gaussian, FWHM rocking_width_xds) puts shares p_f on the
    images, renormalised over them (what lies beyond the images is not seen); the observed shares are
    w_f = I_f / sum I, and the fit maximises sum_f w_f log p_f, the likelihood of the recorded light
    with one weight per reflection.  (DIALS fits its sigma_m to the frames each spot is found on, alike;
    weighting the images by the light found on them keeps the faint tails the spot search follows, a
    bright spot's further out than a weak one's, from widening the spread.)  Reflections
    whose own best spread lies far above the others' (a spot the lattice does not explain, a
    reflection so close to the rotation axis that the images only bound its width) are left out.
    tail: the share of the curves in Lorentzian tails (predict.fraction_inside).
    Returns (eta, per-reflection best eta, mask of those used); eta None when fewer than 3 are left."""
    ll = _rocking_loglik(phi, s1u, observed, lo, hi, beam, goniometer, grid, tail)
    own = grid[np.argmax(ll, axis=0)]
    med = np.median(own)
    mad = 1.4826 * np.median(np.abs(own - med))
    use = own <= med + max(5.0 * mad, 0.5 * med)
    if use.sum() < 3:
        return None, own, use
    return float(grid[int(np.argmax(ll[:, use].sum(1)))]), own, use


def _rocking_loglik(phi, s1u, observed, lo, hi, beam, goniometer, grid, tail):
    """(len(grid), n) log-likelihood of each reflection's shares at each spread (fit_rocking_widths)."""
    from . import predict
    observed = np.asarray(observed, float)
    w = observed / np.maximum(observed.sum(1, keepdims=True), 1e-300)
    ll = np.empty((len(grid), len(phi)))
    for k, eta in enumerate(grid):
        width = predict.rocking_width_xds(s1u, goniometer.axis, float(eta), beam)
        r = predict.fraction_inside(phi[:, None], width[:, None], lo[None, :], hi[None, :], tail)
        r = r / np.maximum(r.sum(1, keepdims=True), 1e-300)
        ll[k] = np.sum(w * np.log((1.0 - STRAY) * r + STRAY / observed.shape[1]), axis=1)
    return ll


TAIL_GRID = (0.0, 0.1, 0.2, 0.3, 0.4)
TAIL_GAIN = 0.05       # log-likelihood per reflection a tail must gain over the Gaussian to be kept


def fit_rocking_shape(phi, s1u, observed, lo, hi, beam, goniometer, tails=TAIL_GRID):
    """(eta, tail, mask of the reflections used): fit_rocking_widths's spread at each share of the
    curve in tails, on the reflections the Gaussian fit keeps, and the pair that explains their
    light best; a tail only where it gains more than TAIL_GAIN per reflection (Gaussian spots, as
    simulated ones, keep the Gaussian).  eta None when fewer than 3 reflections are left."""
    eta, _, use = fit_rocking_widths(phi, s1u, observed, lo, hi, beam, goniometer)
    if eta is None:
        return None, 0.0, use
    obs = np.asarray(observed, float)[use]
    best = None
    for t in tails:
        ll = _rocking_loglik(phi[use], s1u[use], obs, lo, hi, beam, goniometer, MOSAIC_GRID, t).sum(1)
        k = int(np.argmax(ll))
        if best is None or ll[k] > best[0] + TAIL_GAIN * use.sum() * (t > 0 and best[2] == 0):
            best = (ll[k], float(MOSAIC_GRID[k]), float(t))
    return best[1], best[2], use


def _shares(linked, parts, first, last):
    """(n, m) intensity of each linked reflection on each image first..last (PART_DTYPE rows)."""
    obs = np.zeros((len(linked), last - first + 1))
    on = (parts["image"] >= first) & (parts["image"] <= last)
    np.add.at(obs, (parts["spot"][on], parts["image"][on] - first), parts["intensity"][on])
    return obs


def _image_edges(scan, first, last):
    lo = scan_phi(np.arange(first, last + 1), scan.phi_range(first)[0], scan.osc, first)
    return lo, lo + scan.osc


def mosaic_from_widths(linked, parts, beam, detector, goniometer, scan, first, last,
                       min_isig=STRONG_ISIG):
    """(mosaic spread, number of spots used) without an orientation: fit_rocking_widths on the strong
    spots that begin and end inside images first..last, centred on their own intensity-weighted phi
    (a spot cut by the first or last image has its centre pulled inwards).  None when fewer than 3."""
    ok = np.flatnonzero((linked["first"] > first) & (linked["last"] < last)
                        & (linked["intensity"] > min_isig * linked["sigma"]))
    if len(ok) < 3:
        return None, len(ok)
    sel = np.isin(parts["spot"], ok)
    pt = parts[sel].copy()
    pt["spot"] = np.searchsorted(ok, pt["spot"])
    lo, hi = _image_edges(scan, first, last)
    eta, _, use = fit_rocking_widths(linked["phi"][ok], _s1u(linked[ok], detector),
                                     _shares(linked[ok], pt, first, last), lo, hi, beam, goniometer)
    return eta, int(use.sum())


def _n_spots(spots):
    from .spotfinder import TOO_SMALL
    return int(np.sum((spots["flag"] & TOO_SMALL) == 0)) if len(spots) else 0


def mosaic_from_predictions(linked, parts, crystal, beam, detector, goniometer, scan, first, last,
                            min_isig=STRONG_ISIG, radius=3.0, matched=None):
    """(mosaic spread, number of spots used) with an orientation: each strong spot is matched to the
    predicted reflection nearest it on the detector (within `radius` pixels), and fit_rocking_widths
    is given the predicted centres, so that spots cut by the first or last image count too.
    None when fewer than 3 match.  (Each spot is not asked to be reached in full by the predictions:
    the faint tails the spot search follows, a bright spot's further than a weak one's, and a few
    spots the lattice does not explain would then set the spread, 4-6 times the true one on
    L-cysteine's 0.1 degree images.)  matched: _matched's result, when the caller has it."""
    ok, phi = matched or _matched(linked, crystal, beam, detector, goniometer, scan, first, last, min_isig,
                                  radius)
    if len(ok) < 3:
        return None, len(ok)
    pt = parts[np.isin(parts["spot"], ok)].copy()
    pt["spot"] = np.searchsorted(ok, pt["spot"])
    lo, hi = _image_edges(scan, first, last)
    eta, _, use = fit_rocking_widths(phi, _s1u(linked[ok], detector), _shares(linked[ok], pt, first, last),
                                     lo, hi, beam, goniometer)
    return eta, int(use.sum())


def _matched(linked, crystal, beam, detector, goniometer, scan, first, last, min_isig=STRONG_ISIG,
             radius=3.0):
    """(indices of the strong linked spots with a predicted reflection within `radius` pixels, the
    predicted phi of each); fewer than 3 when fewer match."""
    import copy
    from scipy.spatial import cKDTree
    from . import predict
    strong = np.flatnonzero(linked["intensity"] > min_isig * linked["sigma"])
    if len(strong) < 3:
        return strong, np.zeros(len(strong))
    c = copy.copy(crystal)
    c.mosaic, c.tail = 2.0, 0.0      # generous, to find every reflection that could be on the images
    a, b = scan.phi_range(first)[0], scan.phi_range(last)[1]
    dmin = predict.corner_resolution(detector, beam.wavelength)
    pred = predict.predict(c, beam, detector, goniometer, a, b, dmin, margin=3.0)
    pred = pred[pred["on_detector"]]
    if len(pred) == 0:
        return strong[:0], np.zeros(0)
    sp = linked[strong]
    d, j = cKDTree(np.stack([pred["fast"], pred["slow"]], 1)).query(np.stack([sp["fast"], sp["slow"]], 1),
                                                                      distance_upper_bound=radius)
    hit = np.isfinite(d)
    return strong[hit], pred["phi"][j[hit]]


LIGHT_HALF = 5          # the light of a spot on an image: an 11 x 11 box (a near-axis spot runs a few
LIGHT_RING = 5          # pixels across the detector as it rocks), less a background from a 5-pixel rim


def box_light(read_image, images, fast, slow, half=LIGHT_HALF, ring=LIGHT_RING):
    """(n, m) background-subtracted counts in a box about each (fast, slow) pixel position on each of
    the images (negative pixels, Pilatus gaps and dead pixels, left out), clipped at 0."""
    out = np.zeros((len(fast), len(images)))
    f0 = np.rint(np.asarray(fast) - 0.5).astype(int)
    s0 = np.rint(np.asarray(slow) - 0.5).astype(int)
    big = half + ring
    inner = np.zeros((2 * big + 1, 2 * big + 1), bool)
    inner[ring:ring + 2 * half + 1, ring:ring + 2 * half + 1] = True
    for m, img in enumerate(images):
        data = read_image(img)
        ns, nf = data.shape
        for n, (f, s) in enumerate(zip(f0, s0)):
            if s - big < 0 or f - big < 0 or s + big >= ns or f + big >= nf:
                continue
            b = np.asarray(data[s - big:s + big + 1, f - big:f + big + 1], float)
            ok = b >= 0
            rim = b[ok & ~inner]
            if len(rim) < 10:
                continue
            out[n, m] = b[ok & inner].sum() - np.median(rim) * np.sum(ok & inner)
    return np.maximum(out, 0.0)


def shape_from_light(linked, matched, read_image, beam, detector, goniometer, scan, first, last):
    """(eta, tail, number of spots) from the pixels: each strong spot's light on every image (box_light)
    shared among the images by a rocking curve of spread eta with the share `tail` in Lorentzian tails
    (fit_rocking_shape).  The spot search's own shares (mosaic_from_predictions) stop where a spot's
    faint wings fall below its threshold: they cannot see the tails.  linked, matched: link_spots's
    and _matched's (the spots and their predicted phi).  None when fewer than 3 match."""
    ok, phi = matched
    if len(ok) < 3:
        return None, 0.0, len(ok)
    images = list(range(first, last + 1))
    light = box_light(read_image, images, linked["fast"][ok], linked["slow"][ok])
    lo, hi = _image_edges(scan, first, last)
    seen = light.sum(1) > 0
    if seen.sum() < 3:
        return None, 0.0, int(seen.sum())
    eta, tail, use = fit_rocking_shape(phi[seen], _s1u(linked[ok][seen], detector), light[seen], lo, hi,
                                       beam, goniometer)
    return eta, tail, int(use.sum())


def _s1u(sp, detector):
    p = geometry.mm_to_lab(sp["x_mm"], sp["y_mm"], detector.frame())
    return p / np.linalg.norm(p, axis=1)[:, None]


def choose(per_image, beam, detector, goniometer, scan, first, last, *, given=(), crystal=None,
           read_image=None):
    """AutoParams from the spots of images first..last (per_image: find_sweep_spots' lists).
    `given` names what the deck set itself (RASTER, SEPARATION, MOSAIC): those are left alone.
    With an orientation and read_image, the rocking curve's shape too, from the pixels (shape_from_light)."""
    from .shoebox import choose_raster
    ap = AutoParams()
    counts = [_n_spots(s) for s in per_image]
    ap.spots_per_image = float(np.mean(counts)) if counts else 0.0
    ap.sparse = ap.spots_per_image < SPARSE_SPOTS
    if not ap.sparse:
        return ap
    ap.lines.append(f" Few spots per image ({ap.spots_per_image:.0f}): integration parameters are chosen "
                    "from the spots found on the images to be integrated")
    linked, parts = link_spots(per_image, scan.osc, parts=True)
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
    matched = None
    if "MOSAIC" not in given and crystal is not None:
        matched = _matched(linked, crystal, beam, detector, goniometer, scan, first, last)
        ap.mosaic, ap.n_mosaic_spots = mosaic_from_predictions(linked, parts, crystal, beam, detector,
                                                               goniometer, scan, first, last, matched=matched)
        if ap.mosaic is not None:
            ap.lines.append(f" Mosaic spread set to {ap.mosaic:.2f} degrees (full width) from how the "
                            f"intensity of {ap.n_mosaic_spots} strong spots is shared among the images")
    if "MOSAIC" not in given and ap.mosaic is None:
        ap.mosaic, ap.n_mosaic_spots = mosaic_from_widths(linked, parts, beam, detector, goniometer, scan,
                                                          first, last)
        if ap.mosaic is not None:
            ap.lines.append(f" Mosaic spread set to {ap.mosaic:.2f} degrees (full width) from the rocking "
                            f"curves of {ap.n_mosaic_spots} spots seen from start to end within the images")
    # a spot is fully recorded on one image when all of it lies on that image
    ap.n_strong_fulls = int(np.sum(strong["first"] == strong["last"]))
    if ap.n_strong_fulls < MIN_PROFILE_SPOTS:
        ap.profiles = False
        ap.lines.append(f" ***** WARNING ***** only {ap.n_strong_fulls} strong spots are fully recorded on "
                        f"one image (at least {MIN_PROFILE_SPOTS} are needed to form standard profiles): "
                        "profile fitting is not used, the profile-fitted intensities (IPR) are the "
                        "summation intensities")
    if ap.mosaic is not None and matched is not None and read_image is not None:
        eta, tail, n = shape_from_light(linked, matched, read_image, beam, detector, goniometer, scan,
                                        first, last)
        if eta is not None and tail > 0:
            ap.mosaic, ap.tail = eta, tail
            ap.lines.append(f" Rocking curves from the pixels of {n} strong spots on every image: tails beyond "
                            f"a Gaussian's, {tail:.0%} of each curve Lorentzian, mosaic spread {eta:.2f} degrees "
                            "(partials' fractions reach further out)")
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
    probe = take_early_probe(job, read_image, detector, mid)
    if probe is None and (probe_nproc or nproc) == 1 and not (sched and probe_nproc != 1):
        probe = _probe_task(read_image, detector, scan, mid)
    if probe is None:
        probe = _probe_view(find_sweep_spots(read_image, detector, scan, [mid], nproc=probe_nproc or nproc,
                                             scheduler=None if probe_nproc == 1 else sched)[0])
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
    ap = choose(per_image, beam, detector, goniometer, scan, a, b, given=given, crystal=crystal,
                read_image=read_image)
    if ap.mosaic is not None:
        crystal.mosaic = ap.mosaic
        crystal.tail = ap.tail
        mw = (job.kw.get("MAXWIDTH") or {}).get("_args")
        n, hkl = too_wide(crystal, beam, detector, goniometer, scan, first, last, float(mw[0]) if mw else 5.0)
        ap.lines.append(f" {n:7d} Too wide in phi (predicted wider than MAXWIDTH {float(mw[0]) if mw else 5.0:.1f}"
                        " degrees, near the rotation axis: not integrated" +
                        (": " + " ".join("(%d %d %d)" % tuple(h) for h in hkl[:10]) if n else "") + ")")
    for ln in ap.lines:
        job.log.line(ln)
    return ap


# ---- the probes of the deck's PROCESS actions, searched early ------------------------------------
#
# What PROCESS's probe decides with is the number of spots that are not too small and where they are
# (fast, slow): both from the pixels alone (the image, gain, null and overload values), not from the
# detector's position, which refinement moves between the deck's PROCESS actions.  So with worker
# processes the probes of every PROCESS the deck will run are searched by a worker of their own while
# indexing keeps this process busy on its own; PROCESS takes the one whose image and pixel values are
# its own.

PROBE_DTYPE = np.dtype([("fast", "f8"), ("slow", "f8"), ("flag", "i4")])


def _probe_view(spots):
    """The columns of a probe's spots that the probe decides with (fast, slow, flag): nothing the
    detector's position sets."""
    from .spotfinder import TOO_SMALL
    out = np.zeros(len(spots), PROBE_DTYPE)
    out["fast"], out["slow"] = spots["fast"], spots["slow"]
    out["flag"] = spots["flag"] & TOO_SMALL      # the other flags are the detector position's
    return out


def _probe_key(read_image, detector, img):
    import pickle
    try:
        return pickle.dumps((read_image, int(img), float(detector.nullpix), float(detector.overload),
                             float(detector.gain), int(detector.n_fast), int(detector.n_slow)), protocol=4)
    except Exception:            # an unpicklable reader: never matched
        return None


def _probe_task(read_image, detector, scan, img):
    """A probe's search on a worker: _probe_view of the spots PROCESS's probe would find."""
    sp = _search_image(read_image, detector, scan, img, probe=True)
    return _probe_view(_empty() if sp is None else sp)


class EarlyProbes:
    """Probe searches run by the job's worker pool (distributed.local_pool), in the order the deck's
    PROCESS actions need them: while indexing runs one at a time, the next submitted when one ends, so
    a worker probes while indexing keeps this process busy on its own, and indexing's fits are not
    queued behind several probes; once a PROCESS takes one, the rest at once, behind the blocks it has
    queued.
    take(key) gives a probe's result, waiting for it if it is being searched, else None (one not
    started is then not started at all; the caller searches itself, as it would without).  (One per
    worker at once, the second in a thread at nice 19 so that the beam search kept its core, left the
    first with half a core, and once a segment's block and measurements ran, the nice-19 one with
    none: on the 6M sweep the first segment waited 0.2-0.5 s for its probe, the second up to 0.4 s, a
    worker held meanwhile.)"""

    def __init__(self, tasks, nproc):
        import threading
        from .distributed import local_pool
        self.pool = local_pool(nproc)
        self.pending = [(k, a) for k, a in tasks if k is not None]
        self.futures, self._lock = {}, threading.Lock()
        self._next()

    def _next(self, done=None):
        """Submit the next probe (a probe's done-callback, or take's)."""
        if done is not None and done.cancelled():
            return
        with self._lock:          # (take's and a callback's: each probe submitted once)
            if not self.pending:
                return
            k, a = self.pending.pop(0)
            try:
                f = self.futures[k] = self.pool.submit(_probe_task, *a)
            except Exception:     # a broken or stopped pool: that PROCESS searches itself
                return
        f.add_done_callback(self._next)

    def cancel(self):
        """No more probes (the job is ending): those not started are not."""
        with self._lock:
            self.pending = []
        for f in list(self.futures.values()):
            f.cancel()

    def take(self, key):
        # a PROCESS has begun, so indexing is over: the probes still to come are all queued now, behind
        # the blocks it has just queued (left to the chain, a worker sat idle while the next waited)
        while self.pending:
            self._next()
        f = self.futures.get(key)
        if f is None or f.cancel():
            return None
        try:
            return self.pool.wait(f)
        except Exception:               # a broken worker: the caller searches itself
            return None


def start_early_probes(job, detector, scan):
    """With NPROC > 1 (local workers), the probes of the PROCESS actions still to come in the deck
    (job.upcoming), searched on the workers now (EarlyProbes, kept in job.results['early_probes'])."""
    from .distributed import scheduler_from
    from .integrate import _image_range, image_reader, nproc_from
    nproc = nproc_from(job.kw)
    if nproc < 2 or scheduler_from(job.kw) or not job.upcoming:
        return
    tasks, seen = [], set()
    for name, args, template, directory, extension in job.upcoming:
        if name != "PROCESS" or template is None:
            continue
        try:
            first, last = _image_range(job, args)
        except Exception:            # PROCESS says what is wrong with it when it runs
            continue
        reader = image_reader(template, directory, extension)
        mid = (first + last) // 2
        key = _probe_key(reader, detector, mid)
        if key is not None and key not in seen:
            seen.add(key)
            tasks.append((key, (reader, detector, scan, mid)))
    if tasks:
        try:
            job.results["early_probes"] = EarlyProbes(tasks, nproc)
        except Exception:           # early work only: PROCESS searches its probe itself
            pass


def take_early_probe(job, read_image, detector, img):
    """The probe of image img searched early (start_early_probes) with these pixel values, or None."""
    early = job.results.get("early_probes")
    if early is None:
        return None
    key = _probe_key(read_image, detector, img)
    return None if key is None else early.take(key)


def too_wide(crystal, beam, detector, goniometer, scan, first, last, maxwidth):
    """(number, indices) of the reflections on the detector predicted on images first..last at the
    crystal's spread whose rocking width exceeds MAXWIDTH: PROCESS flags them TOO_WIDE and does not
    integrate them, as MOSFLM ("Too wide in phi")."""
    from . import predict
    pred = predict.predict(crystal, beam, detector, goniometer, scan.phi_range(first)[0],
                           scan.phi_range(last)[1], predict.corner_resolution(detector, beam.wavelength))
    wide = pred[pred["on_detector"] & (pred["width"] > maxwidth)]
    return len(wide), np.stack([wide["h"], wide["k"], wide["l"]], 1)


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
