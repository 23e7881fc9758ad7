"""Lattice characters: which Bravais lattices a reduced cell fits, with what distortion (penalty).

For the reduced (Buerger/Niggli) real-space basis, every integer transformation with entries in
{-1, 0, 1} and determinant 1, 2, 3 or 4 is tried (19 683 matrices, vectorised).  A transformed basis is a
candidate conventional cell of a Bravais type when the primitive lattice points fall on that type's
centring positions (P, C, I, F, R obverse); its penalty measures how far its metric is from the type's
ideal one: ten times the angle deviations in degrees plus length mismatches in percent (a cell that fits
exactly scores 0; MOSFLM treats < 20 as acceptable).  For each Bravais type the lowest-penalty transformation is
kept, and the table lists them as MOSFLM lists its lattice characters: penalty, cell, lattice and the
space groups possible for it (the one with no screw axes first, which indexing assigns).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

LATTICES = ["aP", "mP", "mC", "oP", "oC", "oI", "oF", "tP", "tI", "hP", "hR", "cP", "cI", "cF"]
LATTICE_NAMES = {"aP": "Triclinic", "mP": "Primitive Monoclinic", "mC": "C Centred Monoclinic",
                 "oP": "Primitive Orthorhombic", "oC": "C Centred Orthorhombic",
                 "oI": "Body Centred Orthorhombic", "oF": "Face Centred Orthorhombic",
                 "tP": "Primitive Tetragonal", "tI": "Body Centred Tetragonal",
                 "hP": "Primitive Hexagonal", "hR": "Rhombohedral", "cP": "Primitive Cubic",
                 "cI": "Body Centred Cubic", "cF": "Face Centred Cubic"}
SPACE_GROUPS = {"aP": "P1", "mP": "P2 P21", "mC": "C2", "oP": "P222 P2221 P21212 P212121",
                "oC": "C222 C2221", "oI": "I222 I212121", "oF": "F222",
                "tP": "P4 P41 P42 P43 P422 P4212 P4122 P41212 P4222 P42212 P4322 P43212",
                "tI": "I4 I41 I422 I4122", "hP": "P3 P31 P32 P312 P321 P3112 P3121 P3212 P3221 P6 P61 "
                "P65 P62 P64 P63 P622 P6122 P6522 P6222 P6422 P6322", "hR": "H3 H32",
                "cP": "P23 P213 P432 P4232 P4332 P4132", "cI": "I23 I213 I432 I4132",
                "cF": "F23 F432 F4132"}
SG_NUMBER = {"P1": 1, "P2": 3, "C2": 5, "P222": 16, "C222": 21, "I222": 23, "F222": 22, "P4": 75,
             "I4": 79, "P3": 143, "H3": 146, "P23": 195, "I23": 197, "F23": 196}
SYMMETRY_ORDER = {"aP": 1, "mP": 2, "mC": 2, "oP": 4, "oC": 4, "oI": 4, "oF": 4, "tP": 8, "tI": 8,
                  "hP": 12, "hR": 6, "cP": 24, "cI": 24, "cF": 24}

_CENTRING = {
    "P": [(0, 0, 0)],
    "C": [(0, 0, 0), (0.5, 0.5, 0)],
    "I": [(0, 0, 0), (0.5, 0.5, 0.5)],
    "F": [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
    "R": [(0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)],
}
_DET = {"P": 1, "C": 2, "I": 2, "F": 4, "R": 3}


@dataclass
class Solution:
    number: int
    lattice: str
    penalty: float
    transform: np.ndarray      # new real basis rows = transform @ reduced basis rows
    cell: tuple                # raw (transformed) cell
    reg_cell: tuple            # cell with the lattice's constraints imposed

    @property
    def space_group(self):
        return SPACE_GROUPS[self.lattice].split()[0]


def cell_of(basis):
    """(a, b, c, alpha, beta, gamma) of real basis rows (3, 3)."""
    a, b, c = basis
    la, lb, lc = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c)
    ang = lambda u, v, lu, lv: np.degrees(np.arccos(np.clip(u @ v / (lu * lv), -1, 1)))
    return (la, lb, lc, ang(b, c, lb, lc), ang(a, c, la, lc), ang(a, b, la, lb))


def reduce_basis(basis, n_iter=20):
    """A reduced basis (shortest independent vectors, Niggli-like: all angles >= or all <= 90) of the
    lattice spanned by real basis rows; returns (reduced rows, integer matrix T with reduced = T @ basis)."""
    B = np.array(basis, float)
    T = np.eye(3)
    combos = np.array([c for c in itertools.product(range(-2, 3), repeat=3) if any(c)], float)
    for _ in range(n_iter):
        vecs = combos @ B
        lens = np.linalg.norm(vecs, axis=1)
        order = np.argsort(lens, kind="stable")
        chosen = []
        for i in order:
            cand = chosen + [i]
            M = combos[cand]
            if np.linalg.matrix_rank(M) == len(cand):
                chosen = cand
            if len(chosen) == 3:
                break
        M = combos[chosen]
        if abs(round(np.linalg.det(M))) != 1:
            # the shortest vectors span a sublattice: keep the basis, only sort it
            break
        newB = M @ B
        T = M @ T
        if np.allclose(newB, B):
            break
        B = newB
    # right-handed, and all angles acute or all obtuse (flip signs of vectors)
    if np.linalg.det(B) < 0:
        B[2] *= -1
        T[2] *= -1
    best = None
    for signs in itertools.product((1, -1), repeat=3):
        S = np.diag(signs)
        if np.linalg.det(S) < 0:
            continue
        c = cell_of(S @ B)
        acute = all(x <= 90 + 1e-6 for x in c[3:])
        obtuse = all(x >= 90 - 1e-6 for x in c[3:])
        if acute or obtuse:
            best = S
            break
    if best is not None:
        B, T = best @ B, best @ T
    return B, np.round(T).astype(int)


def _transforms(reduced_basis, n_short=40):
    """Candidate integer transformations: triples of the shortest lattice vectors (coefficients -2..2
    on the reduced basis; a conventional cell's axes are short lattice vectors), determinant 1 to 4."""
    combos = np.array([c for c in itertools.product(range(-2, 3), repeat=3) if any(c)], float)
    # one of each +/- pair
    first_nz = np.array([c[np.flatnonzero(c)[0]] for c in combos])
    combos = combos[first_nz > 0]
    lens = np.linalg.norm(combos @ reduced_basis, axis=1)
    short = combos[np.argsort(lens, kind="stable")[:n_short]]
    idx = np.array(list(itertools.combinations(range(len(short)), 3)))
    # every order of the three axes: the unique axis of a lattice type may be any of them
    idx = np.concatenate([idx[:, p] for p in itertools.permutations(range(3))])
    T = short[idx]                                    # (n, 3, 3)
    det = np.round(np.linalg.det(T)).astype(int)
    T[det < 0, 2] *= -1                               # right-handed
    det = np.abs(det)
    keep = np.isin(det, (1, 2, 3, 4))
    T, det = T[keep], det[keep]
    # all sign choices of the first two axes give the same lattice but different angles (90 +/- x)
    return T, det


def _centring_ok(T, centring):
    """Does the lattice generated by the old basis equal the `centring` lattice of the new cell?"""
    inv = np.linalg.inv(T)                     # rows: old basis vectors in new-cell coordinates
    frac = np.mod(np.round(inv * 6) / 6, 1.0)  # fractional parts
    allowed = np.array(_CENTRING[centring])
    # each old basis vector must sit on an allowed centring position
    d = np.abs(frac[:, :, None, :] - allowed[None, None, :, :])
    d = np.minimum(d, 1 - d)
    return np.all(np.any(np.all(d < 1e-3, axis=-1), axis=-1), axis=-1)


def _penalties(cells, lattice):
    """Penalty of each cell (n, 6) for a lattice type, and the regularised cells."""
    a, b, c, al, be, ga = cells.T
    # flipping the sign of one axis turns gamma into 180 - gamma: a 60-degree pair is a 120-degree one
    ga = np.where(ga < 90, 180 - ga, ga) if lattice[0] == "h" else ga
    rel = lambda x, y: 100 * np.abs(x - y) / ((x + y) / 2)
    d90 = lambda x: np.abs(x - 90)
    reg = cells.copy()
    kind = lattice[0]
    if kind == "a":
        pen = np.zeros(len(cells))
    elif kind == "m":
        pen = d90(al) + d90(ga)
        reg[:, 3] = reg[:, 5] = 90
    elif kind == "o":
        pen = d90(al) + d90(be) + d90(ga)
        reg[:, 3:] = 90
    elif kind == "t":
        pen = d90(al) + d90(be) + d90(ga) + rel(a, b)
        m = (a + b) / 2
        reg[:, 0] = reg[:, 1] = m
        reg[:, 3:] = 90
    elif kind == "h":
        pen = d90(al) + d90(be) + np.abs(ga - 120) + rel(a, b)
        m = (a + b) / 2
        reg[:, 0] = reg[:, 1] = m
        reg[:, 3] = reg[:, 4] = 90
        reg[:, 5] = 120
    else:   # cubic
        pen = d90(al) + d90(be) + d90(ga) + rel(a, b) + rel(b, c) + rel(a, c)
        m = (a + b + c) / 3
        reg[:, :3] = m[:, None]
        reg[:, 3:] = 90
    # MOSFLM's scale: a solution 1 degree (or 1 %) from ideal scores about 10; < 20 is acceptable
    return 10.0 * pen, reg


def lattice_solutions(reduced_basis):
    """The best transformation of each Bravais type for a reduced real basis, sorted by penalty."""
    T, det = _transforms(reduced_basis)
    new = np.einsum("nij,jk->nik", T, reduced_basis)
    lens = np.linalg.norm(new, axis=2)
    cos = lambda i, j: np.einsum("nk,nk->n", new[:, i], new[:, j]) / (lens[:, i] * lens[:, j])
    cells = np.stack([lens[:, 0], lens[:, 1], lens[:, 2], np.degrees(np.arccos(np.clip(cos(1, 2), -1, 1))),
                      np.degrees(np.arccos(np.clip(cos(0, 2), -1, 1))),
                      np.degrees(np.arccos(np.clip(cos(0, 1), -1, 1)))], 1)
    out = []
    for lat in LATTICES:
        if lat == "aP":
            out.append(Solution(0, "aP", 0.0, np.eye(3, dtype=int), cell_of(reduced_basis),
                                cell_of(reduced_basis)))
            continue
        cen = lat[1] if lat[1] in "CIFR" else "P"
        sel = np.flatnonzero(det == _DET[cen])
        if cen != "P":
            sel = sel[_centring_ok(T[sel], cen)]
        if not len(sel):
            continue
        pen, reg = _penalties(cells[sel], lat)
        if lat == "hR":     # rhombohedral cells are described on hexagonal axes: a = b, gamma 120
            pass
        # prefer, among equal penalties, conventional settings: monoclinic beta >= 90, a <= c
        tie = np.zeros(len(sel))
        if lat[0] == "m":
            tie += (cells[sel, 4] < 90) * 0.001 + (cells[sel, 0] > cells[sel, 2]) * 0.0005
        if lat[0] == "o" or lat[0] == "t":
            tie += (cells[sel, 0] > cells[sel, 1]) * 0.0005 + (cells[sel, 1] > cells[sel, 2]) * 0.0003 \
                if lat[0] == "o" else 0
        # among settings that fit as well (to 0.3 degrees, within the noise of a fit), the shortest
        # cell: a long monoclinic axis at beta 168 can fit a hair better by chance, but is not the cell
        # anyone would report
        near = pen <= pen.min() + 3.0
        size = cells[sel, 0] + cells[sel, 1] + cells[sel, 2]
        k = int(np.argmin(np.where(near, size / size[near].min() * 1e3 + pen + tie, np.inf)))
        Tk, cell_k = T[sel[k]].astype(int), tuple(cells[sel[k]])
        if lat == "hP" and cell_k[5] < 90:
            # gamma 60 is the same lattice as 120: turn a and c round (still right-handed) so the
            # cell is the conventional one its regularised cell and refinement start from
            Tk = np.diag([-1, 1, -1]) @ Tk
            cell_k = cell_of(Tk @ reduced_basis)
        out.append(Solution(0, lat, float(min(pen[k], 999.0)), Tk, tuple(cell_k), tuple(reg[k])))
    out.sort(key=lambda s: (s.penalty, -SYMMETRY_ORDER[s.lattice]))
    for i, s in enumerate(out, 1):
        s.number = i
    return out


def preferred(solutions, max_penalty=20.0):
    """The highest-symmetry solution within the low-penalty group (MOSFLM's choice)."""
    ok = [s for s in solutions if s.penalty <= max_penalty]
    if not ok:
        return min(solutions, key=lambda s: s.penalty)
    return max(ok, key=lambda s: (SYMMETRY_ORDER[s.lattice], -s.penalty))


def format_table(solutions, sd_cell=None):
    lines = [" No PENALTY SDCELL FRACN LATT      a        b        c     alpha  beta gamma  Possible spacegroups"]
    for s in solutions:
        sg = SPACE_GROUPS[s.lattice]
        sd = sd_cell if sd_cell is not None else 0.0
        lines.append(f"{s.number:3d} {s.penalty:7.0f} {sd:6.1f} {1.0:5.2f}   {s.lattice:2s}"
                     f"{s.cell[0]:9.2f}{s.cell[1]:9.2f}{s.cell[2]:9.2f}{s.cell[3]:7.1f}{s.cell[4]:6.1f}"
                     f"{s.cell[5]:6.1f}  {sg}")
    return lines
