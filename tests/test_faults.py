"""Faults around a run: an output that cannot be written, a disk that fills, two runs in one directory,
numbers at the edge.  Each case ends in one clear line or a correct result, never a traceback (checked in
stdout, stderr and every log file left behind) and never a half-written file under its final name."""
import errno
import io
import os
import re
import resource
import signal
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from conftest import SIM, run_ipmosflm
from pyflm import cli, fileio
from pyflm.log import Log
from pyflm.summary import parse_loggraph

DECK = f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
PROCESS_1_2 = DECK + "process 1 2\ngo\n"


def assert_clean(out, cwd):
    """No traceback in what the run printed or in any log it left; no temporary file left over."""
    text = out + "".join(p.read_text(errors="replace") for p in cwd.rglob("*.lp"))
    assert "Traceback" not in text, text[-3000:]
    assert not [p.name for p in cwd.rglob("*.part")]


def errors(out):
    return [ln for ln in out.splitlines() if ln.startswith(" Error")]


def run_in_process(deck, *args, capsys, monkeypatch):
    """cli.main as the ipmosflm command runs it, here in the test's process so a writer can be faulted."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(deck.encode())))
    status = cli.main(list(args))
    cap = capsys.readouterr()
    return status, cap.out + cap.err


def mtz_values(path):
    m = gemmi.read_mtz_file(str(path))
    return m, np.array(m, copy=False)


# ---- outputs that cannot be written -----------------------------------------------------------------

@pytest.mark.parametrize("args,deck_line,expect", [
    (("HKLOUT", "file.txt/out.mtz"), "", "Command line: HKLOUT: cannot be written (%s/file.txt is a file, not a directory)"),
    ((), "hklout file.txt/sub/out.mtz\n", "Input line 5: HKLOUT: cannot be written (%s/file.txt is a file, not a directory)"),
    (("SUMMARY", "adir"), "", "Command line: SUMMARY: cannot be written (it is a directory)"),
    ((), "newmat nodir/x.mat\n", "Input line 5: NEWMAT: cannot be written (directory %s/nodir does not exist)"),
    (("SPOTOD", "file.txt/s.spt"), "", "Command line: SPOTOD: cannot be written"),
    ((), "xmlfile file.txt/x.xml\n", "Input line 5: XMLFILE: cannot be written"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, args, deck_line, expect):
    # CI runs as root, which chmod does not stop: a path under a regular file cannot be written by anyone
    (tmp_path / "file.txt").write_text("a regular file\n")
    (tmp_path / "adir").mkdir()
    r = run_ipmosflm(DECK + deck_line + "process 1 2\ngo\n", *args, cwd=tmp_path)
    assert r.returncode == 1
    assert errors(r.stdout) and errors(r.stdout)[0].startswith(" Error: " + (expect % tmp_path if "%s" in expect else expect)), r.stdout
    assert len(errors(r.stdout)) == 1 and "Integrating" not in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "file.txt", "mosflm.lp"]
    assert_clean(r.stdout + r.stderr, tmp_path)


# ---- a disk that fills --------------------------------------------------------------------------------

def test_disk_full_while_writing_the_mtz_leaves_the_old_file(workdir, capsys, monkeypatch):
    (workdir / "e.mtz").write_bytes(b"the previous run's MTZ")
    real = gemmi.Mtz.write_to_file

    def fills_half_way(self, path):
        real(self, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(gemmi.Mtz, "write_to_file", fills_half_way)
    status, out = run_in_process(PROCESS_1_2, "HKLOUT", "e.mtz", "SUMMARY", "e.sum",
                                 capsys=capsys, monkeypatch=monkeypatch)
    assert status == 1
    assert errors(out) == [" Error in PROCESS (input line 5): MTZ file e.mtz: cannot be written "
                           "(No space left on device)"]
    assert (workdir / "e.mtz").read_bytes() == b"the previous run's MTZ"
    assert not (workdir / "e.sum").exists()
    assert "MOSFLM HAS TERMINATED EARLY" in (workdir / "mosflm.lp").read_text()
    assert_clean(out, workdir)


def test_disk_full_while_writing_the_summary(workdir, capsys, monkeypatch):
    import builtins

    class FillingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fileio, "open", lambda p, mode="r", **kw: FillingFile(builtins.open(p, mode, **kw)),
                        raising=False)
    status, out = run_in_process(PROCESS_1_2, "HKLOUT", "e.mtz", "SUMMARY", "e.sum",
                                 capsys=capsys, monkeypatch=monkeypatch)
    assert status == 1
    assert errors(out) == [" Error in PROCESS (input line 5): Output file e.sum cannot be written: "
                           "No space left on device"]
    assert not (workdir / "e.sum").exists()
    m, a = mtz_values(workdir / "e.mtz")          # written before the SUMMARY: whole and readable
    assert m.nreflections > 1000 and len(m.batches) == 2
    assert_clean(out, workdir)


def test_a_file_size_limit_stops_the_real_mtz_write(tmp_path):
    """No monkeypatch: the kernel refuses to let any file grow past 150 kB (as a full disk refuses)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "HKLOUT", "e.mtz", "SUMMARY", "e.sum"],
                       input=PROCESS_1_2, text=True, capture_output=True, cwd=tmp_path, timeout=300,
                       preexec_fn=limit)
    assert r.returncode == 1
    err = errors(r.stdout)
    assert len(err) == 1 and err[0].startswith(" Error in PROCESS (input line 5): MTZ file e.mtz: cannot be "
                                                "written (the write failed part-way: is the disk full?)"), r.stdout[-2000:]
    assert not (tmp_path / "e.mtz").exists() and not (tmp_path / "e.sum").exists()
    assert (tmp_path / "mosflm.lp").read_text() == r.stdout
    assert_clean(r.stdout + r.stderr, tmp_path)


def test_a_log_file_that_fills_costs_one_warning(tmp_path):
    screen = io.StringIO()
    log = Log(str(tmp_path / "mosflm.lp"), stream=screen)
    log.line(" first line")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        close = flush
    log._f = Full()
    log.line(" second line")
    log.line(" third line")
    log.close()
    lines = screen.getvalue().splitlines()
    assert lines[:2] == [" first line", " second line"] and lines[-1] == " third line"
    assert [ln for ln in lines if "Warning" in ln] == [
        f" Warning: the log file {tmp_path}/mosflm.lp cannot be written (No space left on device):"
        " the log continues on the terminal only"]
    assert os.listdir(tmp_path) == []          # no half log under the final name, no temporary left


# ---- two runs in one directory -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "pyflm.cli", "HKLOUT", "one.mtz", "SUMMARY", "one.sum"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path)
    # all 60 images: the first run must still be integrating when the second starts (six once took
    # longer than a second run's start; with the integration kernel they take less)
    first.stdin.write(DECK + "process 1 60\ngo\n")
    first.stdin.close()
    seen = []
    for line in first.stdout:        # the first run is integrating: it holds the directory
        seen.append(line)
        if "Integrating Image" in line:
            break
    second = run_ipmosflm(PROCESS_1_2, "HKLOUT", "two.mtz", "SUMMARY", "two.sum", cwd=tmp_path)
    rest = first.stdout.read()
    assert first.wait(timeout=300) == 0
    out1 = "".join(seen) + rest
    assert second.returncode == 1
    assert second.stdout == (f" Error: another pyflm run (process {first.pid}) is working in {tmp_path}: its "
                             "mosflm.lp and output files would be mixed with this run's; wait for it to "
                             "finish or run in another directory\n")
    assert (tmp_path / "mosflm.lp").read_text() == out1          # the first run's log, whole and alone
    assert not (tmp_path / "two.mtz").exists() and not (tmp_path / "two.sum").exists()
    assert len(gemmi.read_mtz_file(str(tmp_path / "one.mtz")).batches) == 60
    assert not (tmp_path / ".mosflm.lock").exists()
    third = run_ipmosflm(PROCESS_1_2, "HKLOUT", "two.mtz", cwd=tmp_path)    # once it is done: free again
    assert third.returncode == 0 and (tmp_path / "two.mtz").exists()
    assert_clean(out1 + first.stderr.read() + second.stdout + second.stderr + third.stdout + third.stderr,
                 tmp_path)


# ---- numbers at the edge -----------------------------------------------------------------------------

def no_nan_in_outputs(d):
    m, a = mtz_values(d / "e.mtz")
    assert m.nreflections > 0 and np.all(np.isfinite(a))
    text = (d / "e.sum").read_text()
    assert not re.search(r"\b(nan|inf)\b", text, re.I)
    return m, text


def xtofd(summary_text):
    cols, rows = parse_loggraph(summary_text)["Refined detector parameters"]
    return float(rows[0][cols.index("XTOFD")])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """PROCESS 1 2 with the truth's own settings."""
    d = tmp_path_factory.mktemp("ref")
    r = run_ipmosflm(PROCESS_1_2, "HKLOUT", "e.mtz", "SUMMARY", "e.sum", cwd=d)
    assert r.returncode == 0
    return gemmi.read_mtz_file(str(d / "e.mtz"))


@pytest.mark.slow
@pytest.mark.parametrize("setting,check", [
    ("wavelength 0.3", lambda m, s, ref: abs(m.datasets[1].wavelength - 0.3) < 1e-6),
    ("wavelength 3", lambda m, s, ref: abs(m.datasets[1].wavelength - 3) < 1e-6 and
     m.resolution_high() >= 1.5 - 1e-3),                         # nothing finer than lambda/2
    ("distance 40", lambda m, s, ref: abs(xtofd(s) - 40) < 1 and abs(m.batches[0].floats[111] - 40) < 1),
    ("distance 1000", lambda m, s, ref: abs(xtofd(s) - 1000) < 10 and m.nreflections < ref.nreflections),
    # finer than the detector's corner: the same reflections as without a limit
    ("resolution 0.3", lambda m, s, ref: m.nreflections == ref.nreflections),
    ("resolution 0.0001", lambda m, s, ref: m.nreflections == ref.nreflections),
    ("symmetry P1\ncell 42.3 51.9 78.6 90 90 179.9", lambda m, s, ref: m.cell.gamma > 179.8),
])
def test_edge_values_give_correct_finite_results(tmp_path, reference, setting, check):
    r = run_ipmosflm(DECK + setting + "\nprocess 1 2\ngo\n", "HKLOUT", "e.mtz", "SUMMARY", "e.sum",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    m, text = no_nan_in_outputs(tmp_path)
    assert check(m, text, reference)
    assert_clean(r.stdout + r.stderr, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("setting,message", [
    ("cell 42.3 51.9 78.6 90 90 179.9",
     " Error: Input line 5: CELL: the cell does not fit space group P 21 21 21: got '42.3 51.9 78.6 90 90 "
     "179.9', expected a cell with the constraints of orthorhombic symmetry"),
    ("symmetry P1\ncell 42.3 51.9 78.6 179.9 179.9 179.9",
     " Error: Input line 6: CELL: impossible cell: got '42.3 51.9 78.6 179.9 179.9 179.9', expected "
     "angles that make a cell with volume"),
    ("cell 42.3 51.9 78.6 90 90 180", " Error: Input line 5: CELL: value out of range"),
    ("wavelength 0", " Error: Input line 5: WAVELENGTH: value out of range"),
    ("distance 0", " Error: Input line 5: DISTANCE: value out of range"),
    ("resolution 100 90",
     " Error in PROCESS (input line 6): MTZ file e.mtz: no reflections to write (none was integrated: "
     "check RESOLUTION, the images and the orientation)"),
])
def test_impossible_values_give_one_clear_line(tmp_path, setting, message):
    r = run_ipmosflm(DECK + setting + "\nprocess 1 2\ngo\n", "HKLOUT", "e.mtz", "SUMMARY", "e.sum",
                     cwd=tmp_path)
    assert r.returncode == 1
    assert len(errors(r.stdout)) == 1 and errors(r.stdout)[0].startswith(message), r.stdout[-2000:]
    assert not (tmp_path / "e.mtz").exists() and not (tmp_path / "e.sum").exists()
    assert_clean(r.stdout + r.stderr, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["wavelength 0.3", "wavelength 3", "distance 40", "distance 1000",
                                     "resolution 0.3", "symmetry P1\ncell 42.3 51.9 78.6 90 90 179.9"])
def test_predict_at_the_edge(tmp_path, setting):
    r = run_ipmosflm(DECK + setting + "\nimage 1\npredict png p.png\ngo\n", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    block = r.stdout.split("Prediction for image", 1)[1]
    assert not re.search(r"\b(nan|inf)\b", block, re.I)
    assert (tmp_path / "p.png").stat().st_size > 0
    assert_clean(r.stdout + r.stderr, tmp_path)


# ---- the terminal and signals outside PROCESS ---------------------------------------------------------

@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_deck_is_read_ends_cleanly(tmp_path, sig, status):
    p = subprocess.Popen([sys.executable, "-m", "pyflm.cli"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    p.stdin.write(DECK)
    p.stdin.flush()                  # the deck is not finished: the program waits for the rest of it
    assert p.stdout.readline().startswith(" ****")     # started, banner out
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == status
    assert out.splitlines()[-1] in (f" Interrupted by signal {int(sig)}: output files written so far are "
                                    "complete", " Interrupted")
    assert (tmp_path / "mosflm.lp").exists() and not (tmp_path / ".mosflm.lock").exists()
    assert_clean(out + err, tmp_path)


def test_a_reader_that_stops_reading_stdout(tmp_path):
    """`ipmosflm < deck | head -2`: the run goes on, mosflm.lp keeps the whole log."""
    r = subprocess.run(f"{sys.executable} -m pyflm.cli HKLOUT e.mtz | head -2", shell=True, input=PROCESS_1_2,
                       text=True, capture_output=True, cwd=tmp_path, timeout=300)
    assert len(r.stdout.splitlines()) == 2 and r.stderr == ""
    assert (tmp_path / "mosflm.lp").read_text().endswith(" Normal termination of pyflm\n")
    assert gemmi.read_mtz_file(str(tmp_path / "e.mtz")).nreflections > 1000
    assert_clean(r.stdout, tmp_path)


# ---- every output arrives by rename ---------------------------------------------------------------------

def test_every_output_file_is_renamed_into_place_when_complete(workdir, capsys, monkeypatch):
    """A deck that writes every kind of output; each file in the directory afterwards must have
    arrived by a rename from a temporary name beside it (so no reader ever saw it half-written)."""
    renames = []
    real_replace = os.replace

    def recording_replace(src, dst, **kw):
        renames.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, **kw)
    monkeypatch.setattr(os, "replace", recording_replace)
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\npicture on\nimage 1\nfindspots\ngo\n'
            "autoindex dps refine image 1 thresh 20\ngo\nmosaic 0.3\nimage 1\npredict png p1.png\ngo\n"
            "process 1 2\ngo\n")
    status, out = run_in_process(deck, "HKLOUT", "a.mtz", "SUMMARY", "a.sum", "SPOTOD", "a.spt", "NEWMAT",
                                 "a.mat", "XMLFILE", "a.xml", capsys=capsys, monkeypatch=monkeypatch)
    assert status == 0, out[-3000:]
    made = sorted(p.name for p in workdir.iterdir())
    for name in ("a.mtz", "a.sum", "a.spt", "a.mat", "a.xml", "mosflm.lp", "p1.png", "spots_00001.png"):
        assert name in made, (name, made)
    arrived = {os.path.abspath(dst) for src, dst in renames
               if os.path.basename(src).startswith("." + os.path.basename(dst) + ".") and src.endswith(".part")
               and os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))}
    assert [n for n in made if str(workdir / n) not in arrived] == []
    assert_clean(out, workdir)


@pytest.mark.slow
def test_a_run_killed_outright_leaves_the_previous_results_and_no_stale_lock(tmp_path):
    """SIGKILL cannot be caught: nothing of the killed run may be found under a final name."""
    first = run_ipmosflm(PROCESS_1_2, "HKLOUT", "e.mtz", "SUMMARY", "e.sum", cwd=tmp_path)
    assert first.returncode == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("e.mtz", "e.sum", "mosflm.lp")}
    p = subprocess.Popen([sys.executable, "-m", "pyflm.cli", "HKLOUT", "e.mtz", "SUMMARY", "e.sum"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    p.stdin.write(DECK + "process 1 20\ngo\n")
    p.stdin.close()
    for line in p.stdout:
        if "Integrating Image    3" in line:
            p.kill()
            break
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert [f.name for f in tmp_path.glob(".mosflm.lp.*.part")]      # its log was still being written
    assert list(tmp_path.glob(".e.mtz.*.part"))                      # and its MTZ, blocks written so far
    again = run_ipmosflm(PROCESS_1_2, "HKLOUT", "e.mtz", cwd=tmp_path)     # the lock died with it
    assert again.returncode == 0 and len(gemmi.read_mtz_file(str(tmp_path / "e.mtz")).batches) == 2
    assert not list(tmp_path.glob(".mosflm.lp.*.part"))        # the dead run's temporary log is cleared
    assert not list(tmp_path.glob(".e.mtz.*.part"))            # and its unfinished MTZ
    assert "Traceback" not in again.stdout + again.stderr + p.stderr.read()
