"""MOSFLM's unmerged (multi-record) MTZ file: one record per reflection per image, written with gemmi.

Columns, in MOSFLM's order, with the types AIMLESS/POINTLESS expect (POINTLESS writes the same types
when it copies such a file: MPART and FLAG "I", BGPKRATIOS "R"):

    H K L       H   indices reduced to the asymmetric unit of the space group
    M/ISYM      Y   256*M + ISYM (see below)
    BATCH       B   image (batch) number
    I SIGI      J Q summation intensity and its sigma
    IPR SIGIPR  J Q profile-fitted intensity and its sigma
    FRACTIONCALC R  calculated fraction of the reflection recorded on this image
    XDET YDET   R   position in pixels, XDET along MOSFLM's detector X (the slow pixel axis), YDET along Y
    ROT         R   phi of the centroid, degrees
    WIDTH       R   rocking width, degrees
    LP          R   Lorentz-polarisation factor applied
    MPART       I   partial code (below)
    FLAG        I   bit flags (below)
    BGPKRATIOS  R   packed background ratio, peak ratio and background gradient (below)

M/ISYM (CCP4 convention, as gemmi's ReciprocalAsu.to_asu returns it): with the space group's primitive
operators R_k (k from 0, in gemmi's order, which is also the SYMM order gemmi writes), ISYM = 2k+1 when the
reduced indices are R_k(h) (I+), ISYM = 2k+2 when they are -R_k(h) (I-).  M = 1 marks a record that is one
part of a partially recorded reflection, 0 a full; POINTLESS only reads MPART for records with M = 1.

MPART (decoding read from POINTLESS's MTZ reader: MPART > 200 -> Npart = MPART/100, Ipart = MPART%100;
MPART > 20 -> Npart = MPART/10, Ipart = MPART%10; MPART = 10 marks a previously summed partial):
    0                  a full
    10*N + i           part i (1..N) of a reflection recorded on N = 2..9 consecutive images
    100*N + i          the same for N >= 10
    11                 a partial of which only this one part was recorded (the rest fell outside the
                       sweep or on rejected images); POINTLESS treats it as "number of parts unknown"

FLAG bits (POINTLESS/AIMLESS observationflags, "Flag bits from Mosflm"):
    1 BGRATIO too large, 2 PKRATIO too large, 4 negative by more than 5 sigma, 8 background gradient too
    high, 16 profile-fitted overload, 32 profile-fitted edge reflection, 64 misfit.

BGPKRATIOS (same source): int(nint(PKRATIO*100)*100 + min(BGRATIO*10, 99)) + min(GRADIENT, 0.99).

Batch headers follow the CCP4 orientation block (ints/floats layout of libccp4's MTZBAT as gemmi stores it).
"""
from __future__ import annotations

import dataclasses
import math
import os

import gemmi
import numpy as np

from .errors import InputError, OutputError, PyflmError
from .fileio import open_temp

COLUMNS = (("H", "H"), ("K", "H"), ("L", "H"), ("M/ISYM", "Y"), ("BATCH", "B"),
           ("I", "J"), ("SIGI", "Q"), ("IPR", "J"), ("SIGIPR", "Q"), ("FRACTIONCALC", "R"),
           ("XDET", "R"), ("YDET", "R"), ("ROT", "R"), ("WIDTH", "R"), ("LP", "R"),
           ("MPART", "I"), ("FLAG", "I"), ("BGPKRATIOS", "R"))

FLAG_BGRATIO = 1
FLAG_PKRATIO = 2
FLAG_TOO_NEGATIVE = 4
FLAG_GRADIENT = 8
FLAG_OVERLOAD = 16
FLAG_EDGE = 32
FLAG_MISFIT = 64

# One record as the writer takes it and the reader returns it (original, unreduced indices).
RECORD_DTYPE = np.dtype([
    ("h", "i4"), ("k", "i4"), ("l", "i4"), ("batch", "i4"),
    ("i", "f4"), ("sigi", "f4"), ("ipr", "f4"), ("sigipr", "f4"),
    ("fractioncalc", "f4"), ("xdet", "f4"), ("ydet", "f4"), ("rot", "f4"), ("width", "f4"),
    ("lp", "f4"), ("mpart", "i4"), ("flag", "i4"), ("bgpkratios", "f4"),
])
# What the reader adds: the indices as stored (asymmetric unit), ISYM and the partial flag M.
READ_DTYPE = np.dtype(RECORD_DTYPE.descr + [("h_asu", "i4"), ("k_asu", "i4"), ("l_asu", "i4"),
                                            ("isym", "i4"), ("m", "i4")])
_REQUIRED = ("h", "k", "l", "batch", "i", "sigi")


class MtzError(PyflmError):
    """An MTZ file that cannot be read as MOSFLM's unmerged layout: names the file and what is wrong."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem
        super().__init__(f"MTZ file {path}: {problem}")


@dataclasses.dataclass
class BatchInfo:
    """What one image's batch header records.  Angles in degrees, lengths in mm and Angstrom.

    umat is MOSFLM's U (A = M . U . B, MOSFLM frame); the missetting angles are folded into the U written
    to the header (M . U) with the header's missets left 0, as MOSFLM does.  detector_limits are the pixel
    ranges of XDET and YDET: ((xmin, xmax), (ymin, ymax))."""
    number: int
    phi_start: float
    phi_end: float
    cell: tuple
    umat: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    missets: tuple = (0.0, 0.0, 0.0)
    mosaic: float = 0.0
    wavelength: float = 0.0           # 0: the file's wavelength
    distance: float = 0.0
    divergence: tuple = (0.0, 0.0)    # horizontal, vertical
    dispersion: float = 0.0           # delta lambda / lambda
    two_theta: float = 0.0
    detector_limits: tuple = ((0.0, 0.0), (0.0, 0.0))
    scan_axis: tuple = (0.0, 0.0, 1.0)
    dataset_id: int = 1
    title: str = ""


@dataclasses.dataclass
class UnmergedMtz:
    """What read_unmerged_mtz returns."""
    records: np.ndarray               # READ_DTYPE, original indices in h, k, l
    space_group: gemmi.SpaceGroup
    cell: tuple
    wavelength: float
    batches: list
    columns: list                     # [(label, type)] in file order
    pname: str
    xname: str
    dname: str
    title: str
    history: list


# ---- codes ------------------------------------------------------------------------------------------

def encode_mpart(n_parts, part):
    """MPART for part `part` (1-based) of a reflection recorded on `n_parts` images (arrays allowed)."""
    n = np.asarray(n_parts, np.int64)
    i = np.asarray(part, np.int64)
    code = np.where(n >= 10, 100 * n + i, 10 * n + i)
    return np.where(n <= 0, 0, code)


def decode_mpart(mpart):
    """(n_parts, part) from MPART, as POINTLESS unpacks it; a full (0) gives (1, 1), 11 gives (-1, 1)."""
    m = np.asarray(mpart, np.int64)
    n = np.where(m > 200, m // 100, np.where(m > 20, m // 10, np.where(m == 0, 1, -1)))
    i = np.where(m > 200, m % 100, np.where(m > 20, m % 10, 1))
    return n, i


def pack_bgpk(bg_ratio, pk_ratio, gradient):
    """BGPKRATIOS from the background ratio, peak ratio and background gradient."""
    bg = np.minimum(np.asarray(bg_ratio, float) * 10.0, 99.0)
    pk = np.rint(np.asarray(pk_ratio, float) * 100.0) * 100.0
    return np.floor(pk + bg) + np.minimum(np.asarray(gradient, float), 0.99)


def unpack_bgpk(bgpk):
    """(bg_ratio, pk_ratio, gradient) from BGPKRATIOS."""
    v = np.asarray(bgpk, float)
    whole = np.floor(v)
    ipk = whole // 100
    return 0.1 * (whole - ipk * 100), 0.01 * ipk, v - whole


def lexsort_ints(keys):
    """np.lexsort(keys) of integer arrays (the last the primary key), the same order: one stable argsort
    of the keys packed into an int64 when their ranges fit in 62 bits (a sim block's 21 000 records by
    h, k, l and batch: 0.4 ms against 2.0), else np.lexsort itself."""
    keys = [np.asarray(k) for k in keys]
    if not len(keys) or not len(keys[0]) or any(k.dtype.kind not in "iu" for k in keys):
        return np.lexsort(keys)
    lows = [int(k.min()) for k in keys]
    spans = [int(k.max()) - lo + 1 for k, lo in zip(keys, lows)]
    if np.prod([float(v) for v in spans]) >= 2.0 ** 62:
        return np.lexsort(keys)
    packed = np.zeros(len(keys[0]), np.int64)
    for k, lo, span in zip(keys[::-1], lows[::-1], spans[::-1]):      # primary first
        packed = packed * span + (k.astype(np.int64) - lo)
    return np.argsort(packed, kind="stable")


def partial_codes(hkl, batch, fraction=None, full_fraction=0.95):
    """MPART for records of one sweep: records with the same original indices on consecutive batches
    are the parts of one reflection (numbered in batch order); a lone record is a full, unless its
    calculated fraction is below `full_fraction` (the rest of it was not recorded), which gets 11."""
    hkl = np.asarray(hkl, np.int64).reshape(-1, 3)
    batch = np.asarray(batch, np.int64)
    n = len(batch)
    mpart = np.zeros(n, np.int64)
    if n == 0:
        return mpart.astype(np.int32)
    order = lexsort_ints((batch, hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    h, b = hkl[order], batch[order]
    same = np.all(h[1:] == h[:-1], axis=1) & (b[1:] == b[:-1] + 1)
    start = np.ones(n, bool)
    start[1:] = ~same
    gid = np.cumsum(start) - 1
    size = np.bincount(gid)[gid]
    first = np.flatnonzero(start)[gid]
    part = np.arange(n) - first + 1
    code = np.where(size > 1, encode_mpart(size, part), 0)
    if fraction is not None:
        f = np.asarray(fraction, float)[order]
        code = np.where((size == 1) & (f < full_fraction), 11, code)
    mpart[order] = code
    return mpart.astype(np.int32)


# ---- writing ----------------------------------------------------------------------------------------

def _space_group(space_group):
    if isinstance(space_group, gemmi.SpaceGroup):
        return space_group
    try:
        sg = gemmi.find_spacegroup_by_number(int(space_group)) if str(space_group).strip().isdigit() \
            else gemmi.find_spacegroup_by_name(str(space_group))
    except (ValueError, RuntimeError):
        sg = None
    if sg is None:
        raise InputError("space group", given=space_group, expected="a space group name or number")
    return sg


def _cell(cell):
    try:
        c = tuple(float(x) for x in cell)
    except (TypeError, ValueError):
        c = ()
    if len(c) != 6 or not all(math.isfinite(x) and x > 0 for x in c) or any(x >= 180 for x in c[3:]):
        raise InputError("cell", given=cell, expected="a b c alpha beta gamma (Angstrom, degrees)")
    return c


def as_records(records, batches=None):
    """A RECORD_DTYPE array from a dict of columns or a structured array (field names in any case).
    Missing optional columns: IPR/SIGIPR copy I/SIGI, FRACTIONCALC 1, LP 1, ROT the middle of the
    record's batch (when batches are given), everything else 0."""
    if isinstance(records, np.ndarray) and records.dtype.names:
        cols = {name.lower(): records[name] for name in records.dtype.names}
    elif isinstance(records, dict):
        cols = {str(k).lower(): v for k, v in records.items()}
    else:
        raise InputError("MTZ records", given=type(records).__name__,
                         expected="a dict of columns or a numpy structured array")
    missing = [c for c in _REQUIRED if c not in cols]
    if missing:
        raise InputError("MTZ records", given=sorted(cols),
                         expected=f"columns {', '.join(_REQUIRED)} (missing {', '.join(missing)})")
    lengths = {k: np.size(v) for k, v in cols.items() if k in RECORD_DTYPE.names}
    n = lengths["h"]
    if len(set(lengths.values())) != 1:
        raise InputError("MTZ records", given=lengths, expected="columns of equal length")
    out = np.zeros(n, RECORD_DTYPE)
    for name in ("h", "k", "l", "batch", "mpart", "flag"):
        if name in cols:
            v = np.asarray(cols[name], float)
            if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
                raise InputError(f"MTZ column {name.upper()}", given="non-integer values",
                                 expected="integers")
            out[name] = v.astype(np.int64)
    for name in ("i", "sigi", "ipr", "sigipr", "fractioncalc", "xdet", "ydet", "rot", "width",
                 "lp", "bgpkratios"):
        if name in cols:
            out[name] = np.asarray(cols[name], float)
    if "ipr" not in cols:
        out["ipr"] = out["i"]
    if "sigipr" not in cols:
        out["sigipr"] = out["sigi"]
    if "fractioncalc" not in cols:
        out["fractioncalc"] = 1.0
    if "lp" not in cols:
        out["lp"] = 1.0
    if "rot" not in cols and batches:
        mid = {b.number: 0.5 * (b.phi_start + b.phi_end) for b in batches}
        out["rot"] = [mid.get(int(b), 0.0) for b in out["batch"]]
    return out


def reduce_to_asu(hkl, space_group):
    """Indices (n, 3) reduced to the asymmetric unit, and ISYM (CCP4 convention, see the module doc).

    gemmi's ReciprocalAsu.to_asu, on whole arrays: gemmi reduces a (merged) table's indices in one call
    (Mtz.ensure_asu, the same ASU), and ISYM is the first operator, in gemmi's order, taking the indices
    there (+R_k(h) before -R_k(h)), as to_asu chooses it: the ASU holds one index of each set of
    equivalents, so R_k(h) is in it exactly when it equals the reduced one.  The same as to_asu for
    every space group (tests/test_mtz.py); a per-index loop over to_asu took a quarter of a second of
    the 6M sweep's MTZ writing."""
    sg = _space_group(space_group)
    hkl = np.asarray(hkl, np.int64).reshape(-1, 3)
    if not len(hkl):
        return hkl.copy(), np.zeros(0, np.int64)
    # the distinct indices by one packed integer each (np.unique over rows sorts rows: 5x slower)
    lo = hkl.min(0)
    span = hkl.max(0) - lo + 1
    key = ((hkl[:, 0] - lo[0]) * span[1] + (hkl[:, 1] - lo[1])) * span[2] + (hkl[:, 2] - lo[2])
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    uniq = hkl[first]
    table = gemmi.Mtz(with_base=True)
    table.spacegroup = sg
    table.set_cell_for_all(gemmi.UnitCell(1, 1, 1, 90, 90, 90))   # (ensure_asu does not use the cell)
    table.add_dataset("asu")
    table.add_column("N", "R", dataset_id=1)                      # each row's place, rows may be moved
    rows = np.empty((len(uniq), 4), np.float32)
    rows[:, :3] = uniq
    rows[:, 3] = np.arange(len(uniq))
    table.set_data(rows)
    table.ensure_asu()
    out = np.array(table, copy=False)
    red = np.empty_like(uniq)
    red[out[:, 3].astype(np.int64)] = out[:, :3]
    isym = np.zeros(len(uniq), np.int64)
    for k, op in enumerate(sg.operations().sym_ops):
        t = uniq @ (np.array(op.rot, np.int64) // op.DEN)        # gemmi's apply_to_hkl: h . R
        todo = isym == 0
        plus = todo & np.all(t == red, axis=1)
        minus = todo & ~plus & np.all(t == -red, axis=1)
        isym[plus], isym[minus] = 2 * k + 1, 2 * k + 2
    if np.any(isym == 0):       # cannot happen for a space group's operators; never written silently
        raise PyflmError(f"indices {uniq[isym == 0][0].tolist()} have no equivalent in the asymmetric "
                         f"unit of {sg.xhm()}")
    inv = inv.reshape(-1)
    return red[inv], isym[inv]


def _lbcell(sg):
    """Cell refinement flags of the header: -1 for a free parameter, 0 for one fixed by symmetry."""
    system = sg.crystal_system_str()
    return {"triclinic": [-1, -1, -1, -1, -1, -1],
            "monoclinic": [-1, -1, -1, 0, -1, 0],
            "orthorhombic": [-1, -1, -1, 0, 0, 0],
            "cubic": [-1, 0, 0, 0, 0, 0]}.get(system, [-1, 0, -1, 0, 0, 0])


def _nearest_axis(umat, cell):
    """1, 2 or 3: the reciprocal axis (a*, b*, c*) closest to the rotation axis (MOSFLM's Z)."""
    from .geometry import b_matrix
    ub = np.asarray(umat, float) @ b_matrix(cell)
    cosz = np.abs(ub[2, :]) / np.linalg.norm(ub, axis=0)
    return int(np.argmax(cosz)) + 1


def _make_batch(info, sg, wavelength):
    from .geometry import misset_matrix
    b = gemmi.Mtz.Batch()
    b.number = int(info.number)
    b.title = info.title or f"Batch {info.number}"
    b.axes = ["PHI"]
    cell = _cell(info.cell)
    u = misset_matrix(*info.missets) @ np.asarray(info.umat, float).reshape(3, 3)
    ints, fl = b.ints, b.floats
    ints[3] = 0                                   # iortyp
    for j, v in enumerate(_lbcell(sg)):
        ints[4 + j] = v                           # lbcell
    ints[10] = 0                                  # misflg: missets folded into U
    ints[11] = _nearest_axis(u, cell)             # jumpax
    ints[12] = 1                                  # ncryst
    ints[13] = 0                                  # lcrflg: isotropic mosaic spread
    ints[14] = 2                                  # ldtype: 3D (oscillation) data
    ints[15] = 1                                  # jsaxs: scan axis is goniostat axis 1
    ints[17] = 1                                  # ngonax
    ints[19] = 1                                  # ndet
    ints[20] = int(info.dataset_id)               # nbsetid
    for j in range(6):
        fl[j] = cell[j]
    for j, v in enumerate(u.ravel(order="F")):   # umat is a Fortran (column-major) 3x3
        fl[6 + j] = v
    fl[21] = info.mosaic                          # crydat[0]
    fl[36], fl[37] = info.phi_start, info.phi_end
    for j in range(3):
        fl[38 + j] = info.scan_axis[j]            # scanax
        fl[59 + j] = info.scan_axis[j]            # e1
    fl[43] = 1.0                                  # bscale
    fl[47] = info.phi_end - info.phi_start        # phirange
    fl[80] = -1.0                                 # idealised source vector: antiparallel to the beam
    fl[83] = -1.0                                 # source vector
    fl[86] = info.wavelength or wavelength
    fl[87] = info.dispersion
    fl[89], fl[90] = info.divergence
    fl[111] = info.distance                       # dx[0]
    fl[112] = info.two_theta                      # theta[0]
    (x0, x1), (y0, y1) = info.detector_limits
    fl[113], fl[114], fl[115], fl[116] = x0, x1, y0, y1
    b.ints, b.floats = ints, fl
    return b


def _metadata(space_group, cell, batches):
    sg = _space_group(space_group)
    cell = _cell(cell)
    batches = sorted(batches, key=lambda b: b.number)
    numbers = [int(b.number) for b in batches]
    if len(set(numbers)) != len(numbers):
        raise InputError("MTZ batches", given=numbers, expected="distinct batch numbers")
    return sg, cell, batches, numbers


def _rows(records, sg, batches, numbers):
    """The float32 rows of the file for some records (checked as the writer checks them; their batches
    against `numbers` unless that is None)."""
    rec = as_records(records, batches)
    unknown = np.setdiff1d(np.unique(rec["batch"]), numbers) if numbers is not None else ()
    if len(unknown):
        raise InputError("MTZ records", given=f"batch {int(unknown[0])}",
                         expected=f"one of the {len(numbers)} batches given a header")
    hkl = np.stack([rec["h"], rec["k"], rec["l"]], axis=1)
    if np.any(np.all(hkl == 0, axis=1)):
        raise InputError("MTZ records", given="indices 0 0 0", expected="real reflections")
    for label, _ in COLUMNS[4:]:
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(rec[label.lower()], float))))
        if bad:
            raise InputError("MTZ records", given=f"{bad} non-finite value(s) in {label}",
                             expected="finite numbers (an MTZ never holds NaN)")
    data = np.empty((len(rec), len(COLUMNS)), np.float32)
    if not len(rec):
        return data
    red, isym = reduce_to_asu(hkl, sg)
    m_flag = (rec["mpart"] != 0).astype(np.int64)
    data[:, 0:3] = red
    data[:, 3] = 256 * m_flag + isym
    for j, (label, _) in enumerate(COLUMNS[4:], start=4):
        data[:, j] = rec[label.lower()]
    return data


def unmerged_mtz_object(records, *, space_group, cell, wavelength, batches, pname="PNAME",
                        xname="XNAME", dname="DNAME", title="", history=(), rows=None):
    """The gemmi.Mtz of MOSFLM's unmerged file holding `records` (or ready-made float32 `rows`)."""
    sg, cell, batches, numbers = _metadata(space_group, cell, batches)
    data = _rows(records, sg, batches, numbers) if rows is None else rows
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title or "From pyflm"
    mtz.spacegroup = sg
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    ds = mtz.add_dataset(dname)
    ds.project_name, ds.crystal_name, ds.dataset_name = pname, xname, dname
    ds.wavelength = float(wavelength)
    ds.cell = gemmi.UnitCell(*cell)
    for label, kind in COLUMNS[3:]:
        mtz.add_column(label, kind, dataset_id=1)
    mtz.set_data(data)
    for info in batches:
        mtz.batches.append(_make_batch(info, sg, wavelength))
    mtz.history = [str(h)[:80] for h in history][:30]     # readers accept at most 30 history lines
    if len(data):
        mtz.update_reso()
    return mtz


def _inv_d2(rows, cell):
    """1/d^2 of rows' indices, in double precision (to choose the rows that set the RESO record)."""
    frac = np.array(gemmi.UnitCell(*cell).frac.mat.tolist())
    q = rows[:, 0:3].astype(np.float64) @ frac      # the reciprocal-lattice vector, orthogonal frame
    return np.einsum("ij,ij->i", q, q)


class _Extremes:
    """Rows holding the smallest and largest 1/d^2 seen so far (with any within rounding of them)."""

    def __init__(self, cell):
        self.cell, self.lo, self.hi = cell, None, None

    @staticmethod
    def _keep(rows, v, lowest):
        best = v.min() if lowest else v.max()
        tol = 1e-9 * max(abs(best), 1e-30)
        sel = v <= best + tol if lowest else v >= best - tol
        return rows[sel], v[sel]

    def add(self, rows):
        if not len(rows):
            return
        v = _inv_d2(rows, self.cell)
        for name, lowest in (("lo", True), ("hi", False)):
            r, w = self._keep(rows, v, lowest)
            old = getattr(self, name)
            if old is not None:
                r, w = np.concatenate([old[0], r]), np.concatenate([old[1], w])
                r, w = self._keep(r, w, lowest)
            setattr(self, name, (r, w))

    def rows(self):
        return np.concatenate([self.lo[0], self.hi[0]])


def _records(header):
    """An MTZ header (bytes, from its position to the end) as 80-character records; the batch headers'
    binary parts are cut into records too, but never start with a keyword searched for here."""
    return [header[i:i + 80] for i in range(0, len(header), 80)]


def write_unmerged_mtz(path, records, *, space_group, cell, wavelength, batches, pname="PNAME",
                       xname="XNAME", dname="DNAME", title="", history=()):
    """Write MOSFLM's unmerged MTZ.  records: original indices and per-record columns (see as_records),
    or an iterable of such arrays (chunks, written as they come: memory holds one chunk, not the file);
    batches: a BatchInfo per image.  The file appears under `path` only when complete.
    Returns the number of records written.

    gemmi writes an MTZ only from a table in memory, so the rows are written here, as gemmi lays them
    out (an 80-byte preamble with the header's position, the float32 rows, then the header), and the
    header is gemmi's own: written for a few rows that carry the file's column minima and maxima and
    its lowest and highest resolution, with the reflection count put right.  The file is byte for byte
    the one gemmi writes from the whole table (tests/test_mtz.py)."""
    chunks = [records] if isinstance(records, (np.ndarray, dict)) else records
    w = UnmergedMtzWriter(path, space_group=space_group, cell=cell, batches=batches)
    try:
        for chunk in chunks:
            w.add(chunk)
        return w.finish(wavelength=wavelength, batches=batches, pname=pname, xname=xname, dname=dname,
                        title=title, history=history)
    finally:
        w.abort()


class UnmergedMtzWriter:
    """write_unmerged_mtz in steps, for records that come while later images are still being measured
    (PROCESS): add(chunk) writes a chunk's rows at once, finish(...) the header (which needs every
    batch) and puts the file under `path`; abort() removes an unfinished file.  The same bytes as
    write_unmerged_mtz.  Without `batches` here, chunks must carry ROT (as_records fills a missing ROT
    from them), and the check that every record's batch has a header waits for finish."""

    def __init__(self, path, *, space_group, cell, batches=None):
        self.path = os.fspath(path)
        self.sg, self.cell = _space_group(space_group), _cell(cell)
        self.batches = self.numbers = None
        if batches is not None:
            self.sg, self.cell, self.batches, self.numbers = _metadata(space_group, cell, batches)
        self.n, self.lo, self.hi = 0, None, None
        self.ext = _Extremes(self.cell)
        self.seen = set()
        self.f = None
        try:
            fd, self.tmp = open_temp(self.path)
            self.f = os.fdopen(fd, "wb")
            self.f.write(bytes(80))               # the preamble, written last (it points to the header)
        except OSError as e:
            self.abort()
            raise self._failed(e) from None

    def _failed(self, e):
        if isinstance(e, OutputError):
            return MtzError(self.path, f"cannot be written ({e.problem})")
        return MtzError(self.path, "cannot be written (the write failed part-way: is the disk full?)")

    def add(self, chunk):
        rows = _rows(chunk, self.sg, self.batches, self.numbers)
        if not len(rows):
            return
        if self.numbers is None:
            self.seen.update(np.unique(rows[:, 4]).astype(int).tolist())
        try:
            self.f.write(rows.tobytes())
        except OSError as e:
            self.abort()
            raise self._failed(e) from None
        self.n += len(rows)
        self.lo = rows.min(0) if self.lo is None else np.minimum(self.lo, rows.min(0))
        self.hi = rows.max(0) if self.hi is None else np.maximum(self.hi, rows.max(0))
        self.ext.add(rows)

    def finish(self, *, wavelength, batches, pname="PNAME", xname="XNAME", dname="DNAME", title="",
               history=()):
        """Write the header and put the file in place; returns the number of records."""
        try:
            sg, cell, batches, numbers = _metadata(self.sg, self.cell, batches)
            unknown = sorted(self.seen - set(numbers))
            if unknown:
                raise InputError("MTZ records", given=f"batch {unknown[0]}",
                                 expected=f"one of the {len(numbers)} batches given a header")
            if not self.n:   # gemmi (and so the programs after us) cannot read an MTZ of no reflections
                raise MtzError(self.path, "no reflections to write (none was integrated: check "
                               "RESOLUTION, the images and the orientation)")
            meta = dict(space_group=sg, cell=cell, wavelength=wavelength, batches=batches, pname=pname,
                        xname=xname, dname=dname, title=title, history=history)
            header = _gemmi_header(self.path, self.tmp, meta, self.ext.rows(), np.stack([self.lo, self.hi]),
                                   self.n)
            self.f.write(header)
            self.f.seek(0)
            self.f.write(_preamble(len(COLUMNS), self.n))
            self.f.close()
            self.f = None
            os.replace(self.tmp, self.path)
            self.tmp = None
        except OSError as e:
            self.abort()
            raise self._failed(e) from None
        except RuntimeError:     # gemmi says only "Writing MTZ file failed: <temporary name>"
            self.abort()
            raise MtzError(self.path, "cannot be written (the write failed part-way: is the disk full?)") \
                from None
        except BaseException:
            self.abort()
            raise
        return self.n

    def abort(self):
        """Remove the unfinished file (nothing once finish has put it in place)."""
        import contextlib
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            self.f = None
        if getattr(self, "tmp", None):
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def _preamble(n_columns, n_rows):
    """MTZ's first 80 bytes: 'MTZ ', the header's position in 4-byte words (from 1), the machine stamp
    of little-endian IEEE floats; as gemmi writes them."""
    out = bytearray(80)
    out[0:4] = b"MTZ "
    start = n_columns * n_rows + 21
    if start > 2 ** 31 - 1:          # gemmi's large-file form: -1 here, the 64-bit position after
        out[4:8] = np.int32(-1).tobytes()
        out[12:20] = np.int64(start).tobytes()
    else:
        out[4:8] = np.int32(start).tobytes()
    out[8:12] = np.int32(0x00004144).tobytes()
    return bytes(out)


def _gemmi_header(path, tmp, meta, reso_rows, minmax_rows, n):
    """gemmi's header for the file: its RESO from the rows that set the resolution range, its COLUMN
    records from two rows of the column minima and maxima, its NCOL with the real reflection count.
    The first is written to a file beside the MTZ (a full disk shows there as it would in gemmi)."""
    import contextlib
    from .fileio import open_temp
    fd, side = open_temp(tmp)
    os.close(fd)
    try:
        unmerged_mtz_object(None, rows=reso_rows, **meta).write_to_file(side)
        with open(side, "rb") as g:
            recs = _records(_header_of(g.read()))
    except OSError as exc:
        raise MtzError(os.fspath(path), f"cannot be written ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(side)
    col_recs = [r for r in _records(_header_of(bytes(unmerged_mtz_object(None, rows=minmax_rows, **meta)
                                                     .write_to_bytes()))) if r.startswith(b"COLUMN ")]
    # the text part of the header ends at END; batch headers (with binary words) come after it
    end = recs.index(b"END".ljust(80))
    cols = iter(col_recs)
    for i in range(end):
        if recs[i].startswith(b"NCOL "):
            recs[i] = f"NCOL {len(COLUMNS):8d} {n:12d} {len(meta['batches']):8d}".ljust(80).encode()
        elif recs[i].startswith(b"COLUMN "):
            recs[i] = next(cols)
    return b"".join(recs)


def _header_of(mtz_bytes):
    start = int(np.frombuffer(mtz_bytes[4:8], np.int32)[0])
    return mtz_bytes[(start - 1) * 4:]


# ---- reading ----------------------------------------------------------------------------------------

def _batch_info(b):
    fl, ints = list(b.floats), list(b.ints)
    u = np.array(fl[6:15], float).reshape(3, 3, order="F")
    return BatchInfo(number=int(b.number), phi_start=fl[36], phi_end=fl[37], cell=tuple(fl[0:6]),
                     umat=u, missets=(0.0, 0.0, 0.0), mosaic=fl[21], wavelength=fl[86],
                     distance=fl[111], divergence=(fl[89], fl[90]), dispersion=fl[87],
                     two_theta=fl[112], detector_limits=((fl[113], fl[114]), (fl[115], fl[116])),
                     scan_axis=tuple(fl[38:41]), dataset_id=int(ints[20]),
                     title=b.title[6:].strip() if b.title.startswith("TITLE ") else b.title.strip())


def read_unmerged_mtz(path):
    """Read an unmerged MTZ (MOSFLM's layout; optional columns may be absent) -> UnmergedMtz with the
    original indices recovered from ISYM in records h, k, l."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MtzError(path, "no such file")
    try:
        mtz = gemmi.read_mtz_file(path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise MtzError(path, f"not a readable MTZ file ({exc})") from None
    labels = [c.label for c in mtz.columns]
    for need in ("H", "K", "L", "M/ISYM", "BATCH"):
        if need not in labels:
            raise MtzError(path, f"column {need} is missing (an unmerged MTZ is expected)")
    if mtz.spacegroup is None:
        raise MtzError(path, "no space group in the header")
    stored = np.array(mtz, copy=True)
    n = len(stored)
    out = np.zeros(n, READ_DTYPE)
    col = {lab: stored[:, j] for j, lab in enumerate(labels)}
    misym = col["M/ISYM"].astype(np.int64)
    out["h_asu"], out["k_asu"], out["l_asu"] = (stored[:, j].astype(np.int32) for j in range(3))
    out["isym"], out["m"] = misym % 256, misym // 256
    if n and (np.any(out["isym"] < 1) or np.any(out["isym"] > 2 * len(mtz.spacegroup.operations().sym_ops))):
        raise MtzError(path, "M/ISYM holds symmetry numbers outside the space group's operators")
    if n and not mtz.switch_to_original_hkl():
        raise MtzError(path, "could not recover the original indices from M/ISYM")
    orig = np.array(mtz, copy=False)
    out["h"], out["k"], out["l"] = (orig[:, j].astype(np.int32) for j in range(3))
    out["batch"] = col["BATCH"].astype(np.int32)
    defaults = {"IPR": col.get("I"), "SIGIPR": col.get("SIGI"), "FRACTIONCALC": 1.0, "LP": 1.0}
    for label, _ in COLUMNS[5:]:
        v = col.get(label, defaults.get(label, 0.0))
        out[label.lower()] = 0.0 if v is None else v
    ds = mtz.datasets[-1] if len(mtz.datasets) else None
    return UnmergedMtz(
        records=out, space_group=mtz.spacegroup, cell=tuple(mtz.cell.parameters),
        wavelength=float(ds.wavelength) if ds else 0.0,
        batches=[_batch_info(b) for b in mtz.batches],
        columns=[(c.label, c.type) for c in mtz.columns],
        pname=ds.project_name if ds else "", xname=ds.crystal_name if ds else "",
        dname=ds.dataset_name if ds else "", title=mtz.title, history=list(mtz.history))
