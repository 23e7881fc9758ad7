"""MOSFLM's spot file (`.spt`, the SPOTOD file; AUTOINDEX ... FILE reads the same layout).

Layout (free-format numbers, one record a line), as programs that hand spots to MOSFLM's DPS indexing
write it (CrystFEL's MOSFLM driver is a public example):

    NXPIX NYPIX PIXEL YSCALE OMEGA    pixels along detector X and Y, pixel size along X (mm), the ratio
                                      of the Y to the X pixel size, detector omega (degrees)
    INVERTX ISWUNG                    1 if X runs the other way; 1 for a swung (two-theta) detector
    XBEAM YBEAM                       the direct beam, MOSFLM detector mm
    X Y DPHI PHI I SIGI               one line per spot, brightest first: position in MOSFLM detector mm
                                      (X along the slow pixel axis, Y along the fast one, see
                                      pyflm.geometry), 0 (reserved), the spot's phi (degrees), intensity
                                      and its sigma
    -999 -999 -999 -999 -999 -999     end of the spots

A file holds spots of one or more images; the image of each spot follows from its phi and the scan.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError, PyflmError
from .fileio import atomic_open
from .spots import SPOT_DTYPE

END_MARK = -999.0
_NEEDED = ("x_mm", "y_mm", "phi", "intensity", "sigma")


class SpotFileError(PyflmError):
    """A spot file that cannot be read: names the file, the line and what is wrong."""

    def __init__(self, path, problem, line_no=None):
        self.path, self.problem, self.line_no = path, problem, line_no
        where = f" line {line_no}" if line_no is not None else ""
        super().__init__(f"Spot file {path}{where}: {problem}")


def write_spot_file(path, spots, *, image_size, pixel_size, beam, two_theta=0.0, include_flagged=False):
    """Write spots (SPOT_DTYPE array) as a MOSFLM spot file.

    image_size  (n_fast, n_slow) pixels
    pixel_size  (pixel_fast, pixel_slow) mm, or one number for square pixels
    beam        (X, Y) direct beam, MOSFLM mm
    Spots with a non-zero flag are left out unless include_flagged.  Returns the number of spots written.
    """
    if not (isinstance(spots, np.ndarray) and spots.dtype.names
            and all(n in spots.dtype.names for n in _NEEDED)):
        raise InputError("spot list", given=type(spots).__name__,
                         expected=f"a structured array with fields {', '.join(_NEEDED)} (SPOT_DTYPE)")
    try:
        n_fast, n_slow = (int(v) for v in image_size)
        p_fast, p_slow = (float(pixel_size),) * 2 if np.ndim(pixel_size) == 0 else map(float, pixel_size)
        bx, by = float(beam[0]), float(beam[1])
    except (TypeError, ValueError):
        n_fast = n_slow = p_fast = p_slow = 0
    if min(n_fast, n_slow) <= 0 or min(p_fast, p_slow) <= 0:
        raise InputError("detector", given=(image_size, pixel_size, beam),
                         expected="image size (n_fast, n_slow) pixels, pixel size (mm) and beam (X, Y) mm")
    keep = spots if include_flagged or "flag" not in spots.dtype.names else spots[spots["flag"] == 0]
    values = np.stack([keep[n].astype(float) for n in _NEEDED], axis=1) if len(keep) else np.zeros((0, 5))
    if not np.all(np.isfinite(values)):
        raise InputError("spot list", given="non-finite positions or intensities", expected="finite numbers")
    order = np.argsort(-values[:, 3], kind="stable")     # MOSFLM takes the brightest spots first
    try:
        _write(path, values[order], n_fast, n_slow, p_fast, p_slow, (bx, by), two_theta)
    except OSError as exc:
        raise SpotFileError(os.fspath(path), f"cannot be written ({exc.strerror or exc})") from None
    return len(keep)


def _write(path, rows, n_fast, n_slow, p_fast, p_slow, beam, two_theta):
    with atomic_open(path, "w") as f:
        # MOSFLM's X runs along the slow pixel axis, so NXPIX counts slow pixels and PIXEL is their size
        f.write(f"{n_slow:10d} {n_fast:10d} {p_slow:10.8f} {p_fast / p_slow:10.6f} {0.0:10.6f}\n")
        f.write(f"{0:10d} {1 if two_theta else 0:10d}\n")
        f.write(f"{float(beam[0]):10.5f} {float(beam[1]):10.5f}\n")
        for x, y, phi, inten, sig in rows:
            f.write(f"{x:10.4f} {y:10.4f} {0.0:10.2f} {phi:10.4f} {inten:14.2f} {sig:12.2f}\n")
        f.write(" ".join(f"{END_MARK:10.2f}" for _ in range(6)) + "\n")


def _numbers(line, count, path, line_no, what):
    parts = line.split()
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise SpotFileError(path, f"expected {what}, got {line.strip()!r}", line_no) from None
    if len(vals) < count or not all(math.isfinite(v) for v in vals):
        raise SpotFileError(path, f"expected {count} numbers ({what}), got {line.strip()!r}", line_no)
    return vals


def read_spot_file(path, *, scan=None):
    """Read a MOSFLM spot file -> (spots as a SPOT_DTYPE array, header dict).

    scan        optional (first_image, phi_start, oscillation) to give each spot its image number from
                its phi; without it the image is 0.
    header      image_size (n_fast, n_slow), pixel_size (fast, slow) mm, beam (X, Y) mm, yscale, omega,
                invertx, swung.
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotFileError(path, f"cannot be read ({exc.__class__.__name__}: {exc})") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if len(numbered) < 3:
        raise SpotFileError(path, "too short: a spot file starts with three header lines")
    (l1, h1), (l2, h2), (l3, h3) = numbered[:3]
    nx, ny, pix, yscale, omega = _numbers(h1, 5, path, l1, "NXPIX NYPIX PIXEL YSCALE OMEGA")[:5]
    invertx, swung = _numbers(h2, 2, path, l2, "INVERTX ISWUNG")[:2]
    xbeam, ybeam = _numbers(h3, 2, path, l3, "XBEAM YBEAM")[:2]
    if nx <= 0 or ny <= 0 or pix <= 0 or yscale <= 0:
        raise SpotFileError(path, f"detector size and pixel must be positive, got {h1.strip()!r}", l1)
    rows, ended = [], False
    for line_no, line in numbered[3:]:
        vals = _numbers(line, 6, path, line_no, "X Y DPHI PHI I SIGI")
        if vals[0] == END_MARK and vals[1] == END_MARK:
            ended = True
            break
        rows.append(vals[:6])
    if not ended:
        raise SpotFileError(path, "no end line (-999 ...): the file is truncated")
    p_slow, p_fast = pix, pix * yscale
    spots = np.zeros(len(rows), SPOT_DTYPE)
    if rows:
        a = np.array(rows)
        spots["x_mm"], spots["y_mm"] = a[:, 0], a[:, 1]
        spots["slow"], spots["fast"] = a[:, 0] / p_slow, a[:, 1] / p_fast
        spots["phi"], spots["intensity"], spots["sigma"] = a[:, 3], a[:, 4], a[:, 5]
        if scan is not None:
            first, phi0, osc = scan
            spots["image"] = first + np.floor((a[:, 3] - phi0) / osc + 1e-9).astype(int)
    header = {"image_size": (int(ny), int(nx)), "pixel_size": (p_fast, p_slow), "beam": (xbeam, ybeam),
              "yscale": yscale, "omega": omega, "invertx": int(invertx), "swung": int(swung)}
    return spots, header
