"""A person at the MOSFLM => prompt (a pseudo-terminal stands in for the terminal)."""
import os
import pty
import select
import subprocess
import sys
import time


def _read_until(fd, token, timeout=20.0):
    buf = b""
    end = time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if token.encode() in buf:
                return buf.decode(errors="replace")
    raise AssertionError(f"did not see {token!r}; got:\n{buf.decode(errors='replace')[-800:]}")


def test_prompt_help_errors_and_exit(tmp_path):
    master, slave = pty.openpty()
    env = dict(os.environ, HOME=str(tmp_path), TERM="dumb")
    p = subprocess.Popen([sys.executable, "-m", "pyflm.cli"], stdin=slave, stdout=slave, stderr=slave,
                         cwd=tmp_path, env=env, close_fds=True)
    os.close(slave)
    try:
        out = _read_until(master, "MOSFLM => ")
        assert "Version" in out
        os.write(master, b"help distance\n")
        out = _read_until(master, "MOSFLM => ")
        assert "Syntax:" in out and "DISTANCE" in out
        os.write(master, b"distance abc\n")
        out = _read_until(master, "MOSFLM => ")        # the message, then the prompt again
        assert "Error: Input line" in out and "'abc'" in out and "Traceback" not in out
        os.write(master, b"help\n")
        out = _read_until(master, "MOSFLM => ")
        assert "AUTOINDEX" in out and "PROCESS" in out
        os.write(master, b"exit\n")
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
