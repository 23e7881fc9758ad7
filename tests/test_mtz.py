"""The unmerged MTZ a MOSFLM user gets from HKLOUT: readable by gemmi (and so by AIMLESS/POINTLESS),
indices in the asymmetric unit with M/ISYM, MOSFLM's columns, one batch header per image, and intensities
that score against the truth of the simulated sweep."""
import csv
import json
import os
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from conftest import SHARED, SIM
from pyflm.errors import InputError, PyflmError
from pyflm.mtz import (COLUMNS, FLAG_EDGE, FLAG_OVERLOAD, BatchInfo, MtzError, as_records, decode_mpart,
                       encode_mpart, pack_bgpk, partial_codes, read_unmerged_mtz, reduce_to_asu,
                       unpack_bgpk, unmerged_mtz_object, write_unmerged_mtz)

CELLS = {
    "P 1": (31.0, 42.0, 53.0, 81.0, 97.0, 103.0),
    "P 1 21 1": (31.0, 42.0, 53.0, 90.0, 101.5, 90.0),
    "C 1 2 1": (91.0, 42.0, 53.0, 90.0, 112.0, 90.0),
    "P 21 21 21": (42.3, 51.9, 78.6, 90.0, 90.0, 90.0),
    "P 41 21 2": (57.9, 57.9, 150.0, 90.0, 90.0, 90.0),
    "P 31 2 1": (50.0, 50.0, 70.0, 90.0, 90.0, 120.0),
    "H 3": (80.0, 80.0, 60.0, 90.0, 90.0, 120.0),
    "P 61": (60.0, 60.0, 90.0, 90.0, 90.0, 120.0),
    "I 2 3": (78.0, 78.0, 78.0, 90.0, 90.0, 90.0),
}


def random_sweep(space_group, n=400, n_batches=5, seed=0):
    """Random reflections with negative indices, Friedel mates and symmetry mates, on a few images."""
    rng = np.random.default_rng(seed)
    sg = gemmi.SpaceGroup(space_group)
    hkl = rng.integers(-15, 16, size=(n, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    mates = -hkl[: n // 4]                                         # Friedel mates
    ops = sg.operations().sym_ops
    sym = np.array([ops[i % len(ops)].apply_to_hkl([int(x) for x in h])
                    for i, h in enumerate(hkl[: n // 4])])         # symmetry mates
    hkl = np.concatenate([hkl, mates, sym, -sym])
    m = len(hkl)
    records = {
        "H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2],
        "BATCH": rng.integers(1, n_batches + 1, m),
        "I": rng.normal(1000, 300, m), "SIGI": rng.uniform(5, 30, m),
        "IPR": rng.normal(1000, 300, m), "SIGIPR": rng.uniform(5, 30, m),
        "FRACTIONCALC": rng.uniform(0.1, 1.0, m), "XDET": rng.uniform(0, 1043, m),
        "YDET": rng.uniform(0, 981, m), "ROT": rng.uniform(0, n_batches, m),
        "WIDTH": rng.uniform(0.3, 0.8, m), "LP": rng.uniform(0.5, 3.0, m),
        "MPART": rng.choice([0, 0, 21, 22, 31, 32, 33, 11], m),
        "FLAG": rng.choice([0, 0, 0, FLAG_OVERLOAD, FLAG_EDGE, 1 | 8], m),
        "BGPKRATIOS": pack_bgpk(rng.uniform(0, 5, m), rng.uniform(0, 3, m), rng.uniform(0, 0.5, m)),
    }
    cell = CELLS[space_group]
    batches = [BatchInfo(number=b, phi_start=0.5 * (b - 1), phi_end=0.5 * b, cell=cell,
                         umat=np.array([[0, 0, 1.0], [0, 1, 0], [-1, 0, 0]]),
                         mosaic=0.25, wavelength=0.9795, distance=120.0,
                         detector_limits=((0, 1043), (0, 981)))
               for b in range(1, n_batches + 1)]
    return records, batches, cell


@pytest.mark.parametrize("space_group", list(CELLS))
def test_isym_round_trip_recovers_original_indices(space_group, tmp_path):
    records, batches, cell = random_sweep(space_group)
    path = tmp_path / "out.mtz"
    n = write_unmerged_mtz(path, records, space_group=space_group, cell=cell, wavelength=0.9795,
                           batches=batches, pname="proj", xname="xtal", dname="native",
                           title="pyflm test", history=["written by test_mtz"])
    assert n == len(records["H"])
    got = read_unmerged_mtz(path)
    rec = got.records

    # what the user processed comes back exactly
    for col in ("H", "K", "L", "BATCH", "MPART", "FLAG"):
        np.testing.assert_array_equal(rec[col.lower()], records[col])
    for col in ("I", "SIGI", "IPR", "SIGIPR", "FRACTIONCALC", "XDET", "YDET", "ROT", "WIDTH", "LP",
                "BGPKRATIOS"):
        np.testing.assert_allclose(rec[col.lower()], records[col], rtol=1e-6, atol=1e-3)

    # the stored indices are in the asymmetric unit and ISYM says how they were reached
    sg = gemmi.SpaceGroup(space_group)
    asu, ops = gemmi.ReciprocalAsu(sg), sg.operations()
    stored = np.stack([rec["h_asu"], rec["k_asu"], rec["l_asu"]], axis=1)
    original = np.stack([rec["h"], rec["k"], rec["l"]], axis=1)
    assert all(asu.is_in(list(map(int, h))) for h in stored)
    for h, red, isym in zip(original.tolist(), stored.tolist(), rec["isym"]):
        image = ops.sym_ops[(isym - 1) // 2].apply_to_hkl(h)
        assert (image if isym % 2 == 1 else [-x for x in image]) == red
    # Friedel mates of acentric reflections land on opposite parities (I+ odd, I- even)
    index = {tuple(h): i for i, h in enumerate(original.tolist())}
    pairs = [(i, index[tuple(-x for x in h)]) for i, h in enumerate(original.tolist())
             if tuple(-x for x in h) in index and not ops.is_reflection_centric(h)]
    assert len(pairs) > 20
    assert all(rec["isym"][i] % 2 != rec["isym"][j] % 2 for i, j in pairs)
    # M says partial exactly where MPART does
    np.testing.assert_array_equal(rec["m"], (records["MPART"] != 0).astype(int))

    # header: symmetry, columns in MOSFLM's order and types, names, batches
    assert got.space_group.hm == sg.hm
    assert got.columns == list(COLUMNS)
    np.testing.assert_allclose(got.cell, cell, atol=1e-4)
    assert (got.pname, got.xname, got.dname, got.title) == ("proj", "xtal", "native", "pyflm test")
    assert got.history == ["written by test_mtz"]
    assert [b.number for b in got.batches] == [1, 2, 3, 4, 5]
    for b, want in zip(got.batches, batches):
        assert (b.phi_start, b.phi_end) == pytest.approx((want.phi_start, want.phi_end))
        np.testing.assert_allclose(b.cell, cell, atol=1e-4)
        np.testing.assert_allclose(b.umat, want.umat, atol=1e-6)
        assert b.wavelength == pytest.approx(0.9795)
        assert b.mosaic == pytest.approx(0.25)
        assert b.distance == pytest.approx(120.0)
        assert b.scan_axis == pytest.approx((0, 0, 1))
        assert b.dataset_id == 1
        assert b.detector_limits == ((0, 1043), (0, 981))


def test_indices_reduced_on_arrays_are_gemmis_to_asu_in_every_space_group():
    """The MTZ's H K L and ISYM, reduced on whole arrays, are what gemmi's to_asu (one index at a time,
    as POINTLESS's convention) gives, in each of gemmi's 530 settings; repeated indices, Friedel mates
    and symmetry mates included."""
    rng = np.random.default_rng(7)
    base = rng.integers(-12, 13, size=(150, 3))
    base = base[np.any(base != 0, axis=1)]
    checked = 0
    for sg in gemmi.spacegroup_table_itb():
        ops = sg.operations()
        mates = [op.apply_to_hkl(h) for op, h in zip(ops.sym_ops * 8, base[:40].tolist())]
        hkl = np.concatenate([base, -base[:30], np.array(mates), base[:20]])
        red, isym = reduce_to_asu(hkl, sg)
        asu = gemmi.ReciprocalAsu(sg)
        want = [asu.to_asu(h, ops) for h in hkl.tolist()]
        assert red.tolist() == [list(w[0]) for w in want], sg.xhm()
        assert isym.tolist() == [w[1] for w in want], sg.xhm()
        checked += 1
    assert checked == 530


def test_gemmi_puts_records_back_on_their_original_indices(tmp_path):
    """score_mtz.py and other readers rely on gemmi's own ISYM decoding, which must agree with ours."""
    records, batches, cell = random_sweep("P 41 21 2", seed=3)
    path = tmp_path / "out.mtz"
    write_unmerged_mtz(path, records, space_group="P 41 21 2", cell=cell, wavelength=1.0,
                       batches=batches)
    mtz = gemmi.read_mtz_file(str(path))
    assert mtz.switch_to_original_hkl()
    hkl = np.array(mtz, copy=False)[:, :3].astype(int)
    np.testing.assert_array_equal(hkl, np.stack([records["H"], records["K"], records["L"]], axis=1))


def test_a_file_read_back_can_be_written_again_unchanged(tmp_path):
    records, batches, cell = random_sweep("C 1 2 1", seed=5)
    write_unmerged_mtz(tmp_path / "a.mtz", records, space_group="C 1 2 1", cell=cell, wavelength=0.9,
                       batches=batches)
    first = read_unmerged_mtz(tmp_path / "a.mtz")
    write_unmerged_mtz(tmp_path / "b.mtz", first.records, space_group=first.space_group, cell=first.cell,
                       wavelength=first.wavelength, batches=first.batches)
    second = read_unmerged_mtz(tmp_path / "b.mtz")
    np.testing.assert_array_equal(second.records, first.records)
    assert [(b.number, b.phi_start, b.phi_end) for b in second.batches] == \
        [(b.number, b.phi_start, b.phi_end) for b in first.batches]


def test_missets_are_folded_into_the_header_u():
    from pyflm.geometry import misset_matrix
    from pyflm.mtz import _make_batch
    u = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    info = BatchInfo(number=7, phi_start=3, phi_end=4, cell=(40, 50, 60, 90, 90, 90), umat=u,
                     missets=(0.3, -0.2, 0.1))
    batch = _make_batch(info, gemmi.SpaceGroup("P 21 21 21"), 1.0)
    stored = np.array(list(batch.floats)[6:15]).reshape(3, 3, order="F")
    np.testing.assert_allclose(stored, misset_matrix(0.3, -0.2, 0.1) @ u, atol=1e-6)
    assert list(batch.ints)[11] == 1      # a* lies along the rotation axis (MOSFLM Z) for this U


def test_partials_get_mpart_codes_pointless_can_unpack():
    hkl = np.array([[1, 2, 3]] * 3 + [[4, 5, 6]] + [[7, 8, 9]] + [[1, 1, 1]] * 12 + [[2, 2, 2]] * 2)
    batch = np.array([4, 5, 6, 10, 20] + list(range(1, 13)) + [3, 5])
    fraction = np.array([0.2, 0.6, 0.2, 1.0, 0.4] + [1 / 12] * 12 + [0.5, 0.5])
    mpart = partial_codes(hkl, batch, fraction)
    assert list(mpart[:3]) == [31, 32, 33]          # three consecutive parts
    assert mpart[3] == 0                            # a full
    assert mpart[4] == 11                           # a lone part of an incomplete partial
    assert list(mpart[5:17]) == [1200 + i for i in range(1, 13)]
    assert list(mpart[17:]) == [11, 11]             # not consecutive: two separate incomplete partials
    n, i = decode_mpart(mpart)
    assert list(n[:3]) == [3, 3, 3] and list(i[:3]) == [1, 2, 3]
    assert (n[3], i[3]) == (1, 1) and n[4] == -1
    assert list(n[5:17]) == [12] * 12 and list(i[5:17]) == list(range(1, 13))
    np.testing.assert_array_equal(encode_mpart([2, 9, 10, 0], [1, 9, 10, 1]), [21, 99, 1010, 0])


def test_bgpkratios_packing_round_trips():
    bg, pk, gr = np.array([0.0, 1.3, 4.2, 12.0]), np.array([0.0, 0.57, 2.31, 1.0]), np.array([0, 0.05, 0.5, 3])
    packed = pack_bgpk(bg, pk, gr)
    b, p, g = unpack_bgpk(packed)
    np.testing.assert_allclose(b, np.minimum(bg, 9.9), atol=0.051)
    np.testing.assert_allclose(p, pk, atol=0.0051)
    np.testing.assert_allclose(g, np.minimum(gr, 0.99), atol=1e-6)
    assert packed[1] == pytest.approx(5713.05)


def test_bad_input_is_one_line_and_leaves_no_file(tmp_path):
    records, batches, cell = random_sweep("P 1 21 1", n=40)
    path = tmp_path / "bad.mtz"
    with pytest.raises(InputError, match="space group"):
        write_unmerged_mtz(path, records, space_group="P 7", cell=cell, wavelength=1, batches=batches)
    with pytest.raises(InputError, match="cell"):
        write_unmerged_mtz(path, records, space_group="P 1 21 1", cell=(1, 2, 3), wavelength=1,
                           batches=batches)
    with pytest.raises(InputError, match="batch 5"):
        write_unmerged_mtz(path, records, space_group="P 1 21 1", cell=cell, wavelength=1,
                           batches=batches[:4])
    with pytest.raises(InputError, match="missing batch"):
        write_unmerged_mtz(path, {"H": [1], "K": [2], "L": [3], "I": [1], "SIGI": [1]},
                           space_group="P 1 21 1", cell=cell, wavelength=1, batches=batches)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_place_is_reported_in_one_line(tmp_path):
    records, batches, cell = random_sweep("P 1", n=20)
    with pytest.raises(MtzError, match="cannot be written"):
        write_unmerged_mtz(tmp_path / "no" / "such" / "dir.mtz", records, space_group="P 1", cell=cell,
                           wavelength=1, batches=batches)


def test_unreadable_files_are_reported_in_one_line(tmp_path):
    junk = tmp_path / "junk.mtz"
    junk.write_text("this is not an MTZ file\n")
    with pytest.raises(MtzError, match="not a readable MTZ"):
        read_unmerged_mtz(junk)
    with pytest.raises(MtzError, match="no such file"):
        read_unmerged_mtz(tmp_path / "missing.mtz")
    merged = gemmi.Mtz(with_base=True)
    merged.spacegroup = gemmi.SpaceGroup("P 1")
    merged.set_cell_for_all(gemmi.UnitCell(10, 10, 10, 90, 90, 90))
    merged.set_data(np.array([[1, 2, 3]], np.float32))
    merged.write_to_file(str(tmp_path / "merged.mtz"))
    with pytest.raises(MtzError, match="M/ISYM is missing") as err:
        read_unmerged_mtz(tmp_path / "merged.mtz")
    assert isinstance(err.value, PyflmError) and "\n" not in err.value.line()


# ---- acceptance: the simulated sweep's predictions, written as MOSFLM would, score against the truth ----

def sweep_records_from_predictions(csv_path, n_images=60):
    """One record per (reflection, image) from predictions.csv, leaving out reflections in gaps, under
    the beamstop or off the detector: I = I_true * fraction, sigma from counting statistics."""
    h, b, f, rows = [], [], [], []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["flags"]:
                continue
            parts = row["fractions"].split(";")
            first = int(parts[0])
            for j, frac in enumerate(parts[1:]):
                image = first + j
                if 1 <= image <= n_images:
                    h.append((int(row["h"]), int(row["k"]), int(row["l"])))
                    b.append(image)
                    f.append(float(frac))
                    rows.append((float(row["I_true"]), float(row["x_px"]), float(row["y_px"]),
                                 float(row["phi_deg"]), float(row["lorentz"]) * float(row["polarisation"])))
    hkl, batch, frac = np.array(h), np.array(b), np.array(f)
    it, xf, ys, phi, lp = np.array(rows).T
    intensity = it * frac
    sigma = np.sqrt(np.maximum(intensity, 0)) + 0.5
    return {"H": hkl[:, 0], "K": hkl[:, 1], "L": hkl[:, 2], "BATCH": batch,
            "I": intensity, "SIGI": sigma, "IPR": intensity, "SIGIPR": sigma,
            "FRACTIONCALC": frac, "XDET": ys, "YDET": xf, "ROT": phi, "LP": lp,
            "MPART": partial_codes(hkl, batch, frac)}


def test_predicted_sweep_written_as_mtz_scores_cc_truth_one(tmp_path):
    truth = json.loads((SIM / "truth.json").read_text())
    records = sweep_records_from_predictions(SIM / "predictions.csv")
    batches = [BatchInfo(number=i, phi_start=i - 1.0, phi_end=float(i), cell=truth["cell"],
                         umat=np.array(truth["U_mosflm"]), mosaic=truth["mosaic_fwhm_deg"],
                         wavelength=truth["wavelength_A"], distance=truth["distance_mm"],
                         detector_limits=((0, truth["image_size_px"][1]), (0, truth["image_size_px"][0])))
               for i in range(1, 61)]
    out = tmp_path / "sim.mtz"
    write_unmerged_mtz(out, records, space_group="P 21 21 21", cell=truth["cell"],
                       wavelength=truth["wavelength_A"], batches=batches, pname="sim", xname="xtal",
                       dname="sweep", title="predicted sweep")
    done = subprocess.run([sys.executable, str(SHARED / "tools" / "score_mtz.py"), str(out), str(SIM),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    score = json.loads(done.stdout)
    overall = score["overall"]
    print(f"records {score['records']}, observations {overall['n_obs']}, unique {overall['n_unique']}, "
          f"completeness {overall['completeness']:.3f}, cc_truth {overall['cc_truth']:.5f}")
    assert score["records"] == len(records["H"])
    assert score["observations_not_in_truth"] == 0
    assert overall["cc_truth"] > 0.999
    # partials were joined: far fewer observations than records, and most unique reflections seen
    assert overall["n_obs"] < 0.6 * score["records"]
    assert overall["completeness"] > 0.5


# ---- a file written as the blocks come, without the sweep in memory ------------------------------------

def predicted_sweep():
    """The sim sweep's predicted records in image order (as PROCESS hands them on), noisy, with batches."""
    truth = json.loads((SIM / "truth.json").read_text())
    cols = sweep_records_from_predictions(SIM / "predictions.csv")
    rng = np.random.default_rng(3)
    cols["IPR"] = cols["I"] + rng.normal(0, 1, len(cols["I"])) * cols["SIGI"]     # weak parts too
    order = np.argsort(cols["BATCH"], kind="stable")
    cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    batches = [BatchInfo(number=i, phi_start=i - 1.0, phi_end=float(i), cell=truth["cell"],
                         umat=np.array(truth["U_mosflm"]), mosaic=truth["mosaic_fwhm_deg"],
                         wavelength=truth["wavelength_A"], distance=truth["distance_mm"])
               for i in range(1, 61)]
    meta = dict(space_group="P 21 21 21", cell=truth["cell"], wavelength=truth["wavelength_A"],
                batches=batches, pname="sim", xname="xtal", dname="sweep", title="predicted sweep",
                history=["From pyflm, images 1 to 60"])
    return cols, meta


def test_an_mtz_written_block_by_block_is_gemmis_file_byte_for_byte(tmp_path):
    cols, meta = predicted_sweep()
    rec = as_records(cols, meta["batches"])
    gemmi_file = tmp_path / "gemmi.mtz"
    unmerged_mtz_object(rec, **meta).write_to_file(str(gemmi_file))      # the whole table in memory
    blocks = [rec[(rec["batch"] > b) & (rec["batch"] <= b + 5)] for b in range(0, 60, 5)]
    streamed = tmp_path / "streamed.mtz"
    assert write_unmerged_mtz(streamed, iter(blocks), **meta) == len(rec)
    assert streamed.read_bytes() == gemmi_file.read_bytes()
    # and so everything a reader sees: columns, ranges, batches, cell, symmetry, history
    got = read_unmerged_mtz(streamed)
    assert [c for c, _ in got.columns] == [c for c, _ in COLUMNS]
    assert len(got.batches) == 60 and got.history == ["From pyflm, images 1 to 60"]
    assert got.space_group.hm == "P 21 21 21"
    np.testing.assert_allclose(got.cell, meta["cell"], atol=1e-4)
    np.testing.assert_array_equal(got.records["h"], rec["h"])
    np.testing.assert_array_equal(got.records["ipr"], rec["ipr"])
    rs = pytest.importorskip("reciprocalspaceship")
    ds = rs.read_mtz(str(streamed))
    assert len(ds) == len(rec) and "BATCH" in ds.columns and ds.spacegroup.hm == "P 21 21 21"
    assert not list(tmp_path.glob(".*.part"))


def test_an_mtz_begun_before_its_batches_are_known_is_the_same_file(tmp_path):
    """PROCESS starts the MTZ with its first finished block and gives the batch headers at the end:
    byte for byte gemmi's file; a record whose batch gets no header is refused then, and no file is left."""
    from pyflm.mtz import UnmergedMtzWriter
    cols, meta = predicted_sweep()
    rec = as_records(cols, meta["batches"])
    gemmi_file = tmp_path / "gemmi.mtz"
    unmerged_mtz_object(rec, **meta).write_to_file(str(gemmi_file))
    w = UnmergedMtzWriter(tmp_path / "late.mtz", space_group=meta["space_group"], cell=meta["cell"])
    for b in range(0, 60, 5):
        w.add(rec[(rec["batch"] > b) & (rec["batch"] <= b + 5)])
    assert not (tmp_path / "late.mtz").exists()          # only once finished
    rest = {k: v for k, v in meta.items() if k not in ("space_group", "cell")}
    assert w.finish(**rest) == len(rec)
    assert (tmp_path / "late.mtz").read_bytes() == gemmi_file.read_bytes()
    w = UnmergedMtzWriter(tmp_path / "bad.mtz", space_group=meta["space_group"], cell=meta["cell"])
    w.add(rec)
    with pytest.raises(InputError, match="batch 60"):
        w.finish(**dict(rest, batches=meta["batches"][:59]))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gemmi.mtz", "late.mtz"]


def test_records_streamed_block_by_block_come_out_as_the_whole_sweep_would_give_them(tmp_path):
    """PROCESS hands each finished block's records on (into the MTZ) and finishes each reflection (MPART,
    weak partials fitted over their images) once the block after it is in: the same values, in the
    same order, as from the whole sweep, while holding no more than a few blocks at a time."""
    from pyflm.integrate import RecordStream, combine_weak_partials
    cols, meta = predicted_sweep()
    rec = as_records(cols, meta["batches"])
    # PROCESS measures no reflection wider than MAXWIDTH (5 images here), as the limit on what is held
    rec = rec[decode_mpart(rec["mpart"])[0] <= 5]
    whole = rec.copy()
    whole["mpart"] = partial_codes(np.stack([whole["h"], whole["k"], whole["l"]], 1), whole["batch"],
                                   whole["fractioncalc"])
    combine_weak_partials(whole)
    assert np.count_nonzero(whole["ipr"] != rec["ipr"]) > 100      # weak partials were combined
    chunks, held = [], []
    stream = RecordStream(chunks.append)
    for b in range(0, 60, 5):
        block = rec[(rec["batch"] > b) & (rec["batch"] <= b + 5)]
        stream.add([block[block["batch"] <= b + 2], block[block["batch"] > b + 2]], b + 5)
        held.append(len(stream.held))
    stream.end()
    got = np.concatenate(chunks)
    assert got.tobytes() == whole.tobytes()
    per_block = len(rec) / 12
    assert len(chunks) >= 10 and max(len(c) for c in chunks) < 2 * per_block
    assert max(held) < 2 * per_block