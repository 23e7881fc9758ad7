"""pyflm batch: many sweeps, one deck each, as tasks on one engine.

    pyflm batch [--scheduler tcp://host:port] [--nproc N] DECK...

Each deck runs as ``ipmosflm HKLOUT <name>.mtz SUMMARY <name>.sum < DECK`` in its own working
directory, ``<name>/`` beside the deck (``x.deck`` -> ``x/``), so the logs and locks of two sweeps never
meet.  The engine is the Dask scheduler when one is named (``--scheduler`` or ``PYFLM_SCHEDULER``), else
N local processes (``--nproc``, else ``PYFLM_NPROC``, else 1).  Each deck is one task: inside it the
sweep is integrated on one process, so the sweeps, not their blocks, share the workers.  One line per
deck reports its exit status, the reflections written and the MTZ; the exit status is 0 when every
deck succeeded, else 1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

USAGE = """\
usage: pyflm batch [--scheduler tcp://host:port] [--nproc N] DECK...
  Runs each deck (a file of MOSFLM keywords) as 'ipmosflm HKLOUT name.mtz SUMMARY name.sum < DECK'
  in its own directory name/ beside the deck, as tasks on a Dask scheduler (--scheduler or
  PYFLM_SCHEDULER) or on N local processes (--nproc or PYFLM_NPROC, default 1).
"""

_N_REFL = re.compile(r"\* Number of Reflections =\s*(\d+)")
_MTZ = re.compile(r"Logical Name: (\S+)\s+Filename: (\S+)")


def workdir_for(deck):
    base, _ = os.path.splitext(os.path.abspath(deck))
    return base


def run_deck(deck, workdir):
    """One sweep: run the deck with ipmosflm in workdir; a dict of what it did (a Dask or pool task)."""
    t0 = time.time()
    name = os.path.basename(workdir)
    out = {"deck": deck, "workdir": workdir, "status": None, "reflections": 0, "mtz": None,
           "seconds": 0.0, "message": ""}
    try:
        with open(deck, "rb") as f:
            text = f.read()
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        out.update(status=1, message=f"{e.strerror}: {e.filename}")
        return out
    env = dict(os.environ)
    env.pop("PYFLM_SCHEDULER", None)   # the sweep's blocks stay on its task's worker
    env.pop("PYFLM_NPROC", None)
    r = subprocess.run([sys.executable, "-m", "pyflm.cli", "HKLOUT", f"{name}.mtz", "SUMMARY", f"{name}.sum"],
                       input=text, capture_output=True, cwd=workdir, env=env)
    log = r.stdout.decode("utf-8", errors="replace")
    out["status"] = r.returncode
    out["seconds"] = time.time() - t0
    n = _N_REFL.findall(log)
    m = _MTZ.findall(log)
    if n:
        out["reflections"] = int(n[-1])
    if m:
        out["mtz"] = os.path.join(workdir, m[-1][1])
    if r.returncode != 0:
        bad = [ln.strip() for ln in log.splitlines() if "Error" in ln or "TERMINATED" in ln]
        out["message"] = bad[0] if bad else (r.stderr.decode(errors="replace").strip().splitlines() or [""])[-1]
    return out


def parse_args(argv):
    """-> (scheduler, nproc, decks); raises ValueError with a one-line message."""
    scheduler, nproc, decks = os.environ.get("PYFLM_SCHEDULER") or None, None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--scheduler", "--nproc"):
            if i + 1 >= len(argv):
                raise ValueError(f"{a} needs a value")
            v = argv[i + 1]
            if a == "--scheduler":
                scheduler = v
            else:
                try:
                    nproc = int(v)
                    if nproc < 1:
                        raise ValueError
                except ValueError:
                    raise ValueError(f"--nproc {v}: expected a whole number of processes, 1 or more")
            i += 2
            continue
        if a.startswith("-"):
            raise ValueError(f"unknown option {a}: expected --scheduler, --nproc or deck files")
        decks.append(a)
        i += 1
    if not decks:
        raise ValueError("no decks given: expected one or more files of MOSFLM keywords")
    missing = [d for d in decks if not os.path.isfile(d)]
    if missing:
        raise ValueError(f"deck {missing[0]} is not a readable file")
    dirs = [workdir_for(d) for d in decks]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two decks would share a working directory (same name in one folder): "
                         + ", ".join(d for d in decks if dirs.count(workdir_for(d)) > 1))
    if nproc is None:
        try:
            nproc = max(1, int(os.environ.get("PYFLM_NPROC", "1")))
        except ValueError:
            nproc = 1
    return scheduler, nproc, decks


def run(decks, scheduler=None, nproc=1, report=print):
    """Run every deck as a task; report(line) as each finishes, in the order given.  -> results."""
    if scheduler:
        from .distributed import executor
        ex = executor(scheduler)
        where = f"the Dask cluster at {scheduler}"
    else:       # threads, each waiting on its deck's own ipmosflm process
        ex = ThreadPoolExecutor(max_workers=nproc)
        where = f"{nproc} local process{'es' if nproc > 1 else ''}"
    report(f" pyflm batch: {len(decks)} deck(s) on {where}")
    results = []
    try:
        futures = [ex.submit(run_deck, os.path.abspath(d), workdir_for(d)) for d in decks]
        for d, f in zip(decks, futures):
            r = f.result()
            results.append(r)
            report(f" {d}: exit {r['status']}, {r['reflections']} reflections written, "
                   f"MTZ {r['mtz'] or 'none'} ({r['seconds']:.1f} s)"
                   + (f"; {r['message']}" if r["message"] else ""))
    finally:
        ex.shutdown(wait=True)
    ok = sum(r["status"] == 0 for r in results)
    report(f" pyflm batch: {ok} of {len(results)} deck(s) succeeded")
    return results


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    try:
        scheduler, nproc, decks = parse_args(argv)
    except ValueError as e:
        sys.stdout.write(f" Error: pyflm batch: {e}\n")
        return 1
    from .errors import PyflmError
    try:
        results = run(decks, scheduler, nproc, report=lambda s: print(s, flush=True))
    except PyflmError as e:     # an unreachable scheduler, dask missing
        sys.stdout.write(f" Error: pyflm batch: {e.line() if hasattr(e, 'line') else e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stdout.write(" pyflm batch: interrupted\n")
        return 130
    return 0 if all(r["status"] == 0 for r in results) else 1
