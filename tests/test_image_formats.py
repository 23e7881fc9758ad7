"""Every image in shared/data opens with plausible geometry; files written in each format read back."""
import bz2
import gzip
import pathlib

import fabio
import numpy as np
import pytest

from conftest import DATA
from pyflm import images
from pyflm.errors import ImageError

ALL_IMAGES = sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix in
                    (".cbf", ".img", ".gz", ".bz2", ".mar2300", ".mccd") and "ref" not in p.parts)


@pytest.mark.parametrize("path", ALL_IMAGES, ids=lambda p: p.name)
def test_every_shared_image_opens_with_plausible_geometry(path):
    data, h = images.read_image(str(path))
    assert data.ndim == 2 and data.shape == (h.n_slow, h.n_fast)
    assert h.detector in ("PILATUS", "EIGER", "ADSC", "TIMEPIX", "MAR", "MARCCD")
    assert 0.05 <= h.pixel_fast <= 0.2
    if h.detector == "TIMEPIX":
        assert 0.01 < h.wavelength < 0.05          # electron diffraction
    else:
        assert 0.5 <= h.wavelength <= 3.0
    if h.distance is not None:
        assert 5 <= h.distance <= 1000
    bx, by = h.beam
    sx, sy = h.n_slow * h.pixel_slow, h.n_fast * h.pixel_fast
    assert 0 < bx < sx and 0 < by < sy


def test_pilatus_beam_is_slow_then_fast_in_mm():
    h = images.read_header(str(DATA / "sim-p212121-cbf" / "sim_0001.cbf"))
    assert h.beam == pytest.approx((521.3 * 0.172, 492.6 * 0.172), abs=1e-6)


def test_mar345_uses_the_image_centre_and_warns():
    h = images.read_header(str(DATA / "formats" / "example.mar2300"))
    assert h.beam == pytest.approx((172.5, 172.5)) and h.beam_source == "image centre"
    assert any("not trusted" in w for w in h.warnings)


def test_smv_written_by_fabio_reads_back(tmp_path):
    data = (np.arange(100 * 120, dtype=np.uint16) % 500).reshape(120, 100)
    hdr = {"PIXEL_SIZE": "0.1024", "DISTANCE": "180.01", "WAVELENGTH": "0.97974", "BEAM_CENTER_X": "6.14",
           "BEAM_CENTER_Y": "5.05", "OSC_START": "140.0", "OSC_RANGE": "0.5", "TWOTHETA": "0.0",
           "SIZE1": "100", "SIZE2": "120"}
    p = tmp_path / "x_001.img"
    fabio.adscimage.adscimage(data=data, header=hdr).write(str(p))
    d, h = images.read_image(str(p))
    assert np.array_equal(d, data)
    assert h.detector == "ADSC" and h.distance == pytest.approx(180.01) and h.beam == (6.14, 5.05)
    assert (h.phi_start, h.osc) == (140.0, 0.5)


def test_cbf_written_by_fabio_reads_back_also_compressed(tmp_path):
    src = fabio.open(str(DATA / "sim-p212121-cbf" / "sim_0001.cbf"))
    p = tmp_path / "y_0001.cbf"
    fabio.cbfimage.CbfImage(data=src.data, header=src.header).write(str(p))
    raw = p.read_bytes()
    (tmp_path / "z_0001.cbf.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "w_0001.cbf.bz2").write_bytes(bz2.compress(raw))
    for name in ("y_0001.cbf", "z_0001.cbf.gz", "w_0001.cbf.bz2"):
        d, h = images.read_image(str(tmp_path / name))
        assert np.array_equal(d, src.data) and h.wavelength == pytest.approx(0.9795)
    # the template finds the compressed file when the plain one is absent
    assert images.image_path("z_####.cbf", str(tmp_path), 1).endswith("z_0001.cbf.gz")


@pytest.mark.parametrize("src", ["formats/ximg2700_00001.cbf", "sim-p212121-cbf/sim_0001.cbf",
                                 "real-pilatus6m-singles/example_004.cbf.gz",
                                 "real-lcys-pilatus2m/l-cyst_04_00001.cbf.gz"])
def test_a_cbf_header_read_alone_is_the_header_of_the_whole_read(src, tmp_path):
    # header_for reads a plain CBF's header without decoding its pixels: it must say what the whole
    # read says, every field
    p = DATA / src
    if p.suffix == ".gz":
        q = tmp_path / p.name[:-3]
        q.write_bytes(gzip.decompress(p.read_bytes()))
        p = q
    alone = images._cbf_header_only(str(p))
    assert alone is not None
    images._HEADER_CACHE.pop(str(p), None)
    whole = images.read_image(str(p))[1]
    assert vars(alone) == vars(whole)


CBF_FILES = sorted(p for p in DATA.rglob("*.cbf*") if p.suffix in (".cbf", ".gz", ".bz2"))


def _plain(p, tmp_path):
    raw = p.read_bytes()
    raw = gzip.decompress(raw) if p.suffix == ".gz" else bz2.decompress(raw) if p.suffix == ".bz2" else raw
    q = tmp_path / (p.stem if p.suffix in (".gz", ".bz2") else p.name)
    q.write_bytes(raw)
    return q


def test_a_plain_minicbf_header_is_read_without_fabio_as_fabio_reads_it(tmp_path):
    # every shared CBF: the header read without fabio (a plain miniCBF) is the whole read's, raw fields
    # and all; a full imgCIF (loops) goes to fabio
    plain = 0
    for p in CBF_FILES:
        q = _plain(p, tmp_path)
        fields = images._plain_minicbf_fields(str(q))
        if fields is None:
            assert b"loop_" in q.read_bytes()[:1 << 16], p.name
            continue
        plain += 1
        alone = images._cbf_header_only(str(q))
        images._HEADER_CACHE.pop(str(q), None)
        assert vars(alone) == vars(images.read_image(str(q))[1]), p.name
    assert plain >= 60                  # the sim sweep, the 6M singles and stills at least


def test_a_minicbf_with_a_line_this_does_not_read_goes_to_fabio(tmp_path):
    raw = (DATA / "sim-p212121-cbf" / "sim_0001.cbf").read_bytes()
    q = tmp_path / "odd_0001.cbf"
    q.write_bytes(raw.replace(b"_array_data.header_convention", b"? _array_data.header_convention", 1))
    assert images._plain_minicbf_fields(str(q)) is None
    assert images._cbf_header_only(str(q)) is not None          # fabio reads it, as before


def test_a_pilatus_sweep_is_indexed_without_importing_fabio(tmp_path):
    # a plain CBF's header and pixels are read by pyflm itself: fabio's import (a tenth of a second)
    # is not part of such a run
    import subprocess
    import sys
    code = ("import sys; from pyflm import images, spotfinder;"
            f"p = {str(DATA / 'sim-p212121-cbf' / 'sim_0001.cbf')!r};"
            "h = images._cbf_header_only(p); d = images.read_pixels(p);"
            "assert d.shape == (h.n_slow, h.n_fast);"
            "print('fabio' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_truncated_cbf_is_still_reported_where_its_pixels_are_read(tmp_path):
    raw = (DATA / "sim-p212121-cbf" / "sim_0001.cbf").read_bytes()
    p = tmp_path / "t_0001.cbf"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageError):
        images.read_image(str(p))


def test_eiger_hdf5_master_reads_back(tmp_path):
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "e_master.h5"
    frames = np.random.default_rng(0).poisson(3, (3, 50, 40)).astype(np.uint32)
    with h5py.File(p, "w") as f:
        det = f.create_group("entry/instrument/detector")
        det["x_pixel_size"] = 75e-6
        det["y_pixel_size"] = 75e-6
        det["detector_distance"] = 0.2
        det["beam_center_x"] = 20.5
        det["beam_center_y"] = 25.5
        f.create_group("entry/instrument/beam")["incident_wavelength"] = 0.9763
        f["entry/data/data_000001"] = frames
        f.create_group("entry/sample/goniometer")["omega"] = np.array([10.0, 10.1, 10.2])
    d, h = images.read_image(str(p), 2)
    assert np.array_equal(d, frames[1]) and h.detector == "EIGER"
    assert h.distance == pytest.approx(200.0) and h.beam == pytest.approx((25.5 * 0.075, 20.5 * 0.075))
    assert h.osc == pytest.approx(0.1)


@pytest.mark.parametrize("make,expect", [
    (lambda p, src: p.write_bytes(b""), "empty"),
    (lambda p, src: p.write_bytes(src[: len(src) // 2]), "truncated"),
    (lambda p, src: p.write_text("this is not an image\n"), "not an image"),
    (lambda p, src: p.write_bytes(src[:3000] + bytes(len(src) - 3000)), "corrupt"),
])
def test_bad_files_give_one_line(tmp_path, make, expect):
    src = (DATA / "sim-p212121-cbf" / "sim_0001.cbf").read_bytes()
    p = tmp_path / "bad_0001.cbf"
    make(p, src)
    with pytest.raises(ImageError) as e:
        images.read_image(str(p))
    assert "bad_0001.cbf" in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)
