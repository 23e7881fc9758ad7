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
8 background gradient, 16 overload, 32 edge (box off the image or invalid pixels in the peak).
"""
from __future__ import annotations

import numpy as np

SB_DTYPE = np.dtype([("I", "f8"), ("SIGI", "f8"), ("IPR", "f8"), ("SIGIPR", "f8"), ("bg", "f8"),
                     ("fast_obs", "f8"), ("slow_obs", "f8"), ("flag", "i4"), ("bgratio", "f8"),
                     ("pkratio", "f8"), ("gradient", "f8"), ("n_peak", "i4"), ("n_bg", "i4")])

F_BGRATIO, F_NEGATIVE, F_GRADIENT, F_OVERLOAD, F_EDGE = 1, 4, 8, 16, 32


def shift_boxes(boxes, ds, df):
    """Boxes (n, nxs, nys) moved by sub-pixel amounts (ds along slow, df along fast; |d| <= 1) with
    bilinear interpolation: content at x goes to x + d."""
    out = boxes
    for axis, d in ((1, ds), (2, df)):
        d = np.asarray(d, float)
        w = np.abs(d)[:, None, None]
        fwd = np.roll(out, 1, axis=axis)      # content moved by +1
        bwd = np.roll(out, -1, axis=axis)     # content moved by -1
        if axis == 1:
            fwd[:, 0, :] = out[:, 0, :]
            bwd[:, -1, :] = out[:, -1, :]
        else:
            fwd[:, :, 0] = out[:, :, 0]
            bwd[:, :, -1] = out[:, :, -1]
        moved = np.where((d > 0)[:, None, None], fwd, bwd)
        out = (1 - w) * out + w * moved
    return out


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
    """Boolean (peak, background) masks of shape (nxs, nys) = (slow, fast) for a RASTER."""
    nxs, nys, nc, nrx, nry = raster
    ix = np.arange(nxs)[:, None]
    iy = np.arange(nys)[None, :]
    dx = np.minimum(ix, nxs - 1 - ix)
    dy = np.minimum(iy, nys - 1 - iy)
    inside = (dx + dy) >= nc
    peak = (dx >= nrx) & (dy >= nry)
    return peak & inside, (~peak) & inside


def extract_boxes(data, fast, slow, raster):
    """Pixel boxes (n, nxs, nys) around predicted positions, the box origin pixels, and a mask of
    boxes lying wholly on the image."""
    nxs, nys = raster[0], raster[1]
    ns, nf = data.shape
    cs = np.floor(np.asarray(slow, float)).astype(np.int64) - nxs // 2
    cf = np.floor(np.asarray(fast, float)).astype(np.int64) - nys // 2
    on = (cs >= 0) & (cf >= 0) & (cs + nxs <= ns) & (cf + nys <= nf)
    ss = np.clip(cs[:, None, None] + np.arange(nxs)[None, :, None], 0, ns - 1)
    ff = np.clip(cf[:, None, None] + np.arange(nys)[None, None, :], 0, nf - 1)
    return data[ss, ff].astype(np.float64), cs, cf, on


def fit_background(boxes, bg_mask, valid, gain=1.0, n_iter=3, cutoff=3.0):
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
        new = bg_mask[None] & valid & (np.abs(resid) <= cutoff)
        if np.array_equal(new, use):
            break
        use = new
    w = use.astype(np.float64)
    nbg = np.maximum(w.sum((1, 2)), 1)
    rms = np.sqrt((w * resid ** 2).sum((1, 2)) / nbg)
    return plane, coef, use, rms


def summation(boxes, plane, peak_mask, valid, bg_used, gain=1.0):
    """Summation intensity and sigma; background-subtracted peak pixels."""
    pk = peak_mask[None] & valid
    net = np.where(pk, boxes - plane, 0.0)
    I = net.sum((1, 2))
    npk = pk.sum((1, 2))
    nbg = np.maximum(bg_used.sum((1, 2)), 1)
    bg_mean = np.where(pk, plane, 0).sum((1, 2)) / np.maximum(npk, 1)
    var = gain * np.maximum(np.where(pk, boxes, 0).sum((1, 2)), 0) + npk ** 2 * gain * \
        np.maximum(bg_mean, 0.5) / nbg
    return I, np.sqrt(np.maximum(var, 1e-12)), net, npk


def region_of(fast, slow, n_fast, n_slow, grid=3):
    """Detector region index (grid x grid) of each reflection."""
    gf = np.clip((np.asarray(fast) / n_fast * grid).astype(int), 0, grid - 1)
    gs = np.clip((np.asarray(slow) / n_slow * grid).astype(int), 0, grid - 1)
    return gs * grid + gf


def build_profiles(nets, regions, strong, peak_mask, grid=3, min_spots=10):
    """Standard profiles (grid*grid, nxs, nys), each normalised to sum 1 over the peak, from strong
    reflections' background-subtracted peaks; regions with fewer than min_spots take the overall
    average profile ("averaged" profiles).  Returns (profiles, counts per region)."""
    nreg = grid * grid
    shape = peak_mask.shape
    prof = np.zeros((nreg,) + shape)
    counts = np.zeros(nreg, int)
    if strong.any():
        s = nets[strong]
        tot = s.sum((1, 2))
        good = tot > 0
        s = s[good] / tot[good, None, None]
        reg = np.asarray(regions)[strong][good]
        np.add.at(prof, reg, s)
        counts = np.bincount(reg, minlength=nreg)
    overall = prof.sum(0)
    if overall.sum() <= 0:
        overall = peak_mask.astype(float)
    overall = np.where(peak_mask, np.maximum(overall, 0), 0)
    overall /= overall.sum()
    for r in range(nreg):
        if counts[r] >= min_spots:
            p = np.where(peak_mask, np.maximum(prof[r], 0), 0)
            prof[r] = p / p.sum()
        else:
            prof[r] = overall
    return prof, counts


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


def profile_sums(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0, strong_isig=10.0,
                 strong_mask=None, grid=3):
    """Sums of normalised strong-reflection peaks per detector region, and their counts, on one image:
    added over a block of images they give the block's standard profiles (block_profiles)."""
    peak_mask, bg_mask = box_masks(raster)
    nreg = grid * grid
    sums = np.zeros((nreg,) + peak_mask.shape)
    counts = np.zeros(nreg, int)
    if len(fast) == 0:
        return sums, counts
    boxes, cs, cf, on = extract_boxes(data, fast, slow, raster)
    valid = boxes > nullpix
    plane, coef, used, rms = fit_background(boxes, bg_mask, valid, gain)
    I, sig, net, npk = summation(boxes, plane, peak_mask, valid, used, gain)
    bad_peak = (peak_mask[None] & ~valid).any((1, 2))
    over = (np.where(peak_mask[None], boxes, 0) >= overload).any((1, 2))
    strong = on & ~bad_peak & ~over & (I > strong_isig * sig)
    if strong_mask is not None:
        strong &= strong_mask
    regions = region_of(fast, slow, data.shape[1], data.shape[0], grid)
    if strong.any():
        ds, df = subpixel_offsets(fast, slow)
        s = shift_boxes(net[strong], -ds[strong], -df[strong])     # every spot centred on its box
        tot = s.sum((1, 2))
        good = tot > 0
        np.add.at(sums, regions[strong][good], s[good] / tot[good, None, None])
        counts = np.bincount(regions[strong][good], minlength=nreg)
    return sums, counts


def block_profiles(sums, counts, raster, min_spots=10):
    """Standard profiles from summed normalised peaks (profile_sums over a block)."""
    peak_mask, _ = box_masks(raster)
    overall = np.where(peak_mask, np.maximum(sums.sum(0), 0), 0)
    overall = overall / overall.sum() if overall.sum() > 0 else peak_mask / peak_mask.sum()
    prof = np.empty_like(sums)
    for r in range(len(sums)):
        p = np.where(peak_mask, np.maximum(sums[r], 0), 0)
        prof[r] = p / p.sum() if counts[r] >= min_spots and p.sum() > 0 else overall
    return prof


def integrate_image(data, fast, slow, *, raster, gain=1.0, overload=1e9, nullpix=-1.0, profiles=None,
                    regions=None, strong_isig=10.0, strong_mask=None, bgratio=3.0, grid=3):
    """Measure reflections at predicted (fast, slow) pixel positions on one image.

    profiles: standard profiles from build_profiles (e.g. over a block of images); None forms them
    from this image's strong reflections (strong_mask, if given, says which may contribute: fulls).
    Returns an SB_DTYPE array (and the profiles used as the attribute-free second value)."""
    n = len(fast)
    out = np.zeros(n, SB_DTYPE)
    if n == 0:
        return out, profiles
    peak_mask, bg_mask = box_masks(raster)
    boxes, cs, cf, on = extract_boxes(data, fast, slow, raster)
    valid = boxes > nullpix
    plane, coef, used, rms = fit_background(boxes, bg_mask, valid, gain)
    I, sig, net, npk = summation(boxes, plane, peak_mask, valid, used, gain)
    regions = region_of(fast, slow, data.shape[1], data.shape[0], grid) if regions is None else regions
    bad_peak = (peak_mask[None] & ~valid).any((1, 2))
    over = (np.where(peak_mask[None], boxes, 0) >= overload).any((1, 2))
    if profiles is None:
        strong = on & ~bad_peak & ~over & (I > strong_isig * sig)
        if strong_mask is not None:
            strong &= strong_mask
        profiles, _ = build_profiles(net, regions, strong, peak_mask, grid)
    ds, df = subpixel_offsets(fast, slow)
    prof_each = shift_boxes(profiles[regions], ds, df)               # each profile moved onto its spot
    Ipr, sigpr = fit_profiles(boxes, plane, prof_each, peak_mask, valid, I, gain, overload=overload)
    # centroid of the net peak, in continuous pixel coordinates
    w = np.maximum(net, 0)
    tot = np.maximum(w.sum((1, 2)), 1e-9)
    ix = np.arange(raster[0])[None, :, None] + 0.5
    iy = np.arange(raster[1])[None, None, :] + 0.5
    out["slow_obs"] = cs + (w * ix).sum((1, 2)) / tot
    out["fast_obs"] = cf + (w * iy).sum((1, 2)) / tot
    out["I"], out["SIGI"], out["IPR"], out["SIGIPR"] = I, sig, Ipr, sigpr
    out["bg"] = coef[:, 0]
    out["bgratio"] = rms
    out["gradient"] = np.hypot(coef[:, 1], coef[:, 2]) / np.maximum(coef[:, 0], 1.0)
    out["n_peak"] = npk
    out["n_bg"] = used.sum((1, 2))
    flag = np.zeros(n, np.int32)
    flag |= np.where(~on | bad_peak | (out["n_bg"] < 6), F_EDGE, 0).astype(np.int32)
    flag |= np.where(over, F_OVERLOAD, 0).astype(np.int32)
    flag |= np.where(rms > bgratio, F_BGRATIO, 0).astype(np.int32)
    flag |= np.where(out["gradient"] > 0.5, F_GRADIENT, 0).astype(np.int32)
    flag |= np.where(I < -5 * sig, F_NEGATIVE, 0).astype(np.int32)
    out["flag"] = flag
    return out, profiles
