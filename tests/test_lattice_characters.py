"""The 44 lattice characters: a lattice built to obey each one is recognised, after measurement
error, with its conventional cell; a general triclinic cell obeys none but aP."""
import numpy as np
import pytest

from pyflm import geometry, lattice


def _g33(g):
    A, B, C, D, E, F = g
    return np.array([[A, F, E], [F, B, D], [E, D, C]])


def _is_niggli(g, typ, eps=1e-9):
    """Niggli's main conditions (IT A 9.2.2) and the sign type."""
    A, B, C, D, E, F = g
    if not (A <= B + eps and B <= C + eps and abs(2 * D) <= B + eps and abs(2 * E) <= A + eps
            and abs(2 * F) <= A + eps):
        return False
    if typ == 1 and not min(D, E, F) > 0.02 * A:
        return False
    if typ == 2 and not (max(D, E, F) <= eps and A + B + 2 * (D + E + F) >= -eps):
        return False
    return np.linalg.eigvalsh(_g33(g)).min() > 0.05 * A


def ideal_reduced_metric(ch, rng):
    """A random Niggli reduced metric obeying character ch exactly (A..C between 1600 and 10000)."""
    _, s, vt = np.linalg.svd(ch.equations) if len(ch.equations) else (None, np.zeros(0), np.eye(6))
    N = vt[int(np.sum(s > 1e-9)):].T
    sign = 1 if ch.niggli_type == 1 else -1
    for _ in range(100000):
        A, B, C = np.sort(rng.uniform(40, 100, 3) ** 2)
        g = np.array([A, B, C, sign * rng.uniform(0, B / 2), sign * rng.uniform(0, A / 2),
                      sign * rng.uniform(0, A / 2)])
        g = N @ np.linalg.lstsq(N, g, rcond=None)[0]
        if _is_niggli(g, ch.niggli_type):
            return g
    raise AssertionError(f"no sample for character {ch.number}")


def generic_reduced_metric(ch, rng):
    """As ideal_reduced_metric, but with no higher symmetry by accident: every lattice of higher
    symmetry is clearly off (penalty over 40), so the character's own lattice is the answer."""
    mine = lattice.SYMMETRY_ORDER[ch.lattice]
    for _ in range(200):
        g = ideal_reduced_metric(ch, rng)
        sols = lattice.lattice_solutions(basis_of_metric(g))
        if all(s.penalty > 40 for s in sols if lattice.SYMMETRY_ORDER[s.lattice] > mine):
            return g
    raise AssertionError(f"no generic sample for character {ch.number}")


def basis_of_metric(g):
    return np.linalg.cholesky(_g33(g))           # rows: a, b, c with this metric


def conventional_form_ok(cell, lat, tol=0.05):
    a, b, c, al, be, ga = cell
    k = lat[0]
    right = lambda *x: all(abs(v - 90) < tol for v in x)
    same = lambda x, y: abs(x - y) < 1e-3 * x
    return {"a": True, "m": right(al, ga), "o": right(al, be, ga), "t": right(al, be, ga) and same(a, b),
            "h": right(al, be) and abs(ga - 120) < tol and same(a, b),
            "c": right(al, be, ga) and same(a, b) and same(b, c)}[k]


def test_each_transformation_gives_its_bravais_lattice_exactly():
    """The table itself: on exact metrics, every character's transformation gives a cell of its
    Bravais lattice's form, with the lattice points on its centring positions."""
    rng = np.random.default_rng(7)
    cen_det = {"P": 1, "C": 2, "I": 2, "F": 4, "R": 3}
    assert [c.number for c in lattice.CHARACTERS] == list(range(1, 45))
    for ch in lattice.CHARACTERS:
        cen = "R" if ch.lattice == "hR" else (ch.lattice[1] if ch.lattice[1] in "CIF" else "P")
        assert round(np.linalg.det(ch.transform)) == cen_det[cen], ch.number
        frac = np.mod(np.linalg.inv(ch.transform) + 1e-9, 1)
        allowed = np.array(lattice.CENTRING[cen])
        for f in frac:            # each reduced basis vector is a lattice point of the conventional cell
            d = np.abs(f - allowed)
            assert np.any(np.all(np.minimum(d, 1 - d) < 1e-6, axis=1)), ch.number
        for _ in range(3):
            conv = ch.transform @ basis_of_metric(ideal_reduced_metric(ch, rng))
            assert conventional_form_ok(lattice.cell_of(conv), ch.lattice, tol=1e-6), ch.number


@pytest.mark.parametrize("number", range(1, 45))
def test_a_lattice_of_each_character_is_found_with_its_conventional_cell(number):
    ch = lattice.CHARACTERS[number - 1]
    rng = np.random.default_rng(100 + number)
    g = generic_reduced_metric(ch, rng)
    red = basis_of_metric(g)
    conv_true = ch.transform @ red                       # the conventional cell as built
    # as indexing sees it: any orientation, any primitive basis, and 0.1 % measurement error
    rot = geometry.rot_about(rng.normal(size=3), rng.uniform(0, 180))
    scramble = np.array([[1, 1, 0], [0, 1, 0], [1, -1, 1]]) if number % 2 else np.array(
        [[0, 1, 0], [-1, 0, 1], [1, 0, 0]])
    noisy = red + rng.normal(scale=0.001, size=(3, 3)) * np.linalg.norm(red, axis=1)[:, None] / np.sqrt(3)
    seen = scramble @ noisy @ rot.T
    sols = lattice.lattice_solutions(seen)
    assert len(sols) == 44 and sorted(s.character for s in sols) == list(range(1, 45))
    mine = next(s for s in sols if s.character == number)
    assert mine.penalty < 5, (number, mine.penalty)
    # the conventional cell is the lattice built: the same conventional lattice (an integer
    # unimodular matrix between the two bases), its constants within 0.3 % and 0.3 degrees
    conv = mine.transform @ seen @ rot
    rel = conv @ np.linalg.inv(conv_true)
    assert np.allclose(rel, np.rint(rel), atol=0.02) and abs(round(np.linalg.det(np.rint(rel)))) == 1, \
        (number, np.round(rel, 3))
    true_cell = lattice.cell_of(conv_true)
    vol = lambda c: np.linalg.det(np.linalg.inv(geometry.b_matrix(c)))
    for got in (mine.cell, mine.reg_cell):
        assert abs(vol(got) / vol(true_cell) - 1) < 0.004, (number, got, true_cell)
        if ch.lattice[0] == "m":
            # the unique axis b; a and c may be any pair of the conventional lattice's plane
            assert abs(got[1] / true_cell[1] - 1) < 0.003, (number, got, true_cell)
        elif ch.lattice[0] != "a":
            # the axis order may differ (orthorhombic and cubic axes, 60 or 120 degrees)
            assert np.allclose(sorted(got[:3]), sorted(true_cell[:3]), rtol=0.003), (number, got, true_cell)
            ang = lambda c: sorted(min(x, 180 - x) for x in c[3:])
            assert np.allclose(ang(got), ang(true_cell), atol=0.3), (number, got, true_cell)
    assert conventional_form_ok(mine.reg_cell, ch.lattice, tol=1e-6)
    # and the Bravais lattice is the preferred one (random parameters have no extra symmetry)
    assert lattice.preferred(sols).lattice == ch.lattice, (number, lattice.preferred(sols))


def form_deviation(cell, lat):
    """Largest deviation (degrees, or percent for lengths) of a cell from its lattice's form."""
    a, b, c, al, be, ga = cell
    pct = lambda x, y: 100 * abs(x - y) / y
    dev = {"a": [0], "m": [al - 90, ga - 90], "o": [al - 90, be - 90, ga - 90],
           "t": [al - 90, be - 90, ga - 90, pct(a, b)], "h": [al - 90, be - 90, ga - 120, pct(a, b)],
           "c": [al - 90, be - 90, ga - 90, pct(a, b), pct(b, c)]}[lat[0]]
    return max(abs(x) for x in dev)


def test_a_triclinic_cell_obeys_only_ap():
    rng = np.random.default_rng(5)
    clean = 0
    for _ in range(8):
        # edges 15 % or more apart, angles 10 to 20 degrees from 90
        cell = tuple(40 * 1.15 ** np.cumsum(rng.uniform(1, 2, 3))) + tuple(
            90 + rng.choice([-1, 1], 3) * rng.uniform(10, 20, 3))
        basis = np.linalg.inv(geometry.b_matrix(cell)) @ geometry.rot_about([1, 2, 3], 40).T
        sols = lattice.lattice_solutions(basis)
        assert min(s.penalty for s in sols if s.lattice == "aP") < 1e-6
        low = [s for s in sols if s.penalty <= 20 and s.lattice != "aP"]
        # a random cell can, by chance, be a degree or two from a monoclinic one: then (only then)
        # that solution's own cell shows it
        for s in low:
            assert form_deviation(s.cell, s.lattice) < 2.0, (cell, s)
        clean += not low
        if not low:
            assert lattice.preferred(sols).lattice == "aP"
            assert min(s.penalty for s in sols if s.lattice != "aP") > 20
    assert clean >= 6


def test_table_is_mosflms_layout():
    basis = np.linalg.inv(geometry.b_matrix((42.3, 51.9, 78.6, 90, 90, 90)))
    lines = lattice.format_table(lattice.lattice_solutions(basis))
    head = [i for i, ln in enumerate(lines) if ln.startswith(" No PENALTY SDCELL FRACN LATT")]
    assert len(head) == 2
    rows = [ln for ln in lines[head[0] + 1:head[1]] if ln[:5].strip().isdigit()]
    assert [int(r.split()[0]) for r in rows] == list(range(44, 0, -1))
    last = rows[-1].split()
    assert last[0] == "1" and last[3] == "oP" and abs(float(last[4]) - 42.3) < 0.01
