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

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .errors import ProcessingError

from .mtz import RECORD_DTYPE


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
    dmin = settings.dmin or predict.corner_resolution(detector, beam.wavelength)
    phi_lo = scan.phi_range(block_images[0])[0]
    phi_hi = scan.phi_range(block_images[-1])[1]
    pred = predict.predict(crystal, beam, detector, goniometer, phi_lo, phi_hi, dmin, settings.dmax,
                           margin=settings.maxwidth)
    parts = predict.image_parts(pred, scan.phi_start, scan.osc, scan.first, scan.last,
                                settings.min_fraction)
    sep = settings.separation
    flags = predict.classify(pred, parts, detector, separation=sep, maxwidth=settings.maxwidth,
                             osc=scan.osc, dmin=dmin, dmax=settings.dmax)
    measurable = (flags & (predict.EXCLUDED | predict.OVERLAP | predict.TOO_WIDE)) == 0
    out_records, out_stats = [], []
    for img in block_images:
        t0 = time.time()
        st = ImageStats(img, scan.phi_range(img))
        sel = np.flatnonzero((parts["image"] == img) & measurable)
        try:
            data = read_image(img)
        except Exception as e:           # a bad image is skipped and reported, the rest goes on
            st.error = str(e)
            out_stats.append(st)
            continue
        p = pred[parts["index"][sel]]
        fulls = parts["n_parts"][sel] == 1
        res, _ = integrate_fn(data, p["fast"], p["slow"], raster=settings.raster or (15, 15, 3, 4, 4),
                              gain=detector.gain, overload=detector.overload, nullpix=detector.nullpix,
                              strong_mask=fulls)
        lp = p["lorentz"] * p["polar"]
        rec = np.zeros(len(sel), RECORD_DTYPE)
        rec["h"], rec["k"], rec["l"] = p["h"], p["k"], p["l"]
        rec["batch"] = img
        rec["i"] = res["I"] / lp
        rec["sigi"] = res["SIGI"] / lp
        rec["ipr"] = res["IPR"] / lp
        rec["sigipr"] = res["SIGIPR"] / lp
        rec["fractioncalc"] = parts["fraction"][sel]
        rec["xdet"], rec["ydet"] = p["slow"], p["fast"]
        rec["rot"] = p["phi"]
        rec["width"] = p["width"]
        rec["lp"] = 1.0 / lp
        rec["flag"] = res["flag"]
        ok = ((res["flag"] & 32) == 0) & np.isfinite(rec["i"]) & np.isfinite(rec["ipr"])
        rec = rec[ok]
        n_parts = parts["n_parts"][sel][ok]
        st.n_full = int(np.sum(n_parts == 1))
        st.n_partial = int(np.sum(n_parts > 1))
        st.n_overload = int(np.sum(rec["flag"] & 16 != 0))
        st.n_bad = int(np.sum(rec["flag"] & ~16 != 0))
        good = rec["sigi"] > 0
        if good.any():
            st.isig_sum = float(np.mean(rec["i"][good] / rec["sigi"][good]))
            st.isig_pr = float(np.mean(rec["ipr"][good] / np.where(rec["sigipr"][good] > 0,
                                                                     rec["sigipr"][good], np.inf)))
            d = p["d"][ok][good]
            outer = d <= np.quantile(d, 0.1)
            st.isig_sum_outer = float(np.mean(rec["i"][good][outer] / rec["sigi"][good][outer]))
            sp = rec["sigipr"][good][outer]
            st.isig_pr_outer = float(np.mean(rec["ipr"][good][outer] / np.where(sp > 0, sp, np.inf)))
        st.seconds = time.time() - t0
        out_records.append(rec)
        out_stats.append(st)
    return out_records, out_stats


def integrate_images(crystal, beam, detector, goniometer, scan, images, settings, read_image,
                     integrate_fn, on_image=None):
    """Integrate `images` (image numbers) block by block, on settings.nproc processes.

    read_image(n) -> 2-D array [slow, fast]; integrate_fn as pyflm.shoebox.integrate_image.
    on_image(stats) is called as each image's result arrives, in image order.
    Returns Result(records in image order with MPART set, per-image stats)."""
    from .mtz import partial_codes
    blocks = _block_ranges(images, max(1, settings.block))
    records, stats = [], []
    args = (crystal, beam, detector, goniometer, scan)
    if settings.nproc > 1 and len(blocks) > 1:
        with ProcessPoolExecutor(max_workers=settings.nproc) as ex:
            futures = [ex.submit(integrate_block, *args, b, settings, read_image, integrate_fn)
                       for b in blocks]
            results = (f.result() for f in futures)
            for recs, sts in results:
                records += recs
                stats += sts
                for s in sts:
                    on_image and on_image(s)
    else:
        for b in blocks:
            recs, sts = integrate_block(*args, b, settings, read_image, integrate_fn)
            records += recs
            stats += sts
            for s in sts:
                on_image and on_image(s)
    rec = np.concatenate(records) if records else np.zeros(0, RECORD_DTYPE)
    if len(rec):
        hkl = np.stack([rec["h"], rec["k"], rec["l"]], 1)
        rec["mpart"] = partial_codes(hkl, rec["batch"], rec["fractioncalc"])
    return Result(rec, stats)
