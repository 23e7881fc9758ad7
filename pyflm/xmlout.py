"""XMLFILE: the XML responses iMosflm's batch jobs read (interface notes §5.10).

Responses accumulate as the job runs and the file is rewritten (atomically) after each one, so a
killed job leaves a well-formed file with everything finished so far.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from .fileio import atomic_open


class XmlResponses:
    def __init__(self, path):
        self.path = path
        self.root = ET.Element("pyflm_responses")

    def add(self, tag, status="ok", **fields):
        el = ET.SubElement(self.root, tag)
        ET.SubElement(el, "status").text = status
        for k, v in fields.items():
            ET.SubElement(el, k).text = f"{v:.4f}" if isinstance(v, float) else str(v)
        self.write()
        return el

    def write(self):
        with atomic_open(self.path, "w") as f:
            f.write(ET.tostring(self.root, encoding="unicode"))
            f.write("\n")


def responses(job):
    """The job's XML writer when XMLFILE was given, else None."""
    path = job.files.get("XMLFILE")
    if not path:
        return None
    x = job.results.get("_xml")
    if x is None:
        x = job.results["_xml"] = XmlResponses(path)
    return x
