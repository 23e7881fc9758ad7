"""The errors a user can cause, each rendered as one line (never a traceback)."""


class PyflmError(Exception):
    """Base of every error pyflm reports to the user as one line."""

    def line(self):
        return str(self)


class InputError(PyflmError):
    """Bad keyword input.  Rendered as
    ``Input line 12: DISTANCE: got 'abc', expected a real number (mm)``."""

    def __init__(self, message, line_no=None, keyword=None, given=None, expected=None):
        self.message, self.line_no, self.keyword = message, line_no, keyword
        self.given, self.expected = given, expected
        super().__init__(self.line())

    def line(self):
        parts = []
        if self.line_no == "command line":
            parts.append("Command line")
        elif self.line_no is not None:
            parts.append(f"Input line {self.line_no}")
        if self.keyword:
            parts.append(str(self.keyword))
        msg = self.message
        if self.given is not None or self.expected is not None:
            msg = f"{msg}: got {self.given!r}, expected {self.expected}" if msg else \
                f"got {self.given!r}, expected {self.expected}"
        parts.append(msg)
        return ": ".join(p for p in parts if p)


class ImageError(PyflmError):
    """A missing, unreadable, truncated or unknown-format image: names the file and what is wrong."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem
        super().__init__(f"Image {path}: {problem}")


class MatrixError(PyflmError):
    """A malformed MOSFLM matrix file."""

    def __init__(self, path, problem):
        self.path, self.problem = path, problem
        super().__init__(f"Matrix file {path}: {problem}")


class OutputError(PyflmError, OSError):
    """An output file that cannot be written (no such directory, not a directory, read-only, disk full).
    Also an OSError, so writers that already catch OSError keep working; `strerror` is the reason."""

    def __init__(self, path, problem, errno=None):
        OSError.__init__(self, errno, problem)
        self.path, self.problem = path, problem

    def __str__(self):
        return f"Output file {self.path} cannot be written: {self.problem}"

    def line(self):
        return str(self)


class DirectoryInUse(PyflmError):
    """Another run holds the working directory's lock (pyflm.fileio.RunLock)."""

    def __init__(self, directory, pid=""):
        self.directory, self.pid = directory, pid
        who = f"another pyflm run (process {pid})" if pid else "another pyflm run"
        super().__init__(f"{who} is working in {directory}: its mosflm.lp and output files would be "
                         "mixed with this run's; wait for it to finish or run in another directory")


class ProcessingError(PyflmError):
    """A stage could not do its job (indexing failed, too few spots...): says why and what to try."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM during a run: outputs finished so far are written, then the program exits
    with 128 + the signal number (130, 143)."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")

    @property
    def status(self):
        return 128 + self.signum
