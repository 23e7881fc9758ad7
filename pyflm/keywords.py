"""The one table of MOSFLM keywords: it drives the parser, the checks on values and `help`.

Each Keyword has a canonical name, a kind (setting, action, control, file), the types of its positional
values, its sub-keywords with the types of their values, and a one-line summary.  A value spec is a
space-separated list of tokens:

    r  real        i  integer      s  word (case folded)      f  file name (case kept)
    t  the rest of the line as text (case kept)
    a suffix ? makes the value optional; * takes any number of values (at least one);
    a range may follow in brackets: r[0:] (>= 0), r(0:] (> 0), i[1:99999].

Values parsed by pyflm.parser land in job.kw (settings) or in the queued action's args, as a dict:
positional values under '_args' (a list); a sub-keyword with one value -> that value, with several ->
a list, with none -> True.  Sub-keyword names are canonical (THRESH -> THRESHOLD).

AUTOINDEX: several AUTOINDEX lines before one GO make one indexing over all their images; the action's
args then carry 'IMAGES': a list of {'IMAGE': n, 'PHI': [a, b]} (and the other sub-keywords merged).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Keyword:
    name: str
    kind: str                   # 'setting' | 'action' | 'control' | 'file'
    args: str = ""              # positional value spec
    subs: dict = field(default_factory=dict)   # SUBKEY -> value spec ('' for a flag)
    summary: str = ""
    action: str = None          # action name queued (actions only)
    min_abbrev: int = 4
    aliases: tuple = ()


def K(name, kind, args="", subs=None, summary="", **kw):
    return Keyword(name, kind, args, subs or {}, summary, **kw)


_PARAMS = "t?"   # free lists of parameter names (FIX/UNFIX/FREE)

TABLE = [
    # -- images and files
    K("TITLE", "setting", "t", summary="title written into the MTZ file"),
    K("PNAME", "setting", "s", summary="project name written into the MTZ file"),
    K("XNAME", "setting", "s", summary="crystal name written into the MTZ file"),
    K("DNAME", "setting", "s", summary="dataset name written into the MTZ file"),
    K("HKLOUT", "file", "f", summary="the output (unmerged) MTZ file"),
    K("SUMMARY", "file", "f", summary="the summary file of per-image tables (loggraph)"),
    K("GENFILE", "file", "f", summary="scratch file of generated reflections"),
    K("NEWMAT", "file", "f", summary="write the refined orientation matrix to this file"),
    K("MATRIX", "file", "f", summary="read the orientation matrix from this file"),
    K("SPOTOD", "file", "f", summary="spot file written by spot finding (.spt)"),
    K("COORDS", "file", "f", summary="file of spot coordinates"),
    K("XMLFILE", "file", "f", summary="XML responses for a graphical interface"),
    K("DIRECTORY", "setting", "f", summary="directory holding the images"),
    K("TEMPLATE", "setting", "f", summary="image file names: # (or ?) stand for the image number digits"),
    K("EXTENSION", "setting", "f", summary="image file extension when the template has none"),
    K("IMAGE", "setting", "i[0:]", {"PHI": "r r"}, "current image, optionally with its phi range"),
    K("HEADER", "action", "", {"BRIEF": ""}, "print the header of the current image", action="HEADER",
      aliases=("HEAD",)),
    K("HARVEST", "setting", "s?", {"ON": "", "OFF": ""}, "deposition harvesting file on or off"),
    # -- beam
    K("WAVELENGTH", "setting", "r(0:10]", summary="X-ray wavelength (Angstrom); overrides the header"),
    K("DIVERGENCE", "setting", "r[0:5] r[0:5]?", summary="beam divergence, horizontal and vertical (degrees)"),
    K("DISPERSION", "setting", "r[0:0.1]", summary="wavelength dispersion delta-lambda/lambda"),
    K("POLARISATION", "setting", "", {"SYNCHROTRON": "r[0:1]?", "MONOCHROMATOR": "r[0:180]",
                                      "PINHOLE": ""}, "polarisation of the incident beam",
      aliases=("POLARIZATION",)),
    K("BEAM", "setting", "r r", {"SWUNG_OUT": ""}, "direct beam position (MOSFLM detector mm)"),
    # -- detector
    K("DETECTOR", "setting", "s?", {"REVERSEPHI": "", "OMEGA": "r[-360:360]"},
      "detector type; REVERSEPHI for a reversed rotation; OMEGA rotation about the beam"),
    K("SCANNER", "setting", "", {"ROFF": "r", "TOFF": "r"}, "spiral image plate distortion constants (mm)"),
    K("DISTANCE", "setting", "r(0:10000]", summary="crystal to detector distance (mm)"),
    K("PIXEL", "setting", "r(0:10]", summary="pixel size (mm)"),
    K("TWOTHETA", "setting", "r[-180:180]", summary="detector swing angle (degrees)"),
    K("LIMITS", "setting", "", {"XMIN": "r", "XMAX": "r", "YMIN": "r", "YMAX": "r", "RMIN": "r[0:]",
                                "RMAX": "r(0:]", "XSCAN": "r", "YSCAN": "r", "EXCLUDE": "r*"},
      "active area and excluded regions of the detector (mm)"),
    K("BACKSTOP", "setting", "", {"CENTRE": "r r", "RADIUS": "r[0:]"}, "circular backstop shadow (mm)",
      ),
    K("NULLPIX", "setting", "r", summary="pixel values at or below this are not measurements"),
    K("OVERLOAD", "setting", "", {"CUTOFF": "r(0:]"}, "saturation value of the detector"),
    K("GAIN", "setting", "r(0:1000]", summary="detector gain (counts per photon)"),
    K("ADCOFFSET", "setting", "r", summary="constant added to pixel values by the electronics"),
    K("DISTORTION", "setting", "", {"YSCALE": "r(0:2]", "TILT": "r", "TWIST": "r", "CCOMEGA": "r",
                                    "ROFF": "r", "TOFF": "r"},
      "detector distortion starting values (TILT, TWIST, CCOMEGA in 0.01 degrees)"),
    # -- crystal
    K("CELL", "setting", "r(0:10000] r(0:10000] r(0:10000] r(0:180) r(0:180) r(0:180)",
      summary="unit cell a b c (Angstrom) alpha beta gamma (degrees)"),
    K("SYMMETRY", "setting", "s", summary="space group by name (P212121, H3, R3) or number",
      aliases=("SYMM",)),
    K("MOSAIC", "setting", "r[0:20]?", {"ESTIMATE": "i?"},
      "mosaic spread (full width, degrees); MOSAIC ESTIMATE [n] estimates it"),
    K("MISSETS", "setting", "r r r", summary="missetting angles phix phiy phiz (degrees)"),
    K("RESOLUTION", "setting", "r(0:]? r(0:]?", {"EXCLUDE": "r*"},
      "resolution limits dmin [dmax] (Angstrom); EXCLUDE d1 d2 removes a shell"),
    # -- spot finding and indexing
    K("FINDSPOTS", "action", "", {"FIND": "i", "FILE": "f", "THRESHOLD": "r(0:]", "RMIN": "r[0:]",
                                  "RMAX": "r(0:]", "MINPIX": "i[1:1000]", "MAXPEAK": "i", "LOCAL": "",
                                  "RADIAL": "", "SPLIT": "r", "IMAGE": "i"},
      "search image(s) for spots", action="FINDSPOTS"),
    K("SPOTS", "setting", "", {"THRESHOLD": "r(0:]", "RMIN": "r[0:]", "RMAX": "r(0:]", "MINPIX": "i[1:1000]",
                               "MAXPEAK": "i", "LOCAL": "", "RADIAL": "", "SPLIT": "r", "ICE": "",
                               "NOICE": ""}, "spot-search parameters kept for later searches"),
    K("THRESHOLD", "setting", "r(0:]", summary="I/sigma threshold for spots used in indexing (default 20)"),
    K("AUTOINDEX", "action", "", {"DPS": "", "REFINE": "", "NOREFINE": "", "IMAGE": "i", "PHI": "r r",
                                  "TO": "i", "THRESHOLD": "r(0:]", "MAXCELL": "r(0:]",
                                  "SOLUTION": "i[1:44]", "HKLDEV": "r(0:1]"},
      "index from the spots of the given images", action="AUTOINDEX"),
    K("SOLUTION", "setting", "i[1:44]", summary="choose autoindexing solution n"),
    K("HKLDEV", "setting", "r(0:1]", summary="largest deviation from integral indices accepted in indexing"),
    # -- refinement
    K("REFINEMENT", "setting", "", {"FIX": _PARAMS, "FREE": _PARAMS, "RESIDUAL": "r(0:]",
                                    "INCLUDE": "s?", "EXCLUDE": "s?", "FULLFRAC": "r[0:1]",
                                    "IMIN": "r"},
      "positional refinement control", aliases=("REFINE",)),
    K("POSTREF", "setting", "", {"FIX": _PARAMS, "UNFIX": _PARAMS, "MULTI": "", "SEGMENTS": "i[1:20]",
                                 "REPEAT": "i[1:100]", "SEGMENT": "i[1:20]", "NOSEGMENT": "",
                                 "MAXRESIDUAL": "r(0:]", "SDFAC": "r(0:]", "NOMULTI": "", "OFF": "",
                                 "ON": ""}, "post-refinement control"),
    # -- integration
    K("PROCESS", "action", "i[0:]? i[0:]?", {"TO": "i[0:]", "START": "r", "ANGLE": "r(0:]", "ADD": "i[0:]"},
      "integrate images a to b", action="PROCESS"),
    K("BLOCK", "setting", "i[1:1000]", summary="images per block in integration"),
    K("RASTER", "setting", "i[3:999] i[3:999] i[0:999] i[0:999] i[0:999]",
      summary="measurement box nxs nys nc nrx nry (pixels)"),
    K("SEPARATION", "setting", "r(0:]? r(0:]?", {"CLOSE": ""}, "minimum spot separation (mm)"),
    K("PROFILE", "setting", "", {"TOLERANCE": "r r?", "AUTO": "s", "OPTIMISE": "", "NOOPTIMISE": "",
                                 "NOFIXBOX": "", "OVERLOAD": "", "PARTIALS": "", "FULLS": ""},
      "profile fitting and box control"),
    K("REJECTION", "setting", "", {"MINBG": "i", "BGRATIO": "r(0:]", "PKRATIO": "r(0:]",
                                   "SIGMA": "r(0:]"}, "outlier rejection and bad-spot tests"),
    K("MAXWIDTH", "setting", "r(0:360]", summary="reflections wider than this in phi are not integrated"),
    K("NPROC", "setting", "i[1:256]", summary="number of processes used for integration"),
    K("SCHEDULER", "setting", "f", summary="Dask scheduler (tcp://host:port) to run integration blocks on"),
    K("PICTURE", "setting", "s?", {"ON": "", "OFF": "", "DIRECTORY": "f"},
      "write PNG pictures of spots and predictions"),
    # -- strategy and prediction
    K("PREDICT", "action", "", {"PNG": "f?"}, "predict the current image", action="PREDICT",
      aliases=("PREDICT_SPOTS",)),
    K("STRATEGY", "action", "", {"START": "r", "END": "r", "AUTO": "", "ANOMALOUS": "", "SEGMENTS": "i[1:3]",
                                 "ROTATE": "r(0:360]"}, "completeness for a phi range, or the best range",
      action="STRATEGY"),
    K("TESTGEN", "action", "", {"START": "r", "END": "r", "STEP": "r(0:]", "MINOSC": "r(0:]",
                                "MAXOSC": "r(0:]", "OVERLAP": "r[0:100]", "ANGLE": "r"},
      "largest oscillation without spatial overlaps", action="TESTGEN"),
    K("STATS", "setting", "", summary="print statistics of the strategy"),
    # -- control
    K("GO", "control", "", summary="run the queued actions", min_abbrev=2),
    K("RUN", "control", "", summary="run the queued actions", min_abbrev=3),
    K("EXIT", "control", "", summary="stop", min_abbrev=4, aliases=("QUIT",)),
    K("END", "control", "", summary="stop", min_abbrev=3),
    K("XGUI", "setting", "s?", {"ON": "", "OFF": ""}, "graphics window (no effect in batch)"),
    K("DISPLAY", "setting", "s?", summary="extra graphics output (no effect in batch)"),
    K("PLOT", "setting", "", summary="extra graphics output (no effect in batch)"),
    K("HELP", "control", "t?", summary="list keywords, or show the help for one"),
]

BY_NAME = {k.name: k for k in TABLE}

# Four-letter abbreviations shared by two keywords: MOSFLM reads them as the commoner one.
PREFERRED = {"DIST": "DISTANCE", "DISP": "DISPERSION", "PROC": "PROCESS", "REFI": "REFINEMENT"}


def lookup(word, names=None, min_abbrev=4):
    """Canonical name for a (possibly abbreviated) keyword, or None.  Exact names and aliases first;
    then a unique prefix of at least 4 characters (or of the keyword's own minimum)."""
    w = word.upper()
    if names is None:
        for k in TABLE:
            if w == k.name or w in k.aliases:
                return k.name
        for abbrev, full in PREFERRED.items():
            if w.startswith(abbrev) and full.startswith(w):
                return full
        cands = list(dict.fromkeys(k.name for k in TABLE if len(w) >= min(k.min_abbrev, len(k.name)) and
                                   (k.name.startswith(w) or any(a.startswith(w) for a in k.aliases))))
    else:
        if w in names:
            return w
        cands = [n for n in names if len(w) >= min(min_abbrev, len(n)) and n.startswith(w)]
    return cands[0] if len(cands) == 1 else None


def all_names():
    return [k.name for k in TABLE]
