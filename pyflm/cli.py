"""ipmosflm: the command line, the banner, batch decks and the interactive `MOSFLM => ` prompt.

    ipmosflm [HKLOUT f] [SUMMARY f] [SPOTOD f] [COORDS f] [XMLFILE f] [GENFILE f] [NEWMAT f] [MATRIX f]
             [< deck]

Batch (stdin not a terminal): the whole deck is read and checked first; if any line is bad every bad
line is reported, nothing runs, and the exit status is 1.  Then each line is echoed (` ===> line`) and
obeyed; GO/RUN run the queued actions.  A fatal error in an action ends the run with
` MOSFLM HAS TERMINATED EARLY` and status 1.  Interactive: errors are shown and the prompt returns.
"""
from __future__ import annotations

import os
import sys
import traceback

from . import __version__
from .errors import InputError, Interrupted, PyflmError
from .job import JobState, apply_statement
from .log import Log

LOGICAL_NAMES = ("HKLOUT", "SUMMARY", "SPOTOD", "COORDS", "XMLFILE", "GENFILE", "NEWMAT", "MATRIX")
PROMPT = "MOSFLM => "

BANNER = f"""\
 ************ Version {__version__} (pyflm) for Image plate, CCD and pixel-array detector data ************
 pyflm: a Python re-implementation of MOSFLM (ipmosflm keywords, files and log lines)
 MOSFLM: A.G.W. Leslie (2006) Acta Cryst. D62, 48-57
 DPS auto-indexing: I. Steller, R. Bolotovsky and M.G. Rossmann (1997) J. Appl. Cryst. 30, 1036-1040
 iMosflm: T.G.G. Battye, L. Kontogiannis, O. Johnson, H.R. Powell and A.G.W. Leslie (2011)
 Acta Cryst. D67, 271-281
"""

USAGE = """\
usage: ipmosflm [LOGICAL file]... [< deck]
  LOGICAL is one of HKLOUT SUMMARY SPOTOD COORDS XMLFILE GENFILE NEWMAT MATRIX (any case).
  Keywords are read from standard input; at a terminal the prompt is 'MOSFLM => '.
  --help     this text        --version  the version
  --demo-dir the folder of the demo images and deck shipped with pyflm
"""


def parse_command_line(argv):
    """Logical-name pairs -> {NAME: file}.  Raises InputError."""
    files = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.upper()
        if name not in LOGICAL_NAMES:
            raise InputError("unknown command-line argument", "command line", None, a,
                             "a logical name (" + " ".join(LOGICAL_NAMES) + ") followed by a file name")
        if i + 1 >= len(argv):
            raise InputError("a logical name needs a file name", "command line", name, "nothing",
                             "a file name after it")
        if name != "MATRIX":     # found now, not after the hours of work whose results it should hold
            from .fileio import output_problem
            why = output_problem(argv[i + 1])
            if why:
                raise InputError(f"cannot be written ({why})", "command line", name, argv[i + 1],
                                 "a file name in a directory that can be written")
        files[name] = argv[i + 1]
        i += 2
    return files


def settings_block(job):
    """The settings in effect, printed before each action."""
    out = [" Settings in effect:"]
    if job.template:
        out.append(f"   TEMPLATE {job.template}  DIRECTORY {job.directory}")
    if job.image is not None:
        out.append(f"   IMAGE {job.image}")
    for name in sorted(job.kw):
        v = job.kw[name]
        parts = [" ".join(str(x) for x in v.get("_args", []))]
        parts += [k if val is True else f"{k} {' '.join(map(str, val)) if isinstance(val, list) else val}"
                  for k, val in v.items() if k != "_args"]
        out.append(f"   {name} {' '.join(p for p in parts if p)}")
    if job.crystal is not None and job.crystal.U is not None:
        out.append("   orientation matrix: " + ("from " + job.files["MATRIX"] if "MATRIX" in job.files
                                               else "from indexing"))
    return out


def _run_queue(job):
    if job.queue:
        for ln in settings_block(job):
            job.log.line(ln)
    try:
        return job.run_queue()
    except KeyboardInterrupt:
        raise
    except Exception as e:   # a bug, not a user error: one line on the terminal, the trace in the log file
        job.log.line(f" Internal error: {type(e).__name__}: {e}")
        job.log.to_file(traceback.format_exc())
        job.log.line(" An unrecoverable error has occurred")
        job.failed = True
        return False


def show_help(job, topic):
    from . import helptext as helpmod
    for ln in helpmod.help_text(topic):
        job.log.line(ln)


def run_batch(lines, job):
    """Run a whole deck; returns the exit status."""
    try:
        return _run_batch(lines, job)
    finally:       # work started early for a PROCESS that did not come (an error, EXIT) is dropped
        if job.results.get("early_blocks"):
            from .integrate import cancel_early_blocks
            cancel_early_blocks(job)
        if job.results.get("early_probes") is not None:
            job.results["early_probes"].cancel()


def _run_batch(lines, job):
    from .parser import parse_lines
    statements, errors = parse_lines(lines)
    # values that parse but cannot be used (unknown space group, bad matrix file) are found by a dry run
    dry = JobState()
    dry.files = dict(job.files)
    upcoming = []        # the actions GO will run, in order (several AUTOINDEX lines make one, as here)
    lines_of, since_go = [], []     # and the statements before each GO (work started early replays them)
    for st in statements:
        try:
            act = apply_statement(dry, st)
            if act == "stop":
                break
            if act == "go":
                upcoming += [(q[0], dict(q[1]), dry.template, dry.directory, dry.extension) for q in dry.queue]
                lines_of += [list(since_go)] * len(dry.queue)
                dry.queue.clear()
                since_go = []
            else:
                since_go.append(st)
        except InputError as e:
            errors.append(e)
    if errors:
        for e in sorted(errors, key=lambda e: _order(e.line_no)):
            job.log.line(f" Error: {e.line()}")
        job.log.line(f" {len(errors)} error(s) in the input: nothing has been processed.")
        return 1
    job.upcoming, job.upcoming_lines = upcoming, lines_of
    for st in statements:
        job.log.echo(st.text)
        action = apply_statement(job, st)
        if action == "stop":
            job.queue.clear()
            break
        if action == "help":
            show_help(job, st.values.get("_args", [""])[0] if st.values.get("_args") else "")
        if action == "go":
            if not _run_queue(job):
                job.log.line(" MOSFLM HAS TERMINATED EARLY")
                _xml_fatal(job)
                return 1
    else:
        if job.queue:   # end of input runs nothing still queued, as EXIT does; say so
            job.log.line(" End of input: queued actions without GO or RUN were not run.")
    job.log.line(" Normal termination of pyflm")
    return 0


def _xml_fatal(job):
    from .xmlout import responses
    x = responses(job)
    if x is not None:
        x.add("fatal_condition_response", status="error", message=job.results.get("_last_error", ""))


def _order(line_no):
    if isinstance(line_no, int):
        return (line_no, "")
    try:
        return (int(str(line_no).split(":")[-1]), str(line_no))
    except ValueError:
        return (10 ** 9, str(line_no))


def run_interactive(job):
    """The MOSFLM => prompt with readline editing and history."""
    from .parser import logical_lines, parse_statement
    try:
        import readline
        hist = os.path.expanduser("~/.pyflm_history")
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
    except ImportError:
        readline, hist = None, None
    pending = []
    status = 0
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                job.log.line("")
                break
            pending.append(line)
            if line.rstrip().endswith("&") or line.rstrip().endswith(" -"):
                continue
            text, pending = pending, []
            try:
                for line_no, t, raw in logical_lines(text):
                    if t is None:
                        continue
                    st = parse_statement(line_no, t)
                    if st is None:
                        continue
                    job.log.to_file(f" ===> {raw}\n")
                    act = apply_statement(job, st)
                    if act == "stop":
                        return status
                    if act == "help":
                        show_help(job, (st.values.get("_args") or [""])[0])
                    if act == "go":
                        _run_queue(job)
            except InputError as e:
                job.log.line(f" Error: {e.line()}")
            except KeyboardInterrupt:
                job.log.line(" (interrupted)")
    finally:
        if readline and hist:
            try:
                readline.write_history_file(hist)
            except OSError:
                pass
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from ._heap import tune
    tune()      # image-sized buffers kept in the heap, not mapped and faulted in again per image
    if argv[:1] == ["batch"]:      # pyflm batch DECK...: many sweeps as tasks on one engine
        from .batch import main as batch_main
        return batch_main(argv[1:])
    if any(a in ("--help", "-h", "-help") for a in argv):
        sys.stdout.write(USAGE)
        return 0
    if "--demo-dir" in argv:     # where the shipped demo images and deck are
        sys.stdout.write(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo") + "\n")
        return 0
    if any(a in ("--version", "-version", "-v") for a in argv):
        sys.stdout.write(f"pyflm (ipmosflm) Version {__version__}\n")
        return 0
    from .fileio import RunLock
    from .errors import DirectoryInUse
    lock = RunLock(".")
    try:
        if lock.acquire():
            lock.remove_stale_logs()
        return _main(argv)
    except DirectoryInUse as e:     # refuse before touching mosflm.lp: the other run's log stays whole
        sys.stdout.write(f" Error: {e.line()}\n")
        return 1
    except Interrupted as e:        # a signal before the log was opened
        return e.status
    except KeyboardInterrupt:
        return 130
    finally:
        lock.release()


def _sigterm(signum, frame):
    raise Interrupted(signum)


def _main(argv):
    import signal
    # SIGTERM outside PROCESS (which handles it itself) ends the run like SIGINT: the log is closed and
    # renamed, the lock let go; files already written are whole, nothing is half-written
    try:
        old_term = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:      # not the main thread (called from a library): leave signals alone
        return _run(argv)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _run(argv):
    log = Log("mosflm.lp")
    status = 1
    try:        # from the first line on: a signal at any point still closes (and renames) the log
        log.write(BANNER)
        job = JobState(log=log)
        try:
            job.files.update(parse_command_line(argv))
            if "MATRIX" in job.files:
                from .job import _read_matrix
                _read_matrix(job, job.files["MATRIX"], "command line")
        except InputError as e:
            log.line(f" Error: {e.line()}")
            return 1
        interactive = sys.stdin.isatty()
        job.batch = not interactive
        if interactive:
            status = run_interactive(job)
        else:
            data = sys.stdin.buffer.read().decode("utf-8", errors="replace")
            status = run_batch(data.splitlines(), job)
    except Interrupted as e:
        log.line(f" Interrupted by signal {e.signum}: output files written so far are complete")
        status = e.status
    except KeyboardInterrupt:
        log.line(" Interrupted")
        status = 130
    except PyflmError as e:
        log.line(f" Error: {e.line()}")
        log.line(" MOSFLM HAS TERMINATED EARLY")
        status = 1
    finally:
        log.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
