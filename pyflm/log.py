"""The log: everything printed goes to stdout and to mosflm.lp in the working directory."""
import sys


class Log:
    """Tee to stdout and a file.  Stage code writes with `log.line(text)`; nothing else prints."""

    def __init__(self, path="mosflm.lp", stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.path = path
        self._f = None
        if path:
            try:
                self._f = open(path, "w", encoding="utf-8", errors="replace")
            except OSError as e:   # an unwritable directory still gets the log on stdout
                self.stream.write(f" Warning: cannot write the log file {path}: {e.strerror}\n")

    def write(self, text):
        self.stream.write(text)
        if self._f:
            self._f.write(text)

    def line(self, text=""):
        self.write(text + "\n")

    def lines(self, texts):
        for t in texts:
            self.line(t)

    def echo(self, input_line):
        """MOSFLM echoes every input line as ' ===> line'."""
        self.line(f" ===> {input_line}")

    def flush(self):
        self.stream.flush()
        if self._f:
            self._f.flush()

    def close(self):
        self.flush()
        if self._f:
            self._f.close()
            self._f = None


class NullLog(Log):
    """A log that keeps lines in memory (tests and library use)."""

    def __init__(self):
        self.stream = None
        self.path = None
        self._f = None
        self.text = []

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass

    def getvalue(self):
        return "".join(self.text)
