#!/usr/bin/env python3
"""The whole job on a sweep, pyflm against DIALS, measured in one run.

    python3 scripts/bench_pipeline.py                      # the shared 60-image sim sweep
    python3 scripts/bench_pipeline.py --sim6m 100          # a simulated Pilatus 6M sweep (made in /tmp)
    python3 scripts/bench_pipeline.py --nproc 1,2          # integration on 1 and on 2 processes
    python3 scripts/bench_pipeline.py --nproc 1,2 --repeat 3   # each 3 times, in turn: the median run
    python3 scripts/bench_pipeline.py --nproc 1,2 --together 2  # and two 1-process jobs at once: the
                                                                # most 2 cores give this work
    python3 scripts/bench_pipeline.py --dask 2             # and on a 2-worker Dask LocalCluster
    python3 scripts/bench_pipeline.py --memory 100,200     # peak memory of 100 vs 200 images
    python3 scripts/bench_pipeline.py --no-dials --no-profile

pyflm runs the deck a user would write (AUTOINDEX on two images, MOSAIC ESTIMATE, cell refinement on
two 3-image segments, PROCESS every image) in a fresh child process, which times each stage:
spot finding, indexing (with the mosaic estimate), cell refinement, integration and MTZ writing.  DIALS
runs dials.import, find_spots, index (space group given, as pyflm's deck gives SYMMETRY), refine,
integrate and export, all with nproc=1, in the same run.  Printed: seconds per image of the sweep for
each stage and the ratio pyflm/DIALS; fabio's decode time per image (timed just before and after each
1-process run: the machine's speed drifts) and integration's ratio to it; the
peak resident memory of pyflm's process tree (getrusage of the child, and of its children: the worker
processes); the scores of both MTZs (../shared/tools/score_mtz.py, --dmax 10); the machine load
(os.getloadavg), since the cores may be shared; with --together N, the machine's own ceiling for N
workers (N copies of the 1-process job run at once, between the same runs: the cores share memory
bandwidth, caches and, on a virtual machine, their host); and, with --profile (default), the top cProfile lines of
each pyflm stage, from a second, profiled run (profiling slows it; the times above are unprofiled).

Each timed run (and DIALS step, and decode sample) finds the images in one state of the page cache,
--cache: read into it just before (warm, the default), evicted (cold), or as left (asis).

Simulated images are written under /tmp (never into the repository) and reused when already there.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("PYFLM_SHARED", ROOT.parent / "shared"))
SIM = SHARED / "data" / "sim-p212121-cbf"
SIMULATE = SHARED / "tools" / "simulate_sweep.py"
SCORE = SHARED / "tools" / "score_mtz.py"
TMP = pathlib.Path(os.environ.get("PYFLM_BENCH_TMP", "/tmp/pyflm-bench"))

STAGES = ("spots", "index", "cellref", "integrate", "mtz")
DIALS_STAGES = ("import", "find_spots", "index", "refine", "integrate", "export")
# which DIALS step does the work of which pyflm stage (import has no pyflm stage: headers are read
# as needed and counted in the stage that reads them)
PAIRS = (("find_spots", "spots"), ("index", "index"), ("refine", "cellref"), ("integrate", "integrate"),
         ("export", "mtz"))

CONFIG_6M = {"name": "sim6m", "detector_name": "PILATUS 6M", "nx": 2463, "ny": 2527,
             "distance_mm": 250.0, "beam_px": [1231.5, 1263.5]}
# a small detector (a Pilatus 300K's size) so a long sweep is cheap to simulate and to process
CONFIG_SMALL = {"name": "simsmall", "detector_name": "PILATUS 300K", "nx": 487, "ny": 619,
                "distance_mm": 100.0, "beam_px": [243.5, 309.5], "module": None}


def load():
    return "load average %.2f %.2f %.2f on %d cores" % (*os.getloadavg(), os.cpu_count())


def simulated(name, cfg, n):
    """A simulated sweep of n images under TMP (made once; its truth is beside the images)."""
    out = TMP / f"{name}-{n}"
    if (out / "truth_intensities.mtz").exists() and len(list(out.glob("sim_*.cbf"))) >= n:
        return out
    TMP.mkdir(parents=True, exist_ok=True)
    c = dict(cfg, n_images=n)
    cfg_path = TMP / f"{name}-{n}.json"
    cfg_path.write_text(json.dumps(c))
    t0 = time.time()
    print(f"simulating {n} images into {out} ...", flush=True)
    subprocess.run([sys.executable, str(SIMULATE), str(out), "--config", str(cfg_path)], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"  simulated in {time.time() - t0:.0f} s", flush=True)
    return out


def deck(sweep, n_images, last=None, nproc=1):
    """The user's deck: index from two images, estimate the mosaic spread, refine the cell on two
    3-image segments, integrate images 1..last; NPROC first, as a user who wants the cores for the
    whole job gives it."""
    last = last or n_images
    second = min(n_images, 45)
    return (f'template "sim_####.cbf"\ndirectory "{sweep}"\nnproc {nproc}\n'
            f"autoindex dps refine image 1 thresh 20\nautoindex dps refine image {second} thresh 20\n"
            "mosaic estimate 1\ngo\nsymmetry P212121\npostref multi segments 2\n"
            f"process 1 3\ngo\nprocess {n_images - 2} {n_images}\ngo\npostref nosegment\n"
            f"process 1 {last}\ngo\n")


# ---- the pyflm child: run the deck in this process, timing (and optionally profiling) each stage ------

class Stages:
    """Wall time (and a cProfile) per stage; nested stages are taken out of the enclosing one."""

    def __init__(self, profile):
        self.t = {s: 0.0 for s in STAGES}
        self.cpu = {s: 0.0 for s in STAGES}     # this (the main) process's CPU time in each stage
        self.rss = {s: 0.0 for s in STAGES}     # peak RSS (MB) within each stage (Linux VmHWM)
        self.stack = []
        self.prof = {}
        self.profile = profile

    def _hwm(self, name):
        """Credit the peak RSS since the last reset to the stage, and reset it (Linux clear_refs 5)."""
        try:
            with open("/proc/self/status") as f:
                kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
            self.rss[name] = max(self.rss[name], kb / 1024)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, StopIteration):
            pass

    def push(self, name):
        now, cpu = time.perf_counter(), time.process_time()
        if self.stack:
            outer, t0, c0 = self.stack[-1]
            self._hwm(outer)
            self.t[outer] += now - t0
            self.cpu[outer] += cpu - c0
            self._prof(outer).disable()
        self.stack.append((name, time.perf_counter(), time.process_time()))
        self._prof(name).enable()

    def pop(self):
        name, t0, c0 = self.stack.pop()
        self._prof(name).disable()
        self.t[name] += time.perf_counter() - t0
        self.cpu[name] += time.process_time() - c0
        self._hwm(name)
        if self.stack:
            outer = self.stack[-1][0]
            self.stack[-1] = (outer, time.perf_counter(), time.process_time())
            self._prof(outer).enable()

    def _prof(self, name):
        if not self.profile:
            class _Off:
                enable = disable = staticmethod(lambda: None)
            return _Off
        import cProfile
        return self.prof.setdefault(name, cProfile.Profile())

    def wrap(self, fn, stage):
        def w(*a, **k):
            self.push(stage(*a) if callable(stage) else stage)
            try:
                return fn(*a, **k)
            finally:
                self.pop()
        return w

    def top(self, name, n=12):
        import io
        import pstats
        if name not in self.prof:
            return ""
        s = io.StringIO()
        pstats.Stats(self.prof[name], stream=s).sort_stats("tottime").print_stats(n)
        lines = s.getvalue().splitlines()
        i = next((k for k, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
        head = next((ln.strip() for ln in lines if "function calls" in ln), "")
        return "\n".join([head] + lines[i:i + n + 1])


def child(deck_path, workdir, profile):
    import pyflm.job as job_mod
    import pyflm.mtz as mtz_mod
    import pyflm.spotfinder as sf
    from pyflm.cli import run_batch
    from pyflm.job import JobState
    from pyflm.log import Log
    from pyflm._heap import tune
    tune()      # as ipmosflm's start does
    os.chdir(workdir)
    st = Stages(profile)
    real_resolve = job_mod.resolve_action

    def stage_of(job, args):
        pr = job.kw.get("POSTREF") or {}
        return "cellref" if (pr.get("MULTI") or pr.get("SEGMENTS")) else "integrate"

    def resolve(name):
        fn = real_resolve(name)
        if fn is None:
            return None
        if name in ("AUTOINDEX", "MOSAIC"):
            return st.wrap(fn, "index")
        if name == "PROCESS":
            return st.wrap(fn, stage_of)
        return fn
    job_mod.resolve_action = resolve
    sf.find_spots = st.wrap(sf.find_spots, "spots")
    # with NPROC > 1 the searches run on worker processes: the wait for them is spot finding too
    sf.find_spots_in_files = st.wrap(sf.find_spots_in_files, "spots")
    sf.find_spots_split = st.wrap(sf.find_spots_split, "spots")
    sf.find_spots_in_rows = st.wrap(sf.find_spots_in_rows, "spots")      # PROCESS's probe, a band first
    # PROCESS writes the MTZ as the blocks come (finishing their records, writing their rows) and its
    # header at the end: MTZ writing, unless in cell refinement's PROCESS segments (cell refinement)
    import pyflm.integrate as integ_mod
    mtz_or_outer = lambda *a: "mtz" if st.stack[-1][0] in ("integrate", "mtz") else st.stack[-1][0]
    for cls, name in ((integ_mod.RecordStream, "add"), (integ_mod.RecordStream, "end"),
                      (mtz_mod.UnmergedMtzWriter, "finish")):
        setattr(cls, name, st.wrap(getattr(cls, name), mtz_or_outer))
    log = Log("mosflm.lp")
    job = JobState(log=log)
    job.files["HKLOUT"] = "pyflm.mtz"
    t0 = time.perf_counter()
    status = run_batch(pathlib.Path(deck_path).read_text().splitlines(), job)
    total = time.perf_counter() - t0
    log.close()
    # the worker pool lives until the program ends: stopped and its workers reaped here (after the
    # timing), so that RUSAGE_CHILDREN below holds their peak RSS (it counts only children waited for)
    from pyflm.distributed import stop_pools
    stop_pools()
    out = {"status": status, "total": total, "stages": st.t, "cpu": st.cpu, "rss_after": st.rss,
           # the stages' peaks too: resetting VmHWM per stage resets ru_maxrss with it
           "maxrss_self_mb": max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
                                 + list(st.rss.values())),
           "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "profiles": {s: st.top(s) for s in STAGES} if profile else {}}
    pathlib.Path(workdir, "stages.json").write_text(json.dumps(out))
    return status


# how each timed run finds the sweep's images in the page cache (--cache).  This machine's kernel pages
# out file pages left unread for ~6 s (a DAMON "pageout" scheme), so without a set state each run would
# find its own share of the images on disk: a 6M run on images just read 7.9-8.0 s (nproc 1) and 4.3-4.6
# (nproc 2), on images evicted 8.0-8.4 and 4.6-4.9
CACHE = {"mode": "warm"}


def set_cache(paths):
    """The files in the state --cache asks for before a timed step: "warm" read whole (in the page cache,
    as a sweep just written is), "cold" evicted (posix_fadvise DONTNEED: read from the disk, as over a
    network file system), "asis" left alone."""
    mode = CACHE["mode"]
    if mode == "asis":
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if mode == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 22):
                    pass
        finally:
            os.close(fd)


def sweep_files(sweep, n_images=None):
    files = sorted(pathlib.Path(sweep).glob("sim_*.cbf"))
    return files[:n_images] if n_images else files


def start_pyflm(sweep, n_images, workdir, last=None, nproc=1, profile=False, scheduler=None):
    """The pyflm child started on the deck in `workdir` (made anew): its Popen.  (Its callers set the
    images' cache state first, outside their clocks: set_cache.)"""
    workdir = pathlib.Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "job.deck").write_text(deck(sweep, n_images, last, nproc))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if scheduler:
        env["PYFLM_SCHEDULER"] = scheduler
    # its log goes to files, not pipes: copies run together are waited for one after the other, and a
    # pipe that nobody reads until the first has ended stalls the second once it holds 64 kB
    with open(workdir / "child.out", "w") as out, open(workdir / "child.err", "w") as err:
        return subprocess.Popen([sys.executable, __file__, "--_child", str(workdir / "job.deck"), str(workdir)]
                                + (["--profile"] if profile else []), env=env, stdout=out, stderr=err)


def finish_pyflm(proc, workdir):
    """The child's figures (stages.json) once it has ended; CPU of its whole tree from wait4."""
    workdir = pathlib.Path(workdir)
    proc.wait()
    out_text, err_text = ((workdir / f).read_text(errors="replace") for f in ("child.out", "child.err"))
    res_path = workdir / "stages.json"
    if proc.returncode != 0 or not res_path.exists():
        sys.exit(f"pyflm failed (status {proc.returncode}) in {workdir}:\n{out_text[-3000:]}{err_text[-3000:]}")
    out = json.loads(res_path.read_text())
    out["mtz"] = str(workdir / "pyflm.mtz")
    out["peak_rss_mb"] = max(out["maxrss_self_mb"], out["maxrss_children_mb"])
    return out


def run_pyflm(sweep, n_images, workdir, last=None, nproc=1, profile=False, scheduler=None):
    set_cache(sweep_files(sweep, n_images))
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = finish_pyflm(start_pyflm(sweep, n_images, workdir, last, nproc, profile, scheduler), workdir)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    # CPU of the whole process tree (the child, its workers: each reaped by its parent), start-up and
    # exit included: against the wall time it says how busy the cores were
    out["cpu_tree"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["sys_tree"] = after.ru_stime - before.ru_stime
    out["faults_tree"] = after.ru_minflt - before.ru_minflt
    out["wall_tree"] = wall
    return out


def run_pyflm_together(sweep, n_images, workdirs):
    """Copies of the 1-process job, one per workdir, run at the same time: their figures.  What the
    machine's cores give independent work of this kind (they share memory bandwidth and caches, and
    a virtual machine's cores their host's) is the most that worker processes could give one job."""
    set_cache(sweep_files(sweep, n_images))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [start_pyflm(sweep, n_images, w) for w in workdirs]
    out = [finish_pyflm(p, w) for p, w in zip(procs, workdirs)]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for o in out:      # (their CPU shared out: each copy's own is not told apart by getrusage)
        o["cpu_tree"] = ((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / len(out)
    return out


# ---- DIALS -----------------------------------------------------------------------------------------

def run_dials(sweep, workdir):
    workdir = pathlib.Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    steps = [
        ("import", ["dials.import", f"template={sweep}/sim_####.cbf"]),
        ("find_spots", ["dials.find_spots", "imported.expt", "nproc=1"]),
        ("index", ["dials.index", "imported.expt", "strong.refl", "space_group=P212121"]),
        ("refine", ["dials.refine", "indexed.expt", "indexed.refl"]),
        ("integrate", ["dials.integrate", "refined.expt", "refined.refl", "nproc=1"]),
        ("export", ["dials.export", "integrated.expt", "integrated.refl", "format=mtz",
                    "mtz.hklout=integrated.mtz"]),
    ]
    t = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for name, cmd in steps:
        set_cache(sweep_files(sweep))       # (its own time not counted, as for pyflm's runs)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
        t[name] = time.perf_counter() - t0
        if r.returncode != 0:
            print(f"DIALS {name} failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
            return {"stages": t, "total": sum(t.values()), "mtz": None}
    return {"stages": t, "total": sum(t.values()), "mtz": str(workdir / "integrated.mtz")}


# ---- the rest --------------------------------------------------------------------------------------

def fabio_decode(sweep, n_images, n_sample=10):
    """Seconds for fabio to open and decode each of a sample of the sweep's images (their median is the
    decode time per image)."""
    import fabio
    nums = sorted({1 + round(i * (n_images - 1) / max(1, n_sample - 1)) for i in range(n_sample)})
    ts = []
    # (the sample's files in the state pyflm's runs find them: with them on disk the decode is slower)
    set_cache([sweep / f"sim_{n:04d}.cbf" for n in nums])
    for n in nums:
        p = sweep / f"sim_{n:04d}.cbf"
        t0 = time.perf_counter()
        fabio.open(str(p)).data.sum()
        ts.append(time.perf_counter() - t0)
    return ts


def score(mtz, sweep):
    if not mtz or not pathlib.Path(mtz).exists():
        return None
    r = subprocess.run([sys.executable, str(SCORE), mtz, str(sweep), "--dmax", "10", "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)["overall"]


def mtz_rows(path):
    """An MTZ's reflections sorted by (H, K, L, M/ISYM, BATCH): the keys and (I, IPR)."""
    import gemmi
    import numpy as np
    m = gemmi.read_mtz_file(path)
    a = np.array(m, copy=False)
    col = {c.label: i for i, c in enumerate(m.columns)}
    keys = a[:, [col[c] for c in ("H", "K", "L", "M/ISYM", "BATCH")]].astype(np.int64)
    order = np.lexsort(keys.T[::-1])
    return keys[order], a[order][:, [col["I"], col["IPR"]]].astype(float)


def same_content(a, b, rtol=1e-6):
    import numpy as np
    (ka, va), (kb, vb) = mtz_rows(a), mtz_rows(b)
    if ka.shape != kb.shape or not np.array_equal(ka, kb):
        return False, f"{len(ka)} vs {len(kb)} reflections, not the same set"
    rel = np.abs(va - vb) / np.maximum(np.maximum(np.abs(va), np.abs(vb)), 1e-30)
    worst = float(rel.max()) if len(rel) else 0.0
    return worst <= rtol, f"{len(ka)} reflections, largest relative difference {worst:.2e}"


def per_image(t, n):
    return t / n


def report_main(args, sweep, n_images):
    print(f"== sweep {sweep} ({n_images} images)")
    print(f"   {load()}")
    print("   page cache: " + {"warm": "the sweep's images read into it before each timed run, DIALS step and "
                                         "decode sample (as a sweep just written is)",
                                 "cold": "the sweep's images evicted from it before each timed run, DIALS step "
                                         "and decode sample (read from the disk)",
                                 "asis": "the images left as earlier runs left them"}[CACHE["mode"]]
          + "; this machine pages out file pages unread for ~6 s (--cache warm|cold|asis)")
    nprocs = [int(x) for x in args.nproc.split(",")]
    runs, all_runs, together, together_cpu = {}, {p: [] for p in nprocs}, [], []
    from pyflm._heap import tune
    tune()      # fabio decodes with the process settings pyflm runs with (malloc, page size)
    fabio_decode(sweep, n_images, 2)           # (fabio's first open imports its CBF reader)
    # --repeat n: each worker count n times, taking turns (a shared machine's load then falls alike on
    # each); the run of median total is the one reported.  fabio's decode is timed just before and just
    # after each run on nproc[0] (a shared machine's speed drifts from minute to minute), and that run's
    # integration is compared with the median of those decodes
    for rep in range(max(1, args.repeat)):
        for p in nprocs:
            before = fabio_decode(sweep, n_images) if p == nprocs[0] else []
            r = run_pyflm(sweep, n_images, TMP / (f"run-{sweep.name}-pyflm-np{p}" + (f"-{rep}" if rep else "")), nproc=p)
            if p == nprocs[0]:
                r["decode"] = statistics.median(before + fabio_decode(sweep, n_images))
            all_runs[p].append(r)
            print(f"   pyflm nproc {p}: {r['total']:.1f} s  ({load()})"
                  + (f"; integration {r['stages']['integrate'] / n_images / r['decode']:.2f} x fabio decode "
                     f"({r['decode']:.4f} s/image, timed beside it)" if p == nprocs[0] else ""), flush=True)
        if args.together:
            # the machine's own ceiling for this job on `together` cores, measured between the same runs
            tog = run_pyflm_together(sweep, n_images, [TMP / f"run-{sweep.name}-pyflm-together-{k}"
                                                       for k in range(args.together)])
            together.append(max(t["total"] for t in tog))
            together_cpu.append(tog[0]["cpu_tree"])
            print(f"   {args.together} copies of the 1-process job at once: " +
                  " ".join(f"{t['total']:.1f}" for t in tog) + f" s  ({load()})", flush=True)
    for p in nprocs:
        ordered = sorted(all_runs[p], key=lambda r: r["total"])
        runs[p] = ordered[(len(ordered) - 1) // 2]
        if len(ordered) > 1:
            print(f"   pyflm nproc {p}, {len(ordered)} runs: totals " +
                  " ".join(f"{r['total']:.2f}" for r in all_runs[p]) + f" s; median {runs[p]['total']:.2f} s"
                  f" (its stages are those reported below)")
    py = runs[nprocs[0]]
    dask_run = None
    if args.dask:
        # the cluster's workers must import this copy of pyflm, as the child does: spawned workers get
        # this process's sys.path (and the environment, for their own children)
        os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        sys.path.insert(0, str(ROOT))
        from distributed import LocalCluster
        with LocalCluster(n_workers=args.dask, processes=True, threads_per_worker=1, host="127.0.0.1",
                          dashboard_address=None) as cl:
            dask_run = run_pyflm(sweep, n_images, TMP / f"run-{sweep.name}-pyflm-dask",
                                 scheduler=cl.scheduler_address)
        print(f"   pyflm on a {args.dask}-worker Dask LocalCluster: {dask_run['total']:.1f} s  ({load()})",
              flush=True)
    dials = None
    if not args.no_dials and shutil.which("dials.import"):
        dials = run_dials(sweep, TMP / f"run-{sweep.name}-dials")
        print(f"   DIALS: {dials['total']:.1f} s  ({load()})", flush=True)
    dec = py["decode"]

    print()
    print(f"   seconds per image ({n_images} images; pyflm on {nprocs[0]} process, DIALS nproc=1)")
    print(f"   {'stage':<22}{'pyflm':>10}{'DIALS':>10}{'pyflm/DIALS':>13}")
    ds = dials["stages"] if dials else {}
    for d_name in DIALS_STAGES:
        p_name = dict(PAIRS).get(d_name)
        pt = py["stages"][p_name] if p_name else None
        dt = ds.get(d_name)
        label = f"{p_name or '-'} / {d_name}"
        print(f"   {label:<22}{(f'{pt / n_images:10.4f}' if pt is not None else f'{chr(45):>10}')}"
              f"{(f'{dt / n_images:10.4f}' if dt is not None else f'{chr(45):>10}')}"
              f"{(f'{pt / dt:13.3f}' if pt is not None and dt else f'{chr(45):>13}')}")
    other = py["total"] - sum(py["stages"].values())
    print(f"   {'(pyflm other)':<22}{other / n_images:10.4f}")
    tot_ratio = py["total"] / dials["total"] if dials else None
    print(f"   {'total':<22}{py['total'] / n_images:10.4f}"
          + (f"{dials['total'] / n_images:10.4f}{tot_ratio:13.3f}" if dials else ""))
    print(f"   total seconds: pyflm {py['total']:.2f}" + (f", DIALS {dials['total']:.2f}" if dials else ""))
    integ = py["stages"]["integrate"] / n_images
    print(f"   fabio decode {dec:.4f} s/image (timed beside the run reported); pyflm integration {integ:.4f}"
          f" s/image = {integ / dec:.2f} x decode")
    print(f"   peak RSS of pyflm (nproc {nprocs[0]}): {py['peak_rss_mb']:.0f} MB "
          f"(process {py['maxrss_self_mb']:.0f} MB, largest worker {py['maxrss_children_mb']:.0f} MB); "
          "peak within each stage: " + ", ".join(f"{k} {v:.0f}" for k, v in py["rss_after"].items()))
    if len(nprocs) > 1:
        base = runs[nprocs[0]]
        for p in nprocs[1:]:
            r = runs[p]
            print(f"   nproc {p} vs {nprocs[0]}, speed-up per stage (seconds {nprocs[0]} -> {p}): " + ", ".join(
                f"{s} {base['stages'][s]:.1f} -> {r['stages'][s]:.1f} = "
                f"{base['stages'][s] / max(r['stages'][s], 1e-9):.2f}x" for s in STAGES)
                + f"; other {base['total'] - sum(base['stages'].values()):.1f} -> "
                f"{r['total'] - sum(r['stages'].values()):.1f}; total {base['total']:.1f} -> {r['total']:.1f} = "
                f"{base['total'] / r['total']:.2f}x (goal >= 1.8: {'yes' if base['total'] / r['total'] >= 1.8 else 'no'})")
            # what the main process does itself: at nproc > 1 what is not shared out, less the waits
            print(f"   main process CPU seconds per stage, nproc {nprocs[0]} -> {p}: " + ", ".join(
                f"{s} {base['cpu'][s]:.2f} -> {r['cpu'][s]:.2f}" for s in STAGES))
            # more CPU in all at nproc p than at 1 is work the sharing-out costs (or cores slowed by
            # each other); total x p - CPU is what the cores left idle
            print(f"   CPU seconds of all processes (start-up and exit included), nproc {nprocs[0]} -> {p}: "
                  f"{base['cpu_tree']:.2f} -> {r['cpu_tree']:.2f} ({100 * (r['cpu_tree'] / base['cpu_tree'] - 1):+.0f} %);"
                  f" left idle at nproc {p}: {max(0.0, p * r['wall_tree'] - r['cpu_tree']):.2f} core-seconds of "
                  f"{p} x {r['wall_tree']:.2f} s")
            # each worker faults its own heap in: the kernel's share of the extra CPU
            print(f"   system CPU seconds and page faults of all processes, nproc {nprocs[0]} -> {p}: "
                  f"{base['sys_tree']:.2f} -> {r['sys_tree']:.2f} s, {base['faults_tree'] / 1e3:.0f}k -> "
                  f"{r['faults_tree'] / 1e3:.0f}k faults")
            if together and nprocs[0] == 1 and p == args.together:
                # n copies at once take t_n each where one alone takes t_1: the cores do n t_1 / t_n of
                # one job's work in its time, the most that p workers could give
                alone = statistics.median(r1["total"] for r1 in all_runs[1])
                ceiling = args.together * alone / statistics.median(together)
                print(f"   the machine's own ceiling: {args.together} copies of the 1-process job at once took "
                      + " ".join(f"{t:.2f}" for t in together) + f" s (median {statistics.median(together):.2f}"
                      f" s) where one alone took {alone:.2f} s (median): {args.together} cores do {ceiling:.2f} x "
                      f"one's work; nproc {p} gave {base['total'] / r['total']:.2f} x, "
                      f"{100 * base['total'] / r['total'] / ceiling:.0f} % of that.  CPU seconds of each copy "
                      f"{statistics.median(together_cpu):.2f} (median), of one alone "
                      f"{statistics.median(r1['cpu_tree'] for r1 in all_runs[1]):.2f}: the same work slower on "
                      "cores that are busy together")
            ok, why = same_content(base["mtz"], r["mtz"])
            print(f"   nproc {p} vs {nprocs[0]}: integration {base['stages']['integrate']:.2f} s -> "
                  f"{r['stages']['integrate']:.2f} s = {base['stages']['integrate'] / r['stages']['integrate']:.2f}x,"
                  f" total {base['total']:.2f} -> {r['total']:.2f} s = {base['total'] / r['total']:.2f}x; "
                  f"RSS main {r['maxrss_self_mb']:.0f} MB + {p - 1} worker{'s' if p > 2 else ''} of at most "
                  f"{r['maxrss_children_mb']:.0f} MB; MTZ {'identical' if ok else 'DIFFERENT'} ({why})")
    if dask_run:
        ok, why = same_content(py["mtz"], dask_run["mtz"])
        print(f"   Dask LocalCluster ({args.dask} workers) vs nproc {nprocs[0]}: integration "
              f"{py['stages']['integrate']:.2f} s -> {dask_run['stages']['integrate']:.2f} s; "
              f"MTZ {'identical' if ok else 'DIFFERENT'} ({why})")
    sp, sd = score(py["mtz"], sweep), score(dials["mtz"], sweep) if dials else None
    for name, s in (("pyflm", sp), ("DIALS", sd)):
        if s:
            print(f"   score {name:<6} cc_truth {s['cc_truth']:.5f}  completeness {s['completeness']:.3f}  "
                  f"n_obs {s['n_obs']}  I/sig {s['i_over_sigma']:.2f}"
                  f"  z_sd {s.get('z_sd', float('nan')):.2f}")
    if dials and sp and sd:
        print(f"   total time pyflm/DIALS {tot_ratio:.3f} (goal <= 0.333: {'yes' if tot_ratio <= 1 / 3 else 'no'});"
              f" cc_truth pyflm {sp['cc_truth']:.6f} vs DIALS {sd['cc_truth']:.6f}"
              f" ({'no worse' if sp['cc_truth'] >= sd['cc_truth'] else 'WORSE'})")
    ratios = [r["stages"]["integrate"] / n_images / r["decode"] for r in all_runs[nprocs[0]]]
    med = statistics.median(ratios)
    print(f"   integration {integ / dec:.2f} x fabio decode in the run reported; in each run on {nprocs[0]} process: "
          + " ".join(f"{x:.2f}" for x in ratios) + f", median {med:.2f} (goal <= 5: {'yes' if med <= 5 else 'no'})")
    print(f"   {load()}")
    if args.profile:
        prof = run_pyflm(sweep, n_images, TMP / f"run-{sweep.name}-pyflm-prof", profile=True)
        print()
        print(f"   cProfile of each pyflm stage (a separate, profiled run: {prof['total']:.1f} s)")
        for s in STAGES:
            print(f"   --- {s}")
            for ln in prof["profiles"].get(s, "").splitlines():
                print("   " + ln)


def report_memory(args):
    counts = [int(x) for x in args.memory.split(",")]
    sweep = simulated("simsmall", CONFIG_SMALL, max(counts))
    n = max(counts)
    print(f"== peak memory against the number of images processed ({sweep}, {CONFIG_SMALL['nx']} x "
          f"{CONFIG_SMALL['ny']} pixels)")
    print(f"   {load()}")
    rss, stage = {}, {s: {} for s in STAGES}
    for c in counts:
        r = run_pyflm(sweep, n, TMP / f"run-mem-{c}", last=c)
        rss[c] = r["peak_rss_mb"]
        for s in STAGES:
            stage[s][c] = r["rss_after"][s]
        print(f"   PROCESS 1 TO {c}: {r['total']:.1f} s, peak RSS {rss[c]:.1f} MB; peak within each stage: "
              + ", ".join(f"{s} {stage[s][c]:.1f}" for s in STAGES) + " MB", flush=True)
    for what, v in [("peak RSS", rss)] + [(f"{s} stage's peak RSS", stage[s]) for s in STAGES]:
        lo, hi = v[counts[0]], v[counts[-1]]
        print(f"   {what} {counts[-1]} / {counts[0]} images = {hi / lo:.3f} ({100 * (hi - lo) / lo:+.1f} %;"
              f" goal < 20 %: {'yes' if abs(hi - lo) / lo < 0.2 else 'no'})")


def compile_bytecode():
    """pyflm's modules compiled to bytecode first, as Python caches them on a package's first import
    (or pip at a wheel's install): with PYTHONDONTWRITEBYTECODE set, as here, every run would compile
    its ~14 000 lines again, in its serial start and in its lazy imports, which no installed copy does
    (DIALS's packages come compiled)."""
    import compileall
    compileall.compile_dir(str(ROOT / "pyflm"), quiet=1)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("   (PYTHONDONTWRITEBYTECODE is set: pyflm's bytecode compiled here first, as a first run "
              "would have cached it)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=pathlib.Path, default=None, help="a sweep folder (sim_####.cbf)")
    ap.add_argument("--sim6m", type=int, default=None, metavar="N",
                    help="simulate a Pilatus 6M sweep of N images into /tmp and use it")
    ap.add_argument("--nproc", default="1", help="comma-separated worker counts for pyflm (e.g. 1,2)")
    ap.add_argument("--memory", default=None, metavar="N1,N2",
                    help="peak memory processing N1 vs N2 images of a small-detector simulated sweep")
    ap.add_argument("--dask", type=int, default=0, metavar="N",
                    help="also run on a Dask LocalCluster of N worker processes (MTZ compared)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run pyflm N times at each --nproc count, in turn, and report the median run (the lower middle one for even N)")
    ap.add_argument("--together", type=int, default=0, metavar="N",
                    help="in each --repeat, also run N copies of the 1-process job at the same time: what "
                         "N cores give independent work of this kind (the ceiling for NPROC N)")
    ap.add_argument("--cache", choices=("warm", "cold", "asis"), default="warm",
                    help="the sweep's images before each timed run (and each DIALS step, and fabio's decode): "
                         "read into the page cache (warm, the default), evicted from it (cold), or left as "
                         "they are (asis)")
    ap.add_argument("--no-dials", action="store_true")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile", dest="profile", action="store_true", default=True)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        sys.exit(child(*args._child, profile=args.profile and "--profile" in sys.argv))
    compile_bytecode()
    CACHE["mode"] = args.cache
    if args.memory and args.sweep is None and args.sim6m is None:
        report_memory(args)
        return
    if args.sim6m:
        sweep = simulated("sim6m", CONFIG_6M, args.sim6m)
    else:
        sweep = args.sweep or SIM
    n_images = len(list(sweep.glob("sim_*.cbf")))
    if args.sim6m:
        n_images = args.sim6m
    report_main(args, sweep, n_images)
    if args.memory:
        print()
        report_memory(args)


if __name__ == "__main__":
    main()
