"""MOSFLM's orientation matrix file (MATRIX reads it, NEWMAT writes it).

Layout (interface notes §4.3):
    3 lines   rows of lambda*A (A = U.B; columns a*, b*, c*; MOSFLM frame at phi 0)
    1 line    missetting angles phix phiy phiz
    3 lines   U
    1 line    cell a b c alpha beta gamma
    1 line    missets again
    optional  SYMM name
The wavelength is not in the file: it is lambda*A / (U.B).
"""
from __future__ import annotations

import math

import numpy as np

from . import geometry
from .errors import MatrixError
from .fileio import atomic_open
from .model import Crystal


def read_matrix(path):
    """A Crystal (U, cell, missets, space group when given) from a matrix file; the file's wavelength
    (from lambda*A against U.B) is kept as crystal.matrix_wavelength.  Raises MatrixError."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        raise MatrixError(path, f"cannot be read ({e.strerror})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    symm = None
    nums = []
    for ln in lines:
        if ln.strip().upper().startswith("SYMM"):
            symm = ln.split(None, 1)[1].strip() if len(ln.split()) > 1 else None
            continue
        for tok in ln.split():
            try:
                v = float(tok)
            except ValueError:
                raise MatrixError(path, f"'{tok}' is not a number (line: {ln.strip()[:60]})") from None
            if not math.isfinite(v):
                raise MatrixError(path, f"holds a non-finite number ({tok})")
            nums.append(v)
    if len(nums) < 24:
        raise MatrixError(path, f"holds {len(nums)} numbers, expected at least 24 (lambda*A 9, missets 3, "
                                "U 9, cell 6)")
    la = np.array(nums[0:9]).reshape(3, 3)
    missets = tuple(nums[9:12])
    U = np.array(nums[12:21]).reshape(3, 3)
    cell = tuple(nums[21:27]) if len(nums) >= 27 else None
    if cell is None:
        raise MatrixError(path, "has no cell line")
    if not np.allclose(U @ U.T, np.eye(3), atol=2e-3) or np.linalg.det(U) < 0:
        raise MatrixError(path, "its U matrix is not a rotation (rows not orthonormal)")
    try:
        B = geometry.b_matrix(cell)
    except ValueError:
        raise MatrixError(path, f"its cell {cell} is impossible") from None
    ub = U @ B
    wl = float(np.sum(la * ub) / np.sum(ub * ub))
    if not (0.01 < wl < 20) or not np.allclose(la, wl * ub, atol=2e-3 * np.abs(la).max()):
        raise MatrixError(path, "lambda*A does not equal the wavelength times U.B of its cell")
    c = Crystal(cell, "P1", U, missets)
    if symm:
        from .job import space_group_name
        try:
            c.space_group = space_group_name(symm)
        except Exception:
            raise MatrixError(path, f"unknown space group on its SYMM line ({symm})") from None
    c.matrix_wavelength = wl
    return c


def write_matrix(path, crystal, wavelength):
    """Write MOSFLM's matrix file for a crystal (missets written as given, not folded)."""
    la = wavelength * (crystal.U @ crystal.B)
    m = crystal.missets
    with atomic_open(path, "w") as f:
        for row in la:
            f.write("".join(f"{x:12.8f}" for x in row) + "\n")
        f.write("".join(f"{x:12.3f}" for x in m) + "\n")
        for row in crystal.U:
            f.write("".join(f"{x:12.8f}" for x in row) + "\n")
        f.write("".join(f"{x:12.4f}" for x in crystal.cell) + "\n")
        f.write("".join(f"{x:12.3f}" for x in m) + "\n")
        import gemmi
        sg = gemmi.SpaceGroup(crystal.space_group)
        f.write(f"SYMM {sg.short_name().upper()}\n")
