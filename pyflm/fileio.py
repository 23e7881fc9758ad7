"""Output files appear complete or not at all: write to a temporary name, rename when done."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name next to `path`; on success rename it to `path`, on failure remove it.

    For writers that want a file name (gemmi's MTZ writer, PIL's save)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=d)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode="w", **kw):
    """Like open(path, mode) but the file only appears under `path` once closed without error."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kw) as f:
            yield f
