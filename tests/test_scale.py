"""Scale: the same MTZ on one process, on two, and on a Dask cluster; many sweeps with `pyflm batch`."""
import pickle
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from conftest import SIM, run_ipmosflm

# eight images in blocks of two: four block tasks to share out
DECK = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
        "symmetry P212121\nblock 2\n{extra}process {first} {last}\ngo\n")


def mtz_table(path):
    """Every record of an MTZ sorted by (H, K, L, M/ISYM, BATCH), and its column labels."""
    m = gemmi.read_mtz_file(str(path))
    a = np.array(m, copy=False).astype(float)
    labels = [c.label for c in m.columns]
    keys = a[:, :5]
    return a[np.lexsort(keys.T[::-1])], labels, len(m.batches)


def assert_same_content(a, b):
    """Same reflections (indices, batch), every value equal to 1e-6 relative."""
    ta, la, na = mtz_table(a)
    tb, lb, nb = mtz_table(b)
    assert la == lb and na == nb
    assert ta.shape == tb.shape, f"{len(ta)} vs {len(tb)} records"
    assert np.array_equal(ta[:, :5], tb[:, :5])
    rel = np.abs(ta - tb) / np.maximum(np.maximum(np.abs(ta), np.abs(tb)), 1e-30)
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    assert rel.max() <= 1e-6, f"column {la[worst[1]]}: {ta[worst]} vs {tb[worst]}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("np1")
    r = run_ipmosflm(DECK.format(extra="nproc 1\n", first=1, last=8), "HKLOUT", "one.mtz", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "in blocks of 2 on 1 process" in r.stdout
    m = gemmi.read_mtz_file(str(d / "one.mtz"))
    assert len(m.batches) == 8 and m.nreflections > 10000
    # the MTZ was written under a temporary name as the blocks finished, and put in place at the end
    assert sorted(p.name for p in d.iterdir()) == ["mosflm.lp", "one.mtz"]
    return d / "one.mtz"


def test_cell_refinement_on_two_processes_refines_the_same_cell(tmp_path):
    """NPROC 2: the refinement runs while the blocks do; the same cycles, cell and matrix as on one process."""
    deck = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
            "symmetry P212121\nnproc {n}\nnewmat refined.mat\npostref multi segments 2\n"
            "process 1 3\ngo\nprocess 58 60\ngo\n")
    logs = {}
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        r = run_ipmosflm(deck.format(n=n), "HKLOUT", "seg.mtz", cwd=tmp_path / str(n))
        assert r.returncode == 0, r.stdout[-2000:]
        lines = r.stdout.splitlines()
        i = lines.index(" Cell refinement is complete")
        logs[n] = (lines[i:i + 40], (tmp_path / str(n) / "refined.mat").read_text())
    assert "Cycle 2" in "\n".join(logs[1][0])
    assert logs[2] == logs[1]


def test_a_sparse_sweep_on_two_processes_writes_the_same_mtz_as_one(tmp_path):
    """With workers, PROCESS starts the blocks as for a dense sweep while it probes an image; L-cysteine's
    sparse sweep changes the box and puts the summation intensities in IPR, so those blocks are dropped
    and the sweep integrated with what its spots chose: the same MTZ as on one process."""
    lcys = SIM.parent / "real-lcys-pilatus2m"
    deck = (f"directory {lcys}\ntemplate l-cyst_01_#####.cbf\nnproc {{n}}\nautoindex dps refine image 1 to 15\n"
            "go\nsymmetry P212121\nprocess 1 to 15\ngo\n")
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        r = run_ipmosflm(deck.format(n=n), "HKLOUT", "lcys.mtz", cwd=tmp_path / str(n))
        assert r.returncode == 0, r.stdout[-2000:]
        assert "profile fitting is not used" in r.stdout and "Few spots per image" in r.stdout
    two = gemmi.read_mtz_file(str(tmp_path / "2" / "lcys.mtz"))
    assert np.array_equal(two.column_with_label("IPR"), two.column_with_label("I"))
    assert_same_content(tmp_path / "1" / "lcys.mtz", tmp_path / "2" / "lcys.mtz")


# two segments of cell refinement on the sim sweep, {n} processes
SEGMENTS = (f'template "sim_####.cbf"\ndirectory "{SIM}"\nmatrix "{SIM}/truth.mat"\nmosaic 0.3\n'
            "symmetry P212121\nnproc {n}\npostref multi segments 2\nprocess 1 3\ngo\n")


def _in_process(deck, hklout, monkeypatch):
    """The deck run here (run_batch, in hklout's folder): the job it leaves."""
    from pyflm.cli import run_batch
    from pyflm.job import JobState
    monkeypatch.chdir(hklout.parent)
    job = JobState()
    job.files["HKLOUT"] = hklout.name
    assert run_batch(deck.splitlines(), job) == 0
    return job


@pytest.mark.parametrize("between", ["", "mosaic 0.35\n"])
def test_cell_refinement_is_done_while_the_segments_blocks_run(tmp_path, monkeypatch, between):
    """NPROC 2: the second segment's blocks start with the first segment's PROCESS (on the worker its
    one block leaves free), and the whole refinement is done while the first segment's blocks run: the
    second segment's PROCESS takes both.  A MOSAIC given between the segments changes what they would
    be integrated and refined with, so none of that is taken; the refinement is then done again while
    the second segment's own blocks run.  The same cell, cycles and MTZ either way."""
    deck = SEGMENTS + between + "process 58 60\ngo\n"
    res = {}
    for n in (1, 2):
        job = _in_process(deck.format(n=n), tmp_path / f"seg{n}.mtz", monkeypatch)
        res[n] = job.results["cell_refinement"]
        res[n]["early_blocks"] = job.results.get("early_blocks_taken", 0)
        assert "early_blocks" not in job.results          # nothing started early is left running
    assert res[1]["early_blocks"] == 0 and res[2]["early_blocks"] == (0 if between else 1)
    assert_same_content(tmp_path / "seg1.mtz", tmp_path / "seg2.mtz")     # the second segment's MTZ
    # and the refinement done while blocks ran (the first segment's; with the MOSAIC between, the second's)
    assert not res[1]["refined_early"] and res[2]["refined_early"]
    assert pickle.dumps(res[2]["cycles"]) == pickle.dumps(res[1]["cycles"])     # every cycle's figures
    assert res[2]["cell"] == res[1]["cell"] and np.array_equal(res[2]["esd"], res[1]["esd"])
    assert np.array_equal(res[2]["U"], res[1]["U"])


@pytest.mark.parametrize("between", ["", "mosaic 0.35\n"])
def test_the_process_after_cell_refinement_starts_while_the_segments_end(tmp_path, monkeypatch, between):
    """NPROC 2: once the cell refinement is known (while the first segment's block runs), the PROCESS
    after the segments gets its blocks started on the worker the segments leave free, with the deck's
    statements up to it replayed (POSTREF NOSEGMENT, and a MOSAIC given between).  It takes them, and
    writes the MTZ one process writes."""
    deck = SEGMENTS + "process 58 60\ngo\npostref nosegment\n" + between + "process 1 10\ngo\n"
    taken = {}
    for n in (1, 2):
        job = _in_process(deck.format(n=n), tmp_path / f"after{n}.mtz", monkeypatch)
        taken[n] = job.results.get("early_blocks_taken", 0)
        assert "early_blocks" not in job.results          # nothing started early is left running
    assert taken == {1: 0, 2: 2}          # the second segment's block, and the last PROCESS's
    assert_same_content(tmp_path / "after1.mtz", tmp_path / "after2.mtz")


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c.scheduler_address


def test_two_processes_write_the_same_mtz_as_one(one_process, tmp_path):
    r = run_ipmosflm(DECK.format(extra="nproc 2\n", first=1, last=8), "HKLOUT", "two.mtz", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "in blocks of 2 on 2 processes" in r.stdout
    assert_same_content(one_process, tmp_path / "two.mtz")


@pytest.mark.slow
def test_a_dask_cluster_writes_the_same_mtz_as_one_process(one_process, cluster, tmp_path):
    r = run_ipmosflm(DECK.format(extra=f"scheduler {cluster}\n", first=1, last=8), "HKLOUT", "dask.mtz",
                     cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    assert f"on the Dask cluster at {cluster}" in r.stdout
    assert_same_content(one_process, tmp_path / "dask.mtz")


def test_an_unreachable_scheduler_is_one_line(tmp_path):
    pytest.importorskip("distributed")
    r = run_ipmosflm(DECK.format(extra="scheduler tcp://127.0.0.1:9\n", first=1, last=4), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in r.stdout


@pytest.mark.slow
def test_pyflm_batch_runs_each_deck_as_a_task_and_reports_it(one_process, cluster, tmp_path):
    (tmp_path / "first.deck").write_text(DECK.format(extra="", first=1, last=8))
    (tmp_path / "second.deck").write_text(DECK.format(extra="", first=5, last=6))
    (tmp_path / "bad.deck").write_text(DECK.format(extra="distance abc\n", first=1, last=2))
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "batch", "--scheduler", cluster, "first.deck",
                        "second.deck", "bad.deck"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.returncode == 1, r.stdout          # one deck failed
    assert f"3 deck(s) on the Dask cluster at {cluster}" in r.stdout
    lines = {ln.split(":")[0].strip(): ln for ln in r.stdout.splitlines() if ".deck:" in ln}
    for name, batches in (("first", 8), ("second", 2)):
        mtz = tmp_path / name / f"{name}.mtz"
        m = gemmi.read_mtz_file(str(mtz))
        assert len(m.batches) == batches
        assert f"{name}.deck: exit 0, {m.nreflections} reflections written, MTZ {mtz}" in lines[f"{name}.deck"]
        assert (tmp_path / name / "mosflm.lp").exists()      # each sweep in its own directory
    assert_same_content(one_process, tmp_path / "first" / "first.mtz")
    assert "bad.deck: exit 1, 0 reflections written, MTZ none" in lines["bad.deck"]
    assert "DISTANCE" in lines["bad.deck"] and "abc" in lines["bad.deck"]
    assert "2 of 3 deck(s) succeeded" in r.stdout


@pytest.mark.slow
def test_pyflm_batch_on_local_processes_and_bad_arguments(tmp_path):
    (tmp_path / "a.deck").write_text(DECK.format(extra="", first=1, last=2))
    (tmp_path / "b.deck").write_text(DECK.format(extra="", first=3, last=4))
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "batch", "--nproc", "2", "a.deck", "b.deck"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 deck(s) on 2 local processes" in r.stdout and "2 of 2 deck(s) succeeded" in r.stdout
    assert len(gemmi.read_mtz_file(str(tmp_path / "b" / "b.mtz")).batches) == 2
    for args, said in ((["nothere.deck"], "deck nothere.deck is not a readable file"),
                       (["--nproc", "x", "a.deck"], "--nproc x: expected a whole number"),
                       ([], "no decks given")):
        r = subprocess.run([sys.executable, "-m", "pyflm.cli", "batch", *args], capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode == 1 and said in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_every_process_of_a_job_uses_the_same_worker_processes(one_process, tmp_path, monkeypatch):
    """NPROC 2: the job's worker (this process being the second of the two) is started once and kept for
    each PROCESS (a new pool per PROCESS cost every worker its start and a slow first block); the
    second PROCESS's MTZ is still the one a single process writes."""
    from pyflm import distributed, integrate, job as job_mod
    from pyflm.cli import run_batch
    monkeypatch.chdir(tmp_path)
    workers, real = [], integrate.run_process

    def run_process(job, args):
        real(job, args)
        workers.append(sorted(distributed.local_pool(2)._processes))
    monkeypatch.setattr(integrate, "run_process", run_process)
    monkeypatch.setattr(job_mod, "resolve_action",
                        lambda name, r=job_mod.resolve_action: run_process if name == "PROCESS" else r(name))
    job = job_mod.JobState()
    job.files["HKLOUT"] = "two.mtz"
    deck = DECK.format(extra="nproc 2\n", first=5, last=8) + "process 1 8\ngo\n"
    try:
        assert run_batch(deck.splitlines(), job) == 0
    finally:
        distributed.drop_pool(distributed.local_pool(2), wait=True)
    assert len(workers) == 2 and len(workers[0]) == 1 and workers[0] == workers[1]
    assert_same_content(one_process, tmp_path / "two.mtz")



def _megabyte():
    return b"x" * (1 << 20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_a_blocks_records_go_back_in_one_write():
    """A 6M block's records are a megabyte: the pool's result pipe holds one whole, so a worker hands
    it over and goes on to its next block while this process, busy writing the MTZ, has not read it
    yet (through a 64 kB pipe the worker waited for each 64 kB to be read, its core idle)."""
    import fcntl
    from pyflm import distributed
    ex = distributed.local_pool(2)
    try:
        size = fcntl.fcntl(ex._result_queue._writer.fileno(), 1032)       # F_GETPIPE_SZ
        assert size >= min(1 << 20, int(open("/proc/sys/fs/pipe-max-size").read()))
        assert [len(f.result()) for f in [ex.submit(_megabyte) for _ in range(3)]] == [1 << 20] * 3
    finally:
        distributed.drop_pool(ex, wait=True)


def _pid_after(seconds):
    import os
    import time
    time.sleep(seconds)
    return os.getpid()


def _interrupted():
    from pyflm.errors import Interrupted
    raise Interrupted(2)


def test_nproc_2_is_this_process_and_one_worker():
    """NPROC 2 is two processes doing the work: one worker, and this one, which runs the tasks no
    worker has begun while it waits for a result (a second worker sat beside an idle main process and
    faulted in a heap of its own)."""
    import os
    from pyflm import distributed
    ex = distributed.local_pool(2)
    try:
        assert ex.n_workers == 1
        futures = [ex.submit(_pid_after, 0.3) for _ in range(4)]
        pids = [ex.wait(f) for f in futures]
        assert os.getpid() in pids and len(set(pids)) == 2
        # a task not begun can still be cancelled, as one queued in a ProcessPoolExecutor
        busy, held = ex.submit(_pid_after, 0.5), ex.submit(_pid_after, 0.0)
        assert held.cancel()
        assert ex.wait(busy) != os.getpid() and ex.outstanding == 0
    finally:
        distributed.drop_pool(ex, wait=True)


def test_a_signal_in_a_task_run_here_stops_this_process():
    """SIGINT while this process runs a block for the workers: the Interrupted reaches PROCESS (which
    writes what is finished), not the task's future alone."""
    from pyflm import distributed
    from pyflm.errors import Interrupted
    ex = distributed.local_pool(2)
    try:
        busy, here = ex.submit(_pid_after, 0.5), ex.submit(_interrupted)
        with pytest.raises(Interrupted):
            ex.wait(busy)
        assert here.done() and isinstance(here.exception(), Interrupted)
    finally:
        distributed.drop_pool(ex, wait=True)


def test_a_pool_shut_down_without_cancelling_runs_what_it_holds():
    from pyflm import distributed
    ex = distributed.local_pool(2)
    futures = [ex.submit(_pid_after, 0.1) for _ in range(3)]
    ex.shutdown(wait=True)
    distributed.drop_pool(ex)
    assert all(f.done() and not f.cancelled() for f in futures) and ex._in_workers == 0
