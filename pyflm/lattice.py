"""The 44 lattice characters of the Niggli reduced cell, with penalties (MOSFLM's and XDS's table).

International Tables A, Table 9.2.5.1 (Burzlaff & Zimmermann; the reduction of Krivy & Gruber as made
numerically stable by Grosse-Kunstleve, Sauter & Adams 2004, Acta A60 1-6): a Niggli reduced cell has
the metric A = a.a, B = b.b, C = c.c, D = b.c, E = a.c, F = a.b; each of the 44 lattice characters is a
set of linear conditions on (A, B, C, D, E, F), a sign type (I: D, E, F all > 0; II: all <= 0), a
Bravais lattice and the transformation from the reduced to the conventional cell.

The observed cell is reduced with gemmi (GruberVector.niggli_reduce).  Its penalty for a character is
the distance of its metric from the nearest metric obeying the character's conditions (a least-squares
projection onto them, each element measured relative to its diagonal, so 1 degree or 1 % off an ideal
cell scores about 10, MOSFLM's scale: < 20 is acceptable, 999 is impossible).  Measurement error moves a
cell across the Niggli boundaries (|2D| = B, angles at 90 ...), where the reduced cell of the true
lattice is another, equally short basis: the penalty is the smallest over the bases as short as the
reduced one (to 2 %), so a lattice near a boundary keeps its character.
"""
from __future__ import annotations

import itertools
import re
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
CENTRING = {"P": [(0, 0, 0)], "C": [(0, 0, 0), (0.5, 0.5, 0)], "I": [(0, 0, 0), (0.5, 0.5, 0.5)],
            "F": [(0, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
            "R": [(0, 0, 0), (2 / 3, 1 / 3, 1 / 3), (1 / 3, 2 / 3, 2 / 3)]}
# rows: the primitive rhombohedral basis in the hexagonal (obverse) cell's coordinates
HEX_TO_RHOMBOHEDRAL = np.array([[2 / 3, 1 / 3, 1 / 3], [-1 / 3, 1 / 3, 1 / 3], [-1 / 3, -2 / 3, 1 / 3]])

# IT A Table 9.2.5.1: number, Bravais lattice, Niggli type, conditions (besides the ordering
# A <= B <= C), transformation rows (conventional basis = T @ reduced basis).  Type II's
# "2|D+E+F| = A+B" reads -2D-2E-2F = A+B, since D, E, F <= 0 there.  All transformations are
# right-handed (17: the table's matrix negated); 43 (I-centred monoclinic in the table) is given in
# its C-centred setting, as MOSFLM reports it ("C2 (transformed from I2)").
_TABLE = """
 1 cF 1 A=B=C; D=E=F=A/2                    1 -1 1 / 1 1 -1 / -1 1 1
 2 hR 1 A=B=C; D=E=F                        1 -1 0 / -1 0 1 / -1 -1 -1
 3 cP 2 A=B=C; D=E=F=0                      1 0 0 / 0 1 0 / 0 0 1
 4 hR 2 A=B=C; D=E=F                        1 -1 0 / -1 0 1 / -1 -1 -1
 5 cI 2 A=B=C; D=E=F=-A/3                   1 0 1 / 1 1 0 / 0 1 1
 6 tI 2 A=B=C; D=E; -2D-2E-2F=A+B           0 1 1 / 1 0 1 / 1 1 0
 7 tI 2 A=B=C; E=F; -2D-2E-2F=A+B           1 0 1 / 1 1 0 / 0 1 1
 8 oI 2 A=B=C; -2D-2E-2F=A+B                -1 -1 0 / -1 0 -1 / 0 -1 -1
 9 hR 1 A=B; D=E=F=A/2                      1 0 0 / -1 1 0 / -1 -1 3
10 mC 1 A=B; D=E                            1 1 0 / 1 -1 0 / 0 0 -1
11 tP 2 A=B; D=E=F=0                        1 0 0 / 0 1 0 / 0 0 1
12 hP 2 A=B; D=E=0; F=-A/2                  1 0 0 / 0 1 0 / 0 0 1
13 oC 2 A=B; D=E=0                          1 1 0 / -1 1 0 / 0 0 1
14 mC 2 A=B; D=E                            1 1 0 / -1 1 0 / 0 0 1
15 tI 2 A=B; D=E=-A/2; F=0                  1 0 0 / 0 1 0 / 1 1 2
16 oF 2 A=B; D=E; -2D-2E-2F=A+B             -1 -1 0 / 1 -1 0 / 1 1 2
17 mC 2 A=B; -2D-2E-2F=A+B                  -1 1 0 / -1 -1 0 / 1 0 1
18 tI 1 B=C; D=A/4; E=F=A/2                 0 -1 1 / 1 -1 -1 / 1 0 0
19 oI 1 B=C; E=F=A/2                        -1 0 0 / 0 -1 1 / -1 1 1
20 mC 1 B=C; E=F                            0 1 1 / 0 1 -1 / -1 0 0
21 tP 2 B=C; D=E=F=0                        0 1 0 / 0 0 1 / 1 0 0
22 hP 2 B=C; D=-B/2; E=F=0                  0 1 0 / 0 0 1 / 1 0 0
23 oC 2 B=C; E=F=0                          0 1 1 / 0 -1 1 / 1 0 0
24 hR 2 B=C; E=F=-A/3; -2D-2E-2F=A+B        1 2 1 / 0 -1 1 / 1 0 0
25 mC 2 B=C; E=F                            0 1 1 / 0 -1 1 / 1 0 0
26 oF 1 D=A/4; E=F=A/2                      1 0 0 / -1 2 0 / -1 0 2
27 mC 1 E=F=A/2                             -1 2 0 / -1 0 0 / 0 -1 1
28 mC 1 E=A/2; F=2D                         -1 0 0 / -1 0 2 / 0 1 0
29 mC 1 E=2D; F=A/2                         1 0 0 / 1 -2 0 / 0 0 -1
30 mC 1 D=B/2; F=2E                         0 1 0 / 0 1 -2 / -1 0 0
31 aP 1 -                                   1 0 0 / 0 1 0 / 0 0 1
32 oP 2 D=E=F=0                             1 0 0 / 0 1 0 / 0 0 1
33 mP 2 D=F=0                               1 0 0 / 0 1 0 / 0 0 1
34 mP 2 D=E=0                               -1 0 0 / 0 0 -1 / 0 -1 0
35 mP 2 E=F=0                               0 -1 0 / -1 0 0 / 0 0 -1
36 oC 2 D=F=0; E=-A/2                       1 0 0 / -1 0 -2 / 0 1 0
37 mC 2 E=-A/2; F=0                         1 0 2 / 1 0 0 / 0 1 0
38 oC 2 D=E=0; F=-A/2                       -1 0 0 / 1 2 0 / 0 0 -1
39 mC 2 E=0; F=-A/2                         -1 -2 0 / -1 0 0 / 0 0 -1
40 oC 2 D=-B/2; E=F=0                       0 -1 0 / 0 1 2 / -1 0 0
41 mC 2 D=-B/2; F=0                         0 -1 -2 / 0 -1 0 / -1 0 0
42 oI 2 D=-B/2; E=-A/2; F=0                 -1 0 0 / 0 -1 0 / 1 1 2
43 mC 2 -2D-2E-2F=A+B; -2D-F=B              1 1 0 / -1 -1 -2 / -1 0 0
44 aP 2 -                                   1 0 0 / 0 1 0 / 0 0 1
"""

_VARS = "ABCDEF"


def _linear(expr):
    """Coefficients over (A..F) of a sum of terms like 'A', '-B/2', '2D', '0'."""
    v = np.zeros(6)
    for sign, num, var, den in re.findall(r"([+-]?)(\d*)([A-F]?)(?:/(\d+))?", expr.replace(" ", "")):
        if not var:
            continue
        v[_VARS.index(var)] += (-1 if sign == "-" else 1) * float(num or 1) / float(den or 1)
    return v


@dataclass
class Character:
    number: int
    lattice: str
    niggli_type: int
    conditions: str
    transform: np.ndarray         # (3, 3) int
    equations: np.ndarray         # (k, 6): equations @ (A, B, C, D, E, F) = 0


def _parse_table():
    out = []
    for line in _TABLE.strip().splitlines():
        num, lat, typ, rest = line.split(None, 3)
        cond, mat = rest[:36].strip(), rest[36:]
        T = np.array([[int(x) for x in row.split()] for row in mat.split("/")])
        eqs = []
        for clause in ([] if cond == "-" else cond.split(";")):
            sides = [_linear(s) for s in clause.split("=")]
            eqs += [sides[i] - sides[i + 1] for i in range(len(sides) - 1)]
        out.append(Character(int(num), lat, int(typ), cond, T, np.array(eqs).reshape(-1, 6)))
    return out


CHARACTERS = _parse_table()


def metric(basis):
    """(A, B, C, D, E, F) of real basis rows."""
    G = basis @ basis.T
    return np.array([G[0, 0], G[1, 1], G[2, 2], G[1, 2], G[0, 2], G[0, 1]])


def _g33(g):
    A, B, C, D, E, F = g
    return np.array([[A, F, E], [F, B, D], [E, D, C]])


def cell_of(basis):
    """(a, b, c, alpha, beta, gamma) of real basis rows (3, 3)."""
    return _cell_of_metric(metric(np.asarray(basis, float)))


def _cell_of_metric(g):
    A, B, C, D, E, F = g
    a, b, c = np.sqrt([A, B, C])
    ang = lambda x: float(np.degrees(np.arccos(np.clip(x, -1, 1))))
    return (float(a), float(b), float(c), ang(D / (b * c)), ang(E / (a * c)), ang(F / (a * b)))


def niggli_reduce(basis):
    """The Niggli reduced basis of the lattice of real basis rows (gemmi's Krivy-Gruber reduction):
    (reduced rows, integer matrix N with reduced = N @ basis)."""
    import gemmi
    basis = np.asarray(basis, float)
    if np.linalg.det(basis) < 0:
        basis = basis * -1.0
        flip = -1
    else:
        flip = 1
    gv = gemmi.GruberVector(gemmi.UnitCell(*cell_of(basis)), "P", True)
    # gemmi compares metric elements to epsilon: scale it to the cell (A^2)
    gv.niggli_reduce(epsilon=1e-7 * float(np.mean(metric(basis)[:3])), iteration_limit=200)
    op = gv.change_of_basis
    N = np.rint(np.array(op.rot, float).T / op.DEN).astype(int) * flip
    return N @ (basis * flip), N


_UNIMODULAR = None


def _unimodular():
    """Every integer matrix with entries -1, 0, 1 and determinant +1 (3 480 of them)."""
    global _UNIMODULAR
    if _UNIMODULAR is None:
        m = np.array(list(itertools.product((-1, 0, 1), repeat=9))).reshape(-1, 3, 3)
        _UNIMODULAR = m[np.rint(np.linalg.det(m)) == 1]
    return _UNIMODULAR


def _null_basis(eqs):
    if not len(eqs):
        return np.eye(6)
    _, s, vt = np.linalg.svd(eqs)
    rank = int(np.sum(s > 1e-9))
    return vt[rank:].T


# one of these per sign pattern: the character's equations plus "this element is 0"
_NULL_CACHE = {}


def _projection(ch, g, w):
    """Nearest metric to g (n, 6) obeying character ch, in the metric weighted by w (n, 6), with the
    character's sign type imposed (elements of the wrong sign pinned at 0)."""
    n = len(g)
    fixed = np.zeros((n, 3), bool)
    out = np.empty_like(g)
    todo = np.arange(n)
    for _ in range(4):
        if not len(todo):
            break
        pats = fixed[todo]
        for pat in np.unique(pats, axis=0):
            sel = todo[np.all(pats == pat, axis=1)]
            key = (ch.number, tuple(pat))
            if key not in _NULL_CACHE:
                extra = np.eye(6)[3:][pat]
                _NULL_CACHE[key] = _null_basis(np.concatenate([ch.equations, extra]))
            N = _NULL_CACHE[key]
            WN = w[sel, :, None] * N[None]                         # (k, 6, m)
            p = np.einsum("kmi,ki->km", np.linalg.pinv(WN), w[sel] * g[sel])
            out[sel] = p @ N.T
        def_ = out[todo, 3:]
        wrong = def_ < -1e-12 if ch.niggli_type == 1 else def_ > 1e-12
        fixed[todo] |= wrong
        todo = todo[np.any(wrong, axis=1)]
    return out


# penalty per unit of relative metric distance: an angle 1 degree from 90 scores about 10 (MOSFLM's scale)
_PENALTY_SCALE = 400.0


def _weights(g):
    A, B, C = g[:, 0], g[:, 1], g[:, 2]
    r2 = np.sqrt(2.0)
    return np.stack([1 / A, 1 / B, 1 / C, r2 / np.sqrt(B * C), r2 / np.sqrt(A * C), r2 / np.sqrt(A * B)], 1)


@dataclass
class Solution:
    number: int                # row of the table, 1 = lowest penalty (SOLUTION n)
    lattice: str
    penalty: float
    transform: np.ndarray      # conventional real basis rows = transform @ the basis given
    cell: tuple                # raw: the observed cell transformed
    reg_cell: tuple            # the nearest cell obeying the character (its constraints imposed)
    character: int = 0         # International Tables number, 1-44
    ref_cell: tuple = None     # refined with the constraints (pre-refinement), if done
    sd_mm: float = None        # sd in spot positions of that refinement
    fraction: float = None     # fraction of the spots it indexes

    @property
    def space_group(self):
        return SPACE_GROUPS[self.lattice].split()[0]

    @property
    def rhombohedral_cell(self):
        """For hR: the primitive rhombohedral cell of the regularised hexagonal cell."""
        from . import geometry
        hexb = np.linalg.inv(geometry.b_matrix(self.reg_cell))
        return cell_of(HEX_TO_RHOMBOHEDRAL @ hexb)


def _regularise(cell, lat):
    """Impose the Bravais lattice's exact constraints (the projection leaves rounding)."""
    a, b, c, al, be, ga = cell
    k = lat[0]
    if k == "a":
        return tuple(cell)
    if k == "m":
        return (a, b, c, 90.0, be, 90.0)
    if k == "o":
        return (a, b, c, 90.0, 90.0, 90.0)
    if k == "t":
        m = (a + b) / 2
        return (m, m, c, 90.0, 90.0, 90.0)
    if k == "h":
        m = (a + b) / 2
        return (m, m, c, 90.0, 90.0, 120.0)
    m = (a + b + c) / 3
    return (m, m, m, 90.0, 90.0, 90.0)


def lattice_solutions(basis, alt_tolerance=0.02):
    """The 44 lattice characters of the lattice of real basis rows, each with its penalty and
    conventional cell, sorted by penalty (number 1 = lowest)."""
    basis = np.asarray(basis, float)
    red, N = niggli_reduce(basis)
    g0 = metric(red)
    # bases as short as the reduced one, to alt_tolerance in A + B + C: the reduced cells of the
    # lattices near this one (across a Niggli boundary) are among them
    U = _unimodular()
    G0 = _g33(g0)
    GU = np.einsum("nij,jk,nlk->nil", U, G0, U)
    tr = np.trace(GU, axis1=1, axis2=2)
    keep = np.flatnonzero(tr <= np.trace(G0) * (1 + alt_tolerance))
    keep = keep[np.argsort(np.any(U[keep] != np.eye(3, dtype=int), axis=(1, 2)), kind="stable")]
    U, GU = U[keep], GU[keep]                     # the reduced cell itself first
    g = np.stack([GU[:, 0, 0], GU[:, 1, 1], GU[:, 2, 2], GU[:, 1, 2], GU[:, 0, 2], GU[:, 0, 1]], 1)
    w = _weights(g)
    # among bases that fit a character as well, the reduced cell itself, else one in its order
    # A <= B <= C (the characters' transformations assume it: an orthorhombic cell comes out a < b < c)
    disorder = (np.maximum(g[:, 0] - g[:, 1], 0) + np.maximum(g[:, 1] - g[:, 2], 0)) / (tr[keep] / 3)
    tie = 0.01 * disorder + 1e-9 * np.arange(len(g))
    out = []
    for ch in CHARACTERS:
        proj = _projection(ch, g, w)
        dist = np.linalg.norm(w * (g - proj), axis=1)
        k = int(np.argmin(dist + tie))
        pen = float(min(_PENALTY_SCALE * dist[k], 999.0))
        M = ch.transform
        T = M @ U[k] @ N
        raw = cell_of(T @ basis)
        gc = _g33(proj[k])
        gc = M @ gc @ M.T
        if np.all(np.linalg.eigvalsh(gc) > 0):
            reg = _cell_of_metric([gc[0, 0], gc[1, 1], gc[2, 2], gc[1, 2], gc[0, 2], gc[0, 1]])
        else:                  # far from the character: its nearest metric is no cell at all
            reg = raw
        if ch.lattice[0] == "m" and raw[4] < 90:
            # the same cell with a and c reversed (still right-handed): beta >= 90, as reported
            T = np.diag([-1, 1, -1]) @ T
            raw = cell_of(T @ basis)
            reg = (reg[0], reg[1], reg[2], reg[3], 180.0 - reg[4], reg[5])
        out.append(Solution(0, ch.lattice, pen, T.astype(int), tuple(raw), _regularise(reg, ch.lattice),
                            character=ch.number))
    out.sort(key=lambda s: (round(s.penalty, 6), -SYMMETRY_ORDER[s.lattice], s.character))
    for i, s in enumerate(out, 1):
        s.number = i
    return out


def preferred(solutions, max_penalty=20.0):
    """The highest-symmetry solution within the low-penalty group (MOSFLM's choice)."""
    ok = [s for s in solutions if s.penalty <= max_penalty]
    if not ok:
        return min(solutions, key=lambda s: s.penalty)
    return max(ok, key=lambda s: (SYMMETRY_ORDER[s.lattice], -s.penalty, -s.number))


def _cellfmt(c):
    return f"{c[0]:9.2f}{c[1]:9.2f}{c[2]:9.2f}{c[3]:8.1f}{c[4]:6.1f}{c[5]:6.1f}"


def format_table(solutions):
    """MOSFLM's table: highest penalty first, the lowest last, next to the suggested solution.  The
    first line of a solution has its refined cell ("ref") when it was pre-refined, otherwise the raw
    one ("unrefined"); the lines under it give the regularised ("reg") and raw ("raw") cells, and for
    hR the primitive rhombohedral cell."""
    head = " No PENALTY SDCELL FRACN LATT      a        b        c     alpha  beta gamma  Possible spacegroups"
    lines = [" List of possible Laue groups, sorted on penalty index.", " The lower the PENALTY, the better",
             head, ""]
    for s in sorted(solutions, key=lambda s: -s.number):
        sg = ",".join(SPACE_GROUPS[s.lattice].split())
        if s.lattice == "hR":
            sg += " (hexagonal settings of R3 and R32)"
        if s.character == 43:
            sg += " (transformed from I2)"
        if s.ref_cell is not None:
            sd = f"{s.sd_mm:6.3f} {s.fraction:4.2f}"
            first = s.ref_cell
        else:
            sd = "   unrefined"
            first = s.cell
        lines.append(f" {s.number:3d} {s.penalty:4.0f}  {sd:>12s}  {s.lattice:2s}{_cellfmt(first)}   {sg}")
        pad = " " * 23
        if s.ref_cell is not None:
            lines.append(f"{pad}reg {_cellfmt(s.reg_cell)}")
            lines.append(f"{pad}raw {_cellfmt(s.cell)}")
        if s.lattice == "hR":
            lines.append(f"{pad}    {_cellfmt(s.rhombohedral_cell)}   R3,R32 (primitive rhombohedral cell)")
    lines.append(head)
    return lines


def reduce_basis(basis, n_iter=20):
    """A reduced basis of the lattice spanned by real basis rows (the Niggli cell, gemmi); returns
    (reduced rows, integer matrix T with reduced = T @ basis)."""
    return niggli_reduce(basis)
