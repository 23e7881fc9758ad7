"""The SPOTOD spot file: spots found on the simulated sweep written the way MOSFLM lays them out, read
back unchanged; broken files are reported in one line."""
import csv
import json

import numpy as np
import pytest

from conftest import SIM
from pyflm.errors import InputError, PyflmError
from pyflm.geometry import pixel_to_mm
from pyflm.spotfile import SpotFileError, read_spot_file, write_spot_file
from pyflm.spots import SPOT_DTYPE

TRUTH = json.loads((SIM / "truth.json").read_text())
PIXEL = TRUTH["pixel_mm"]
SIZE = tuple(TRUTH["image_size_px"])               # (fast, slow)
BEAM = tuple(TRUTH["mosflm_beam_mm"])              # MOSFLM X (slow), Y (fast)


def predicted_spots(images=(1, 2, 3)):
    """The unflagged predicted reflections whose crossing falls on the given images, as a spot list."""
    rows = []
    with open(SIM / "predictions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["flags"] or not row["image"] or int(row["image"]) not in images:
                continue
            rows.append((int(row["image"]), float(row["phi_deg"]), float(row["x_px"]), float(row["y_px"]),
                         float(row["I_true"]) * float(row["lorentz"])))
    spots = np.zeros(len(rows), SPOT_DTYPE)
    a = np.array(rows)
    spots["image"], spots["phi"], spots["fast"], spots["slow"] = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    spots["x_mm"], spots["y_mm"] = pixel_to_mm(spots["fast"], spots["slow"], PIXEL, PIXEL)
    spots["intensity"] = a[:, 4]
    spots["sigma"] = np.sqrt(a[:, 4]) + 1.0
    return spots


def test_spots_round_trip_through_the_spot_file(tmp_path):
    spots = predicted_spots()
    spots["flag"][::10] = 1                        # e.g. too close to a neighbour: not for indexing
    path = tmp_path / "sim.spt"
    n = write_spot_file(path, spots, image_size=SIZE, pixel_size=PIXEL, beam=BEAM)
    good = spots[spots["flag"] == 0]
    assert n == len(good) > 200

    lines = path.read_text().splitlines()
    assert lines[0].split()[:3] == [str(SIZE[1]), str(SIZE[0]), f"{PIXEL:.8f}"]
    assert [float(v) for v in lines[2].split()] == pytest.approx(BEAM, abs=1e-5)
    assert [float(v) for v in lines[-1].split()] == [-999.0] * 6
    assert len(lines) == 3 + n + 1

    got, header = read_spot_file(path, scan=(1, 0.0, 1.0))
    assert header["image_size"] == SIZE
    assert header["pixel_size"] == pytest.approx((PIXEL, PIXEL))
    assert header["beam"] == pytest.approx(BEAM, abs=1e-5)
    # brightest first, as MOSFLM's indexing takes them
    assert np.all(np.diff(got["intensity"]) <= 0)
    want = good[np.argsort(-good["intensity"], kind="stable")]
    np.testing.assert_allclose(got["x_mm"], want["x_mm"], atol=1e-4)
    np.testing.assert_allclose(got["y_mm"], want["y_mm"], atol=1e-4)
    np.testing.assert_allclose(got["fast"], want["fast"], atol=1e-3)
    np.testing.assert_allclose(got["slow"], want["slow"], atol=1e-3)
    np.testing.assert_allclose(got["phi"], want["phi"], atol=1e-4)
    np.testing.assert_allclose(got["intensity"], want["intensity"], atol=0.01)
    np.testing.assert_allclose(got["sigma"], want["sigma"], atol=0.01)
    np.testing.assert_array_equal(got["image"], want["image"])


def test_flagged_spots_can_be_kept_and_an_empty_list_is_a_valid_file(tmp_path):
    spots = predicted_spots(images=(5,))
    spots["flag"][:3] = 4
    assert write_spot_file(tmp_path / "all.spt", spots, image_size=SIZE, pixel_size=PIXEL, beam=BEAM,
                           include_flagged=True) == len(spots)
    assert write_spot_file(tmp_path / "none.spt", spots[:0], image_size=SIZE, pixel_size=PIXEL,
                           beam=BEAM) == 0
    got, _ = read_spot_file(tmp_path / "none.spt")
    assert len(got) == 0 and got.dtype == SPOT_DTYPE


def test_rectangular_pixels_keep_their_sizes(tmp_path):
    spots = predicted_spots(images=(7,))[:20]
    spots["x_mm"], spots["y_mm"] = pixel_to_mm(spots["fast"], spots["slow"], 0.1, 0.2)
    write_spot_file(tmp_path / "r.spt", spots, image_size=SIZE, pixel_size=(0.1, 0.2), beam=(50, 40))
    got, header = read_spot_file(tmp_path / "r.spt")
    assert header["pixel_size"] == pytest.approx((0.1, 0.2))
    assert header["yscale"] == pytest.approx(0.5)
    order = np.argsort(-spots["intensity"], kind="stable")
    np.testing.assert_allclose(got["fast"], spots["fast"][order], atol=2e-3)
    np.testing.assert_allclose(got["slow"], spots["slow"][order], atol=2e-3)


@pytest.mark.parametrize("text, expect", [
    ("", "too short"),
    ("1043 981 0.172 1.0 0.0\n0 0\n", "too short"),
    ("1043 981 0.172 1.0\n0 0\n89.7 84.7\n-999 -999 -999 -999 -999 -999\n", "line 1: expected 5 numbers"),
    ("1043 981 0.172 1.0 0.0\n0 0\n89.7 84.7\n10.0 20.0 0 0.5 100.0\n"
     "-999 -999 -999 -999 -999 -999\n", "line 4: expected 6 numbers"),
    ("1043 981 0.172 1.0 0.0\n0 0\n89.7 84.7\n10.0 20.0 0 0.5 abc 1\n", "line 4: expected X Y"),
    ("1043 981 0.172 1.0 0.0\n0 0\n89.7 84.7\n10.0 20.0 0 0.5 100 10\n", "truncated"),
    ("1043 981 -0.172 1.0 0.0\n0 0\n89.7 84.7\n-999 -999 -999 -999 -999 -999\n", "must be positive"),
])
def test_malformed_spot_files_are_reported_in_one_line(tmp_path, text, expect):
    path = tmp_path / "bad.spt"
    path.write_text(text)
    with pytest.raises(SpotFileError, match=expect) as err:
        read_spot_file(path)
    assert isinstance(err.value, PyflmError)
    assert "\n" not in err.value.line() and "bad.spt" in err.value.line()


def test_missing_file_and_bad_spot_lists(tmp_path):
    with pytest.raises(SpotFileError, match="cannot be read"):
        read_spot_file(tmp_path / "nothing.spt")
    old = tmp_path / "keep.spt"
    old.write_text("previous run\n")
    with pytest.raises(InputError, match="spot list"):
        write_spot_file(old, [(1, 2)], image_size=SIZE, pixel_size=PIXEL, beam=BEAM)
    spots = predicted_spots(images=(2,))[:5]
    spots["x_mm"][0] = np.nan
    with pytest.raises(InputError, match="finite"):
        write_spot_file(old, spots, image_size=SIZE, pixel_size=PIXEL, beam=BEAM)
    assert old.read_text() == "previous run\n"     # a failed write leaves the old file as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.spt"]
    with pytest.raises(SpotFileError, match="cannot be written"):
        write_spot_file(tmp_path / "no" / "dir" / "x.spt", spots[1:], image_size=SIZE, pixel_size=PIXEL,
                        beam=BEAM)
    with pytest.raises(InputError, match="detector"):
        write_spot_file(old, spots[1:], image_size=SIZE, pixel_size="0.172 mm", beam=BEAM)
