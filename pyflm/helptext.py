"""`help` at the prompt: the keyword list from the table, and entries from help/mosflm.hlp.

The help file holds one entry per keyword: a line `KEYWORD` in column one (upper case), then its
indented text.  A test checks that the file and the keyword table name the same keywords.
"""
from __future__ import annotations

from . import keywords


def _help_file_text():
    from importlib import resources
    try:
        return (resources.files("pyflm.help") / "mosflm.hlp").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        return ""


def entries():
    """{KEYWORD: [lines]} from help/mosflm.hlp."""
    out, cur = {}, None
    for ln in _help_file_text().splitlines():
        if ln and not ln[0].isspace() and ln.strip().isupper() and " " not in ln.strip():
            cur = ln.strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(ln)
    return {k: v[:len(v) - next((i for i, x in enumerate(reversed(v)) if x.strip()), 0)]
            for k, v in out.items()}


def help_text(topic=""):
    topic = (topic or "").strip()
    if not topic:
        lines = [" Keywords (HELP keyword for details; abbreviate to 4 characters):"]
        lines += [f"   {k.name:<13s} {k.summary}" for k in keywords.TABLE]
        return lines
    name = keywords.lookup(topic)
    if name is None:
        return [f" No keyword {topic!r}: type HELP for the list."]
    body = entries().get(name)
    if not body:
        k = keywords.BY_NAME[name]
        return [f" {name}: {k.summary}"]
    return [f" {name}"] + [" " + ln for ln in body]
