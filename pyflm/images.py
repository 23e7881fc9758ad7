"""Images: templates, reading every format through fabio, headers, and the experiment they imply.

Formats: CBF/miniCBF (Pilatus, Eiger converted to CBF; also .gz/.bz2), SMV (ADSC, Timepix and other
d*TREK-style headers), Mar345 (.mar1600/.mar2300/.mar3450), MarCCD/Rayonix, R-AXIS, and Eiger HDF5
master files.  Every header is turned into an ImageHeader with MOSFLM's conventions (beam in MOSFLM mm,
via pyflm.geometry.header_beam_to_mosflm).  Anything wrong with a file is an ImageError: one line that
names the file and what is wrong.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import geometry
from .errors import ImageError, InputError
from .model import Beam, Detector, Goniometer, Scan


@dataclass
class ImageHeader:
    path: str
    detector: str = "UNKNOWN"          # as MOSFLM names it: PILATUS, EIGER, ADSC, MAR, MARCCD, RAXIS, ...
    wavelength: Optional[float] = None  # Angstrom
    distance: Optional[float] = None    # mm
    pixel_fast: Optional[float] = None  # mm
    pixel_slow: Optional[float] = None
    n_fast: int = 0
    n_slow: int = 0
    beam: Optional[tuple] = None        # MOSFLM mm (X along slow, Y along fast)
    beam_source: str = "header"         # 'header' or 'image centre'
    phi_start: Optional[float] = None   # degrees
    osc: Optional[float] = None         # degrees
    two_theta: float = 0.0              # degrees
    omega: float = 0.0                  # detector rotation about the beam (MOSFLM's DETECTOR OMEGA)
    overload: Optional[float] = None
    gain: Optional[float] = None
    exposure: Optional[float] = None
    polarisation: Optional[float] = None
    polarisation_angle: float = 0.0     # geometry.polarisation_angle of the scan axis
    warnings: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def phi_end(self):
        return None if self.phi_start is None or self.osc is None else self.phi_start + self.osc


# ---- templates ------------------------------------------------------------------------------------

_HASHES = re.compile(r"[#?]+")


def image_name(template, number, extension=None):
    """`name_###.ext` with the run of # (or ?) replaced by the zero-padded image number."""
    m = list(_HASHES.finditer(template))
    if not m:
        raise InputError("TEMPLATE has no # (or ?) standing for the image number", keyword="TEMPLATE",
                         given=template, expected="a name such as image_###.cbf")
    last = m[-1]
    width = last.end() - last.start()
    if number < 0 or len(str(number)) > width:
        raise InputError("image number does not fit the template", keyword="IMAGE", given=number,
                         expected=f"0 to {10 ** width - 1} for {template}")
    name = template[:last.start()] + f"{number:0{width}d}" + template[last.end():]
    if extension and not os.path.splitext(name)[1]:
        name += "." + extension.lstrip(".")
    return name


def image_path(template, directory, number, extension=None):
    """The file holding image `number`; a .gz or .bz2 variant is used when the plain file is absent."""
    p = os.path.join(directory or ".", image_name(template, number, extension))
    if os.path.exists(p):
        return p
    for ext in (".gz", ".bz2"):
        if os.path.exists(p + ext):
            return p + ext
    return p


def images_on_disk(template, directory, extension=None):
    """Sorted image numbers present on disk for a template (plain, .gz or .bz2)."""
    m = list(_HASHES.finditer(template))
    if not m:
        return []
    last = m[-1]
    pre, post = template[:last.start()], template[last.end():]
    if extension and not os.path.splitext(template)[1]:
        post += "." + extension.lstrip(".")
    pat = re.compile(re.escape(pre) + r"(\d{%d})" % (last.end() - last.start()) + re.escape(post)
                     + r"(\.gz|\.bz2)?$")
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return []
    return sorted({int(mm.group(1)) for n in names for mm in [pat.match(n)] if mm})


def sectors(numbers):
    """Consecutive image numbers form a sector: [(first, last), ...]."""
    out = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [tuple(s) for s in out]


# ---- reading --------------------------------------------------------------------------------------

_CBF_CLASS = []


def _cbf_class():
    """fabio's CbfImage with its byte-offset decoding done by ext/_cbf.pyx (2-3 times faster, the same
    pixels to the bit: tests/test_cbf_read.py); whatever that kernel does not take (other pixel types, a
    64-bit delta, a stream cut off inside an escape) fabio decodes itself."""
    if not _CBF_CLASS:
        from fabio.cbfimage import CbfImage
        try:
            from ._ext import _cbf
        except ImportError:
            _cbf = None

        class FastCbfImage(CbfImage):
            def _readbinary_byte_offset(self, raw_bytes):
                if _cbf is not None and self._dtype == np.int32 and sys.byteorder == "little":
                    dim2, dim1 = self._shape
                    data = _cbf.dec_cbf32(memoryview(raw_bytes).cast("B"), dim1 * dim2)
                    if data is not None:
                        return data
                return super()._readbinary_byte_offset(raw_bytes)
        _CBF_CLASS.append(FastCbfImage)
    return _CBF_CLASS[0]


def _open(path):
    import fabio
    logging.getLogger("fabio").setLevel(logging.CRITICAL)   # its warnings would bypass our one line
    if not os.path.exists(path):
        raise ImageError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise ImageError(path, "the file is empty (0 bytes)")
    if path.endswith((".h5", ".nxs", ".hdf5")):
        return None
    if path.endswith(".cbf"):
        # fabio checks a CBF's MD5 but only logs a mismatch; _check_truncated checks it and refuses the
        # image, so fabio need not hash the pixel data too (that was as long as decoding it)
        try:
            return _cbf_class()().read(path, check_MD5=False)
        except Exception:      # not a CBF after all, or a broken one: fabio.open tells which below
            pass
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # fabio prints while sniffing some formats
            return fabio.open(path)
    except Exception:   # fabio raises many kinds; say what the user can act on
        head = _raw_bytes(path, 4096)
        if b"_array_data" in head or b"HEADER_BYTES" in head or b"mar research" in head.lower():
            raise ImageError(path, "the image data is truncated or corrupt") from None
        raise ImageError(path, "not an image in any format pyflm reads (CBF, SMV, Mar345, MarCCD, "
                               "R-AXIS, Eiger HDF5)") from None


def read_header(path, frame=None):
    """The header of an image file as an ImageHeader (reads the file through fabio)."""
    return read_image(path, frame)[1]


_HEADER_CACHE = {}


def read_image(path, frame=None):
    """(data [slow, fast] as float32 or int32, ImageHeader).  Raises ImageError."""
    path = os.fspath(path)
    if path.endswith((".h5", ".nxs", ".hdf5")):
        return _read_eiger(path, frame or 1)
    img = _open(path)
    try:
        data = img.data
    except Exception as e:
        raise ImageError(path, f"the pixel data cannot be decoded ({e})") from None
    if data is None or data.ndim != 2 or data.size == 0:
        raise ImageError(path, "no 2-D pixel array in the file")
    hdr = _parse(img, path)
    if hdr.n_fast and hdr.n_slow and (data.shape[1], data.shape[0]) != (hdr.n_fast, hdr.n_slow):
        raise ImageError(path, f"the pixel array is {data.shape[1]}x{data.shape[0]} but the header "
                               f"says {hdr.n_fast}x{hdr.n_slow} (truncated or corrupt)")
    hdr.n_fast, hdr.n_slow = data.shape[1], data.shape[0]
    _default_beam(hdr)
    _check_truncated(img, path, data)
    _HEADER_CACHE[path] = hdr
    return data, hdr


def read_pixels(path, frame=None):
    """read_image(path, frame)[0]: the pixels alone.  A plain miniCBF of byte-offset 32-bit counts (a
    Pilatus's) is read without fabio's parse of its text header, which integration does not need (0.4
    ms of a sim image's 2 ms, the rest its MD5 and decoding): its binary section's header gives the
    size, shape and checksum, the kernel decodes the same bytes.  Anything else, or anything wrong
    (short, checksum, sizes that disagree), goes through read_image, which reads it or says what is
    wrong."""
    path = os.fspath(path)
    data = _plain_cbf_pixels(path) if path.endswith(".cbf") else None
    return data if data is not None else read_image(path, frame)[0]


_STARTER = b"\x0c\x1a\x04\xd5"
_BINARY_KEY = re.compile(rb"^\s*([A-Za-z0-9-]+)\s*[:=]\s*(.*?)\s*$", re.M)


def _mime_fields(section_header):
    """{name: value} of a CBF binary section's MIME header lines (the bytes from its
    --CIF-BINARY-FORMAT-SECTION-- line to the data's starter), quotes taken off, as fabio gives them."""
    return {k.decode("ascii", "replace"): v.strip(b'"').decode("ascii", "replace")
            for k, v in _BINARY_KEY.findall(section_header)}



def _md5_matches(blob, md5):
    """Whether the binary section's bytes hash to its header's Content-MD5 (base64)."""
    return _md5_base64(_md5_digests([blob])[0]) == md5


def _md5_base64(digest):
    import base64
    return base64.b64encode(digest).decode()


def _md5_digests(blobs):
    """hashlib's MD5 digests of the buffers; of several at once from the kernel's SIMD lanes (one
    buffer's MD5 is a chain of dependent steps: a sim block's five images 2.3x faster side by side)."""
    import hashlib
    if len(blobs) > 1:
        try:
            from ._ext import _cbf
            digests = _cbf.md5_many(blobs)
        except (ImportError, AttributeError):       # not built, or a build older than md5_many
            digests = None
        if digests is not None:
            return digests
    return [hashlib.md5(b).digest() for b in blobs]


def _plain_cbf_section(path):
    """A plain miniCBF of byte-offset 32-bit counts: (its binary section's bytes, their Content-MD5,
    the number of pixels, slow, fast), or None (anything else, or sizes that disagree)."""
    if sys.byteorder != "little":
        return None
    try:
        from ._ext import _cbf  # noqa: F401  (its decoder reads what this finds)
        with open(path, "rb") as f:
            raw = f.read()
    except (ImportError, OSError):
        return None
    at = raw.find(_STARTER)
    sec = raw.rfind(b"--CIF-BINARY-FORMAT-SECTION--", 0, max(at, 0))
    if at < 0 or sec < 0:
        return None
    h = _mime_fields(raw[sec:at])
    try:
        size, n = int(h["X-Binary-Size"]), int(h["X-Binary-Number-of-Elements"])
        fast, slow = int(h["X-Binary-Size-Fastest-Dimension"]), int(h["X-Binary-Size-Second-Dimension"])
        md5 = h["Content-MD5"]
    except (KeyError, ValueError):
        return None
    if ('conversions="x-CBF_BYTE_OFFSET"' not in raw[sec:at].decode("ascii", "replace")
            or h.get("X-Binary-Element-Type") != "signed 32-bit integer"
            or h.get("X-Binary-Element-Byte-Order", "LITTLE_ENDIAN") != "LITTLE_ENDIAN"
            or fast <= 0 or slow <= 0 or n != fast * slow or len(raw) < at + 4 + size):
        return None
    return memoryview(raw)[at + 4:at + 4 + size], md5, n, slow, fast


def _plain_cbf_pixels(path):
    return _plain_cbf_many([path])[0]


def _plain_cbf_many(paths):
    """_plain_cbf_pixels of each path (None: read_image must read it), the sections' checksums
    computed together (_md5_digests)."""
    secs = [_plain_cbf_section(p) for p in paths]
    digests = iter(_md5_digests([s[0] for s in secs if s is not None]))
    out = []
    for s in secs:
        data = None
        if s is not None:
            blob, md5, n, slow, fast = s
            if _md5_base64(next(digests)) == md5:
                from ._ext import _cbf          # (_plain_cbf_section found it)
                data = _cbf.dec_cbf32(blob.cast("B"), n)
        out.append(None if data is None else data.reshape(slow, fast))
    return out


def read_pixels_many(paths, frame=None):
    """read_pixels of each path: its pixels, or the exception read_pixels raises for it; the plain
    miniCBFs' checksums computed together (_md5_digests)."""
    paths = [os.fspath(p) for p in paths]
    cbf = [i for i, p in enumerate(paths) if p.endswith(".cbf")]
    plain = dict(zip(cbf, _plain_cbf_many([paths[i] for i in cbf]) if cbf else []))
    out = []
    for i, p in enumerate(paths):
        data = plain.get(i)
        if data is None:
            try:
                data = read_image(p, frame)[0]
            except Exception as e:
                data = e
        out.append(data)
    return out


def _default_beam(hdr):
    if hdr.beam is None and hdr.pixel_fast:
        hdr.beam = geometry.header_beam_to_mosflm("image_centre", None, hdr.pixel_fast, hdr.pixel_slow,
                                                  (hdr.n_fast, hdr.n_slow))
        hdr.beam_source = "image centre"


def _cbf_header_only(path):
    """A plain CBF's ImageHeader from its text and binary-section headers alone, without decoding the
    pixels (the experiment needs only the header; a 6M image's decode is ~25 ms): what read_image gives
    for it, the array's size from X-Binary-Size-*.  None when that is not certain (not a plain .cbf,
    unreadable, no sizes): read_image then reads the whole file and says what is wrong."""
    if not path.endswith(".cbf") or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        fields = _plain_minicbf_fields(path)
        if fields is not None:
            hdr = _parse_minicbf(fields, path)
        else:
            logging.getLogger("fabio").setLevel(logging.CRITICAL)
            img = _cbf_class()()
            with open(path, "rb") as f:
                img._readheader(f)
            hdr = _parse(img, path)
    except Exception:            # read_image reads it again and reports it
        return None
    if not (hdr.n_fast and hdr.n_slow):
        return None
    _default_beam(hdr)
    return hdr


_CIF_ITEM = re.compile(r"^(_\S+)(?:[ \t]+(\S.*?))?[ \t]*$")


def _plain_minicbf_fields(path):
    """A plain miniCBF's header as fabio's CbfImage.header gives it (its CIF items, the
    header_contents text among them, and its binary section's MIME fields), from the file's first
    64 kB, without fabio (whose import was a tenth of a Pilatus run's start, before any work could
    begin).  None for anything else (a full imgCIF's loops, several data blocks, a line this does not
    read, no binary section near the start): fabio parses those."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    sec = head.find(b"--CIF-BINARY-FORMAT-SECTION--")
    at = head.find(_STARTER, sec) if sec >= 0 else -1
    if at < 0 or not head.startswith(b"###CBF"):
        return None
    lines = head[:sec].decode("latin-1").split("\n")
    fields, blocks, i = {}, 0, 0
    while i < len(lines):
        ln = lines[i].rstrip("\r")
        if not ln.strip() or ln.lstrip().startswith("#"):
            i += 1
            continue
        if ln.startswith("data_"):
            blocks += 1
            i += 1
            continue
        m = _CIF_ITEM.match(ln)
        if m is None or blocks != 1:
            return None
        name, value = m.groups()
        if value is not None:
            if len(value) > 1 and value[0] in "\"'" and value[-1] == value[0]:
                value = value[1:-1]
            fields[name] = value
            i += 1
            continue
        # a text field: from a line of ';' alone to the next line that starts with ';'
        if i + 1 >= len(lines) or lines[i + 1].rstrip("\r") != ";":
            return None
        if name == "_array_data.data":          # the binary section, which is next
            break
        j = i + 2
        while j < len(lines) and not lines[j].startswith(";"):
            j += 1
        if j >= len(lines):
            return None
        fields[name] = "\n".join(lines[i + 2:j]).rstrip("\r")
        i = j + 1
    else:
        return None
    if "_array_data.header_contents" not in fields:
        return None
    fields.update(_mime_fields(head[sec:at]))
    return fields


def _check_truncated(img, path, data):
    """fabio pads short CBF byte-offset data silently; the header says how many elements there are."""
    h = getattr(img, "header", {}) or {}
    n = h.get("X-Binary-Number-of-Elements")
    if n is not None and int(n) != data.size:
        raise ImageError(path, f"holds {data.size} pixels, its header says {n} (truncated)")
    size = h.get("X-Binary-Size")
    if size is not None and path.endswith(".cbf"):
        if os.path.getsize(path) < int(size):
            raise ImageError(path, f"is {os.path.getsize(path)} bytes, shorter than its {size} bytes of "
                                   "compressed data (truncated)")
    md5 = h.get("Content-MD5")
    if md5 and size is not None:
        # fabio only logs a checksum mismatch; corrupt pixel data must not pass as an image
        cbs, at = getattr(img, "cbs", None), getattr(img, "start_binary", None)
        if isinstance(cbs, bytes) and at is not None and cbs[at:at + 4] == _STARTER:
            start, raw = at, cbs               # the binary section fabio has just read: not read again
        else:
            raw = _raw_bytes(path, -1)
            start = raw.find(_STARTER)
        if start >= 0:
            blob = memoryview(raw)[start + 4:start + 4 + int(size)]      # a view: no copy to hash
            if not _md5_matches(blob, md5.strip()):
                raise ImageError(path, "the image data is corrupt (its checksum does not match)")


def _num(s, default=None):
    try:
        return float(str(s).split()[0])
    except (ValueError, IndexError, TypeError):
        return default


def _imgcif_axes(header):
    """(scan axis, fast, slow, two-theta, two-theta axis) in the imgCIF lab from the _axis, scan and
    array-structure loops of a full imgCIF header (as fabio parses them), or None if it has none."""
    def s(v):
        return v.decode() if isinstance(v, bytes) else str(v)
    loops = {}
    try:
        for names, rows in header.get("loop_") or []:
            key = s(names[0]).split(".")[0]
            loops[key] = [{s(k).split(".", 1)[1]: s(v) for k, v in r.items()} for r in rows]
        axes = {r["id"]: r for r in loops["_axis"]}
        vec = lambda r: np.array([float(r[f"vector[{i}]"]) for i in (1, 2, 3)])
        angle = {r["axis_id"]: float(r["angle"]) for r in loops.get("_diffrn_scan_frame_axis", [])
                 if r.get("angle") not in (None, ".", "?")}
        scan = [r["axis_id"] for r in loops["_diffrn_scan_axis"] if axes.get(r["axis_id"], {}).get("type")
                == "rotation" and axes[r["axis_id"]]["equipment"] == "goniometer"
                and abs(float(r["angle_increment"])) > 0]
        if len(scan) != 1:
            return None
        e = vec(axes[scan[0]])
        parent = axes[scan[0]]["depends_on"]
        while parent in axes:                     # the scan axis as the axes it sits on leave it
            e = geometry.rot_about(vec(axes[parent]), angle.get(parent, 0.0)) @ e
            parent = axes[parent]["depends_on"]
        sets = {r["axis_set_id"]: r["axis_id"] for r in loops["_array_structure_list_axis"]}
        lst = sorted(loops["_array_structure_list"], key=lambda r: int(r["precedence"]))
        pix = []
        for r in lst[:2]:
            v = vec(axes[sets[r["axis_set_id"]]])
            pix.append(-v if r["direction"].lower().startswith("decr") else v)
        tt, tt_axis = 0.0, (1.0, 0.0, 0.0)
        for k, r in axes.items():
            if r["equipment"] == "detector" and r["type"] == "rotation" and abs(angle.get(k, 0.0)) > 1e-6:
                tt, tt_axis = angle[k], vec(r)
        return e, pix[0], pix[1], tt, tt_axis
    except (KeyError, ValueError, TypeError, IndexError, AttributeError):
        return None


def _parse(img, path):
    kind = type(img).__name__
    if kind == "CbfImage" or isinstance(img, _cbf_class()):
        return _parse_minicbf(img.header, path)
    if kind in ("DtrekImage", "AdscImage", "RaxisImage") or "BEAM_CENTER_X" in img.header:
        if kind == "RaxisImage":
            return _parse_raxis(img, path)
        return _parse_smv(img, path)
    if kind == "Mar345Image":
        return _parse_mar345(img, path)
    if kind == "MarccdImage":
        return _parse_marccd(img, path)
    h = ImageHeader(path, detector=kind.replace("Image", "").upper(), raw=dict(img.header))
    h.warnings.append(f"format {kind} is read without geometry: give WAVELENGTH, DISTANCE, BEAM, PIXEL")
    return h


VERTICAL_AXIS = (0.0, 1.0, 0.0)      # a vertical goniometer's scan axis in the imgCIF lab (y up)


def _parse_minicbf(header, path):
    """A miniCBF's ImageHeader from its header fields (fabio's CbfImage.header, or _plain_minicbf_fields)."""
    text = header.get("_array_data.header_contents", "")
    h = ImageHeader(path, raw=dict(header))
    lines = {}
    for ln in text.replace("\r", "").split("\n"):
        ln = ln.lstrip("# ").strip()
        if ln:
            key = re.split(r"[\s:=]", ln, 1)[0]
            lines[key] = ln[len(key):].strip(" :=")
    det = lines.get("Detector", "")
    h.detector = "EIGER" if "EIGER" in det.upper() else "PILATUS"
    m = re.findall(r"([\d.eE+-]+)\s*m", lines.get("Pixel_size", ""))
    if len(m) >= 2:
        h.pixel_fast, h.pixel_slow = float(m[0]) * 1000, float(m[1]) * 1000
    h.wavelength = _num(lines.get("Wavelength"))
    dist = _num(lines.get("Detector_distance"))
    h.distance = dist * 1000 if dist is not None else None
    m = re.findall(r"[-\d.eE+]+", lines.get("Beam_xy", ""))
    h.n_fast = int(_num(header.get("X-Binary-Size-Fastest-Dimension"), 0) or 0)
    h.n_slow = int(_num(header.get("X-Binary-Size-Second-Dimension"), 0) or 0)
    if len(m) >= 2 and h.pixel_fast:
        h.beam = geometry.header_beam_to_mosflm("pixels_fast_slow", (float(m[0]), float(m[1])),
                                                h.pixel_fast, h.pixel_slow)
    h.phi_start = _num(lines.get("Start_angle"))
    h.osc = _num(lines.get("Angle_increment"))
    for axis in ("Phi", "Omega"):   # some beamlines write the scan under the axis name
        if h.phi_start is None and lines.get(axis) is not None:
            h.phi_start = _num(lines.get(axis))
    h.two_theta = _num(lines.get("Detector_2theta"), 0.0) or 0.0
    # Which detector axis the rotation axis runs along is not in a miniCBF header except as a hint;
    # MOSFLM's DETECTOR OMEGA says it (0: fast along the axis).  Known mountings:
    if "SLOW" in lines.get("Oscillation_axis", "").upper():
        h.omega = 90.0                       # vertical goniometer, axis along the slow direction
        # and the synchrotron's horizontal electric vector is then across the axis, not along it
        h.polarisation_angle = geometry.polarisation_angle(VERTICAL_AXIS)
    # a full imgCIF header (I19's Pilatus 2M) says it exactly: scan axis, pixel axes and two-theta axis
    axes = _imgcif_axes(header)
    if axes is not None:
        tt, h.omega, problem = geometry.imgcif_detector_to_mosflm(*axes)
        h.polarisation_angle = geometry.polarisation_angle(axes[0])
        h.two_theta = tt if axes[3] else h.two_theta
        if problem:
            h.warnings.append(f"detector axes in the header: {problem}; MOSFLM's model is approximate")
    h.overload = _num(lines.get("Count_cutoff"))
    h.exposure = _num(lines.get("Exposure_time"))
    h.polarisation = _num(lines.get("Polarization"))
    h.gain = 1.0
    return h


def _parse_smv(img, path):
    g = img.header
    h = ImageHeader(path, raw=dict(g))
    bl = (g.get("BEAMLINE", "") + g.get("DETECTOR_TYPE", "")).upper()
    h.detector = "TIMEPIX" if "TIMEPIX" in bl else "ADSC"
    p = _num(g.get("PIXEL_SIZE"))
    h.pixel_fast = h.pixel_slow = p
    h.n_fast = int(_num(g.get("SIZE1"), 0))
    h.n_slow = int(_num(g.get("SIZE2"), 0))
    h.wavelength = _num(g.get("WAVELENGTH"))
    h.distance = _num(g.get("DISTANCE"))
    bx, by = _num(g.get("BEAM_CENTER_X")), _num(g.get("BEAM_CENTER_Y"))
    if bx is not None and p and h.n_fast and max(bx, by) > max(h.n_fast, h.n_slow) * p:
        # beyond the detector in mm but inside it in pixels (Timepix-style SMV): pixels, and then
        # (fast, slow) as Pilatus' Beam_xy (dxtbx reads the Timepix header so; its DENZO_X_BEAM agrees)
        h.beam = geometry.header_beam_to_mosflm("pixels_fast_slow", (bx, by), p, p)
        h.warnings.append("BEAM_CENTER_X/Y in this header are in pixels, not mm: converted")
    elif bx is not None and by is not None:
        h.beam = geometry.header_beam_to_mosflm("mm_slow_fast", (bx, by), p, p)
    h.phi_start = _num(g.get("OSC_START"), _num(g.get("PHI")))
    h.osc = _num(g.get("OSC_RANGE"))
    h.two_theta = _num(g.get("TWOTHETA"), 0.0) or 0.0
    h.overload = _num(g.get("CCD_IMAGE_SATURATION"), 65535.0)
    h.gain = _num(g.get("GAIN"))
    h.exposure = _num(g.get("TIME"))
    return h


def _parse_raxis(img, path):
    g = img.header
    h = ImageHeader(path, detector="RAXIS", raw=dict(g))
    h.wavelength = _num(g.get("Wavelength"))
    h.distance = _num(g.get("Camera length [mm]"), _num(g.get("Distance in mm")))
    h.pixel_fast = _num(g.get("X Pixel Size [mm]"), _num(g.get("pixelsize x")))
    h.pixel_slow = _num(g.get("Y Pixel Size [mm]"), _num(g.get("pixelsize y"))) or h.pixel_fast
    h.phi_start = _num(g.get("Phi Start [deg]"))
    h.osc = None if h.phi_start is None else (_num(g.get("Phi End [deg]"), h.phi_start) - h.phi_start)
    return h


def _parse_mar345(img, path):
    g = img.header
    h = ImageHeader(path, detector="MAR", raw=dict(g))
    h.pixel_fast = _num(g.get("PixelLength"), 0.15)
    h.pixel_slow = _num(g.get("PixelHeight"), h.pixel_fast)
    h.wavelength = _num(g.get("Wavelength"))
    h.distance = _num(g.get("Distance"))
    h.phi_start = _num(g.get("StartPhi"))
    end = _num(g.get("EndPhi"))
    h.osc = None if end is None or h.phi_start is None else end - h.phi_start
    h.two_theta = _num(g.get("TwoTheta"), 0.0) or 0.0
    h.overload = 250000.0
    h.gain = _num(g.get("GAIN"), 1.0)
    n = int(_num(g.get("DIM"), 0) or 0)
    h.n_fast = h.n_slow = n
    # MOSFLM does not trust the Mar345 header's beam centre: the image centre is used, with a warning
    if n and h.pixel_fast:
        h.beam = geometry.header_beam_to_mosflm("image_centre", None, h.pixel_fast, h.pixel_slow, (n, n))
        h.beam_source = "image centre"
        h.warnings.append("the beam centre in a Mar345 header is not trusted: the image centre is used "
                          "(give BEAM to override)")
    return h


def _parse_marccd(img, path):
    """MarCCD/Rayonix: TIFF with MarCCD's frame header at byte 1024 (little or big endian)."""
    h = ImageHeader(path, detector="MARCCD", raw=dict(img.header))
    raw = _raw_bytes(path, 4096)
    hdr = raw[1024:]
    if len(hdr) < 1024:
        raise ImageError(path, "the MarCCD header is shorter than 1024 bytes (truncated)")
    for bo in "<>":
        g = lambda off, bo=bo: struct.unpack(bo + "i", hdr[off:off + 4])[0]
        if 0 < g(80) <= 16384 and 0 < g(84) <= 16384:
            break
    h.n_fast, h.n_slow = g(80), g(84)
    h.overload = float(g(104)) or 65535.0
    h.distance = g(640) / 1000.0 or g(696) / 1000.0 or None
    h.pixel_fast = g(772) / 1e6 or None
    h.pixel_slow = g(776) / 1e6 or h.pixel_fast
    h.wavelength = g(908) / 1e5 or None
    h.phi_start = g(684) / 1000.0
    h.osc = g(736) / 1000.0 or (g(716) - g(684)) / 1000.0
    h.two_theta = g(668) / 1000.0
    bx, by = g(644) / 1000.0, g(648) / 1000.0
    if h.pixel_fast and (bx or by):
        h.beam = geometry.header_beam_to_mosflm("pixels_fast_slow", (bx, by), h.pixel_fast, h.pixel_slow)
    if not h.distance:
        h.warnings.append("the header holds no crystal to detector distance: give DISTANCE")
    return h


def _raw_bytes(path, n):
    import bz2
    import gzip
    opener = gzip.open if path.endswith(".gz") else bz2.open if path.endswith(".bz2") else open
    try:
        with opener(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e})") from None


def _read_eiger(path, frame):
    """Eiger (NeXus/HDF5) master file: frame n (1-based) of the data arrays it links."""
    try:
        import h5py
        import hdf5plugin  # noqa: F401  (registers the bitshuffle/LZ4 filters)
    except ImportError as e:
        raise ImageError(path, f"HDF5 support is not installed ({e})") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ImageError(path, f"not a readable HDF5 file ({e})") from None
    with f:
        det = f.get("/entry/instrument/detector")
        if det is None:
            raise ImageError(path, "no /entry/instrument/detector group (not an Eiger master file)")
        spec = det.get("detectorSpecific", {})
        h = ImageHeader(path, detector="EIGER")
        val = lambda g, k, d=None: float(g[k][()]) if k in g else d
        h.pixel_fast = val(det, "x_pixel_size", 7.5e-5) * 1000
        h.pixel_slow = val(det, "y_pixel_size", 7.5e-5) * 1000
        h.distance = val(det, "detector_distance", 0.0) * 1000 or None
        bx, by = val(det, "beam_center_x"), val(det, "beam_center_y")
        beam = f.get("/entry/instrument/beam")
        h.wavelength = val(beam, "incident_wavelength") if beam is not None else None
        h.overload = val(spec, "countrate_correction_count_cutoff") if hasattr(spec, "keys") else None
        data = None
        group = f.get("/entry/data")
        if group is None:
            raise ImageError(path, "no /entry/data group")
        remaining = frame
        for name in sorted(group.keys()):
            try:
                ds = group[name]
            except KeyError:
                raise ImageError(path, f"its data file for {name} is missing") from None
            if remaining <= ds.shape[0]:
                data = np.asarray(ds[remaining - 1])
                break
            remaining -= ds.shape[0]
        if data is None:
            raise ImageError(path, f"holds no frame {frame}")
        h.n_slow, h.n_fast = data.shape
        if bx is not None:
            h.beam = geometry.header_beam_to_mosflm("pixels_fast_slow", (bx, by), h.pixel_fast,
                                                    h.pixel_slow)
        gon = f.get("/entry/sample/goniometer")
        if gon is not None:
            for axis in ("omega", "phi"):
                if axis in gon and gon[axis].size > 1:
                    ang = np.asarray(gon[axis][()], float)
                    h.osc = float(ang[1] - ang[0])
                    h.phi_start = float(ang[0])
                    break
        return data, h


# ---- the experiment for an image ------------------------------------------------------------------

def _kw(job, name):
    return job.kw.get(name) or {}


def _arg(job, name, i=0, default=None):
    a = _kw(job, name).get("_args") or []
    return a[i] if len(a) > i else default


def current_path(job, image):
    if not job.template:
        raise InputError("no TEMPLATE has been given, so no image can be read", keyword="IMAGE",
                         given=image, expected="TEMPLATE name_###.ext before any image action")
    return image_path(job.template, job.directory, image, job.extension)


def header_for(job, image):
    path = current_path(job, image)
    hdr = _HEADER_CACHE.get(path)
    if hdr is None:
        hdr = _cbf_header_only(path)
        if hdr is None:
            hdr = read_image(path)[1]          # (which keeps it)
        else:
            _HEADER_CACHE[path] = hdr           # as read_image keeps the headers it reads
    return hdr


def experiment_for(job, image):
    """(Beam, Detector, Goniometer, Scan) for an image: its header, then the keywords that override it."""
    if image is None:
        numbers = images_on_disk(job.template, job.directory, job.extension) if job.template else []
        if not numbers:
            raise InputError("no image has been chosen", keyword="IMAGE", given=None,
                             expected="IMAGE n (or a TEMPLATE whose images exist)")
        image = numbers[0]
    hdr = header_for(job, image)
    wl = _arg(job, "WAVELENGTH", 0, hdr.wavelength)
    dist = _arg(job, "DISTANCE", 0, hdr.distance)
    pix = _arg(job, "PIXEL", 0, None)
    pf, ps = (pix, pix) if pix else (hdr.pixel_fast, hdr.pixel_slow)
    beam_kw = _kw(job, "BEAM").get("_args")
    bx, by = (beam_kw[0], beam_kw[1]) if beam_kw and len(beam_kw) >= 2 else (hdr.beam or (None, None))
    missing = [n for n, v in (("WAVELENGTH", wl), ("DISTANCE", dist), ("PIXEL", pf), ("BEAM", bx))
               if v is None or (isinstance(v, float) and not math.isfinite(v))]
    if missing:
        raise ImageError(hdr.path, f"the header lacks {', '.join(missing)}: give "
                                   f"{' and '.join(missing)} keyword(s)")
    beam = Beam(float(wl), polarisation_angle=hdr.polarisation_angle)
    div = _kw(job, "DIVERGENCE").get("_args")
    if div:
        beam.divergence = (float(div[0]), float(div[-1]))
    if _arg(job, "DISPERSION") is not None:
        beam.dispersion = float(_arg(job, "DISPERSION"))
    pol = _kw(job, "POLARISATION")
    if "SYNCHROTRON" in pol:
        beam.polarisation_model = "SYNCHROTRON"
        if pol["SYNCHROTRON"] is not True:
            beam.polarisation = float(pol["SYNCHROTRON"])
    elif "MONOCHROMATOR" in pol:
        beam.polarisation_model = "MONOCHROMATOR"
        beam.monochromator_two_theta = float(pol["MONOCHROMATOR"])
    elif "PINHOLE" in pol:
        beam.polarisation_model = "PINHOLE"
    elif hdr.polarisation:
        beam.polarisation = hdr.polarisation
    det = Detector(float(dist), float(bx), float(by), float(pf), float(ps), hdr.n_fast, hdr.n_slow,
                   name=(_arg(job, "DETECTOR", 0) or hdr.detector).upper())
    det.two_theta = float(_arg(job, "TWOTHETA", 0, hdr.two_theta) or 0.0)
    det.overload = float(_kw(job, "OVERLOAD").get("CUTOFF", hdr.overload or 1e9))
    det.gain = float(_arg(job, "GAIN", 0, hdr.gain or 1.0))
    det.nullpix = float(_arg(job, "NULLPIX", 0, -1))
    det.adcoffset = float(_arg(job, "ADCOFFSET", 0, 0))
    dist_kw = _kw(job, "DISTORTION")
    det.yscale = float(dist_kw.get("YSCALE", 1.0))
    det.tilt = float(dist_kw.get("TILT", 0)) / 100.0
    det.twist = float(dist_kw.get("TWIST", 0)) / 100.0
    det.ccomega = float(dist_kw.get("CCOMEGA", 0)) / 100.0
    det.omega = float(_kw(job, "DETECTOR").get("OMEGA", hdr.omega))
    bs = _kw(job, "BACKSTOP")
    if "CENTRE" in bs and "RADIUS" in bs:
        det.backstop = (float(bs["CENTRE"][0]), float(bs["CENTRE"][1]), float(bs["RADIUS"]))
    det.limits = dict(_kw(job, "LIMITS"))
    gonio = Goniometer(reverse_phi=bool(_kw(job, "DETECTOR").get("REVERSEPHI")))
    numbers = images_on_disk(job.template, job.directory, job.extension) or [image]
    # the sweep runs from the first to the last image on disk: a missing image in the middle is a hole
    # in the data (skipped and reported when processed), not the end of the sweep
    first, last = min(numbers + [image]), max(numbers + [image])
    phi0, osc = hdr.phi_start, hdr.osc
    if image in job.phi_override:
        a, b = job.phi_override[image]
        phi0, osc = a, b - a
    if phi0 is None or not osc:
        raise ImageError(hdr.path, "the header gives no phi range: give IMAGE n PHI start TO end")
    scan = Scan(job.template, job.directory, first, last, phi0 - (image - first) * osc, osc)
    return beam, det, gonio, scan


# ---- HEADER ---------------------------------------------------------------------------------------

def run_header(job, args):
    """HEADER [BRIEF]: the lines MOSFLM prints about the current image (interface notes §5.1)."""
    image = job.image
    if image is None:
        numbers = images_on_disk(job.template, job.directory, job.extension) if job.template else []
        image = numbers[0] if numbers else None
    if image is None:
        raise InputError("no image to read the header of", keyword="HEADER", given=None,
                         expected="TEMPLATE and IMAGE n first")
    path = current_path(job, image)
    hdr = read_image(path)[1]
    try:
        beam, det, gonio, scan = experiment_for(job, image)
    except ImageError as e:      # a still, or a header without a distance: show what it does hold
        return _header_incomplete(job, image, hdr, e.problem)
    log = job.log
    src = lambda kw: "keyword input" if job.kw.get(kw) else "image header"
    a, b = scan.phi_range(image)
    if args.get("BRIEF"):
        log.line(f" Image {image:5d}  {os.path.basename(path)}  detector {det.name}")
        log.line(f" Phi {a:9.3f} to {b:9.3f}  Wavelength {beam.wavelength:.5f}A  Distance "
                 f"{det.distance:.3f}mm  Beam {det.beam_x:.3f} {det.beam_y:.3f}mm")
        return
    log.line("")
    log.line(" From information in the image file, the detector has been")
    log.line(f" recognized as: {det.name}")
    log.line(" If this is incorrect you must supply a DETECTOR keyword")
    log.line("")
    log.line(f" Crystal to detector distance of {det.distance:8.2f}mm taken from {src('DISTANCE')}")
    log.line("")
    log.line(f" Wavelength of {beam.wavelength:.5f}A taken from {src('WAVELENGTH')}")
    log.line("")
    log.line(f" Pixel size of {det.pixel_fast:.4f}mm taken from {src('PIXEL')}.")
    log.line("")
    log.line(f" Start and end phi values for image {image:5d} from "
             f"{'keyword input' if image in job.phi_override else 'image header'} are "
             f"{a:8.2f} and {b:8.2f} degrees.")
    log.line(f" Phi start {a:.4f} end {b:.4f} oscillation {scan.osc:.4f} degrees")
    beam_src = "keyword input" if job.kw.get("BEAM") else ("the image centre" if hdr.beam_source ==
                                                           "image centre" else "image header")
    log.line(f" Beam coordinates of {det.beam_x:8.3f}mm {det.beam_y:8.3f}mm taken from {beam_src}")
    log.line(f" Image size {det.n_fast} x {det.n_slow} pixels (fast x slow); overload cutoff "
             f"{det.overload:.0f}")
    if det.two_theta:
        log.line(f" Detector two-theta {det.two_theta:.3f} degrees")
    for w in hdr.warnings:
        if "give DISTANCE" in w and job.kw.get("DISTANCE"):
            continue            # given: nothing left to warn about
        log.line("")
        log.line(" ***** WARNING *****")
        log.line(f" {w}")


def _header_incomplete(job, image, hdr, problem):
    """HEADER for an image whose header cannot make a full experiment (stills have no oscillation;
    some MarCCD headers hold no distance): the values it has, and what the user must add."""
    log = job.log
    src = lambda kw: "keyword input" if job.kw.get(kw) else "image header"
    log.line("")
    log.line(" From information in the image file, the detector has been")
    log.line(f" recognized as: {(_arg(job, 'DETECTOR', 0) or hdr.detector).upper()}")
    log.line(" If this is incorrect you must supply a DETECTOR keyword")
    log.line("")
    dist = _arg(job, "DISTANCE", 0, hdr.distance)
    wl = _arg(job, "WAVELENGTH", 0, hdr.wavelength)
    pix = _arg(job, "PIXEL", 0, hdr.pixel_fast)
    log.line(f" Crystal to detector distance of {dist:8.2f}mm taken from {src('DISTANCE')}" if dist else
             " The image header gives no crystal to detector distance: give DISTANCE")
    log.line("")
    log.line(f" Wavelength of {wl:.5f}A taken from {src('WAVELENGTH')}" if wl else
             " The image header gives no wavelength: give WAVELENGTH")
    log.line("")
    log.line(f" Pixel size of {pix:.4f}mm taken from {src('PIXEL')}." if pix else
             " The image header gives no pixel size: give PIXEL")
    log.line("")
    if hdr.phi_start is not None and not hdr.osc:
        log.line(f" Image {image:5d} is a still (oscillation 0) at phi {hdr.phi_start:8.2f} degrees;"
                 " give IMAGE n PHI start TO end to treat it as a rotation image")
    elif hdr.phi_start is not None:
        log.line(f" Phi start {hdr.phi_start:.4f} end {hdr.phi_end:.4f} oscillation {hdr.osc:.4f} degrees")
    beam_kw = _kw(job, "BEAM").get("_args")
    bx, by = (beam_kw[0], beam_kw[1]) if beam_kw and len(beam_kw) >= 2 else (hdr.beam or (None, None))
    if bx is not None:
        beam_src = "keyword input" if beam_kw else ("the image centre" if hdr.beam_source == "image centre"
                                                   else "image header")
        log.line(f" Beam coordinates of {bx:8.3f}mm {by:8.3f}mm taken from {beam_src}")
    over = float(_kw(job, "OVERLOAD").get("CUTOFF", hdr.overload or 1e9))
    log.line(f" Image size {hdr.n_fast} x {hdr.n_slow} pixels (fast x slow); overload cutoff {over:.0f}")
    tt = float(_arg(job, "TWOTHETA", 0, hdr.two_theta) or 0.0)
    if tt:
        log.line(f" Detector two-theta {tt:.3f} degrees")
    for w in hdr.warnings + ([] if hdr.phi_start is not None and not hdr.osc else [problem]):
        log.line("")
        log.line(" ***** WARNING *****")
        log.line(f" {w}")
