"""FINDSPOTS: spots on an image (algorithms.md 1a).

A pixel is a spot pixel when, over a 7 x 7 window of valid pixels around it, the index of dispersion
var/mean exceeds 1 + k_d.sqrt(2/(n-1)) (the window is not pure Poisson background) and the pixel
exceeds mean + k_s.sqrt(gain.mean) (DIALS's "dispersion" test, Parkhurst et al. 2016; a photon-counting
background has var = mean).  Spot pixels are joined by 8-connectivity (scipy.ndimage.label); spots of
fewer than MINPIX pixels, or larger than MAXSIZE times the median, are rejected.  Per spot: background
(the window mean outside spot pixels), background-subtracted intensity, sigma, intensity-weighted
centroid, size.  Spots inside the backstop, outside RMIN..RMAX or the LIMITS, on ice rings, or closer to
each other than SEPARATION are flagged (kept in the list with a non-zero flag).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import geometry
from .spots import SPOT_DTYPE

# flag bits of rejected spots
TOO_SMALL, TOO_BIG, OUTSIDE, BACKSTOP, ICE, TOO_CLOSE, OVERLOADED = 1, 2, 4, 8, 16, 32, 64

ICE_RINGS_D = (3.897, 3.669, 3.441, 2.671, 2.249, 2.072, 1.948, 1.918, 1.883, 1.721)


def dispersion_mask(data, valid, gain=1.0, kernel=7, sigma_b=6.0, sigma_s=3.0, min_count=2):
    """Spot-pixel mask by the dispersion test, and the local background mean.

    The window sums are taken over the whole image; the tests only where a pixel could pass them
    (valid, at least min_count counts, a mostly valid window), which on a Pilatus 6M is a small part."""
    d = np.where(valid, data, 0).astype(np.float64)
    size = (kernel, kernel)
    k2 = kernel * kernel
    # (in place where the arrays are the image's size: each pass over a 6M image is ~10 ms)
    n = ndimage.uniform_filter(valid.astype(np.float64), size, mode="constant")
    n *= k2
    s1 = ndimage.uniform_filter(d, size, mode="constant")
    s1 *= k2
    bgmean = np.maximum(n, 1)
    np.divide(s1, bgmean, out=bgmean)
    bgmean[n <= 1] = 0.0
    # the pixel test first (cheap, on the whole image), the window's dispersion where it passes
    cand = bgmean * gain if gain != 1.0 else bgmean.copy()
    np.maximum(cand, 1e-9, out=cand)
    np.sqrt(cand, out=cand)
    cand *= sigma_s
    cand += bgmean
    test = d > cand
    test &= valid
    test &= d >= min_count
    test &= n >= k2 // 2
    test &= bgmean > 0
    del cand
    ii = np.flatnonzero(test)
    sq = np.square(d, out=d)         # d is not needed after the test
    s2 = ndimage.uniform_filter(sq, size, mode="constant")
    s2 *= k2
    nn, a, b, mean = n.flat[ii], s1.flat[ii], s2.flat[ii], bgmean.flat[ii]
    var = (b - a * a / nn) / (nn - 1)
    bound = 1.0 + sigma_b * np.sqrt(2.0 / (nn - 1))
    strong = np.zeros(valid.shape, bool)
    strong.flat[ii[var > bound * mean * gain]] = True
    return strong, bgmean


def _spot_pixels(data, valid, over, gain, kernel, sigma_b):
    """The spot-pixel mask (dispersion test, overloads, one-pixel holes closed) and background mean."""
    strong, bgmean = dispersion_mask(data, valid & ~over, gain, kernel, sigma_b)
    strong |= over & valid
    # close one-pixel holes so a spot is not split by a noisy pixel
    closed = close_2x2(strong)
    closed &= valid
    return closed, bgmean


def close_2x2(x):
    """scipy.ndimage.binary_closing(x, structure=np.ones((2, 2))) by shifted ORs and ANDs (its
    dilation takes a pixel and its neighbours below and to the right, the erosion those above and to
    the left, outside the image counting as empty): the same mask, a tenth of the time."""
    d = x.copy()
    d[:-1, :] |= x[1:, :]
    d[:, :-1] |= d[:, 1:].copy()
    e = d.copy()
    e[1:, :] &= d[:-1, :]
    e[0, :] = False
    out = e.copy()
    out[:, 1:] &= e[:, :-1]
    out[:, 0] = False
    return out


# Rows per band of the pixel search: each of its float arrays (8 bytes a pixel) then stays under glibc's
# largest mmap threshold (32 MB) and is reused from the heap, not mapped and faulted in afresh for every
# image (a Pilatus 6M image's search: 0.45-0.9 s whole, 0.33 s in four bands).  The bands' results are
# the whole image's to the bit: the window sums run along the columns first, on integer counts.
BAND_PIXELS = 1 << 21


def _rows_pixels(data, valid, over, r0, r1, gain, kernel, sigma_b):
    """Rows r0..r1 of the spot-pixel mask, from the image's rows around them, band by band: (mask
    rows, flat indices of their spot pixels counted from row r0, the background mean there)."""
    ny, nx = data.shape
    h = kernel // 2 + 4              # the window, and the 2 x 2 closing's reach (2 rows) with a row spare
    step = max(8 * kernel, BAND_PIXELS // max(nx, 1))
    masks, idxs, vals = [], [], []
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        lo, hi = max(0, a - h), min(ny, b + h)
        strong, bg = _spot_pixels(data[lo:hi], valid[lo:hi], over[lo:hi], gain, kernel, sigma_b)
        band = strong[a - lo:b - lo]
        idx = np.flatnonzero(band)
        masks.append(band)
        idxs.append(idx + (a - r0) * nx)
        vals.append(bg[a - lo:b - lo].ravel()[idx])
    return np.concatenate(masks), np.concatenate(idxs), np.concatenate(vals)


def _assemble(shape, parts):
    """The whole image's mask and background mean from [(first row, _rows_pixels result)]."""
    strong = np.concatenate([p[1][0] for p in parts])
    bgmean = np.zeros(shape)              # only the spot pixels' values are used (pages untouched stay free)
    for r0, (_, idx, vals) in parts:
        bgmean.ravel()[r0 * shape[1] + idx] = vals
    return strong, bgmean


def find_spots(data, detector, *, image=0, phi=0.0, threshold=3.0, min_pix=None, max_size_ratio=10.0,
               rmin=None, rmax=None, wavelength=None, ice_rings=False, separation=None, sigma_b=6.0,
               kernel=7, mask=None, pixels=None, row0=0):
    """Spots on one image -> spot list (pyflm.spots.SPOT_DTYPE), brightest first.

    threshold is the I/sigma a spot must reach to be kept (FINDSPOTS THRESHOLD); min_pix defaults to
    MOSFLM's 6, or 3 for small pixels that see small spots.  pixels: (spot-pixel mask, background
    mean) when already found (find_spots_split); with row0, data (and pixels) are the image's rows
    from row0 on (find_spots_in_rows), the positions the image's."""
    data = np.asarray(data)
    valid = data > detector.nullpix
    if mask is not None:
        valid &= ~mask
    over = data >= detector.overload
    if pixels is None and data.ndim == 2 and data.size > BAND_PIXELS:
        strong, bgmean = _assemble(data.shape, [(0, _rows_pixels(data, valid, over, 0, data.shape[0],
                                                                 detector.gain, kernel, sigma_b))])
    elif pixels is None:
        strong, bgmean = _spot_pixels(data, valid, over, detector.gain, kernel, sigma_b)
    else:                      # found by find_spots_split's workers, band by band
        strong, bgmean = pixels
    labels, n = ndimage.label(strong, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(0, SPOT_DTYPE)
    # sums over the spot pixels only (a few per cent of the image), by label
    ss, ff = np.nonzero(labels)
    lab = labels[ss, ff] - 1
    bg = bgmean[ss, ff]
    net = data[ss, ff].astype(np.float64) - bg
    npix = np.bincount(lab, minlength=n).astype(float)
    inten = np.bincount(lab, net, n)
    bgsum = np.bincount(lab, bg, n)
    var = detector.gain * (inten + 2 * bgsum)
    sig = np.sqrt(np.maximum(var, 1e-9))
    w = np.maximum(net, 0)
    wsum = np.maximum(np.bincount(lab, w, n), 1e-9)
    cs = np.bincount(lab, w * (ss + (0.5 + row0)), n) / wsum
    cf = np.bincount(lab, w * (ff + 0.5), n) / wsum
    objs = ndimage.find_objects(labels)
    size_s = np.array([o[0].stop - o[0].start for o in objs], float)
    size_f = np.array([o[1].stop - o[1].start for o in objs], float)
    n_over = np.bincount(lab, over[ss, ff].astype(float), n)
    spots = np.zeros(n, SPOT_DTYPE)
    spots["image"] = image
    spots["phi"] = phi
    spots["fast"], spots["slow"] = cf, cs
    spots["x_mm"], spots["y_mm"] = detector.pixel_to_mm(cf, cs)
    spots["intensity"], spots["sigma"] = inten, sig
    spots["npix"] = npix
    spots["size_fast"], spots["size_slow"] = size_f, size_s
    flag = np.zeros(n, np.int32)
    if min_pix is None:
        min_pix = 3 if detector.pixel_fast >= 0.1 else 4
    flag[npix < min_pix] |= TOO_SMALL
    flag[inten < threshold * sig] |= TOO_SMALL
    ok = flag == 0
    if ok.any():
        med = np.median(npix[ok])
        flag[npix > max_size_ratio * max(med, 1) * 4] |= TOO_BIG
    flag[n_over > 0] |= OVERLOADED
    r = np.hypot(spots["x_mm"] - detector.beam_x, spots["y_mm"] - detector.beam_y)
    if rmin is not None:
        flag[r < rmin] |= OUTSIDE
    if rmax is not None:
        flag[r > rmax] |= OUTSIDE
    if detector.backstop:
        bx, by, br = detector.backstop
        flag[np.hypot(spots["x_mm"] - bx, spots["y_mm"] - by) < br] |= BACKSTOP
    lim = detector.limits or {}
    for key, coord, cmp in (("XMIN", "x_mm", np.less), ("XMAX", "x_mm", np.greater),
                            ("YMIN", "y_mm", np.less), ("YMAX", "y_mm", np.greater)):
        if key in lim and lim[key] is not True:
            flag[cmp(spots[coord], float(lim[key]))] |= OUTSIDE
    if ice_rings and wavelength:
        dsp = geometry.resolution_of(spots["x_mm"], spots["y_mm"], detector.frame(), wavelength)
        for dr in ICE_RINGS_D:
            flag[np.abs(1 / dsp - 1 / dr) < 0.01] |= ICE
    if separation is not None and n > 1:
        from scipy.spatial import cKDTree
        good = np.flatnonzero(flag == 0)
        if len(good) > 1:
            pts = np.stack([spots["x_mm"][good] / separation[0], spots["y_mm"][good] / separation[1]], 1)
            pairs = cKDTree(pts).query_pairs(1.0, p=np.inf, output_type="ndarray")
            if len(pairs):
                flag[good[pairs.ravel()]] |= TOO_CLOSE
    spots["flag"] = flag
    order = np.argsort(-spots["intensity"] / np.maximum(spots["sigma"], 1e-9))
    return spots[order]


def find_spots_in_rows(data, detector, r0, r1, *, kernel=7, sigma_b=6.0, mask=None, **kwargs):
    """find_spots of the spots lying wholly in rows r0..r1 of the image, each as the whole image's search
    finds it (its pixels, sums, position and TOO_SMALL flag: the band's mask rows are the image's, see
    _rows_pixels); a spot touching the band's first or last row may go on beyond it and is left out
    (unless that row is the image's edge).  The flags that weigh spots against each other (TOO_BIG,
    TOO_CLOSE) are the band's.  For questions a part of the image answers, at a part of the cost."""
    data = np.asarray(data)
    ny = data.shape[0]
    band, idx, vals = _slab_pixels(data, detector, r0, r1, kernel, sigma_b, mask)
    labels, _ = ndimage.label(band, structure=np.ones((3, 3)))
    edge = [labels[0]] if r0 > 0 else []
    if r1 < ny:
        edge.append(labels[-1])
    cut = np.unique(np.concatenate(edge)) if edge else np.zeros(0, labels.dtype)
    cut = cut[cut > 0]
    if len(cut):
        band &= ~np.isin(labels, cut)
    bgmean = np.zeros(band.shape)          # (only the spot pixels' values are read)
    bgmean.ravel()[idx] = vals
    return find_spots(data[r0:r1], detector, kernel=kernel, sigma_b=sigma_b, pixels=(band, bgmean), row0=r0,
                      **kwargs)


def find_spots_in_file(path, detector, kwargs):
    """find_spots on the image at `path` (decoded here: worker processes are given paths, not arrays).
    None when the image cannot be read; the caller reads it again to report why."""
    from .images import read_pixels
    try:
        data = read_pixels(path)
    except Exception:            # pyflm's errors do not survive the trip back from a worker
        return None
    return find_spots(data, detector, **kwargs)


def _band_pixels(read, detector, r0, r1, kernel, sigma_b):
    """Rows r0..r1 of find_spots' spot-pixel mask for the image read() gives (a worker's share of
    find_spots_split): _rows_pixels of the rows with a margin; None when the image cannot be read."""
    try:
        data = read()
    except Exception:                # said by the caller, which reads the image itself
        return None
    return _slab_pixels(data, detector, r0, r1, kernel, sigma_b)


def _slab_pixels(data, detector, r0, r1, kernel, sigma_b, mask=None):
    """_rows_pixels of rows r0..r1, from those rows and its margin only (valid and overloaded pixels
    found there, not over the whole image)."""
    h = kernel // 2 + 4                    # _rows_pixels' margin
    lo, hi = max(0, r0 - h), min(data.shape[0], r1 + h)
    sub = data[lo:hi]
    valid = sub > detector.nullpix
    if mask is not None:
        valid &= ~mask[lo:hi]
    return _rows_pixels(sub, valid, sub >= detector.overload, r0 - lo, r1 - lo, detector.gain, kernel, sigma_b)


def find_spots_split(read, detector, nproc, scheduler=None, *, kernel=7, sigma_b=6.0, **kwargs):
    """find_spots on one image with its spot-pixel search (most of the time) shared out in bands of
    rows to nproc worker processes, each decoding the image itself from read() (a picklable callable:
    a path's reader, not an array); the same spots as find_spots.  The rest is done here."""
    from .distributed import run_tasks
    ny, nx = detector.n_slow, detector.n_fast
    if kwargs.get("mask") is not None or ny < 8 * kernel * nproc:
        return find_spots(read(), detector, kernel=kernel, sigma_b=sigma_b, **kwargs)
    edges = np.linspace(0, ny, nproc + 1).round().astype(int)
    # this process decodes the image too (for the spots' sums) while the workers search their bands
    bands, data = run_tasks(_band_pixels, [(read, detector, int(edges[i]), int(edges[i + 1]), kernel,
                                            sigma_b) for i in range(nproc)], nproc, scheduler, meanwhile=read)
    if data.shape != (ny, nx) or any(bd is None for bd in bands):     # not the header's size, or unread
        return find_spots(data, detector, kernel=kernel, sigma_b=sigma_b, **kwargs)
    return find_spots(data, detector, kernel=kernel, sigma_b=sigma_b,
                      pixels=_assemble(data.shape, list(zip(edges, bands))), **kwargs)


def find_spots_in_files(tasks, nproc=1, scheduler=None, meanwhile=None):
    """Spot lists of several images, [(path, detector, find_spots keywords)] -> [spots or None], in
    order: on worker processes when nproc > 1 (or on a Dask cluster), each the same as found here.
    With `meanwhile` (a callable run here while the workers search): (lists, its result)."""
    from .distributed import run_tasks
    return run_tasks(find_spots_in_file, tasks, nproc, scheduler, meanwhile=meanwhile)


def chain_groups(lists, linked):
    """Spots of consecutive images joined into chains: `lists` holds one spot array per image, in
    image order; linked(a, b) gives the (ia, ib) pairs of a spot on one image continuing on the next.
    Returns the concatenated spots and each one's chain number (0..n-1)."""
    allsp = np.concatenate(lists)
    starts = np.cumsum([0] + [len(s) for s in lists])
    parent = np.arange(len(allsp))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for k in range(len(lists) - 1):
        a, b = lists[k], lists[k + 1]
        if not len(a) or not len(b):
            continue
        for ia, ib in linked(a, b):
            ra, rb = root(starts[k] + ia), root(starts[k + 1] + ib)
            if ra != rb:
                parent[rb] = ra
    roots = np.array([root(i) for i in range(len(allsp))])
    return allsp, np.unique(roots, return_inverse=True)[1]


def chain_sums(allsp, group, dtype):
    """Per chain (chain_groups): centroid in fast, slow, x_mm, y_mm and phi weighted by intensity,
    intensity and variance added.  Returns the new array (dtype) and the weights used."""
    n = group.max() + 1
    w = np.maximum(allsp["intensity"], 1e-9)
    sumw = np.bincount(group, w, n)
    out = np.zeros(n, dtype)
    for col in ("fast", "slow", "x_mm", "y_mm", "phi"):
        out[col] = np.bincount(group, w * allsp[col], n) / sumw
    out["intensity"] = np.bincount(group, allsp["intensity"], n)
    out["sigma"] = np.sqrt(np.bincount(group, allsp["sigma"] ** 2, n))
    return out, w, sumw


def merge_3d(per_image, osc, *, radius=2.5, threshold=3.0, min_pix=3, max_images=None):
    """Spots found on consecutive thin images joined into 3D spots (algorithms.md 1a, merging).

    per_image: spot lists (SPOT_DTYPE, found with threshold 0 and min_pix 1 so that the weak tails of a
    reflection are kept), one per image, in image order, phi = the image's midpoint.  A spot on image
    n+1 continues the one on image n whose centroid lies within `radius` pixels (a reflection moves
    less than that in 0.1 degrees); chains are summed: intensity and variance added, the centroid in
    fast, slow and phi weighted by intensity, npix added, `image` the image of the brightest part.  A
    merged spot is kept (flag 0) when its summed I/sigma reaches `threshold` and it has `min_pix`
    pixels, so a reflection too weak on any one image is still found in 3D.
    """
    from scipy.spatial import cKDTree
    lists = [s[(s["flag"] & ~(TOO_SMALL | TOO_CLOSE)) == 0] for s in per_image]
    lists = [s[s["intensity"] > 0] for s in lists]
    if not lists or sum(len(s) for s in lists) == 0:
        return np.zeros(0, SPOT_DTYPE)

    def linked(a, b):
        # continued when the centroids are within `radius`, or the spots' boxes touch (a large spot
        # moving across the detector: its pixels overlap from image to image, as 3D labelling joins)
        reach = radius + 0.5 * (max(a["size_fast"].max(), a["size_slow"].max()) +
                                max(b["size_fast"].max(), b["size_slow"].max()))
        pairs = cKDTree(np.stack([a["fast"], a["slow"]], 1)).query_ball_point(
            np.stack([b["fast"], b["slow"]], 1), reach)
        for ib, near in enumerate(pairs):
            for ia in near:
                df, ds = abs(a["fast"][ia] - b["fast"][ib]), abs(a["slow"][ia] - b["slow"][ib])
                touch = (df <= 0.5 * (a["size_fast"][ia] + b["size_fast"][ib]) + 1.0 and
                         ds <= 0.5 * (a["size_slow"][ia] + b["size_slow"][ib]) + 1.0)
                if np.hypot(df, ds) <= radius or touch:
                    yield ia, ib
    allsp, group = chain_groups(lists, linked)
    out, _, _ = chain_sums(allsp, group, SPOT_DTYPE)
    n = len(out)
    out["npix"] = np.bincount(group, allsp["npix"], n).astype(np.int32)
    brightest = np.zeros(n, int)
    order = np.argsort(allsp["intensity"])            # later (brighter) rows win the assignment
    brightest[group[order]] = order
    out["image"] = allsp["image"][brightest]
    out["size_fast"] = np.maximum.reduceat(allsp["size_fast"][np.argsort(group)],
                                           np.searchsorted(np.sort(group), np.arange(n)))
    out["size_slow"] = np.maximum.reduceat(allsp["size_slow"][np.argsort(group)],
                                           np.searchsorted(np.sort(group), np.arange(n)))
    n_img = np.bincount(group, minlength=n)
    # a reflection seen on the first or last image may go on beyond it: its phi centroid is pulled
    # inwards (by up to half its width), so it says nothing sure about where it is centred in phi
    ends = [i for i, s in enumerate(lists) if len(s)]
    first_img, last_img = lists[ends[0]]["image"][0], lists[ends[-1]]["image"][0]
    edge = (allsp["image"] == first_img) | (allsp["image"] == last_img)
    out["phi_cut"] = np.bincount(group, edge, n) > 0
    flag = np.zeros(n, np.int32)
    flag[(out["npix"] < min_pix) | (out["intensity"] < threshold * out["sigma"])] |= TOO_SMALL
    if max_images is not None:
        flag[n_img > max_images] |= TOO_BIG
    out["flag"] = flag
    order = np.argsort(-out["intensity"] / np.maximum(out["sigma"], 1e-9))
    return out[order]


def spot_statistics(spots, detector, wavelength):
    """Counts and resolution figures MOSFLM prints after a spot search."""
    ok = spots[spots["flag"] == 0]
    out = {"found": len(spots), "ok": len(ok),
           "too_close": int(np.sum(spots["flag"] & TOO_CLOSE != 0)),
           "rejected": int(np.sum(spots["flag"] != 0))}
    if len(ok):
        d = geometry.resolution_of(ok["x_mm"], ok["y_mm"], detector.frame(), wavelength)
        out["highest_resolution"] = float(np.min(d))
        out["res99"] = float(np.quantile(d, 0.01))
        out["median_size"] = (float(np.median(ok["size_slow"])), float(np.median(ok["size_fast"])))
    return out


def run_findspots(job, args):
    """FINDSPOTS [FIND n] [THRESHOLD r] [RMIN r] [RMAX r] [MINPIX i] ...: search the current image."""
    from .images import current_path, read_pixels
    from .shoebox import choose_raster
    image = int(args.get("FIND", args.get("IMAGE", job.image or 0)) or 0) or None
    beam, det, gonio, scan = job.experiment(image)
    image = image or scan.first
    data = read_pixels(current_path(job, image))
    a, b = scan.phi_range(image)
    spots_kw = dict(job.kw.get("SPOTS") or {})
    spots_kw.update(args)
    sep = (job.kw.get("SEPARATION") or {}).get("_args")
    spots = find_spots(data, det, image=image, phi=0.5 * (a + b),
                       threshold=float(spots_kw.get("THRESHOLD", 3.0)),
                       min_pix=spots_kw.get("MINPIX"), rmin=spots_kw.get("RMIN"), rmax=spots_kw.get("RMAX"),
                       wavelength=beam.wavelength, ice_rings=bool(spots_kw.get("ICE")),
                       separation=(sep[0], sep[-1]) if sep else None)
    log_spot_search(job.log, spots, det, beam.wavelength, image, 0.5 * (a + b), sep)
    job.results.setdefault("spots", {})[image] = spots
    st = spot_statistics(spots, det, beam.wavelength)
    if "median_size" in st:
        job.results["raster"] = choose_raster(*st["median_size"])
    if "SPOTOD" in job.files:
        from .spotfile import write_spot_file
        allspots = np.concatenate(list(job.results["spots"].values()))
        write_spot_file(job.files["SPOTOD"], allspots, image_size=(det.n_fast, det.n_slow),
                        pixel_size=det.pixel_fast, beam=(det.beam_x, det.beam_y), two_theta=det.two_theta)
    pic = job.kw.get("PICTURE") or {}
    if pic.get("ON") or (pic.get("_args") or [""])[0] == "ON":
        import os
        from .pictures import spot_picture
        d = pic.get("DIRECTORY", ".")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"spots_{image:05d}.png")
        spot_picture(path, data, spots, float(job.kw.get("THRESHOLD", {}).get("_args", [20])[0]))
        job.log.line(f" Picture of the spots written to {path}")


def log_spot_search(log, spots, det, wavelength, image, phi, sep=None):
    from .shoebox import choose_raster
    st = spot_statistics(spots, det, wavelength)
    log.line("")
    log.line(f" Finding spots on image {image:5d} (Midpoint of phi {phi:8.3f} degrees)")
    log.line(f" {st['found']:6d} spots found;  {st['rejected']:5d} rejected")
    log.line(f" Number too close (SEPARATION keyword) {st['too_close']:5d}")
    if sep:
        log.line(f" (currently SEPARATION {sep[0]:6.2f}{sep[-1]:6.2f})")
    log.line(f" Number stored as OK {st['ok']:6d}")
    if st["ok"]:
        log.line(f" The highest resolution is {st['highest_resolution']:6.2f} Angstrom")
        log.line(f" 99% have resolution less than {st['res99']:6.2f} Angstrom")
        sx, sy = st["median_size"]
        r = choose_raster(sx, sy)
        log.line(f" Based on a median spot size of {int(round(sx)):2d} by {int(round(sy)):2d} pixels in X and Y,"
                 " the measurement box")
        log.line(" parameters have been set to " + "".join(f"{v:4d}" for v in r))
