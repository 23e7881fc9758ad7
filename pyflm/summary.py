"""The SUMMARY file: per-image tables in CCP4 loggraph form, as MOSFLM writes them (interface notes §5.8).

A table is

    $TABLE : Refined detector parameters:
    $GRAPHS :Beam centre:N:1,2,3: :Distance:N:1,4: $$
    Image XCEN YCEN ... $$
    $$
       1  89.66  84.73 ...
    $$

loggraph (and xia2, iMosflm) read the column names between the first two `$$` and the rows between the
next pair.  Rows are appended as images finish, so an interrupted run still leaves readable tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .fileio import atomic_open


@dataclass
class Table:
    title: str
    columns: list
    graphs: list = field(default_factory=list)     # [(graph title, [1-based column numbers])]
    formats: list = None                           # per-column format strings
    rows: list = field(default_factory=list)

    def add(self, *values):
        self.rows.append(values)

    def render(self):
        graphs = " ".join(f":{t}:N:{','.join(str(c) for c in cols)}:" for t, cols in self.graphs)
        out = [f"$TABLE : {self.title}:", f"$GRAPHS {graphs or ':' + self.title + ':N:1,2:'} $$",
               " ".join(self.columns) + " $$", "$$"]
        fmts = self.formats or ["{:>10}"] * len(self.columns)
        for row in self.rows:
            out.append(" ".join(f.format(v) for f, v in zip(fmts, row)))
        out.append("$$")
        return "\n".join(out) + "\n"


def detector_table():
    """Refined detector parameters per image (first table, as xia2 expects)."""
    return Table("Refined detector parameters",
                 ["Image", "XCEN", "YCEN", "XTOFD", "YSCALE", "TILT", "TWIST", "ROFF", "TOFF",
                  "RESID", "WRESID"],
                 graphs=[("Beam centre", [1, 2, 3]), ("Distance", [1, 4]), ("YSCALE", [1, 5]),
                         ("Tilt and twist", [1, 6, 7]), ("Residuals", [1, 10, 11])],
                 formats=["{:6d}", "{:8.3f}", "{:8.3f}", "{:9.3f}", "{:8.5f}", "{:6.0f}", "{:6.0f}",
                          "{:7.3f}", "{:7.3f}", "{:7.4f}", "{:7.2f}"])


def postref_table():
    """Post-refinement per image (second table)."""
    return Table("Post-refinement",
                 ["Image", "PHIX", "PHIY", "PHIZ", "A", "B", "C", "ALPHA", "BETA", "GAMMA", "MOSAIC"],
                 graphs=[("Missetting angles", [1, 2, 3, 4]), ("Cell", [1, 5, 6, 7]), ("Mosaic", [1, 11])],
                 formats=["{:6d}", "{:7.3f}", "{:7.3f}", "{:7.3f}", "{:9.3f}", "{:9.3f}", "{:9.3f}",
                          "{:7.2f}", "{:7.2f}", "{:7.2f}", "{:7.3f}"])


def integration_table():
    """Integration statistics per image (third table)."""
    return Table("Integration statistics",
                 ["Image", "NFULL", "NPART", "NOVERLOAD", "NBAD", "I/SIGPR", "I/SIGSUM",
                  "I/SIGPR_OUTER", "I/SIGSUM_OUTER"],
                 graphs=[("I/sigma overall", [1, 6, 7]), ("I/sigma outer shell", [1, 8, 9]),
                         ("Bad spots and overloads", [1, 4, 5])],
                 formats=["{:6d}", "{:7d}", "{:7d}", "{:6d}", "{:6d}", "{:8.1f}", "{:8.1f}", "{:8.1f}",
                          "{:8.1f}"])


def write_summary(path, tables, header=""):
    """Write the SUMMARY file whole, under a temporary name renamed when complete."""
    with atomic_open(path, "w") as f:
        if header:
            f.write(header.rstrip("\n") + "\n")
        for t in tables:
            f.write(t.render())
            f.write("\n")


def parse_loggraph(text):
    """Read loggraph tables back: {title: (columns, rows as lists of strings)} (tests, drivers)."""
    tables, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("$TABLE"):
            title = ln.split(":", 1)[1].strip().rstrip(":").strip()
            i += 1
            while "$$" not in lines[i]:
                i += 1
            i += 1                                          # past $GRAPHS ... $$
            cols = lines[i].replace("$$", "").split()
            i += 2                                          # past column line and the opening $$
            rows = []
            while lines[i].strip() != "$$":
                rows.append(lines[i].split())
                i += 1
            tables[title] = (cols, rows)
        i += 1
    return tables
