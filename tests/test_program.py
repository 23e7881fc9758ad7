"""ipmosflm as a user drives it: decks in, log lines and exit status out."""
import json
import re

import pytest

from conftest import SIM, run_ipmosflm
from pyflm import helptext, keywords

SIM_HEAD = f'template "sim_####.cbf"\ndirectory "{SIM}"\n'


def test_exit_prints_the_banner_with_the_version_and_exits_0(workdir):
    r = run_ipmosflm("exit\n", cwd=workdir)
    assert r.returncode == 0
    assert re.search(r"Version \d+\.\d+\.\d+", r.stdout)
    assert (workdir / "mosflm.lp").read_text().startswith(r.stdout[:50])


def test_version_and_help_flags(workdir):
    assert "Version" in run_ipmosflm("", "--version", cwd=workdir).stdout
    out = run_ipmosflm("", "--help", cwd=workdir).stdout
    assert "HKLOUT" in out and "SUMMARY" in out


def test_xia2_header_deck_reports_geometry_as_the_truth(workdir):
    truth = json.load(open(SIM / "truth.json"))
    deck = SIM_HEAD + "image 1\nhead\ngo\nimage 30\nhead brief\ngo\n"
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 0, r.stdout
    out = r.stdout
    dist = [ln for ln in out.splitlines() if "Crystal to detector distance of" in ln][0]
    assert abs(float(dist.split()[5].replace("mm", "")) - truth["distance_mm"]) < 0.001   # xia2's token
    assert "Wavelength of 0.97950A" in out
    bx, by = truth["mosflm_beam_mm"]
    m = re.search(r"Beam coordinates of\s+([\d.]+)mm\s+([\d.]+)mm", out)
    assert abs(float(m.group(1)) - bx) < 0.001 and abs(float(m.group(2)) - by) < 0.001
    assert re.search(r"image\s+1 from image header are\s+0\.00 and\s+1\.00 degrees", out)
    m = re.search(r"Phi\s+([\d.]+) to\s+([\d.]+)\s+Wavelength ([\d.]+)A\s+Distance ([\d.]+)mm\s+"
                  r"Beam ([\d.]+) ([\d.]+)mm", out)
    phi0, phi1, wl, d, x, y = map(float, m.groups())
    assert (phi0, phi1) == (29.0, 30.0) and abs(wl - truth["wavelength_A"]) < 1e-5
    assert abs(x - bx) < 0.001 and abs(y - by) < 0.001 and abs(d - 120.0) < 0.001


def test_keywords_override_the_header(workdir):
    deck = SIM_HEAD + "image 2 phi 10 to 11\nbeam 90.0 85.0\ndistance 121.5\nwavelength 1.0\nhead\ngo\n"
    out = run_ipmosflm(deck, cwd=workdir).stdout
    assert "121.50mm taken from keyword input" in out
    assert "Wavelength of 1.00000A taken from keyword input" in out
    assert "90.000mm   85.000mm taken from keyword input" in out
    assert "10.00 and    11.00 degrees" in out


EVERY_KEYWORD_DECK = f"""
title a test of every keyword
pname P
xname X
dname D
hklout out.mtz
summary out.sum
genfile out.gen
newmat new.mat
matrix "{SIM}/truth.mat"
spotod out.spt
coords out.coords
xmlfile out.xml
directory "{SIM}"
template "sim_####.cbf"
extension cbf
image 1 phi 0 to 1
harvest on
wavelength 0.9795
divergence 0.02 0.02
dispersion 0.0002
polarisation synchrotron 0.95
beam 89.6636 84.7272
detector pilatus reversephi
detector omega 0
scanner roff 0 toff 0
distance 120
pixel 0.172
twotheta 0
limits xmin 0 xmax 180 ymin 0 ymax 170 rmin 3 rmax 150
limits exclude 10 10 20 10 20 20 10 20
backstop centre 89.6 84.7 radius 2.2
nullpix -1
overload cutoff 1048500
gain 1.0
adcoffset 0
distortion yscale 1.0 tilt 0 twist 0 ccomega 0
cell 42.3 51.9 78.6 90 90 90
symmetry P212121
mosaic 0.3
missets 0 0 0
resolution 1.5 40
spots minpix 4 threshold 5
threshold 20
solution 9
hkldev 0.15
refinement residual 15 include partials
postref fix mosaic
postref multi segments 2 repeat 10
postref maxresidual 5.0 sdfac 1.0
block 5
raster 13 17 9 4 5
separation 0.5 0.7 close
profile tolerance 0.02 0.03 nooptimise
rejection bgratio 3 pkratio 3.5
maxwidth 5
nproc 1
scheduler tcp://127.0.0.1:8786
picture off
stats
xgui off
display
plot
help distance
header brief
findspots threshold 5 minpix 6
autoindex dps refine image 1 thresh 20
mosaic estimate 1
predict
strategy start 0 end 60
testgen start 0 end 10 step 5
process 1 to 2
exit
"""


def test_a_deck_using_every_keyword_parses():
    from pyflm.parser import parse_lines
    statements, errors = parse_lines(EVERY_KEYWORD_DECK.splitlines())
    assert not errors, [e.line() for e in errors]
    used = {s.keyword for s in statements}
    assert set(keywords.all_names()) - used == {"GO", "RUN", "END"}   # stop words tested elsewhere
    from pyflm.job import JobState, apply_statement
    job = JobState()
    for st in statements:
        apply_statement(job, st)
    assert job.crystal.space_group == "P 21 21 21" and job.kw["DISTANCE"]["_args"] == [120.0]
    assert [q[0] for q in job.queue] == ["HEADER", "FINDSPOTS", "AUTOINDEX", "MOSAIC", "PREDICT",
                                         "STRATEGY", "TESTGEN", "PROCESS"]


def test_autoindex_images_on_one_line_or_several_add_up():
    # "AUTOINDEX DPS REFINE IMAGE 1 IMAGE 10" once indexed from image 10 alone
    from pyflm.job import JobState, apply_statement
    from pyflm.parser import parse_lines
    queues = []
    for deck in ("autoindex dps refine image 1 phi 0 1 image 10 thresh 20\n",
                 "autoindex dps refine image 1 phi 0 1 thresh 20\nautoindex image 10\n"):
        statements, errors = parse_lines(deck.splitlines())
        assert not errors
        job = JobState()
        for st in statements:
            apply_statement(job, st)
        queues.append(job.queue)
    for q in queues:
        assert [a[0] for a in q] == ["AUTOINDEX"]
        assert q[0][1]["IMAGES"] == [{"IMAGE": 1, "PHI": [0.0, 1.0]}, {"IMAGE": 10}]
        assert q[0][1]["THRESHOLD"] == 20.0


def test_every_keyword_has_help_and_every_help_entry_a_keyword():
    assert set(helptext.entries()) == set(keywords.all_names())
    for name in keywords.all_names():
        text = "\n".join(helptext.help_text(name))
        assert "Syntax:" in text and "Example:" in text


def test_abbreviations_comments_continuation_and_quotes():
    from pyflm.parser import parse_lines
    deck = ["DIST 120.0   ! the distance", "# a whole-line comment", "", "wave 0.9795 # trailing",
            "limits xmin 0 xmax 100 -", "  ymin 0 ymax 90", "extension cbf # a comment after a word", 'template "My Images_###.cbf"',
            "symm P212121", "thresh 10", "sepa 0.5 0.6 clos"]
    st, err = parse_lines(deck)
    assert not err
    by = {s.keyword: s.values for s in st}
    assert by["DISTANCE"]["_args"] == [120.0]
    assert by["LIMITS"] == {"XMIN": 0.0, "XMAX": 100.0, "YMIN": 0.0, "YMAX": 90.0}
    assert by["TEMPLATE"]["_args"] == ["My Images_###.cbf"]
    assert by["EXTENSION"]["_args"] == ["cbf"]
    st, err = parse_lines(["TEMPLATE hg_###.mar1600"])      # unquoted, as the tutorial writes it
    assert not err and st[0].values["_args"] == ["hg_###.mar1600"]
    assert by["SEPARATION"] == {"_args": [0.5, 0.6], "CLOSE": True}


def test_at_file_includes_keywords(workdir):
    (workdir / "geom.dat").write_text("distance 121\nwavelength 1.0\n")
    r = run_ipmosflm(SIM_HEAD + "@geom.dat\nimage 1\nhead\ngo\n", cwd=workdir)
    assert r.returncode == 0 and "121.00mm taken from keyword input" in r.stdout


def test_logical_names_on_the_command_line(workdir):
    r = run_ipmosflm("exit\n", "hklout", "x.mtz", "SUMMARY", "x.sum", cwd=workdir)
    assert r.returncode == 0
    r = run_ipmosflm("exit\n", "HKLOUT", cwd=workdir)
    assert r.returncode == 1 and "needs a file name" in r.stdout
    r = run_ipmosflm("exit\n", "BOGUS", "x", cwd=workdir)
    assert r.returncode == 1 and "BOGUS" in r.stdout


MALFORMED = [
    ("distnce 120", "DISTNCE"),
    ("distance abc", "'abc'"),
    ("distance", "too few values"),
    ("distance 120 130", "too many values"),
    ("distance -5", "out of range"),
    ("distance nan", "finite"),
    ("distance inf", "finite"),
    ("wavelength 0", "out of range"),
    ("beam 89.6", "too few values"),
    ("beam x y", "'x'"),
    ("cell 42 51 78 90 90", "too few values"),
    ("cell 42 51 78 90 90 190", "out of range"),
    ("cell 42 51 78 10 10 170", "impossible cell"),
    ("symmetry P9999", "unknown space group"),
    ("symmetry 231", "unknown space group"),
    ("image -1", "out of range"),
    ("image one", "'one'"),
    ("image 3 phi 5", "too few values"),
    ("image 3 phi 5 to 4", "phi range must increase"),
    ("mosaic lots", "'LOTS'"),
    ("resolution -1", "out of range"),
    ("separation 0.5 banana", "BANANA"),
    ("raster 13 17 9 4", "too few values"),
    ("raster 13 17 9 4 x", "'x'"),
    ("process 1 to x", "'x'"),
    ("autoindex dps image x", "'x'"),
    ("autoindex wrongsub", "WRONGSUB"),
    ("findspots threshold 5 threshold 6", "THRESHOLD given twice"),
    ("findspots threshold -3", "out of range"),
    ("postref segments 0", "out of range"),
    ("polarisation synchrotron 1.5", "out of range"),
    ("limits xmin", "too few values"),
    ("overload cutoff", "too few values"),
    ("@/nonexistent/deck.dat", "cannot read the @file"),
    ('template "unterminated', "unbalanced quotes"),
    ("matrix /nonexistent/x.mat", "cannot be read"),
    ("nproc 0", "out of range"),
    ("gain 1.0.0", "'1.0.0'"),
    ("blah", "BLAH"),
]


@pytest.mark.parametrize("bad,expect", MALFORMED)
def test_malformed_deck_gives_one_line_and_exit_1(workdir, bad, expect):
    deck = f"distance 120\n{bad}\nprocess 1 2\ngo\n"
    r = run_ipmosflm(deck, cwd=workdir)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    errs = [ln for ln in r.stdout.splitlines() if ln.startswith(" Error:")]
    assert len(errs) == 1, r.stdout
    assert "Input line 2" in errs[0] and expect.lower() in errs[0].lower(), errs[0]
    assert "===>" not in r.stdout          # nothing was processed


def test_every_bad_line_is_reported(workdir):
    r = run_ipmosflm("distance x\nwavelength y\nfoo\n", cwd=workdir)
    errs = [ln for ln in r.stdout.splitlines() if ln.startswith(" Error:")]
    assert r.returncode == 1 and len(errs) == 3


def test_non_utf8_bytes_do_not_crash(workdir):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pyflm.cli"], input=b"title \xff\xfe caf\xe9\nexit\n",
                       capture_output=True, cwd=workdir)
    assert r.returncode == 0 and b"Traceback" not in r.stdout + r.stderr


def test_an_action_whose_stage_is_missing_is_reported_not_dropped(workdir):
    r = run_ipmosflm(SIM_HEAD + "image 1\nstrategy start 0 end 60\ngo\n", cwd=workdir)
    assert "STRATEGY" in r.stdout


def test_a_missing_image_ends_the_run_with_one_line(workdir):
    r = run_ipmosflm(SIM_HEAD + "image 99\nhead\ngo\n", cwd=workdir)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "sim_0099.cbf: no such file" in r.stdout and "MOSFLM HAS TERMINATED EARLY" in r.stdout
