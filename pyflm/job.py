"""The job state that keywords build, and the dispatch of queued actions to the stages.

Contract shared by every stage:
  * ``job.kw[NAME]`` holds the latest value of each *setting* keyword by its canonical name, as a dict:
    positional values under ``'_args'`` (a list), sub-keywords by canonical name (value, list of values,
    or True for a flag).  Later lines merge into earlier ones sub-key by sub-key.
    Example: ``SEPARATION 0.5 0.7 CLOSE`` -> ``{'_args': [0.5, 0.7], 'CLOSE': True}``.
  * Actions are queued as ``(NAME, args, line_no)`` with args in the same form, and run on GO/RUN by
    ``run_queue``.  Each action is a plain function ``fn(job, args)`` in its stage module (ACTIONS);
    it writes with ``job.log.line(...)`` and raises a pyflm.errors.PyflmError subclass on failure.
  * ``job.experiment(image)`` gives (beam, detector, goniometer, scan) for an image: header values with
    keyword overrides applied (pyflm.images.experiment_for).
  * ``job.crystal`` is the current pyflm.model.Crystal (MATRIX, CELL, SYMMETRY, MISSETS, MOSAIC, or
    indexing), or None.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

from .errors import PyflmError
from .log import Log, NullLog
from .model import Crystal

# Action keyword -> "module:function".  A module or function that does not exist yet means the stage
# is not built: the action is reported as recognised but not implemented, never silently dropped.
ACTIONS = {
    "HEADER": "pyflm.images:run_header",
    "FINDSPOTS": "pyflm.spotfinder:run_findspots",
    "AUTOINDEX": "pyflm.indexing:run_autoindex",
    "MOSAIC": "pyflm.indexing:run_mosaic_estimate",
    "PREDICT": "pyflm.predict:run_predict",
    "STRATEGY": "pyflm.strategy:run_strategy",
    "TESTGEN": "pyflm.strategy:run_testgen",
    "PROCESS": "pyflm.integrate:run_process",
}


@dataclass
class JobState:
    log: Log = field(default_factory=NullLog)
    kw: dict = field(default_factory=dict)          # setting keywords, see module docstring
    files: dict = field(default_factory=dict)       # logical names: HKLOUT, SUMMARY, SPOTOD, ...
    template: Optional[str] = None
    directory: str = "."
    extension: Optional[str] = None
    image: Optional[int] = None                     # current image (IMAGE n)
    phi_override: dict = field(default_factory=dict)  # image -> (phi start, phi end) from IMAGE n PHI a TO b
    crystal: Optional[Crystal] = None
    queue: list = field(default_factory=list)       # [(NAME, args, line_no)]
    results: dict = field(default_factory=dict)     # what stages leave for later stages (spots, solutions...)
    upcoming: list = field(default_factory=list)    # the deck's actions, in order, as a batch run found
    #                                                 them: (NAME, args, template, directory, extension),
    #                                                 for work that can start early (PROCESS's probes)
    upcoming_lines: list = field(default_factory=list)  # beside each of those, the statements the deck
    #                                                 gives between the GO before it and its own GO
    batch: bool = True                              # False at the interactive prompt
    failed: bool = False

    def experiment(self, image=None):
        from .images import experiment_for
        return experiment_for(self, self.image if image is None else image)

    def run_queue(self):
        """Run the queued actions in order; an action's error is reported as one line and ends the queue."""
        queue, self.queue = self.queue, []
        for name, args, line_no in queue:
            if self.upcoming and self.upcoming[0][0] == name:    # what is still to come, from the next on
                self.upcoming.pop(0)
                if self.upcoming_lines:
                    self.upcoming_lines.pop(0)
            fn = resolve_action(name)
            if fn is None:
                self.log.line(f" {name} is recognised but not implemented yet (input line {line_no}).")
                continue
            try:
                fn(self, args)
            except PyflmError as e:
                self.log.line(f" Error in {name} (input line {line_no}): {e.line()}")
                self.results["_last_error"] = e.line()
                self.failed = True
                return False
        return True


def resolve_action(name):
    target = ACTIONS.get(name)
    if target is None:
        return None
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            return None
        raise
    return getattr(mod, fn_name, None)


# ---- applying parsed keywords to the job ----------------------------------------------------------

def apply_statement(job, st):
    """Change the job state for one parsed statement (pyflm.parser.Statement).  Returns 'stop' for
    EXIT/END, 'go' for GO/RUN, None otherwise.  Raises pyflm.errors.InputError for values that parse but
    cannot be used (an unknown space group, an unreadable matrix file)."""
    from . import keywords
    from .errors import InputError
    name, v = st.keyword, st.values
    kw = keywords.BY_NAME[name]
    args = v.get("_args", [])
    if name in ("EXIT", "END"):
        return "stop"
    if name in ("GO", "RUN"):
        return "go"
    if name == "HELP":
        return "help"
    if kw.kind == "file":
        if name == "MATRIX":
            _read_matrix(job, args[0], st.line_no)
        else:     # found in the check of the deck, not after the work whose results it should hold
            from .fileio import output_problem
            why = output_problem(args[0])
            if why:
                raise InputError(f"cannot be written ({why})", st.line_no, name, args[0],
                                 "a file name in a directory that can be written")
        job.files[name] = args[0]
        return None
    if name == "TEMPLATE":
        job.template = args[0]
        return None
    if name == "DIRECTORY":
        job.directory = args[0]
        return None
    if name == "EXTENSION":
        job.extension = args[0]
        return None
    if name == "IMAGE":
        job.image = int(args[0])
        if "PHI" in v:
            a, b = v["PHI"]
            if b <= a:
                raise InputError("the phi range must increase", st.line_no, "IMAGE", f"{a} TO {b}",
                                 "PHI start TO end with end > start")
            job.phi_override[job.image] = (float(a), float(b))
        return None
    if kw.kind == "action":
        _queue_action(job, st)
        return None
    if name == "MOSAIC" and "ESTIMATE" in v:
        est = v["ESTIMATE"]
        job.queue.append(("MOSAIC", {"IMAGE": est} if est is not True else {}, st.line_no))
        if not args:
            return None
    # settings: merge sub-key by sub-key
    cur = job.kw.setdefault(name, {})
    if name == "POSTREF":       # switches undo each other: the last one given holds
        if v.get("NOMULTI") or v.get("NOSEGMENT") or v.get("OFF"):
            for k in ("MULTI", "SEGMENTS", "SEGMENT", "NOMULTI", "NOSEGMENT"):
                cur.pop(k, None)
            v = {k: val for k, val in v.items() if k not in ("NOMULTI", "NOSEGMENT")}
        elif v.get("MULTI") or v.get("SEGMENTS"):
            cur.pop("OFF", None)
        if v.get("OFF"):
            cur.pop("ON", None)
        elif v.get("ON"):
            cur.pop("OFF", None)
    cur.update(v)
    if name in ("CELL", "SYMMETRY", "MISSETS", "MOSAIC"):
        _update_crystal(job, name, args, st.line_no)
    return None


def _queue_action(job, st):
    name = keywords_action(st.keyword)
    args = dict(st.values)
    if name == "AUTOINDEX":
        specs = args.pop("_images", None)
        if specs is None:
            specs = [{k: args.pop(k) for k in ("IMAGE", "TO", "PHI") if k in args}] if "IMAGE" in args else []
        for q in job.queue:      # several AUTOINDEX lines before one GO make one indexing
            if q[0] == "AUTOINDEX":
                q[1].update({k: a for k, a in args.items()})
                q[1].setdefault("IMAGES", []).extend(specs)
                return
        if specs:
            args["IMAGES"] = specs
    job.queue.append((name, args, st.line_no))


def keywords_action(name):
    from . import keywords
    return keywords.BY_NAME[name].action or name


def _read_matrix(job, path, line_no):
    from .errors import InputError, MatrixError
    try:
        from .matrix import read_matrix
    except ImportError:
        return
    try:
        crystal = read_matrix(path)
    except MatrixError as e:
        raise InputError(e.problem, line_no, "MATRIX", path, "a MOSFLM matrix file") from None
    if job.crystal is not None:
        crystal.mosaic = crystal.mosaic or job.crystal.mosaic
        if "SYMMETRY" in job.kw:
            crystal.space_group = job.crystal.space_group
    job.crystal = crystal


def space_group_name(value, line_no=None):
    """A space group given by name or number, as gemmi's Hermann-Mauguin name (H3 -> R 3 :H)."""
    import gemmi
    from .errors import InputError
    s = str(value).strip()
    sg = None
    try:
        if s.isdigit():
            sg = gemmi.find_spacegroup_by_number(int(s))
        else:
            sg = gemmi.find_spacegroup_by_name(s)
            if sg is None and s.upper().startswith("H"):
                sg = gemmi.find_spacegroup_by_name("R" + s[1:] + ":H")
    except (ValueError, RuntimeError):
        sg = None
    if sg is None:
        raise InputError("unknown space group", line_no, "SYMMETRY", value,
                         "a space group name such as P212121, H3, R3 or a number 1-230")
    return sg.hm


def _update_crystal(job, name, args, line_no):
    from .errors import InputError
    if job.crystal is None:
        job.crystal = Crystal((1, 1, 1, 90, 90, 90))
        job.crystal.U = None         # no orientation until MATRIX or indexing gives one
    c = job.crystal
    if name == "CELL":
        from . import geometry
        try:
            geometry.b_matrix(args)
        except ValueError:
            raise InputError("impossible cell", line_no, "CELL", " ".join(map(str, args)),
                             "angles that make a cell with volume") from None
        c.cell = tuple(float(a) for a in args)
    elif name == "SYMMETRY":
        c.space_group = space_group_name(args[0], line_no)
    if name in ("CELL", "SYMMETRY") and "CELL" in job.kw and c.space_group:
        _check_cell_fits(c.cell, c.space_group, line_no, name)
    if name == "MISSETS":
        c.missets = tuple(float(a) for a in args)
    elif name == "MOSAIC" and args:
        c.mosaic = float(args[0])


def _check_cell_fits(cell, space_group, line_no, keyword):
    """A CELL the space group's symmetry cannot hold (90 90 179.9 in P212121) is refused: it would
    predict a lattice unlike the crystal's.  Tolerant of rounding: the metric may move by 1 % of a^2."""
    import gemmi
    import numpy as np
    from .errors import InputError
    sg = gemmi.find_spacegroup_by_name(space_group)
    if sg is None:
        return
    a, b, c = cell[:3]
    ca, cb, cg = np.cos(np.radians(cell[3:6]))
    G = np.array([[a * a, a * b * cg, a * c * cb], [a * b * cg, b * b, b * c * ca],
                  [a * c * cb, b * c * ca, c * c]])     # real-space metric, fractional coordinates
    worst = 0.0
    for op in sg.operations():
        R = np.array(op.rot, float) / op.DEN
        worst = max(worst, float(np.max(np.abs(R.T @ G @ R - G))))
    if worst > 0.01 * float(np.max(np.diag(G))):
        raise InputError(f"the cell does not fit space group {space_group}", line_no, keyword,
                         " ".join(f"{x:g}" for x in cell),
                         f"a cell with the constraints of {sg.crystal_system_str()} symmetry")
