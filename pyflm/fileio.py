"""Output files appear complete or not at all: write to a temporary name, rename when done.

Also where an output may go (checked before anything runs, so a bad HKLOUT fails at once rather than
after an hour of integration) and the lock that keeps two runs out of one working directory."""
import contextlib
import os
import tempfile

from .errors import DirectoryInUse, OutputError

try:
    import fcntl
except ImportError:       # not POSIX: no lock, runs are trusted to keep to their own directories
    fcntl = None


def _reason(exc):
    return exc.strerror or str(exc)


def open_temp(path):
    """(fd, temporary name) next to `path`, with the permissions a plain open() would give (mkstemp's
    0600 would leave the renamed MTZ unreadable to the rest of a beamline group).  Raises OutputError."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=d)
    except (OSError, ValueError) as e:
        raise OutputError(path, output_problem(path) or _reason(e), getattr(e, "errno", None)) from None
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name next to `path`; on success rename it to `path`, on failure remove it.

    For writers that want a file name (gemmi's MTZ writer, PIL's save).  An OSError (disk full, the
    directory gone) becomes OutputError: one line naming the file and the reason."""
    path = os.fspath(path)
    fd, tmp = open_temp(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(path, _reason(e), e.errno) from None
        raise


@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Like open(path, mode) but the file only appears under `path` once closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kw) as f:
            yield f


def output_problem(path):
    """Why `path` cannot be written as an output file, or None if it can (as far as can be told
    without writing: a full disk shows only when writing)."""
    try:
        path = os.fspath(path)
        if not path.strip():
            return "no file name given"
        if os.path.isdir(path):
            return "it is a directory"
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(d):
            up = d
            while up and not os.path.exists(up) and os.path.dirname(up) != up:
                up = os.path.dirname(up)
            if os.path.exists(up) and not os.path.isdir(up):
                return f"{up} is a file, not a directory"
            return f"directory {d} does not exist"
        if not os.path.isdir(d):
            return f"{d} is a file, not a directory"
        if not os.access(d, os.W_OK | os.X_OK):   # also false on a read-only file system, even for root
            return f"directory {d} cannot be written"
    except (ValueError, OSError) as e:            # a NUL byte, a name too long
        return f"not a usable file name ({e})"
    return None


class RunLock:
    """An exclusive lock on `.mosflm.lock` in the working directory for the length of a run: a second
    run there would write its mosflm.lp (and, usually, SUMMARY and HKLOUT) over this one's."""

    NAME = ".mosflm.lock"

    def __init__(self, directory="."):
        self.path = os.path.join(directory, self.NAME)
        self.directory = os.path.abspath(directory)
        self.fd = None

    def acquire(self):
        """True when held; False when the directory cannot be written (nothing of this run goes there
        then, so there is nothing to protect).  Raises DirectoryInUse if another run holds it."""
        if fcntl is None:
            return False
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                raise DirectoryInUse(self.directory, pid) from None
            # the previous holder removes the file as it lets go: only a lock on the file still there counts
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return True
            os.close(fd)
        return False

    def remove_stale_logs(self):
        """Temporary logs left by runs killed outright (SIGKILL, power): with the lock held no run of
        ours is writing here, so any that remain are dead."""
        import glob
        for f in glob.glob(os.path.join(glob.escape(self.directory), ".mosflm.lp.*.part")):
            with contextlib.suppress(OSError):
                os.unlink(f)

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
