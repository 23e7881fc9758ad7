"""Measuring reflections on one image (MOSFLM's integration, Leslie 1999/2006): measurement box,
background plane, summation and profile-fitted intensities, bad-spot flags.  Vectorised numpy.

Measurement box (RASTER nxs nys nc nrx nry): nxs pixels along MOSFLM X (the slow axis) by nys along Y
(fast), corners cut by nc (pixels whose |dx|+|dy| from the box corner is below nc), a background rim nrx
wide along X and nry along Y; the peak is the rest.  The box is centred on the pixel that holds the
predicted position.

Per reflection: background plane a + b.x + c.y fitted to the rim pixels with iterative rejection of
outliers (> 3 sigma, Poisson sigma times gain); summation intensity I = sum_peak(c - bg) with
var = gain.sum_peak(c) + n_peak^2 var(bg mean); profile fitting against standard profiles formed from
strong fully recorded reflections in regions of the detector (3 x 3 grid; a region with too few
strong spots takes the average of all profiles): I = sum(P(c-bg)/v)/sum(P^2/v), sigma^2 = 1/sum(P^2/v),
v = gain.(bg + I.P), iterated.

Flags (as written to the MTZ FLAG column, pyflm.mtz): 1 BGRATIO, 4 more than 5 sigma negative,
8 background gradient, 16 overload, 32 edge (box off the image, shadowed pixels in the peak, or dead
pixels holding more than MAX_DEAD_FRACTION of its intensity; fewer are masked, _mend_dead_pixels).
"""
from __future__ import annotations

import functools

import numpy as np

try:        # the Cython kernel of fit_background (ext/_background.pyx); fit_background_numpy is its twin
    from ._ext import _background as _bg_ext
except ImportError:
    _bg_ext = None
try:        # the Cython kernel of shadow_mask's statistics (ext/_shadow.pyx); twin shadow_stats_numpy
    from ._ext import _shadow as _shadow_ext
except ImportError:
    _shadow_ext = None
try:        # the integration kernel (ext/_integrate.pyx): measure, profile sums and profile fitting
    from ._ext import _integrate as _int_ext
except ImportError:
    _int_ext = None

SB_DTYPE = np.dtype([("I", "f8"), ("SIGI", "f8"), ("IPR", "f8"), ("SIGIPR", "f8"), ("bg", "f8"),
                     ("fast_obs", "f8"), ("slow_obs", "f8"), ("flag", "i4"), ("bgratio", "f8"),
                     ("pkratio", "f8"), ("gradient", "f8"), ("n_peak", "i4"), ("n_bg", "i4")])

F_BGRATIO, F_NEGATIVE, F_GRADIENT, F_OVERLOAD, F_EDGE = 1, 4, 8, 16, 32


def subpixel_offsets(fast, slow):
    """Offsets (slow, fast) of predicted positions from the centre of the pixel holding them."""
    f = np.asarray(fast, float)
    s = np.asarray(slow, float)
    return s - np.floor(s) - 0.5, f - np.floor(f) - 0.5


def choose_raster(spot_x, spot_y):
    """MOSFLM's RASTER (nxs nys nc nrx nry) from the median spot size in pixels along X (slow) and Y."""
    px = int(np.ceil(spot_x)) + 2 | 1            # peak a little larger than the spot, odd
    py = int(np.ceil(spot_y)) + 2 | 1
    rx, ry = max(3, px // 2 + 1), max(3, py // 2 + 1)
    nxs, nys = px + 2 * rx, py + 2 * ry
    nc = min(nxs, nys) // 2 - 1
    return nxs, nys, max(nc, 0), rx, ry


def box_masks(raster):
    """Boolean (peak, background) masks of shape (nxs, nys) = (slow, fast) for a RASTER (read-only:
    the same two arrays for every call with that RASTER, several a measured image)."""
    return _box_masks(tuple(int(r) for r in raster))


@functools.lru_cache(maxsize=16)
def _box_masks(raster):
    nxs, nys, nc, nrx, nry = raster
    ix = np.arange(nxs)[:, None]
    iy = np.arange(nys)[None, :]
    dx = np.minimum(ix, nxs - 1 - ix)
    dy = np.minimum(iy, nys - 1 - iy)
    inside = (dx + dy) >= nc
    peak = (dx >= nrx) & (dy >= nry)
    masks = peak & inside, (~peak) & inside
    for m in masks:
        m.flags.writeable = False
    return masks


def extract_boxes(data, fast, slow, raster):
    """Pixel boxes (n, nxs, nys) around predicted positions, the box origin pixels, and a mask of
    boxes lying wholly on the image.  (Measuring boxes that reach over the image's edge, with the
    background from the part on it, added corner reflections but took 0.02 off cc_truth at 1.5 A.)"""
    nxs, nys = raster[0], raster[1]
    ns, nf = data.shape
    cs = np.floor(np.asarray(slow, float)).astype(np.int64) - nxs // 2
    cf = np.floor(np.asarray(fast, float)).astype(np.int64) - nys // 2
    on = (cs >= 0) & (cf >= 0) & (cs + nxs <= ns) & (cf + nys <= nf)
    ss = np.clip(cs[:, None, None] + np.arange(nxs)[None, :, None], 0, ns - 1)
    ff = np.clip(cf[:, None, None] + np.arange(nys)[None, None, :], 0, nf - 1)
    return data[ss, ff].astype(np.float64), cs, cf, on


def foreground_mask(shape, fast, slow, raster, use_cython=True):
    """Pixels of an image inside the peak region of any of the given predicted spots: kept out of every
    other spot's background (a neighbour's peak in the rim would raise it)."""
    nxs, nys, nc, nrx, nry = raster
    ps, pf = nxs - 2 * nrx, nys - 2 * nry
    if use_cython and _int_ext is not None:
        return _int_ext.foreground_mask(tuple(shape), fast, slow, ps, pf)
    slow, fast = np.asarray(slow, float), np.asarray(fast, float)
    on = np.isfinite(slow) & np.isfinite(fast)        # rays that miss the detector plane have no pixel
    s0 = np.floor(slow[on]).astype(np.int64) - ps // 2
    f0 = np.floor(fast[on]).astype(np.int64) - pf // 2
    si, fi = np.broadcast_arrays(s0[:, None, None] + np.arange(ps)[None, :, None],
                                 f0[:, None, None] + np.arange(pf)[None, None, :])
    si, fi = si.ravel(), fi.ravel()
    ok = (si >= 0) & (si < shape[0]) & (fi >= 0) & (fi < shape[1])
    mask = np.zeros(shape, bool)
    mask[si[ok], fi[ok]] = True
    return mask


def shadow_mask(images, nullpix=-1.0, bin_=8, ratio=0.25, min_level=0.5, grow=2, use_cython=True):
    """Pixels in a shadow (beamstop, its arm, anything that blocks the beam) from a block of images:
    their median over the block, averaged over 3 x 3 pixels (so counting noise cannot reach the test), is
    below `ratio` times the local background level (median over 5 x 5 bins of bin_ pixels), where that
    level is at least min_level counts.  The mask is grown by `grow` pixels for the penumbra.  Spots
    measured there would be a fraction of their true intensity, whatever the shadow's shape."""
    from scipy import ndimage
    if not len(images):
        return None
    if use_cython and _shadow_ext is not None:
        # the kernel (ext/_shadow.pyx): block_stats, median5 and shadow_test streamed in one pass
        return _shadow_ext.shadow_block(list(images), float(nullpix), int(bin_), float(ratio),
                                        float(min_level), int(grow))
    valid, mean, coarse = shadow_stats_numpy(images, nullpix, bin_)
    level = ndimage.median_filter(coarse, 5, mode="nearest")
    return shadow_test_numpy(valid, mean, level, bin_, ratio, min_level, grow)


def _sum3x3(a):
    """Sums over 3 x 3 pixels, the image's edges repeated: rows first, then columns (the kernel adds
    in the same order, so the two agree to the last bit)."""
    p = np.pad(a, 1, mode="edge")
    r = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return r[:-2] + r[1:-1] + r[2:]


def shadow_test_numpy(valid, mean, level, bin_, ratio, min_level, grow):
    """shadow_mask's test on block_stats' results and the smoothed coarse level (the twin of
    ext/_shadow.pyx's shadow_test): the mean of the valid pixels' medians over 3 x 3 pixels (where more
    than half of them are valid) below ratio x the local level."""
    from scipy import ndimage
    num = _sum3x3(mean)
    den = _sum3x3(valid.astype(float))
    local = np.where(den > 4.5, num / np.maximum(den, 1e-9), np.inf)
    ns, nf = mean.shape
    level = np.repeat(np.repeat(level, bin_, 0), bin_, 1)[:ns, :nf]
    shadow = valid & (level >= min_level) & (local < ratio * level)
    if grow and shadow.any():
        shadow = ndimage.binary_dilation(shadow, iterations=grow)
    return shadow


def shadow_stats_numpy(images, nullpix=-1.0, bin_=8):
    """shadow_mask's statistics of a block: pixels valid on most images, their median over the block
    (negative values as 0; 0 where not valid), and the median of the valid ones over bin_ x bin_ bins
    (0 where a bin has none).  The numpy twin of ext/_shadow.pyx."""
    stack = [np.asarray(d, float) for d in images]
    valid = np.mean([d > nullpix for d in stack], 0) > 0.5
    # the median over the block, so spots crossing the shadow on one image do not hide it
    mean = np.where(valid, np.median([np.maximum(d, 0) for d in stack], 0), 0.0)
    ns, nf = mean.shape
    ps, pf = -ns % bin_, -nf % bin_
    m = np.pad(np.where(valid, mean, np.nan), ((0, ps), (0, pf)), constant_values=np.nan)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            coarse = np.nanmedian(m.reshape(m.shape[0] // bin_, bin_, m.shape[1] // bin_, bin_), (1, 3))
    return valid, mean, np.where(np.isfinite(coarse), coarse, 0.0)


def _valid(boxes, nullpix, mask, fast, slow, raster):
    """Pixels that are measurements: above NULLPIX and outside `mask` (e.g. shadow_mask)."""
    valid = boxes > nullpix
    if mask is not None:
        valid &= ~extract_boxes(mask, fast, slow, raster)[0].astype(bool)
    return valid


def union(masks):
    """One mask from bg_exclude given as a few (a list or tuple: their union), as the kernel takes them."""
    if not isinstance(masks, (list, tuple)):
        return masks
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = np.array(masks[0], bool)
    for m in masks[1:]:
        out |= m
    return out


def _bg_valid(valid, bg_exclude, fast, slow, raster):
    """Pixels the background may use: valid ones outside other spots' peaks (foreground_mask)."""
    bg_exclude = union(bg_exclude)
    if bg_exclude is None:
        return valid
    return valid & ~extract_boxes(bg_exclude, fast, slow, raster)[0].astype(bool)


def fit_background(boxes, bg_mask, valid, gain=1.0, n_iter=3, cutoff=3.0, use_cython=True):
    """fit_background_numpy's results from the Cython kernel when it is built (10x faster: one pass
    over each box per iteration instead of ~20 over all boxes)."""
    if use_cython and _bg_ext is not None:
        return _bg_ext.fit_background(np.ascontiguousarray(boxes, np.float64),
                                      np.ascontiguousarray(bg_mask, bool).view(np.uint8),
                                      np.ascontiguousarray(valid, bool).view(np.uint8),
                                      float(gain), int(n_iter), float(cutoff))
    return fit_background_numpy(boxes, bg_mask, valid, gain, n_iter, cutoff)


def fit_background_numpy(boxes, bg_mask, valid, gain=1.0, n_iter=3, cutoff=3.0):
    """Least-squares plane per box over background pixels, rejecting outliers.

    Returns (plane values over the box (n, nxs, nys), coefficients (n, 3), mask of pixels used,
    rms residual in units of the expected Poisson sigma)."""
    n, nxs, nys = boxes.shape
    x = (np.arange(nxs) - (nxs - 1) / 2.0)[None, :, None] * np.ones((1, 1, nys))
    y = (np.arange(nys) - (nys - 1) / 2.0)[None, None, :] * np.ones((1, nxs, 1))
    use = bg_mask[None] & valid
    coef = np.zeros((n, 3))
    for _ in range(n_iter + 1):
        w = use.astype(np.float64)
        sw, sx, sy = w.sum((1, 2)), (w * x).sum((1, 2)), (w * y).sum((1, 2))
        sxx, sxy, syy = (w * x * x).sum((1, 2)), (w * x * y).sum((1, 2)), (w * y * y).sum((1, 2))
        sc, sxc, syc = (w * boxes).sum((1, 2)), (w * x * boxes).sum((1, 2)), (w * y * boxes).sum((1, 2))
        M = np.stack([np.stack([sw, sx, sy], -1), np.stack([sx, sxx, sxy], -1),
                      np.stack([sy, sxy, syy], -1)], -2)
        rhs = np.stack([sc, sxc, syc], -1)
        M[:, 1, 1] += 1e-3     # a small ridge keeps a plane defined when rim pixels are collinear
        M[:, 2, 2] += 1e-3
        ok = sw >= 6
        M[~ok] = np.eye(3)
        rhs[~ok] = 0
        coef = np.linalg.solve(M, rhs[..., None])[..., 0]
        plane = coef[:, 0, None, None] + coef[:, 1, None, None] * x + coef[:, 2, None, None] * y
        sig = np.sqrt(np.maximum(plane, 1.0) * gain)
        resid = (boxes - plane) / sig
        # a residual at the cutoff to rounding (a flat plane of integer counts) is kept, whatever the
        # order the sums were taken in: the kernels then reject the same pixels as this twin
        new = bg_mask[None] & valid & (np.abs(resid) <= cutoff + 1e-9)
        if np.array_equal(new, use):
            break
        use = new
    w = use.astype(np.float64)
    nbg = np.maximum(w.sum((1, 2)), 1)
    rms = np.sqrt((w * resid ** 2).sum((1, 2)) / nbg)
    return plane, coef, use, rms


def _plane_of(coef, raster):
    """Background planes (n, nxs, nys) from their coefficients, as fit_background_numpy forms them."""
    nxs, nys = raster[0], raster[1]
    x = (np.arange(nxs) - (nxs - 1) / 2.0)[None, :, None] * np.ones((1, 1, nys))
    y = (np.arange(nys) - (nys - 1) / 2.0)[None, None, :] * np.ones((1, nxs, 1))
    return coef[:, 0, None, None] + coef[:, 1, None, None] * x + coef[:, 2, None, None] * y


def summation(boxes, plane, peak_mask, valid, bg_used, gain=1.0, n_bg_images=1):
    """Summation intensity and sigma; background-subtracted peak pixels (the plane from bg_used's
    pixels on each of n_bg_images images)."""
    pk = peak_mask[None] & valid
    net = np.where(pk, boxes - plane, 0.0)
    I = net.sum((1, 2))
    npk = pk.sum((1, 2))
    nbg = np.maximum(bg_used.sum((1, 2)) * n_bg_images, 1)
    bg_mean = np.where(pk, plane, 0).sum((1, 2)) / np.maximum(npk, 1)
    var = gain * np.maximum(np.where(pk, boxes, 0).sum((1, 2)), 0) + npk ** 2 * gain * \
        np.maximum(bg_mean, 0.5) / nbg
    return I, np.sqrt(np.maximum(var, 1e-12)), net, npk


def ring_regions(fast, slow, centre, r_max, n_rings=4, n_sectors=1):
    """Profile regions as rings about the direct beam (centre: fast, slow pixels) out to r_max pixels,
    each cut into n_sectors: spots grow with the scattering angle, so profiles should follow radius."""
    df, ds = np.asarray(fast, float) - centre[0], np.asarray(slow, float) - centre[1]
    # a position that is not finite (no pixel) goes to the outer ring, sector 0, rather than a bad cast
    r = np.nan_to_num(np.hypot(df, ds) / r_max * n_rings, nan=n_rings, posinf=n_rings, neginf=0.0)
    ring = np.clip(r.astype(int), 0, n_rings - 1)
    if n_sectors == 1:          # every angle's sector is 0: no arctan2
        return ring
    a = np.nan_to_num((np.arctan2(ds, df) + np.pi) / (2 * np.pi) * n_sectors, nan=0.0)
    sector = np.clip(a.astype(int), 0, n_sectors - 1)
    return ring * n_sectors + sector


def region_of(fast, slow, n_fast, n_slow, grid=3):
    """Detector region index (grid x grid) of each reflection."""
    gf = np.clip((np.asarray(fast) / n_fast * grid).astype(int), 0, grid - 1)
    gs = np.clip((np.asarray(slow) / n_slow * grid).astype(int), 0, grid - 1)
    return gs * grid + gf


def fit_profiles(boxes, plane, profiles_for_each, peak_mask, valid, I_start, gain=1.0, n_iter=3,
                 overload=None):
    """Profile-fitted intensities (and sigmas) of boxes against their standard profiles."""
    pk = peak_mask[None] & valid
    if overload is not None:
        pk &= boxes < overload           # an overloaded pixel is left out; the profile fills it in
    P = np.where(pk, profiles_for_each, 0.0)
    net = boxes - plane
    I = np.maximum(I_start, 0.0)
    for _ in range(n_iter):
        v = gain * np.maximum(plane + I[:, None, None] * P, 0.5)
        a = (P * P / v).sum((1, 2))
        b = (P * net / v).sum((1, 2))
        I = b / np.maximum(a, 1e-30)
    v = gain * np.maximum(plane + np.maximum(I, 0)[:, None, None] * P, 0.5)
    a = (P * P / v).sum((1, 2))
    return I, 1.0 / np.sqrt(np.maximum(a, 1e-30))


# Standard profiles are sampled on a grid SUB times finer than the pixels, as a function of a pixel
# centre's offset from the predicted spot centre.  Each strong spot's pixels sample that function at
# their own offsets, so spots at every sub-pixel phase fill it in; a spot being fitted reads it at its
# own pixels' offsets.  Shifting whole-pixel profiles by interpolation instead blurs them (by up to
# 1/4 pixel^2 each time), which biased profile-fitted intensities of weak spots up by 3 %.
SUB = 4

# a spot makes the standard profiles when its I/sigma from its image alone is above this
STRONG_ISIG = 10.0


def _fine_coords(fast, slow, raster, sub):
    """Fine-grid coordinates (n, nxs, nys) along slow and fast of every box pixel's offset from its
    spot's predicted centre."""
    nxs, nys = raster[0], raster[1]
    ds, df = subpixel_offsets(fast, slow)
    us = np.arange(nxs)[None, :, None] - nxs // 2 - ds[:, None, None]
    uf = np.arange(nys)[None, None, :] - nys // 2 - df[:, None, None]
    return np.broadcast_arrays((us + nxs // 2 + 1) * sub, (uf + nys // 2 + 1) * sub)


def fine_shape(raster, sub=SUB):
    return (2 * (raster[0] // 2 + 1) * sub + 1, 2 * (raster[1] // 2 + 1) * sub + 1)


def row_order(slow):
    """The boxes in the order of the image's rows, as the kernels take them: neighbouring boxes share the
    rows' cache lines and pages (each one's results are written at its own place, so any order gives the
    same numbers).  By slow alone: np.lexsort's second key (fast) cost 0.2 ms of a sim image's 2 500
    boxes, argsort 0.02, and the boxes over a row are read together either way."""
    return np.argsort(slow)


def measure(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0, mask=None, bg_exclude=None,
            bg_images=(), use_cython=True):
    """Everything of each reflection's measurement but the profile fit: background plane (coef, rms,
    n_bg), summation I and SIGI, n_peak, centroid (slow_obs, fast_obs), box origins (cs, cf) and
    whether the box is on the image (on), has invalid peak pixels (bad_peak) or overloads (over).
    bg_images: neighbouring images (up to two) whose pixels join the background plane (integrate_image).
    bg_exclude: a mask, or a list of up to three whose union it is (no union image is made for the kernel).
    A dict of arrays; the kernel (ext/_integrate.pyx) when built, else measure_numpy (its twin)."""
    fast, slow = np.asarray(fast, float), np.asarray(slow, float)
    if use_cython and _int_ext is not None and len(bg_images) <= 2:
        peak_mask, bg_mask = box_masks(raster)
        order = row_order(slow)
        m = _int_ext.measure(data, fast, slow, raster, peak_mask, bg_mask, mask, bg_exclude,
                             float(gain), float(overload), float(nullpix), bg_images=list(bg_images),
                             order=order)
        m["_row_order"] = order          # integrate_image's profile fit takes them in the same order
        return m
    return measure_numpy(data, fast, slow, raster=raster, gain=gain, overload=overload, nullpix=nullpix,
                         mask=mask, bg_exclude=bg_exclude, bg_images=bg_images)


def quick_sums(data, fast, slow, raster, nullpix=-1.0, use_cython=True):
    """Per box: the sum of its valid peak pixels' counts, their number, the sum of its valid rim pixels'
    counts and their number, (n, 4): a look at which reflections stand above their background without
    fitting any (refinement's choice of spots).  The kernel when built, else quick_sums_numpy (its twin)."""
    peak, bgm = box_masks(raster)
    if use_cython and hasattr(_int_ext, "quick_sums"):      # (not in a build older than the kernel)
        return _int_ext.quick_sums(data, np.asarray(fast, float), np.asarray(slow, float), raster, peak, bgm,
                                   float(nullpix))
    return quick_sums_numpy(data, fast, slow, raster, nullpix)


def quick_sums_numpy(data, fast, slow, raster, nullpix=-1.0):
    peak, bgm = box_masks(raster)
    boxes = extract_boxes(data, fast, slow, raster)[0]
    valid = boxes > nullpix
    pk, rim = peak[None] & valid, bgm[None] & valid
    return np.stack([np.where(pk, boxes, 0).sum((1, 2)), pk.sum((1, 2)), np.where(rim, boxes, 0).sum((1, 2)),
                     rim.sum((1, 2))], 1).astype(np.float64)


def measure_numpy(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0, mask=None,
                  bg_exclude=None, bg_images=()):
    """measure's results with numpy over all boxes at once (plus the boxes, planes and valid pixels,
    which the numpy profile fit reuses)."""
    peak_mask, bg_mask = box_masks(raster)
    boxes, cs, cf, on = extract_boxes(data, fast, slow, raster)
    valid = _valid(boxes, nullpix, mask, fast, slow, raster)
    bg_boxes, bg_valid = boxes, _bg_valid(valid, bg_exclude, fast, slow, raster)
    if len(bg_images):
        # a 3-D background, as DIALS's: the rim pixels of the neighbouring images too (the background
        # hardly changes over a degree or two), fitted as their mean where every image has a
        # measurement.  Three times the pixels: weak fulls at 1.4 A correlated with the truth at 0.57
        # from one image against DIALS's 0.61
        stack = [boxes] + [extract_boxes(d, fast, slow, raster)[0] for d in bg_images]
        for b in stack[1:]:
            bg_valid = bg_valid & (b > nullpix)
        bg_boxes = np.mean(stack, 0)
    k_bg = 1 + len(bg_images)
    plane, coef, used, rms = fit_background_numpy(bg_boxes, bg_mask, bg_valid, gain / k_bg)
    I, sig, net, npk = summation(boxes, plane, peak_mask, valid, used, gain, k_bg)
    # centroid of the net peak, in continuous pixel coordinates
    w = np.maximum(net, 0)
    tot = np.maximum(w.sum((1, 2)), 1e-9)
    ix = np.arange(raster[0])[None, :, None] + 0.5
    iy = np.arange(raster[1])[None, None, :] + 0.5
    return {"I": I, "SIGI": sig, "coef": coef, "rms": rms, "n_peak": npk, "n_bg": used.sum((1, 2)),
            "slow_obs": cs + (w * ix).sum((1, 2)) / tot, "fast_obs": cf + (w * iy).sum((1, 2)) / tot,
            "cs": cs, "cf": cf, "on": on, "bad_peak": (peak_mask[None] & ~valid).any((1, 2)),
            "over": (np.where(peak_mask[None], boxes, 0) >= overload).any((1, 2)),
            "_boxes": boxes, "_plane": plane, "_valid": valid, "_net": net}


def profile_sums(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0,
                 strong_isig=STRONG_ISIG, strong_mask=None, grid=3, sub=SUB, mask=None, regions=None,
                 n_regions=None, bg_exclude=None, measured=None, use_cython=True):
    """Sums over one image's strong spots of their net peaks (and of their intensities, the weights),
    sampled on the fine grid per detector region: (sums, weights, spot counts).  Added over a block of images they give the
    block's standard profiles (block_profiles).  measured: these spots' measure() results, if known."""
    peak_mask, bg_mask = box_masks(raster)
    nreg = n_regions or grid * grid
    shape = fine_shape(raster, sub)
    sums = np.zeros((nreg,) + shape)
    weights = np.zeros((nreg,) + shape)
    counts = np.zeros(nreg, int)
    if len(fast) == 0:
        return sums, weights, counts
    kernel = use_cython and _int_ext is not None
    m = measured
    if m is None or (not kernel and "_boxes" not in m):
        m = measure(data, fast, slow, raster=raster, gain=gain, overload=overload, nullpix=nullpix, mask=mask,
                    bg_exclude=bg_exclude, use_cython=kernel)
    I, sig = m["I"], m["SIGI"]
    strong = m["on"] & ~m["bad_peak"] & ~m["over"] & (I > strong_isig * sig) & (I > 0)
    if strong_mask is not None:
        strong &= strong_mask
    if not strong.any():
        return sums, weights, counts
    if regions is None:
        regions = region_of(fast, slow, data.shape[1], data.shape[0], grid)
    regions = np.asarray(regions)
    counts = np.bincount(regions[strong], minlength=nreg)
    if kernel:
        _int_ext.add_profile_sums(data, np.asarray(fast, float), np.asarray(slow, float), m["coef"], I, regions,
                                  np.flatnonzero(strong), raster, peak_mask, sub, sums, weights)
        return sums, weights, counts
    regions = regions[strong]
    fast, slow = np.asarray(fast, float)[strong], np.asarray(slow, float)[strong]
    ts, tf = _fine_coords(fast, slow, raster, sub)
    # ratio of sums (net counts over intensities) rather than a mean of normalised spots: weaker spots
    # then count in proportion to their intensity, and their noisy totals do not bias the shape
    vals = m["_net"][strong]
    pm = np.broadcast_to(peak_mask[None], vals.shape)
    reg = np.broadcast_to(regions[:, None, None], vals.shape)[pm]
    tot = np.broadcast_to(I[strong][:, None, None], vals.shape)[pm]
    ts, tf, vals = ts[pm], tf[pm], vals[pm]
    s0, f0 = np.floor(ts).astype(np.int64), np.floor(tf).astype(np.int64)
    ws, wf = ts - s0, tf - f0
    flat_s, flat_w = sums.reshape(-1), weights.reshape(-1)
    for a, wa in ((0, 1 - ws), (1, ws)):
        for b, wb in ((0, 1 - wf), (1, wf)):
            idx = (reg * shape[0] + s0 + a) * shape[1] + f0 + b
            w = wa * wb
            np.add.at(flat_s, idx, w * vals)
            np.add.at(flat_w, idx, w * tot)
    return sums, weights, counts


def block_profiles(sums, weights, counts, raster, min_spots=10, prior=1.0, sub=SUB, pool=True, spread=None):
    """Standard profiles on the fine grid from profile_sums added over a block: per region its sums over
    its weights, drawn towards the average of all regions where it has few samples (`prior` is that
    average's weight, relative to the region's best-sampled point); a region with fewer than min_spots
    strong spots takes the average ("averaged" profiles).

    spread (per region, pixel^2 per radian^2: a mean square of geometry.spot_spread there) says how spots
    widen across the detector; then a region with too few strong spots of its own takes the profile of
    the region nearest in spread that has them, widened by the difference (widen_profiles)."""
    w_all, s_all = weights.sum(0), sums.sum(0)
    overall = np.where(w_all > 0, s_all / np.maximum(w_all, 1e-30), 0.0)
    if spread is not None:
        return widen_profiles(sums, weights, counts, raster, overall, spread, min_spots, prior, sub)
    prof = np.empty_like(sums)
    nreg = len(sums)
    for r in range(nreg):
        # a region with few strong spots pools its nearest regions by index (rings: the next ring in,
        # then out), whose spots are more like its own than the average of all
        s, w, c = sums[r].copy(), weights[r].copy(), int(counts[r])
        for j in sorted((j for j in range(nreg) if j != r), key=lambda j: (abs(j - r), j > r)):
            if c >= min_spots or not pool:
                break
            s, w, c = s + sums[j], w + weights[j], c + int(counts[j])
        if c >= min_spots:
            k = prior * 0.02 * w.max()
            prof[r] = (s + k * overall) / (w + k)
        else:
            prof[r] = overall
    return {"fine": np.maximum(prof, 0.0), "sub": sub, "raster": tuple(raster)}


def profile_variance(fine, raster, sub=SUB):
    """Mean of a fine-grid profile's variances along slow and fast (pixels^2)."""
    us = np.arange(fine.shape[0]) / sub - (raster[0] // 2 + 1)
    uf = np.arange(fine.shape[1]) / sub - (raster[1] // 2 + 1)
    t = fine.sum()
    if t <= 0:
        return np.nan
    ps, pf = fine.sum(1) / t, fine.sum(0) / t
    return 0.5 * (ps @ us ** 2 - (ps @ us) ** 2 + pf @ uf ** 2 - (pf @ uf) ** 2)


def widen_profiles(sums, weights, counts, raster, overall, spread, min_spots=10, prior=1.0, sub=SUB):
    """block_profiles with a model of spot width: var = a + b.spread (the point spread plus the mosaic
    spread's angle carried to the detector; b is the mosaic spread's square) fitted to the profiles of
    the regions that have min_spots strong spots; a region without them takes the profile of the one
    nearest in spread that has them, convolved with a Gaussian of variance b.(its spread - that one's).
    Spots far out are wider than any strong spot: on the sim sweep no spot beyond 1.52 A is strong
    (I/sigma > 10), and the spots there (sigma 1.4-1.7 pixels) fitted with the 1.7-2 A spots' profile
    (sigma ~1.1) came out 12-20 % low."""
    from scipy.ndimage import gaussian_filter
    nreg = len(sums)
    spread = np.asarray(spread, float)
    prof = np.zeros_like(sums)
    have = np.flatnonzero((np.asarray(counts) >= min_spots) & np.isfinite(spread))
    for r in have:
        k = prior * 0.02 * weights[r].max()
        prof[r] = np.maximum((sums[r] + k * overall) / (weights[r] + k), 0.0)
    b = 0.0
    if len(have) >= 2 and np.ptp(spread[have]) > 0:
        v = np.array([profile_variance(prof[r], raster, sub) for r in have])
        w = np.asarray(counts, float)[have]
        x = spread[have]
        xm, vm = np.average(x, weights=w), np.average(v, weights=w)
        b = max(float(np.sum(w * (x - xm) * (v - vm)) / np.sum(w * (x - xm) ** 2)), 0.0)
    for r in range(nreg):
        if r in have:
            continue
        if not len(have) or not np.isfinite(spread[r]):
            prof[r] = np.maximum(overall, 0.0)
            continue
        src = have[np.argmin(np.abs(spread[have] - spread[r]))]
        dv = b * (spread[r] - spread[src])
        prof[r] = gaussian_filter(prof[src], np.sqrt(dv) * sub, mode="constant") if dv > 0 else prof[src]
    return {"fine": np.maximum(prof, 0.0), "sub": sub, "raster": tuple(raster)}


def profiles_at(profiles, regions, fast, slow, peak_mask):
    """Each reflection's standard profile over its own box pixels (read off the fine grid at the pixels'
    offsets from its predicted centre), zero outside the peak and normalised to sum 1 over it."""
    fine, sub, raster = profiles["fine"], profiles["sub"], profiles["raster"]
    shape = fine.shape[1:]
    ts, tf = _fine_coords(fast, slow, raster, sub)
    s0 = np.clip(np.floor(ts).astype(np.int64), 0, shape[0] - 2)
    f0 = np.clip(np.floor(tf).astype(np.int64), 0, shape[1] - 2)
    ws, wf = ts - s0, tf - f0
    reg = np.asarray(regions)[:, None, None]
    flat = fine.reshape(-1)
    out = np.zeros(ts.shape)
    for a, wa in ((0, 1 - ws), (1, ws)):
        for b, wb in ((0, 1 - wf), (1, wf)):
            out += wa * wb * flat[(reg * shape[0] + s0 + a) * shape[1] + f0 + b]
    out = np.where(peak_mask[None], out, 0.0)
    tot = out.sum((1, 2))
    return out / np.where(tot > 0, tot, 1.0)[:, None, None]


MAX_DEAD_FRACTION = 0.25    # of a peak's intensity that may fall on dead pixels and be made good
MAX_DEAD_PIXELS = 0.2       # of its pixels that may be dead (more is a module gap, not a bad pixel)


def _dead_pixel_estimates(net, ok, dead):
    """Each dead pixel's net counts from the reflection's own valid ones: the pixel opposite it through
    the spot's centroid (spots are near-symmetric; a neighbour mean would miss a pixel beside the
    maximum by half), else the mean of its valid 3 x 3 neighbours.  Returns their sums per box and
    whether a box has a dead pixel in its core (within a pixel of the centroid)."""
    n, nxs, nys = net.shape
    b, i, j = np.nonzero(dead)
    v = np.pad(np.where(ok, net, 0.0), ((0, 0), (1, 1), (1, 1)))
    c = np.pad(ok.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    near = sum(v[b, i + 1 + da, j + 1 + db] for da in (-1, 0, 1) for db in (-1, 0, 1))
    est = np.maximum(near / np.maximum(sum(c[b, i + 1 + da, j + 1 + db] for da in (-1, 0, 1)
                                           for db in (-1, 0, 1)), 1.0), 0.0)
    ix, iy = np.arange(nxs)[None, :, None] + 0.5, np.arange(nys)[None, None, :] + 0.5
    for _ in range(3):      # the centroid with the estimates filled in, so a gap does not push it away
        w = np.where(ok, np.maximum(net, 0.0), 0.0)
        w[b, i, j] = est
        tot = w.sum((1, 2))
        cs = np.where(tot > 0, (w * ix).sum((1, 2)) / np.maximum(tot, 1e-9), nxs / 2)
        cf = np.where(tot > 0, (w * iy).sum((1, 2)) / np.maximum(tot, 1e-9), nys / 2)
        mi = np.floor(2 * cs[b] - (i + 0.5)).astype(np.int64)
        mj = np.floor(2 * cf[b] - (j + 0.5)).astype(np.int64)
        inside = (mi >= 0) & (mi < nxs) & (mj >= 0) & (mj < nys)
        mi, mj = np.clip(mi, 0, nxs - 1), np.clip(mj, 0, nys - 1)
        mirror = inside & ok[b, mi, mj] & ~((mi == i) & (mj == j))
        est = np.where(mirror, np.maximum(net[b, mi, mj], 0.0), est)
    # a dead pixel among the (up to 4) around the centroid is in the spot's core: nothing of the spot
    # itself can stand in for it
    at = (np.abs(i + 0.5 - cs[b]) < 1.0) & (np.abs(j + 0.5 - cf[b]) < 1.0)
    core = np.bincount(b, at, minlength=n) > 0
    return np.bincount(b, est, minlength=n), core


def _mend_dead_pixels(I, sig, bad_peak, boxes, plane, nullpix, valid, peak_mask, prof_each, on):
    """A reflection whose peak holds a few dead pixels (value <= NULLPIX; a Pilatus marks them -2) is
    measured from its other pixels rather than rejected, as a crystallographer would mask the pixel.
    The profile fit already uses only the valid pixels against a profile normalised over the whole
    peak; the summation is divided by the fraction of the intensity on the valid ones, read off the
    standard profile, or where there is none (sparse sweeps) off the reflection's own net counts
    (_dead_pixel_estimates).  At most MAX_DEAD_FRACTION of the intensity and MAX_DEAD_PIXELS of the
    peak may be missing; shadowed pixels (the mask) and boxes off the image still reject it.
    Returns the corrected (I, sig) and the reflections still to flag."""
    pk = peak_mask[None]
    dead = pk & (boxes <= nullpix)
    other = (pk & ~valid & ~dead).any((1, 2))
    few = dead.sum((1, 2)) <= MAX_DEAD_PIXELS * peak_mask.sum()
    cand = bad_peak & on & ~other & few
    lost = np.zeros(len(I))
    if cand.any():
        total = prof_each[cand].sum((1, 2))
        lost[cand] = (prof_each[cand] * dead[cand]).sum((1, 2)) / np.where(total > 0, total, 1.0)
        # the reflection's own counts only where there is no profile (each box is estimated on its own)
        own_c = np.flatnonzero(cand)[total <= 0]
        if len(own_c):
            fill, core = _dead_pixel_estimates((boxes - plane)[own_c], (pk & valid)[own_c], dead[own_c])
            own = np.maximum(I[own_c], 0.0) + fill
            lost[own_c] = np.where(core, 1.0, np.where(own > 0, fill / np.where(own > 0, own, 1.0), 0.0))
    return _mend_by(I, sig, bad_peak, cand, lost)


def _mend_by(I, sig, bad_peak, cand, lost):
    """_mend_dead_pixels' last step: candidates whose lost fraction of the intensity is at most
    MAX_DEAD_FRACTION scaled up by 1 / (1 - lost) and no longer flagged."""
    mend = cand & (lost <= MAX_DEAD_FRACTION)
    scale = np.where(mend, 1.0 / (1.0 - np.where(mend, lost, 0.0)), 1.0)
    return I * scale, sig * scale, bad_peak & ~mend


def integrate_image(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0, profiles=None,
                    regions=None, strong_isig=STRONG_ISIG, strong_mask=None, bgratio=3.0, grid=3, mask=None,
                    bg_exclude=None, bg_images=(), measured=None, use_cython=True):
    """Measure reflections at predicted (fast, slow) pixel positions on one image.

    profiles: standard profiles from block_profiles (e.g. over a block of images); None forms them
    from this image's strong reflections (strong_mask, if given, says which may contribute: fulls).
    bg_images: neighbouring images whose pixels at the same places join the background plane (then
    bg_exclude should hold their spots' peaks too).
    measured: these reflections' measure() results when already known (with the same bg_images).
    use_cython=False: numpy all through (the twin).
    Returns an SB_DTYPE array (and the profiles used as the attribute-free second value)."""
    n = len(fast)
    out = np.zeros(n, SB_DTYPE)
    if n == 0:
        return out, profiles
    kernel = use_cython and _int_ext is not None
    peak_mask, bg_mask = box_masks(raster)
    m = measured
    if m is None or (not kernel and "_boxes" not in m):
        m = measure(data, fast, slow, raster=raster, gain=gain, overload=overload, nullpix=nullpix, mask=mask,
                    bg_exclude=bg_exclude, bg_images=bg_images, use_cython=kernel)
    I, sig = m["I"], m["SIGI"]
    regions = region_of(fast, slow, data.shape[1], data.shape[0], grid) if regions is None else regions
    if profiles is None:
        s_, w_, c_ = profile_sums(data, fast, slow, raster=raster, gain=gain, overload=overload,
                                  nullpix=nullpix, strong_isig=strong_isig, strong_mask=strong_mask, grid=grid,
                                  mask=mask, bg_exclude=bg_exclude, measured=None if len(bg_images) else m,
                                  use_cython=kernel)   # profiles from the image alone, as always
        profiles = block_profiles(s_, w_, c_, raster)
    bad_peak, on = m["bad_peak"], m["on"]
    if kernel:
        f_, s_ = np.asarray(fast, float), np.asarray(slow, float)
        o = m.get("_row_order")                    # the image's row order, as measure
        if o is None or len(o) != n:
            o = row_order(s_)
        Ipr, sigpr, lost = _int_ext.fit_profiles(data, f_, s_, m["coef"], I, np.asarray(regions),
                                                 profiles["fine"], profiles["sub"], raster, peak_mask, mask,
                                                 float(gain), float(overload), float(nullpix), order=o, dead=True)
        # the few reflections _mend_dead_pixels may mend (on the image, a few dead peak pixels and no
        # shadowed ones): those with a profile by the share of it the fit found on their dead pixels,
        # those without through it, boxes and all (numpy's calls for ~20 boxes an image cost 0.5-1 ms);
        # it leaves every other one as it is
        ds = m.get("n_dead_shadowed")
        if ds is None:
            idx = np.flatnonzero(bad_peak & on)
            f_, s_ = np.asarray(fast, float)[idx], np.asarray(slow, float)[idx]
            boxes = extract_boxes(data, f_, s_, raster)[0]
            dead = peak_mask[None] & (boxes <= nullpix)
            ds = np.zeros((n, 2), int)
            ds[idx, 0] = dead.sum((1, 2))
            ds[idx, 1] = (peak_mask[None] & ~_valid(boxes, nullpix, mask, f_, s_, raster) & ~dead).sum((1, 2))
        idx = np.flatnonzero(bad_peak & on & (ds[:, 1] == 0) & (ds[:, 0] <= MAX_DEAD_PIXELS * peak_mask.sum()))
        if len(idx):
            I, sig, bad_peak = I.copy(), sig.copy(), bad_peak.copy()
            w = idx[np.isfinite(lost[idx])]
            I[w], sig[w], bad_peak[w] = _mend_by(I[w], sig[w], bad_peak[w], np.ones(len(w), bool), lost[w])
            idx = idx[~np.isfinite(lost[idx])]
        if len(idx):
            f_, s_ = np.asarray(fast, float)[idx], np.asarray(slow, float)[idx]
            boxes = extract_boxes(data, f_, s_, raster)[0]
            valid = _valid(boxes, nullpix, mask, f_, s_, raster)
            I[idx], sig[idx], bad_peak[idx] = _mend_dead_pixels(
                I[idx], sig[idx], bad_peak[idx], boxes, _plane_of(m["coef"][idx], raster), nullpix, valid,
                peak_mask, profiles_at(profiles, np.asarray(regions)[idx], f_, s_, peak_mask), on[idx])
    else:
        prof_each = profiles_at(profiles, regions, fast, slow, peak_mask)
        Ipr, sigpr = fit_profiles(m["_boxes"], m["_plane"], prof_each, peak_mask, m["_valid"], I, gain,
                                  overload=overload)
        I, sig, bad_peak = _mend_dead_pixels(I, sig, bad_peak, m["_boxes"], m["_plane"], nullpix, m["_valid"],
                                             peak_mask, prof_each, on)
    coef, rms = m["coef"], m["rms"]
    out["slow_obs"], out["fast_obs"] = m["slow_obs"], m["fast_obs"]
    out["I"], out["SIGI"], out["IPR"], out["SIGIPR"] = I, sig, Ipr, sigpr
    out["bg"] = coef[:, 0]
    out["bgratio"] = rms
    out["gradient"] = np.hypot(coef[:, 1], coef[:, 2]) / np.maximum(coef[:, 0], 1.0)
    out["n_peak"] = m["n_peak"]
    out["n_bg"] = m["n_bg"]
    flag = np.zeros(n, np.int32)
    flag |= np.where(~on | bad_peak | (out["n_bg"] < 6), F_EDGE, 0).astype(np.int32)
    flag |= np.where(m["over"], F_OVERLOAD, 0).astype(np.int32)
    flag |= np.where(rms > bgratio, F_BGRATIO, 0).astype(np.int32)
    flag |= np.where(out["gradient"] > 0.5, F_GRADIENT, 0).astype(np.int32)
    flag |= np.where(I < -5 * sig, F_NEGATIVE, 0).astype(np.int32)
    out["flag"] = flag
    return out, profiles
