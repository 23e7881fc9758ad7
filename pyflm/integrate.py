"""PROCESS: integrate images into an unmerged MTZ and a SUMMARY, block by block, on one or more cores.

MOSFLM works in blocks of images: reflections are predicted for the block, standard profiles are formed
from the block's strong reflections (pass 2), and every image of the block is integrated with them.
Positional refinement per image (pass 1) comes from pyflm.refine when it is available.

Plain API: ``integrate_images(crystal, beam, detector, goniometer, scan, images, settings) -> Result``
where Result holds the MTZ records, per-image statistics and batch headers; ``run_process(job, args)``
is the PROCESS action (log lines of interface notes §5.6, MTZ, SUMMARY, PNG plot).

The same records come out whatever the number of worker processes: blocks are independent and their
results are concatenated in image order.
"""
from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import Interrupted, ProcessingError

from .mtz import RECORD_DTYPE, lexsort_ints



@dataclass
class Settings:
    dmin: float = None
    dmax: float = None
    separation: tuple = None         # mm (x, y); None: from the spot size
    raster: tuple = None             # nxs nys nc nrx nry; None: automatic
    maxwidth: float = 5.0            # degrees
    block: int = 5
    nproc: int = 1
    min_fraction: float = 0.01       # parts smaller than this are not measured
    sd_add: float = 0.01             # error model: sigma^2 += (sd_add * I)^2
    scheduler: str = None            # a Dask scheduler's address: blocks run there (pyflm.distributed)
    refine: object = None            # pyflm.refine.Options: refine each block before integrating it


@dataclass
class ImageStats:
    image: int
    phi: tuple
    n_full: int = 0
    n_partial: int = 0
    n_overload: int = 0
    n_bad: int = 0
    isig_pr: float = 0.0
    isig_sum: float = 0.0
    isig_pr_outer: float = 0.0
    isig_sum_outer: float = 0.0
    seconds: float = 0.0
    error: str = ""


@dataclass
class Result:
    records: np.ndarray
    stats: list = field(default_factory=list)


def nproc_from(job_kw):
    """Worker count: NPROC keyword, else PYFLM_NPROC, else 1 (MOSFLM's behaviour)."""
    v = (job_kw.get("NPROC") or {}).get("_args", [None])[0]
    if v is None:
        v = os.environ.get("PYFLM_NPROC", "1")
    try:
        return max(1, int(v))
    except ValueError:
        return 1


def _block_ranges(images, block):
    images = list(images)
    return [images[i:i + block] for i in range(0, len(images), block)]


def integrate_block(crystal, beam, detector, goniometer, scan, block_images, settings, read_image,
                    integrate_fn):
    """Predict the block's reflections, integrate each of its images; records and stats in image order."""
    from . import predict
    # each image is decoded once: pass 1 (refinement, up to three measurements) and pass 2 read it here
    block_image, datas = decode_once(lambda img: check_image(read_image(img), detector))
    for img, data in zip(block_images, read_images(read_image, block_images)):
        try:
            if isinstance(data, Exception):
                raise data
            datas[img] = check_image(data, detector)
        except Exception as e:           # a bad image is skipped and reported (datas keeps why)
            datas[img] = e
    refined = {}
    if settings.refine is not None:      # pass 1: positional and post-refinement on the block
        from .refine import refine_block
        crystal, detector, refined = refine_block(crystal, beam, detector, goniometer, scan, block_images,
                                                  settings, block_image)
    dmin = settings.dmin or predict.corner_resolution(detector, beam.wavelength)
    phi_lo = scan.phi_range(block_images[0])[0]
    phi_hi = scan.phi_range(block_images[-1])[1]
    pred = predict.predict(crystal, beam, detector, goniometer, phi_lo, phi_hi, dmin, settings.dmax,
                           margin=settings.maxwidth)
    parts = predict.image_parts(pred, scan.phi_start, scan.osc, scan.first, scan.last,
                                settings.min_fraction)
    # only this block's images are measured here, and a part's flags depend only on the parts on its own
    # image: the parts on the margin's images (up to MAXWIDTH either side) need no classifying or positions
    # (take, not a boolean selection: numpy copies a structured array's masked rows one by one)
    parts = parts.take(np.flatnonzero(np.isin(parts["image"], block_images)))
    sep = settings.separation
    flags = predict.classify(pred, parts, detector, separation=sep, maxwidth=settings.maxwidth,
                             osc=scan.osc, dmin=dmin, dmax=settings.dmax)
    measurable = (flags & (predict.EXCLUDED | predict.OVERLAP | predict.TOO_WIDE)) == 0
    # a 7 x 7 peak in a 17 x 17 box: more rim pixels (neighbours' peaks kept out of them) give weak
    # spots a better background (sim sweep, cc_truth at 1.5 A 0.857 -> 0.866 over a 15 x 15 box; 19 and
    # 21 gain no more and lose edge reflections)
    raster = settings.raster or (17, 17, 4, 5, 5)
    # each part is measured where its own share of the rocking curve diffracts (matters near the axis)
    part_fast, part_slow = predict.positions_at(crystal, beam, detector, goniometer,
                                                predict.fields(pred, parts["index"], ("h", "k", "l")),
                                                predict.part_phi(pred, parts, scan.phi_start, scan.osc,
                                                                 scan.first))
    regions, n_regions, spread = _profile_regions(detector, part_fast, part_slow)
    out_records, out_stats = [], []
    # pass 2 of MOSFLM: standard profiles from the strong fully recorded reflections of the whole block
    from .shoebox import block_profiles, foreground_mask, measure, profile_sums, shadow_mask
    acc = None
    # every predicted spot's peak on an image (measured or not) is kept out of its neighbours' background
    on_image = {}

    # each image's rows, in their order, from one stable sort of the block's parts by image
    order = np.argsort(parts["image"], kind="stable")
    on, at = np.unique(parts["image"].take(order), return_index=True)
    rows = {int(j): order[a:b] for j, a, b in zip(on, at, list(at[1:]) + [len(order)])}
    empty = np.zeros(0, np.int64)

    def foreground(img):
        if img not in on_image:
            sel_all = rows.get(img, empty)
            on_image[img] = foreground_mask((detector.n_slow, detector.n_fast), part_fast[sel_all],
                                            part_slow[sel_all], raster)
        return on_image[img]
    levels = {}

    def bg_level(img):
        if img not in levels:
            levels[img] = background_level(datas[img], detector.nullpix)
        return levels[img]
    # shadows (the beamstop and its arm) found from the block's images: spots there are not measured
    shadow = shadow_mask([d for d in datas.values() if not isinstance(d, Exception)], detector.nullpix)
    kw = dict(raster=raster, gain=detector.gain, overload=detector.overload, nullpix=detector.nullpix,
              mask=shadow)
    # pass 2 of MOSFLM: the fulls and the larger parts of partials (measured at their own centroids, on
    # their own image) make the block's profiles.  Each image's reflections are measured once here, with
    # the 3-D background, for their intensities and the profiles; the profile fit waits for the block's
    measured = {}
    for img in block_images:
        if isinstance(datas[img], Exception):
            continue
        sel = rows.get(img, empty)
        sel = sel[measurable[sel]]
        big = parts["fraction"].take(sel) >= 0.5
        # the background planes also from the images either side in the block, their spots kept out;
        # not from one whose background differs (a dim or bright image would pull this one's planes)
        nb = [j for j in (img - 1, img + 1) if j in datas and not isinstance(datas[j], Exception)
              and abs(bg_level(j) - bg_level(img)) <= 0.05 * bg_level(img) + 0.02]
        # (their union: the kernel ORs them as it reads the masks, no union image is made)
        exclude = tuple(foreground(j) for j in [img] + nb)
        m = measure(datas[img], part_fast[sel], part_slow[sel], bg_exclude=exclude,
                    bg_images=[datas[j] for j in nb], **kw)
        # the profiles from the same measurement's net peaks (3-D background planes): measuring the
        # larger parts again from the image alone for them cost 0.4-0.7 ms an image and gave the same
        # scores (sim sweep ONE_DECK: cc_truth equal to 0.0002 in every shell, 1.37-1.27 A 0.0002 higher)
        # (takes of the larger parts' positions: boolean indexing of each of 9 arrays cost twice as much)
        ib = np.flatnonzero(big)
        mb = {k: m[k].take(ib, axis=0) for k in ("I", "SIGI", "coef", "on", "bad_peak", "over")}
        sel_big = sel.take(ib)
        sums = profile_sums(datas[img], part_fast.take(sel_big), part_slow.take(sel_big),
                            regions=regions.take(sel_big), n_regions=n_regions, measured=mb, **kw)
        measured[img] = (sel, nb, exclude, m)
        acc = sums if acc is None else tuple(a + b for a, b in zip(acc, sums))
    profiles = block_profiles(*acc, raster, spread=spread) if acc is not None else None
    for img in block_images:
        t0 = time.time()
        st = ImageStats(img, scan.phi_range(img))
        st.refined = refined.get(img)
        data = datas[img]
        if isinstance(data, Exception):
            st.error = str(data)
            out_stats.append(st)
            continue
        sel, nb, exclude, m = measured[img]
        fulls = parts["n_parts"].take(sel) == 1
        res, _ = integrate_fn(data, part_fast[sel], part_slow[sel], strong_mask=fulls, profiles=profiles,
                              regions=regions[sel], bg_exclude=exclude, bg_images=[datas[j] for j in nb],
                              measured=m, **kw)
        # the records of the rows kept only (kept: not rejected, intensities finite as stored, in f4)
        at_pred = parts["index"].take(sel)
        lp = pred["lorentz"].take(at_pred) * pred["polar"].take(at_pred)
        i_lp, ipr_lp = res["I"] / lp, res["IPR"] / lp
        ok = ((res["flag"] & 32) == 0) & np.isfinite(i_lp.astype(np.float32)) & \
            np.isfinite(ipr_lp.astype(np.float32))
        kept = np.flatnonzero(ok)
        lp, rows_k, i_lp, ipr_lp = lp[kept], sel[kept], i_lp[kept], ipr_lp[kept]
        # (whole records gathered, their fields read as views: 6 takes from the block's fields cost
        # twice as much on the sim sweep's 2 000 rows of 12 000)
        p = pred.take(at_pred[kept])
        res = {k: res[k].take(kept, axis=0)
               for k in ("I", "SIGI", "IPR", "SIGIPR", "flag")}
        rec = np.zeros(len(kept), RECORD_DTYPE)
        rec["h"], rec["k"], rec["l"] = p["h"], p["k"], p["l"]
        rec["batch"] = img
        rec["i"] = i_lp
        rec["sigi"] = res["SIGI"] / lp
        rec["ipr"] = ipr_lp
        rec["sigipr"] = res["SIGIPR"] / lp
        # error model: a fraction of the intensity for the errors of the profile and partiality models
        # (counting statistics alone make strong reflections look better than they are)
        rec["sigi"] = np.sqrt(rec["sigi"] ** 2 + (settings.sd_add * rec["i"]) ** 2)
        rec["sigipr"] = np.sqrt(rec["sigipr"] ** 2 + (settings.sd_add * rec["ipr"]) ** 2)
        fraction = parts["fraction"].take(rows_k)
        rec["fractioncalc"] = fraction
        rec["xdet"], rec["ydet"] = part_slow[rows_k], part_fast[rows_k]
        rec["rot"] = p["phi"]
        rec["width"] = p["width"]
        rec["lp"] = 1.0 / lp
        rec["flag"] = res["flag"]
        n_parts = parts["n_parts"].take(rows_k)
        st.n_full = int(np.sum(n_parts == 1))
        st.n_partial = int(np.sum(n_parts > 1))
        st.n_overload = int(np.sum(rec["flag"] & 16 != 0))
        st.n_bad = int(np.sum(rec["flag"] & ~16 != 0))
        good = rec["sigi"] > 0
        if good.any():
            gi, gs, gp, gsp = (rec[f][good] for f in ("i", "sigi", "ipr", "sigipr"))
            st.isig_sum = float(np.mean(gi / gs))
            st.isig_pr = float(np.mean(gp / np.where(gsp > 0, gsp, np.inf)))
            d = p["d"][good]
            outer = d <= _quantile(d, 0.1)
            st.isig_sum_outer = float(np.mean(gi[outer] / gs[outer]))
            sp = gsp[outer]
            st.isig_pr_outer = float(np.mean(gp[outer] / np.where(sp > 0, sp, np.inf)))
        st.seconds = time.time() - t0
        out_records.append(rec)
        out_stats.append(st)
    return out_records, out_stats


def _quantile(v, q):
    """np.quantile(v, q) of a 1-D float array, the same number (its index, neighbours and
    interpolation, in its order) from one partition: ~10 us an image's 2 000 values, np.quantile ~100."""
    n = len(v)
    vi = (n - 1) * q
    if n == 0 or vi >= n - 1 or not np.isfinite(v).all():
        return np.quantile(v, q)
    lo = int(np.floor(vi))
    part = np.partition(v, [lo, lo + 1])
    a, b = part[lo], part[lo + 1]
    g = vi - lo
    diff = b - a
    return b - diff * (1 - g) if g >= 0.5 else a + diff * g


def background_level(data, nullpix=-1.0, step=8):
    """An image's background level: the mean of every step-th pixel's valid values below their 99th
    percentile (the spots left out).  To 1.5 % on the sim sweep's images, whose level is 2-5 counts
    (every 4th pixel: 1 %, but 0.43 ms an image against 0.13; pass 2 compares levels to 5 %)."""
    s = np.asarray(data[::step, ::step])
    if s.dtype.kind in "iu":
        level = _count_level(s[s > nullpix])
        if level is not None:
            return level
    v = np.asarray(s, float)
    v = v[v > nullpix]
    if not len(v):
        return 0.0
    return float(np.mean(v[v <= np.percentile(v, 99)]))


def _count_level(iv, cap=1 << 16):
    """background_level of whole counts from their histogram (sorting 400 000 of a 6M image's pixels
    for the percentile cost a fifth of its integration): the same 99th percentile (numpy's linear
    interpolation between the two order statistics) and the same mean (their sum is exact), or None
    when the counts do not suit (negative, or the percentile among the lumped largest)."""
    n = len(iv)
    if not n:
        return 0.0
    if iv.min() < 0:
        return None
    # (as int64: numpy 2 refuses to compare uint16 counts, an SMV image's, with a cap beyond their range)
    h = np.bincount(np.minimum(iv.astype(np.int64, copy=False), cap).ravel())
    c = np.cumsum(h)
    idx = 0.99 * (n - 1)
    lo = int(np.floor(idx))
    hi = min(lo + 1, n - 1)
    fr = idx - lo
    a, b = int(np.searchsorted(c, lo + 1)), int(np.searchsorted(c, hi + 1))
    if b >= cap:
        return None
    p = a + (b - a) * fr if fr < 0.5 else b - (b - a) * (1 - fr)
    top = int(np.floor(p))
    return float(int(np.dot(np.arange(top + 1, dtype=np.int64), h[:top + 1])) / int(c[top]))


def _profile_regions(detector, fast, slow, n_rings=4, n_sectors=1):
    """Standard-profile region of each part: rings about the direct beam out to the farthest corner
    (weak spots far out were fitted 3-10 % low with profiles from a 3 x 3 grid of the detector, whose
    regions mix radii; sectors bring nothing on the simulated sweep), and each region's spread (mean
    square of geometry.spot_spread's tangential term over its parts) for block_profiles' width model.
    (Eight rings: profile-fitted and summation intensities agree better at 1.6-1.5 A, but the outer
    rings' wider profiles lost 0.01-0.03 of cc_truth at 1.37-1.27 A on the sim sweep.)"""
    from . import geometry
    from .shoebox import ring_regions
    frame = detector.frame()
    x, y, _ = geometry.lab_to_mm(geometry.BEAM_DIRECTION[None], frame)
    bf, bs = detector.mm_to_pixel(x, y)
    centre = (float(np.ravel(bf)[0]), float(np.ravel(bs)[0]))
    corners_f = np.array([0, detector.n_fast, 0, detector.n_fast]) - centre[0]
    corners_s = np.array([0, 0, detector.n_slow, detector.n_slow]) - centre[1]
    r_max = float(np.max(np.hypot(corners_f, corners_s)))
    regions = ring_regions(fast, slow, centre, r_max, n_rings, n_sectors)
    n = n_rings * n_sectors
    x, y = detector.pixel_to_mm(np.asarray(fast, float), np.asarray(slow, float))
    _, wt = geometry.spot_spread(x, y, frame, 0.5 * (detector.pixel_fast + detector.pixel_slow))
    # the tangential term: the sim sweep's spot widths follow it (psf plus 0.108 deg of mosaic spread
    # from 3.2 to 1.4 A) while radially they grow more slowly than the obliquity would say (0.065-0.08
    # deg); the mean of both squares gave wider profiles and 0.5-3 % more noise at 1.4-1.27 A
    sq = wt ** 2
    ok = np.isfinite(sq)
    if not ok.all():        # (else the same sums without two boolean takes)
        regions_ok, sq = regions[ok], sq[ok]
    else:
        regions_ok = regions
    cnt = np.bincount(regions_ok, minlength=n)
    spread = np.bincount(regions_ok, sq, minlength=n) / np.maximum(cnt, 1)
    spread[cnt == 0] = np.nan
    return regions, n, spread


def combine_weak_partials(rec, max_isig=10.0, min_fraction=0.1, gain=1.0, kappa=4.0 / 3.0, n_iter=3):
    """Profile-fitted intensities of weak partials, fitted jointly over the images they span.

    Each part i measures f_i.I with f_i its calculated fraction; the inverse-variance combination of
    I_i/f_i (weights f_i^2/sigma_i^2) uses every image of a weak reflection, as a 3-D profile would.
    The parts then carry I.f_i/sum(f) (so they add up to the joint estimate) and sigmas whose squares
    add up to its variance.  Only reflections whose every part is weak (I/sigma < max_isig) are
    combined: for them the variances are mostly background's.  (Up to I/sigma 10 the sim sweep's
    cc_half gains 0.001-0.003 in the 1.9-1.5 A shells over a limit of 3; combining strong parts too
    loses 0.0009 in the first shell, as fraction errors then outweigh counting noise.)

    The weights use each part's variance at the joint estimate, not at its own fitted intensity: a
    profile-fitted variance grows with the intensity fitted (d var/dI = gain.sum P^3/(sum P^2)^2, 4/3
    for a Gaussian spot), so a part fitted high by noise would get less weight than one fitted low,
    and the joint intensities of the sim sweep's weak reflections came out 10 % low at 1.35 A."""
    key = (rec["h"].astype(np.int64) + 512) * 1048576 + (rec["k"] + 512) * 1024 + (rec["l"] + 512)
    order = lexsort_ints((rec["batch"], key))
    k, b = key[order], rec["batch"][order]
    start = np.ones(len(key), bool)
    start[1:] = ~((k[1:] == k[:-1]) & (b[1:] == b[:-1] + 1))
    gid = np.cumsum(start) - 1
    f = rec["fractioncalc"][order].astype(float)
    I = rec["ipr"][order].astype(float)
    s = np.maximum(rec["sigipr"][order].astype(float), 1e-9)
    # counts per unit of the (LP-corrected) record intensity: the signal's share of the variance
    per_count = kappa * gain * rec["lp"][order].astype(float)
    n = np.bincount(gid)
    strong_part = np.bincount(gid, (np.abs(I) >= max_isig * s).astype(float)) > 0
    use = f >= min_fraction
    ff = np.maximum(f, 1e-9)
    var0 = s * s - per_count * np.maximum(I, 0.0)      # the part's variance with no signal in it
    var0 = np.maximum(var0, 0.25 * s * s)
    w = np.where(use, f * f, 0.0)                      # start: equal variances (background's)
    for _ in range(n_iter + 1):
        den = np.bincount(gid, w)
        Ij = np.bincount(gid, w * I / ff) / np.maximum(den, 1e-30)
        var = var0 + per_count * np.maximum(f * Ij[gid], 0.0)
        w = np.where(use, f * f / var, 0.0)
    den = np.bincount(gid, w)
    Ij = np.bincount(gid, w * I / ff) / np.maximum(den, 1e-30)
    sj = 1.0 / np.sqrt(np.maximum(den, 1e-30))
    fs = np.bincount(gid, f)
    ok = (n > 1) & ~strong_part & (den > 0) & (fs > 0.5)
    sel = ok[gid]
    new_i = f * Ij[gid] / fs[gid]
    new_s = sj[gid] * np.sqrt(f / fs[gid])
    ipr = rec["ipr"].copy()
    sig = rec["sigipr"].copy()
    ipr[order[sel]] = new_i[sel]
    sig[order[sel]] = new_s[sel]
    rec["ipr"], rec["sigipr"] = ipr, sig


def decode_once(read_image):
    """A reader that decodes each image once, and the dict it keeps them in (a failure is kept too and
    raised again on every read): the passes over a block, or cell refinement's cycles, share it."""
    cache = {}

    def read(img):
        if img not in cache:
            try:
                cache[img] = read_image(img)
            except Exception as e:
                cache[img] = e
        if isinstance(cache[img], Exception):
            raise cache[img]
        return cache[img]
    return read, cache


def check_image(data, detector):
    """Refuse images that cannot be measurements of this sweep: another size, blank, all overloaded."""
    if data.shape != (detector.n_slow, detector.n_fast):
        raise ProcessingError(f"it is {data.shape[1]} x {data.shape[0]} pixels, the sweep's images are "
                              f"{detector.n_fast} x {detector.n_slow}")
    # one pass for the maximum decides most images (a boolean copy of every pixel cost as much as decoding)
    top = float(np.max(data))
    if top <= detector.nullpix or top <= 0:
        raise ProcessingError("it is blank (no pixel above zero)")
    if top >= detector.overload:
        valid = data > detector.nullpix
        if np.count_nonzero(data >= detector.overload) > 0.5 * np.count_nonzero(valid):
            raise ProcessingError("most of its pixels are overloaded")
    return data


class Started:
    """Block tasks already submitted (start_blocks), for integrate_images to take the results of; or
    to cancel, when what they were started with turns out not to be what PROCESS integrates with."""

    def __init__(self, executor, blocks, futures):
        self.executor, self.blocks, self.futures = executor, blocks, futures

    def cancel(self):
        """Drop the tasks; a block already running ends on its worker, nobody waits for it."""
        if self.executor is None:
            return
        for f in self.futures:
            f.cancel()
        _release(self.executor)
        self.executor = None


def start_blocks(crystal, beam, detector, goniometer, scan, images, settings, read_image, integrate_fn):
    """Submit the blocks of `images` to the worker processes (or the Dask cluster) now, a Started for
    integrate_images: this process is then free for other work while they run (PROCESS's probe of the
    sweep), and takes those not yet begun on a worker itself when it waits (distributed._Pool.wait)."""
    blocks = _block_ranges(images, max(1, settings.block))
    ex = _executor(settings)
    try:
        futures = [ex.submit(integrate_block, crystal, beam, detector, goniometer, scan, b, settings,
                             read_image, integrate_fn) for b in blocks]
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    return Started(ex, blocks, futures)


def integrate_images(crystal, beam, detector, goniometer, scan, images, settings, read_image,
                     integrate_fn, on_image=None, stream=None, started=None, meanwhile=None):
    """Integrate `images` (image numbers) block by block, on settings.nproc processes.

    read_image(n) -> 2-D array [slow, fast]; integrate_fn as pyflm.shoebox.integrate_image.
    on_image(stats) is called as each image's result arrives, in image order.
    Returns Result(records in image order with MPART set, per-image stats).  With a RecordStream the
    records of each finished block go to it instead (memory then holds a block, not the sweep):
    Result.records is None and the stream hands them on, MPART set, in the same order.
    `started` (start_blocks with these same arguments) holds the block tasks already submitted;
    `meanwhile()` is run here once they are all submitted, before their results are awaited."""
    blocks = _block_ranges(images, max(1, settings.block)) if started is None else started.blocks
    stats = []
    done = []
    kept = RecordStream(done.append, detector.gain) if stream is None else stream
    args = (crystal, beam, detector, goniometer, scan)
    interrupted = None

    def take(block, recs, sts):
        kept.add(recs, block[-1])
        stats.extend(sts)
        for s in sts:
            on_image and on_image(s)
    if started is not None or ((settings.nproc > 1 or settings.scheduler) and len(blocks) > 1):
        futures = []
        try:
            if started is None:
                started = start_blocks(*args, images, settings, read_image, integrate_fn)
            futures = started.futures
            if meanwhile is not None:
                meanwhile()
            from .distributed import wait_for
            for b, f in zip(blocks, futures):
                take(b, *wait_for(started.executor, f))
        except Interrupted as e:
            interrupted = e
            for f in futures:
                f.cancel()
        finally:
            if started is not None and started.executor is not None:
                _release(started.executor, stop=interrupted is not None)
                started.executor = None
    else:
        if meanwhile is not None:
            meanwhile()
        try:
            for b in blocks:
                take(b, *integrate_block(*args, b, settings, read_image, integrate_fn))
        except Interrupted as e:      # keep what is finished; the caller writes it
            interrupted = e
    if stream is None:
        kept.end()
        rec = concat_rows(done, RECORD_DTYPE)
    else:
        rec = None
    result = Result(rec, stats)
    result.interrupted = interrupted
    return result


def concat_rows(arrays, dtype):
    """np.concatenate of 1-D structured arrays of `dtype` (an empty one for none), the same bytes:
    through raw views, as numpy copies a packed structured dtype field by field (a sim block's 21 000
    records: 0.04 ms against 0.78)."""
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        return np.zeros(0, dtype)
    if any(a.dtype != dtype or a.ndim != 1 for a in arrays):
        return np.concatenate(arrays)
    raw = np.dtype((np.void, dtype.itemsize))
    return np.concatenate([np.ascontiguousarray(a).view(raw) for a in arrays]).view(dtype)


class RecordStream:
    """Finished blocks' records on their way out, in image order: add(records of a block, its last
    image) hands every record that is finished to sink(records), end() the rest.

    Finishing (MPART, weak partials combined over their images) is per reflection (records of the same
    indices on consecutive images), so a reflection is finished once the block after its last image is
    in: a few blocks' records are held, never the sweep's, and the records come out exactly as if the
    whole sweep were at hand.  PROCESS's sink writes them into the MTZ as the blocks arrive."""

    def __init__(self, sink, gain=1.0):
        self.sink, self.gain = sink, gain
        self.held, self.done, self.last = np.zeros(0, RECORD_DTYPE), np.zeros(0, bool), None

    def add(self, records, last_image):
        new = concat_rows(records, RECORD_DTYPE)
        out, self.held, self.done = _finish(self.held, self.done, new, last_image, final=False, gain=self.gain)
        self.last = last_image
        if len(out):
            self.sink(out)

    def end(self):
        if self.last is not None:
            out, self.held, self.done = _finish(self.held, self.done, np.zeros(0, RECORD_DTYPE), self.last,
                                                final=True, gain=self.gain)
            self.last = None
            if len(out):
                self.sink(out)


def clear_stale_mtz(hklout):
    """The unfinished MTZ of this HKLOUT left by a run that was killed outright (SIGKILL: no clean-up
    ran; PROCESS writes the MTZ under a temporary name as the blocks finish).  Only in the working
    directory, which this run holds (fileio's run lock): no live run's file can be there."""
    import contextlib
    import glob
    d = os.path.dirname(os.path.abspath(hklout))
    if os.path.realpath(d) != os.path.realpath(os.getcwd()):
        return
    for old in glob.glob(os.path.join(glob.escape(d), "." + glob.escape(os.path.basename(hklout)) + ".*.part")):
        with contextlib.suppress(OSError):
            os.unlink(old)


def _finish(held, done, new, last_image, final, gain=1.0):
    from .mtz import partial_codes
    seq = concat_rows([held, new], RECORD_DTYPE)
    fin = np.concatenate([done, np.zeros(len(new), bool)])
    work = np.flatnonzero(~fin)
    # reflections (same indices, consecutive images) among the unfinished records; by fields, not
    # whole records (a gather of RECORD_DTYPE rows is several times slower)
    wb, wh, wk, wl = (seq[f][work] for f in ("batch", "h", "k", "l"))
    order = lexsort_ints((wb, wl, wk, wh))
    bs, hs, ks, ls = wb[order], wh[order], wk[order], wl[order]
    start = np.ones(len(order), bool)
    start[1:] = ~((hs[1:] == hs[:-1]) & (ks[1:] == ks[:-1]) & (ls[1:] == ls[:-1]) & (bs[1:] == bs[:-1] + 1))
    gid = np.empty(len(order), np.int64)
    gid[order] = np.cumsum(start) - 1
    # a reflection's last image: its records are in batch order, so its last record's
    ends = np.append(np.flatnonzero(start)[1:] - 1, len(order) - 1) if len(order) else np.zeros(0, np.int64)
    last = bs[ends].astype(np.int64)
    still_open = (last[gid] >= last_image) & (not final)       # may go on onto the next block's images
    closing = work[~still_open]
    if len(closing):
        # the closing reflections' columns that finishing reads, and back only the three it sets (a
        # gather and a scatter of whole RECORD_DTYPE rows were most of the stream's time)
        sub = {f: seq[f][closing] for f in ("h", "k", "l", "batch", "fractioncalc", "ipr", "sigipr", "lp")}
        mpart = partial_codes(np.stack([sub["h"], sub["k"], sub["l"]], 1), sub["batch"], sub["fractioncalc"])
        combine_weak_partials(sub, gain=gain)
        seq["mpart"][closing] = mpart
        seq["ipr"][closing] = sub["ipr"]
        seq["sigipr"][closing] = sub["sigipr"]
        fin[closing] = True
    first_open = int(wb[still_open].min()) if still_open.any() else None
    if first_open is None:
        return seq, seq[:0], fin[:0]
    batch = seq["batch"]
    if np.all(batch[1:] >= batch[:-1]):     # records come in image order: the finished ones lead
        n = int(np.searchsorted(batch, first_open))
        return seq[:n], seq[n:], fin[n:]
    emit = batch < first_open
    return seq[emit], seq[~emit], fin[~emit]


def _executor(settings):
    """Local worker processes, or the Dask cluster when a scheduler is named: the same block tasks."""
    if settings.scheduler:
        from .distributed import executor
        return executor(settings.scheduler)
    from .distributed import local_pool
    return local_pool(settings.nproc)


def _release(ex, stop=False):
    """Done with an executor of _executor's: the job's local pool is kept for the next action (its
    cancelled tasks dropped; a block already running ends on its worker), unless the run is stopping
    (a signal: the workers go now); a Dask executor's tasks end, its client stays."""
    from .distributed import DaskExecutor, drop_pool
    if isinstance(ex, DaskExecutor):
        ex.shutdown(wait=not stop, cancel_futures=True)
    elif stop:
        drop_pool(ex)


def _ignore_signals():
    """Workers leave SIGINT/SIGTERM to the main process, which stops them and writes what is done."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---- the PROCESS action ---------------------------------------------------------------------------

def read_image_data(template, directory, extension, number):
    """Image data by number (module level so worker processes can be handed it)."""
    from .images import image_path, read_pixels
    return read_pixels(image_path(template, directory, number, extension))


def read_images(read_image, numbers):
    """read_image(n) of each n: its pixels, or the exception it raised.  image_reader's readers read
    them together (read_pixels_many: their CBF checksums at once)."""
    if isinstance(read_image, functools.partial) and read_image.func is read_image_data and \
            len(read_image.args) == 3 and not read_image.keywords:
        from .images import image_path, read_pixels_many
        template, directory, extension = read_image.args
        return read_pixels_many([image_path(template, directory, n, extension) for n in numbers])
    out = []
    for n in numbers:
        try:
            out.append(read_image(n))
        except Exception as e:
            out.append(e)
    return out


def job_image_reader(job):
    """read_image(n) for the job's images, as every stage hands it to worker processes."""
    return image_reader(job.template, job.directory, job.extension)


def image_reader(template, directory, extension):
    """read_image(n) for the images of a template.  The directory is absolute: workers (or other
    machines) may not share this working directory.  One way of making it, so that equal jobs give
    equal readers (early-started work is matched by its arguments' bytes)."""
    return functools.partial(read_image_data, template, os.path.abspath(directory), extension)


def settings_from_job(job, detector):
    kw = job.kw
    s = Settings()
    res = (kw.get("RESOLUTION") or {}).get("_args") or []
    if res:
        s.dmin = float(min(res))
        if len(res) > 1:
            s.dmax = float(max(res))
    sep = (kw.get("SEPARATION") or {}).get("_args") or []
    if sep:
        s.separation = (float(sep[0]), float(sep[-1]))
    else:     # MOSFLM sets it from the spot size; a box's worth of pixels is the safe default
        s.separation = (4 * detector.pixel_slow, 4 * detector.pixel_fast)
    ras = (kw.get("RASTER") or {}).get("_args")
    if ras:
        s.raster = tuple(int(r) for r in ras)
    mw = (kw.get("MAXWIDTH") or {}).get("_args")
    if mw:
        s.maxwidth = float(mw[0])
    blk = (kw.get("BLOCK") or {}).get("_args")
    if blk:
        s.block = int(blk[0])
    s.nproc = nproc_from(kw)
    from .refine import options_from
    s.refine = options_from(kw)
    from .distributed import scheduler_from
    s.scheduler = scheduler_from(kw)
    return s


def _image_range(job, args):
    a = args.get("_args") or []
    if len(a) >= 2:
        return int(a[0]), int(a[1])
    if len(a) == 1 and "TO" in args:
        return int(a[0]), int(args["TO"])
    if len(a) == 1:
        return int(a[0]), int(a[0])
    raise ProcessingError("PROCESS needs the images to integrate: PROCESS first TO last")


def run_process(job, args):
    """PROCESS a TO b [START phi ANGLE dphi]: integrate images a..b into HKLOUT and SUMMARY."""
    from . import summary as summ
    first, last = _image_range(job, args)
    if last < first:
        raise ProcessingError(f"PROCESS {first} TO {last}: the last image comes before the first")
    if "START" in args:
        start, width = float(args["START"]), float(args.get("ANGLE", 0) or 0)
        if width <= 0:
            raise ProcessingError("PROCESS START needs ANGLE (the oscillation of each image)")
        for i in range(first, last + 1):
            job.phi_override[i] = (start + (i - first) * width, start + (i - first + 1) * width)
    crystal = job.crystal
    if crystal is None or getattr(crystal, "U", None) is None:
        raise ProcessingError("no orientation matrix: give MATRIX (or run AUTOINDEX) before PROCESS")
    beam, det, gonio, scan = job.experiment(first)
    if scan.first > first or scan.last < last:
        raise ProcessingError(f"images {first} to {last} are not all on disk for {job.template} "
                              f"(found {scan.first} to {scan.last})")
    from .shoebox import integrate_image
    reader = job_image_reader(job)
    # sparse sweeps (small molecules on thin slices): box, separation, spread and profiles from their spots.
    # One probe image says whether the sweep is sparse; most are not, and then nothing changes.  So with
    # worker processes the blocks start now, as for a dense sweep, while this process probes; they are
    # kept only if the probe leaves the crystal and settings as they were started with.
    from . import autoparams
    plain = settings_from_job(job, det)
    started = spec = None
    if plain.nproc > 1 or plain.scheduler:
        block_args = _block_args(job, crystal, (beam, det, gonio, scan), first, last, plain)
        spec = block_args[0]
        started = take_early_blocks(job, block_args) or start_blocks(*block_args)
    try:
        if started is not None:
            _start_next_segment(job, spec, first, last)
        auto = autoparams.apply_to_process(job, crystal, beam, det, gonio, scan, first, last, reader,
                                           probe_nproc=1 if started else None, on_sparse=started.cancel if started else None)
        if not crystal.mosaic:
            crystal.mosaic = 0.3
            job.log.line(" No MOSAIC given: a mosaic spread of 0.30 degrees is assumed (MOSAIC r sets it)")
        settings = autoparams.update_settings(settings_from_job(job, det), auto)
        if started is not None and (settings != plain or crystal.mosaic != spec.mosaic or auto.sparse
                                    or not auto.profiles):
            started.cancel()
        if started is not None and started.executor is None:
            started = None
    except BaseException:
        if started is not None:
            started.cancel()
        raise
    log = job.log
    log.line("")
    log.line(f" Integrating images {first} to {last} in blocks of {settings.block}"
             + (f" on the Dask cluster at {settings.scheduler}" if settings.scheduler else
                f" on {settings.nproc} process{'es' if settings.nproc > 1 else ''}"))
    log.line(f" Cell {' '.join(f'{c:.3f}' for c in crystal.cell)}  Space group {crystal.space_group}"
             f"  Mosaic {crystal.mosaic:.2f}")
    tables = [summ.detector_table(), summ.postref_table(), summ.integration_table()]
    from .xmlout import responses
    xml = responses(job)

    reported = set()
    # a signal that comes while an image is being reported waits until its log lines and SUMMARY rows
    # are all written (no half report, and no second report of it). Blocking the signal is not enough:
    # one that arrives just before the block still runs its Python handler inside the report.
    reporting = {"now": False, "pending": None}

    def on_image(st):
        reporting["now"] = True
        try:
            _report(st)
            reported.add(st.image)
        finally:
            reporting["now"] = False
        if reporting["pending"] is not None:
            raise Interrupted(reporting["pending"])

    def _report(st):
        a, b = st.phi
        log.line("")
        log.line(" ************************************************")
        log.line(f" Integrating Image {st.image:4d}  Phi {a:7.2f} to {b:7.2f}")
        log.line(" ************************************************")
        if st.error:
            log.line(f" ***** WARNING ***** image {st.image} skipped: {st.error}")
            if xml is not None:
                xml.add("integration_response", status="error", image=st.image, message=st.error)
            return
        from .refine import image_lines, table_rows
        for ln in image_lines(st, det, crystal):
            log.line(ln)
        det_row, post_row = table_rows(st, det, crystal)
        if auto is not None and not auto.profiles:    # IPR will carry the summation intensities
            st.isig_pr, st.isig_pr_outer = st.isig_sum, st.isig_sum_outer
        log.line(f"   {st.n_full:6d} Fully recorded and {st.n_partial:6d} partials measured;"
                 f" {st.n_overload} overloads, {st.n_bad} bad spots")
        log.line(f"   <I/sigI> profile fitted {st.isig_pr:7.1f}  summation {st.isig_sum:7.1f};"
                 f"  outer shell {st.isig_pr_outer:6.1f} {st.isig_sum_outer:6.1f}")
        log.line(f" Smoothed value for refined mosaic spread {post_row[-1]:7.3f}")
        tables[0].add(*det_row)
        tables[1].add(*post_row)
        tables[2].add(st.image, st.n_full, st.n_partial, st.n_overload, st.n_bad, st.isig_pr,
                      st.isig_sum, st.isig_pr_outer, st.isig_sum_outer)
        if xml is not None:
            xml.add("integration_response", image=st.image, phi_start=a, phi_end=b, xcen=det.beam_x,
                    ycen=det.beam_y, distance=det.distance, mosaic=crystal.mosaic, fulls=st.n_full,
                    partials=st.n_partial, overloads=st.n_overload, bad_spots=st.n_bad,
                    mean_isigi_profile=st.isig_pr, mean_isigi_summation=st.isig_sum)
        log.flush()

    hklout = job.files.get("HKLOUT", "hklout.mtz")
    # the MTZ is written as the blocks finish, under a temporary name (memory holds a few blocks, and
    # what is left to do once the last block is in is its last records and the header)
    from .mtz import UnmergedMtzWriter
    try:
        clear_stale_mtz(hklout)
        writer = UnmergedMtzWriter(hklout, space_group=crystal.space_group, cell=crystal.cell)
    except BaseException:
        if started is not None:
            started.cancel()
        raise
    try:
        stream = RecordStream(lambda c: writer.add(autoparams.summation_fallback(c, auto)), det.gain)
        return _process_streamed(job, stream, writer, hklout, (crystal, beam, det, gonio, scan), first,
                                 last, settings, reader, integrate_image, on_image, reported, reporting,
                                 tables, started)
    finally:
        if started is not None:        # not taken (an error before integration began)
            started.cancel()
        writer.abort()                 # an unfinished MTZ (nothing once it is in place)


def _block_args(job, crystal, models, first, last, settings):
    """What PROCESS first TO last starts its blocks with (start_blocks' arguments) before its probe of
    the sweep: the crystal with a mosaic spread (0.3 when none is given), the images' geometry, the
    settings of the job's keywords."""
    from .shoebox import integrate_image
    spec = copy.copy(crystal)
    spec.mosaic = crystal.mosaic or 0.3
    return (spec, *models, range(first, last + 1), settings, job_image_reader(job), integrate_image)


def _blocks_key(block_args):
    from .refine import _task_key
    crystal, beam, det, gonio, scan, images, settings, reader, fn = block_args
    return _task_key((crystal, beam, det, gonio, scan, list(images), settings, reader, fn))


def _start_next_segment(job, spec, first, last):
    """A cell refinement's segment that is not the last: the next segment's PROCESS (the deck's next
    action) gets its blocks started now, on a process this segment's few blocks leave free (a segment
    is one block: the segments' blocks otherwise run one after the other).  They
    are started with what that PROCESS will be given if nothing changes before it: the crystal, the
    settings, its images' geometry; it takes them only if it starts the very same (take_early_blocks)."""
    from .distributed import scheduler_from
    postref = job.kw.get("POSTREF") or {}
    done = len(job.results.get("cellref_segments") or [])
    if not (postref.get("MULTI") or postref.get("SEGMENTS")) or done + 1 >= int(postref.get("SEGMENTS", 2)) \
            or nproc_from(job.kw) < 2 or scheduler_from(job.kw) or not job.upcoming:
        return
    name, args, template, directory, extension = job.upcoming[0]
    if name != "PROCESS" or "START" in args or (template, directory, extension) != \
            (job.template, job.directory, job.extension):
        return
    try:
        a, b = _image_range(job, args)
        beam, det, gonio, scan = job.experiment(a)
    except Exception:          # that PROCESS says what is wrong when it runs
        return
    if b < a or scan.first > a or scan.last < b or (a, b) == (first, last):
        return
    cancel_early_blocks(job)
    try:
        block_args = _block_args(job, spec, (beam, det, gonio, scan), a, b, settings_from_job(job, det))
        _keep_early_blocks(job, block_args)
        job.results["next_segment"] = ((a, b), (beam, det, gonio, scan))
    except Exception:          # early work only: that PROCESS starts its own
        pass


def _keep_early_blocks(job, block_args):
    """Blocks started now for a PROCESS still to come, kept in job.results['early_blocks'] (a list, one
    start for each PROCESS's images: an earlier one for the same images is dropped)."""
    images = block_args[5]
    kept = []
    for key, started in job.results.pop("early_blocks", []):
        if started.blocks and (started.blocks[0][0], started.blocks[-1][-1]) == (images[0], images[-1]):
            started.cancel()
        else:
            kept.append((key, started))
    job.results["early_blocks"] = kept + [(_blocks_key(block_args), start_blocks(*block_args))]


def take_early_blocks(job, block_args):
    """The blocks started early for this PROCESS's images (_start_next_segment,
    _start_after_cell_refinement) if they were started with exactly these arguments (their pickled
    bytes), else None (and they are dropped).  Those started for another PROCESS are left for it."""
    key, images = _blocks_key(block_args), block_args[5]
    taken, kept = None, []
    for k, started in job.results.pop("early_blocks", []):
        if not started.blocks or (started.blocks[0][0], started.blocks[-1][-1]) != (images[0], images[-1]):
            kept.append((k, started))
        elif taken is None and started.executor is not None and k == key:
            job.results["early_blocks_taken"] = job.results.get("early_blocks_taken", 0) + 1
            taken = started
        else:
            started.cancel()
    if kept:
        job.results["early_blocks"] = kept
    return taken


def cancel_early_blocks(job):
    """Drop blocks started early that no PROCESS took (the job ends, or another early start replaces them)."""
    for _, started in job.results.pop("early_blocks", []):
        started.cancel()


def _last_segment_early(job, models, first, last, started):
    """Cell refinement's work for this process while a segment's blocks run on workers (it would
    otherwise refine alone, the workers idle, after the last segment's blocks): the whole refinement
    (pyflm.refine.refine_cell_early), as the last segment's PROCESS will ask for it if nothing changes
    before then.  In the segment before the last when the last one's blocks were started with it
    (_start_next_segment), with that PROCESS's geometry; in the last segment, unless refined already.
    None otherwise."""
    postref = job.kw.get("POSTREF") or {}
    segs = list(job.results.get("cellref_segments") or []) + [(first, last)]
    nxt = job.results.pop("next_segment", None)
    if started is None or not (postref.get("MULTI") or postref.get("SEGMENTS")):
        return None
    need = int(postref.get("SEGMENTS", 2))
    from .refine import refine_cell_early, refinement_pending
    if len(segs) == need - 1 and nxt is not None and "early_blocks" in job.results:
        (a, b), next_models = nxt

        def early():
            refine_cell_early(job, segs + [(a, b)], next_models)
            _start_after_cell_refinement(job, ahead=1)
        return early
    if len(segs) != need or refinement_pending(job, segs, models[1:]):
        return None

    def early_here():
        refine_cell_early(job, segs, models[1:])
        _start_after_cell_refinement(job, ahead=0)
    return early_here


def _start_after_cell_refinement(job, ahead):
    """The PROCESS after a cell refinement's last segment gets its blocks started as soon as the
    refinement is known (refine_cell_early), where a worker would otherwise wait for the segments to
    end: with the crystal, geometry and settings it will have if nothing changes before it, found by
    replaying on a copy of the job the deck's statements up to it (job.upcoming_lines), with the
    refinement applied where the last segment applies it (`ahead`: the segments' PROCESS actions still
    to come, 1 or 0).  That PROCESS takes them only if it starts the very same (take_early_blocks)."""
    from .distributed import scheduler_from
    from .job import apply_statement
    from .log import NullLog
    from .refine import apply_cell_refinement
    early = job.results.get("cellref_early")
    if early is None or nproc_from(job.kw) < 2 or scheduler_from(job.kw) or job.crystal is None \
            or len(job.upcoming) <= ahead or len(job.upcoming_lines) != len(job.upcoming):
        return
    name, args, template, directory, extension = job.upcoming[ahead]
    if name != "PROCESS" or "START" in args or any(job.upcoming[k][0] != "PROCESS" for k in range(ahead)):
        return
    try:
        sim = copy.copy(job)
        sim.kw, sim.crystal = copy.deepcopy(job.kw), copy.deepcopy(job.crystal)
        sim.files, sim.phi_override, sim.queue, sim.results = dict(job.files), dict(job.phi_override), [], {}
        sim.log = NullLog()
        for k in range(ahead + 1):
            if k == ahead:
                apply_cell_refinement(sim, early[1])
            for st in job.upcoming_lines[k]:
                if apply_statement(sim, st) is not None:      # (HELP, EXIT: not a plain run)
                    return
        if (template, directory, extension) != (sim.template, sim.directory, sim.extension):
            return
        a, b = _image_range(sim, args)
        models = sim.experiment(a)
        scan = models[3]
        if b < a or scan.first > a or scan.last < b:
            return
        block_args = _block_args(sim, sim.crystal, models, a, b, settings_from_job(sim, models[1]))
        if not (block_args[6].nproc > 1 and not block_args[6].scheduler):
            return
        _keep_early_blocks(job, block_args)
    except Exception:          # early work only: that PROCESS starts its own
        return


def _process_streamed(job, stream, writer, hklout, models, first, last, settings, reader, integrate_image,
                      on_image, reported, reporting, tables, started=None):
    """PROCESS's integration and outputs, the records streamed into `writer` (run_process aborts it if
    it is not finished)."""
    import signal
    from . import summary as summ
    from .mtz import BatchInfo
    crystal, beam, det, gonio, scan = models
    log = job.log

    def _stop(signum, frame):
        if reporting["now"]:
            reporting["pending"] = signum
            return
        raise Interrupted(signum)
    old = {s_: signal.signal(s_, _stop) for s_ in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = integrate_images(crystal, beam, det, gonio, scan, range(first, last + 1), settings,
                                  reader, integrate_image, on_image=on_image, stream=stream, started=started,
                                  meanwhile=_last_segment_early(job, models, first, last, started))
        for s_ in result.stats:     # a signal can stop the reports part-way through a finished block
            if s_.image not in reported:
                try:
                    on_image(s_)
                except Interrupted as e:
                    result.interrupted = result.interrupted or e
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)
    if result.interrupted is not None:
        done = [s.image for s in result.stats if not s.error]
        log.line("")
        log.line(f" ***** Interrupted (signal {result.interrupted.signum}) after "
                 f"{len(done)} image(s): writing what is finished")
    bad = [s for s in result.stats if s.error]
    batches = []
    U = __import__("pyflm.geometry", fromlist=["misset_matrix"]).misset_matrix(*crystal.missets) @ crystal.U
    for s in result.stats:
        if s.error:
            continue
        batches.append(BatchInfo(s.image, s.phi[0], s.phi[1], tuple(crystal.cell), U,
                                 mosaic=crystal.mosaic, wavelength=beam.wavelength, distance=det.distance,
                                 divergence=tuple(beam.divergence), dispersion=beam.dispersion,
                                 two_theta=det.two_theta,
                                 detector_limits=((0.0, float(det.n_slow)), (0.0, float(det.n_fast)))))
    if not batches:
        if result.interrupted is not None:
            raise result.interrupted
        raise ProcessingError("no image could be integrated")
    # the last records (a skipped image has none: every record's batch has a header), then the header
    stream.end()
    kwn = lambda n, d: ((job.kw.get(n) or {}).get("_args") or [d])[0]
    n = writer.finish(wavelength=beam.wavelength, batches=batches, pname=kwn("PNAME", "PNAME"),
                      xname=kwn("XNAME", "XNAME"), dname=kwn("DNAME", "DNAME"), title=kwn("TITLE", ""),
                      history=[f"From pyflm, images {first} to {last}"])
    if "SUMMARY" in job.files:
        summ.write_summary(job.files["SUMMARY"], tables,
                           header=f" pyflm summary file: images {first} to {last}" +
                           "".join(f"\n ***** WARNING ***** image {s.image} skipped: {s.error}" for s in bad))
    log.line("")
    if bad:
        log.line(f" {len(bad)} image(s) could not be integrated: " + ", ".join(str(s.image) for s in bad))
    log.line(" WRITTEN OUTPUT MTZ FILE")
    log.line(f" Logical Name: {hklout}   Filename: {hklout}")
    log.line(f" * Number of Reflections = {n}")
    job.results["integration"] = result
    postref = job.kw.get("POSTREF") or {}
    if (postref.get("MULTI") or postref.get("SEGMENTS")) and result.interrupted is None:
        from .refine import cell_refinement_segment
        cell_refinement_segment(job, result, (beam, det, gonio, scan), first, last)
    if result.interrupted is not None:
        raise result.interrupted
