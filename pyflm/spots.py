"""The spot list every stage passes around (spot finding -> indexing -> refinement, and the .spt file).

A spot list is a numpy structured array of SPOT_DTYPE.  Positions are given both as pixels (fast, slow,
counted from the outer edge of the first pixel, as pyflm.geometry) and as MOSFLM detector mm (x_mm along
slow, y_mm along fast).  phi is the centroid phi when known, else the middle of the image's oscillation.
"""
import numpy as np

SPOT_DTYPE = np.dtype([
    ("image", "i4"),        # image number the spot was found on
    ("phi", "f8"),          # degrees
    ("fast", "f8"),         # pixels
    ("slow", "f8"),         # pixels
    ("x_mm", "f8"),         # MOSFLM detector X (slow) mm
    ("y_mm", "f8"),         # MOSFLM detector Y (fast) mm
    ("intensity", "f8"),    # background-subtracted counts
    ("sigma", "f8"),
    ("npix", "i4"),
    ("size_fast", "f4"),    # extent in pixels
    ("size_slow", "f4"),
    ("flag", "i4"),         # 0 ok; bit flags (see pyflm.spotfinder) for rejected spots
    ("phi_cut", "i1"),      # 1: a 3D spot on the first or last image searched, its phi centroid cut
])


def empty(n=0):
    return np.zeros(n, dtype=SPOT_DTYPE)
