"""The log: everything printed goes to stdout and to mosflm.lp in the working directory.

mosflm.lp is written under a temporary name and renamed when the run ends (normally, with an error or
on SIGINT/SIGTERM), like every other output: a reader never sees half a log under the final name.
A log file that cannot be written (unwritable directory, disk full) costs one warning line; the log
goes on on stdout."""
import contextlib
import os
import sys


class Log:
    """Tee to stdout and a file.  Stage code writes with `log.line(text)`; nothing else prints."""

    def __init__(self, path="mosflm.lp", stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.path = path
        self._f = None
        self._tmp = None
        if path:
            from .fileio import open_temp
            from .errors import OutputError
            try:
                fd, self._tmp = open_temp(path)
                self._f = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
            except OutputError as e:
                self._tmp = None
                self._say(f" Warning: cannot write the log file {path}: {e.problem}\n")

    def _say(self, text):
        if self.stream is None:
            return
        try:
            self.stream.write(text)
        except OSError:      # stdout closed (`ipmosflm < deck | head`): the log file still gets it all
            self._stream_gone()

    def _stream_gone(self):
        if self.stream is sys.stdout:    # so that Python's own flush at exit has nowhere to fail
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        self.stream = None

    def _file_failed(self, e):
        f, self._f = self._f, None
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
        self._say(f"\n Warning: the log file {self.path} cannot be written ({e.strerror or e}):"
                  " the log continues on the terminal only\n")

    def to_file(self, text):
        """Text for mosflm.lp only (echoed prompt input, an internal error's trace)."""
        if self._f:
            try:
                self._f.write(text)
            except OSError as e:
                self._file_failed(e)

    def write(self, text):
        self._say(text)
        self.to_file(text)

    def line(self, text=""):
        self.write(text + "\n")

    def lines(self, texts):
        for t in texts:
            self.line(t)

    def echo(self, input_line):
        """MOSFLM echoes every input line as ' ===> line'."""
        self.line(f" ===> {input_line}")

    def flush(self):
        if self.stream is not None:
            try:
                self.stream.flush()
            except OSError:
                self._stream_gone()
        if self._f:
            try:
                self._f.flush()
            except OSError as e:
                self._file_failed(e)

    def close(self):
        self.flush()
        if self._f:
            try:
                self._f.close()
                self._f = None
                os.replace(self._tmp, self.path)
            except OSError as e:
                self._f = None
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)
                self._say(f" Warning: the log file {self.path} cannot be written ({e.strerror or e})\n")


class NullLog(Log):
    """A log that keeps lines in memory (tests and library use)."""

    def __init__(self):
        self.stream = None
        self.path = None
        self._f = None
        self._tmp = None
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.text)
