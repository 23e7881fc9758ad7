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
    batch: bool = True                              # False at the interactive prompt
    failed: bool = False

    def experiment(self, image=None):
        from .images import experiment_for
        return experiment_for(self, self.image if image is None else image)

    def run_queue(self):
        """Run the queued actions in order; an action's error is reported as one line and ends the queue."""
        queue, self.queue = self.queue, []
        for name, args, line_no in queue:
            fn = resolve_action(name)
            if fn is None:
                self.log.line(f" {name} is recognised but not implemented yet (input line {line_no}).")
                continue
            try:
                fn(self, args)
            except PyflmError as e:
                self.log.line(f" Error in {name} (input line {line_no}): {e.line()}")
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
