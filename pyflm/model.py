"""The experiment model: beam, detector, goniometer, scan and crystal as small objects with units.

They hold numbers only; conventions live in pyflm.geometry, algorithms in the stage modules, and the
keyword layer (pyflm.job) sets them from image headers and keywords.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import geometry


@dataclass
class Beam:
    wavelength: float                      # Angstrom
    divergence: tuple = (0.02, 0.02)       # degrees, horizontal and vertical (MOSFLM's default)
    dispersion: float = 0.0002             # delta lambda / lambda
    polarisation: float = 0.95             # fraction polarised in the horizontal (lab XY) plane
    polarisation_angle: float = 0.0        # degrees from the rotation axis (Z) to the electric vector
    polarisation_model: str = "SYNCHROTRON"  # SYNCHROTRON | MONOCHROMATOR | PINHOLE
    monochromator_two_theta: float = 0.0   # degrees, for MONOCHROMATOR

    @property
    def s0(self):
        """Incident beam vector in MOSFLM's lab frame, 1/Angstrom."""
        return geometry.BEAM_DIRECTION / self.wavelength


@dataclass
class Detector:
    distance: float                        # mm
    beam_x: float                          # mm, MOSFLM X (slow)
    beam_y: float                          # mm, MOSFLM Y (fast)
    pixel_fast: float                      # mm
    pixel_slow: float                      # mm
    n_fast: int
    n_slow: int
    two_theta: float = 0.0                 # degrees, swing about the rotation axis
    tilt: float = 0.0                      # degrees (MOSFLM's TILT keyword is in 0.01 degree units)
    twist: float = 0.0                     # degrees
    yscale: float = 1.0
    omega: float = 0.0                     # DETECTOR OMEGA, degrees
    roff: float = 0.0                      # mm, spiral image plates
    toff: float = 0.0                      # mm
    ccomega: float = 0.0                   # degrees
    overload: float = 1.0e9                # saturation value (counts)
    gain: float = 1.0                      # counts per photon
    nullpix: float = -1.0                  # values <= nullpix are not measurements
    adcoffset: float = 0.0
    name: str = "UNKNOWN"                  # detector type as MOSFLM names it (PILATUS, ADSC, ...)
    backstop: Optional[tuple] = None       # (x mm, y mm, radius mm)
    limits: dict = field(default_factory=dict)   # XMIN/XMAX/YMIN/YMAX/RMIN/RMAX, EXCLUDE: [quads]

    def frame(self):
        return geometry.detector_frame(self.distance, self.beam_x, self.beam_y,
                                       self.two_theta, self.tilt, self.twist, self.omega)

    @property
    def size_mm(self):
        return self.n_slow * self.pixel_slow, self.n_fast * self.pixel_fast   # (X extent, Y extent)

    def pixel_to_mm(self, fast, slow):
        return geometry.pixel_to_mm(fast, slow, self.pixel_fast, self.pixel_slow)

    def mm_to_pixel(self, x_mm, y_mm):
        return geometry.mm_to_pixel(x_mm, y_mm, self.pixel_fast, self.pixel_slow)


@dataclass
class Goniometer:
    reverse_phi: bool = False              # DETECTOR REVERSEPHI

    @property
    def axis(self):
        return -geometry.ROTATION_AXIS if self.reverse_phi else geometry.ROTATION_AXIS


@dataclass
class Scan:
    template: str                          # e.g. sim_####.cbf
    directory: str
    first: int                             # first image number
    last: int
    phi_start: float                       # degrees, phi at the start of image `first`
    osc: float                             # degrees per image

    def phi_range(self, image):
        start = self.phi_start + (image - self.first) * self.osc
        return start, start + self.osc

    def image_at(self, phi):
        return int(np.floor((phi - self.phi_start) / self.osc)) + self.first


@dataclass
class Crystal:
    cell: tuple                            # a b c (Angstrom) alpha beta gamma (degrees)
    space_group: str = "P1"                # Hermann-Mauguin, as gemmi names it
    U: np.ndarray = field(default_factory=lambda: np.eye(3))   # MOSFLM lab frame, phi 0
    missets: tuple = (0.0, 0.0, 0.0)       # phix phiy phiz, degrees
    mosaic: float = 0.0                    # full width, degrees
    tail: float = 0.0                      # share of the rocking curve in Lorentzian tails (0: Gaussian)

    @property
    def B(self):
        return geometry.b_matrix(self.cell)

    @property
    def A(self):
        """Setting matrix M.U.B (columns a*, b*, c* in MOSFLM's lab frame at phi 0), 1/Angstrom."""
        return geometry.misset_matrix(*self.missets) @ self.U @ self.B

    def lambda_a(self, wavelength):
        """The wavelength-scaled matrix MOSFLM keeps (dimensionless), missets excluded as in its file."""
        return wavelength * (self.U @ self.B)

    def sg(self):
        import gemmi
        return gemmi.SpaceGroup(self.space_group)
