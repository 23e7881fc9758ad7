"""Reading MOSFLM keyword input: lines -> (keyword, values), checked against pyflm.keywords.TABLE.

Syntax (interface notes §2): case-insensitive keywords, unique abbreviations of 4+ characters, `!` and
`#` comments, `-` or `&` continuation, quoted file names, blank lines, `@file` includes.  Every problem
is an InputError naming the input line, the keyword, what was given and what was expected.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass

from . import keywords
from .errors import InputError


@dataclass
class Statement:
    keyword: str            # canonical name
    values: dict            # {'_args': [...], SUB: value}
    line_no: object         # int, or "file:line" inside an @file
    text: str               # the input line as given (for the echo)


# ---- lines ----------------------------------------------------------------------------------------

def strip_comment(line):
    """Remove a `!` comment, or a `#` comment starting a word, that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "!" or (ch == "#" and (i == 0 or line[i - 1].isspace())):
            # '#' inside a word is part of a template (hg_###.mar1600), not a comment
            return line[:i]
    return line


def logical_lines(lines, source=None, depth=0):
    """Join continuation lines and expand @file includes: yields (line_no, text, raw_text)."""
    pending, start, raw = "", None, []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        body = strip_comment(line).rstrip()
        if start is None:
            start = n
        raw.append(line)
        if body.endswith("&") or re.search(r"(^|\s)-$", body):
            pending += body[:-1] + " "
            continue
        text = (pending + body).strip()
        label = start if source is None else f"{source}:{start}"
        pending, start, rawtext, raw = "", None, " ".join(r.strip() for r in raw), []
        if text.startswith("@"):
            yield from _include(text[1:].strip().strip("\"'"), label, depth)
            continue
        yield label, text, rawtext
    if pending.strip():
        yield (start if source is None else f"{source}:{start}"), pending.strip(), pending.strip()


def _include(path, label, depth):
    _no_nul(path, label, "@")
    if depth > 10:
        raise InputError("@file includes nest too deeply", line_no=label, keyword="@", given=path,
                         expected="at most 10 levels")
    try:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        raise InputError("cannot read the @file", line_no=label, keyword="@", given=path,
                         expected=f"a readable file of keywords ({e.strerror})") from None
    yield label, None, f"@{path}"
    yield from logical_lines(data.splitlines(), os.path.basename(path), depth + 1)


def _no_nul(text, line_no, keyword=None):
    """A NUL byte is no part of any keyword, value or file name (the system refuses such a name with a
    ValueError, not an OSError): the line is named here, before anything opens a file by it."""
    if "\x00" in text:
        raise InputError("a NUL byte in the line", line_no=line_no, keyword=keyword, given=text,
                         expected="text (keywords, numbers and file names)")


def tokenize(text, line_no=None):
    _no_nul(text, line_no)
    try:
        lex = shlex.shlex(text, posix=True)
        lex.whitespace_split = True
        lex.commenters = ""
        return list(lex)
    except ValueError as e:
        raise InputError("unbalanced quotes", line_no=line_no, given=text,
                         expected="matching \" or ' around file names") from None


# ---- values ---------------------------------------------------------------------------------------

_SPEC = re.compile(r"^([rislft])([?*]?)(?:([\[(])([^:\])]*):([^\])]*)([\])]))?([?*]?)$")


def _spec_items(spec):
    """[(type, multiplicity, low bracket, low, high, high bracket)] for a value spec."""
    out = []
    for tok in spec.split():
        m = _SPEC.match(tok)
        if m is None:
            raise ValueError(f"bad value spec {tok!r}")
        t, m1, lb, lo, hi, hb, m2 = m.groups()
        out.append((t, m1 or m2 or "", lb, lo, hi, hb))
    return out


def _convert(tok, item, kw, line_no, what):
    t, _, lo_b, lo, hi, hi_b = item
    if t in "ri":
        try:
            v = float(tok) if t == "r" else int(tok)
        except ValueError:
            if t == "i":
                try:
                    fv = float(tok)
                except ValueError:
                    fv = None
                if fv is not None and math.isfinite(fv) and fv == int(fv):
                    v = int(fv)
                else:
                    raise InputError(f"bad value for {what}", line_no, kw, tok, "an integer") from None
            else:
                raise InputError(f"bad value for {what}", line_no, kw, tok, "a real number") from None
        if not math.isfinite(v):
            raise InputError(f"bad value for {what}", line_no, kw, tok, "a finite number")
        if lo_b:
            if lo and (v < float(lo) or (lo_b == "(" and v == float(lo))):
                raise InputError(f"value out of range for {what}", line_no, kw, tok,
                                 f"a number {'>' if lo_b == '(' else '>='} {lo}")
            if hi and (v > float(hi) or (hi_b == ")" and v == float(hi))):
                raise InputError(f"value out of range for {what}", line_no, kw, tok,
                                 f"a number {'<' if hi_b == ')' else '<='} {hi}")
        return v
    if t == "s":
        return tok.upper()
    return tok   # f: file name, case kept


def _take(tokens, pos, spec, kw, line_no, what, subnames):
    """Values for `spec` from tokens[pos:]; returns (values, new pos)."""
    items = _spec_items(spec)
    vals = []
    for item in items:
        t, mult = item[0], item[1]
        if t == "t":
            rest = tokens[pos:]
            if not rest and mult != "?":
                raise InputError(f"{what} needs text", line_no, kw, "", "some text")
            vals.append(" ".join(rest))
            return vals, len(tokens)
        while (pos < len(tokens) and tokens[pos].upper() == "TO" and t in "ri"
               and (vals or what == "values") and "TO" not in subnames):
            pos += 1
        if mult == "*":
            got = 0
            while pos < len(tokens) and keywords.lookup(tokens[pos], subnames) is None:
                if tokens[pos].upper() == "TO":
                    pos += 1
                    continue
                vals.append(_convert(tokens[pos], item, kw, line_no, what))
                pos += 1
                got += 1
            if not got:
                raise InputError(f"{what} needs values", line_no, kw, "nothing", "one or more numbers")
            continue
        if pos >= len(tokens) or (t not in "f" and keywords.lookup(tokens[pos], subnames) is not None
                                  and not _is_number(tokens[pos])):
            if mult == "?":
                continue
            raise InputError(f"too few values for {what}", line_no, kw, " ".join(tokens[1:]) or "nothing",
                             f"{len([i for i in items if i[1] != '?'])} value(s) ({spec})")
        if t in "ri" and not _is_number(tokens[pos]) and mult == "?":
            continue
        vals.append(_convert(tokens[pos], item, kw, line_no, what))
        pos += 1
    return vals, pos


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def parse_statement(line_no, text):
    """One logical line -> Statement (or None for a blank line).  Raises InputError."""
    tokens = tokenize(text, line_no)
    if not tokens:
        return None
    word = tokens[0]
    name = keywords.lookup(word)
    if name is None:
        raise InputError("unknown keyword", line_no, None, word,
                         "a MOSFLM keyword (type HELP for the list)")
    kw = keywords.BY_NAME[name]
    subnames = list(kw.subs)
    values = {}
    pos = 1
    if kw.args:
        args, pos = _take(tokens, pos, kw.args, name, line_no, "values", subnames)
        if args:
            values["_args"] = args
    while pos < len(tokens):
        tok = tokens[pos]
        sub = keywords.lookup(tok, subnames)
        if sub is None:
            expected = ("no more values" if not subnames else
                        "one of " + " ".join(subnames))
            if not subnames and kw.args:
                raise InputError("too many values", line_no, name, " ".join(tokens[pos:]), expected)
            raise InputError("unknown or misplaced sub-keyword", line_no, name, tok, expected)
        pos += 1
        spec = kw.subs[sub]
        if name == "AUTOINDEX" and sub == "IMAGE" and sub in values:
            # AUTOINDEX IMAGE 1 IMAGE 10: each IMAGE [TO m] [PHI a b] adds an image, as several lines do
            values.setdefault("_images", []).append(
                {k: values.pop(k) for k in ("IMAGE", "TO", "PHI") if k in values})
        elif sub in values and "*" not in spec:
            # a repeated sub-keyword would silently replace the first
            raise InputError(f"{sub} given twice on one line", line_no, name, tok, f"one {sub} per line")
        if spec in ("", None):
            values[sub] = True
            continue
        got, pos = _take(tokens, pos, spec, name, line_no, sub, subnames)
        if not got:
            values[sub] = True
        elif len(got) == 1 and "*" not in spec:
            values[sub] = got[0]
        elif "*" in spec and isinstance(values.get(sub), list):
            values[sub] = values[sub] + list(got)     # RESOLUTION EXCLUDE a b EXCLUDE c d: both shells
        else:
            values[sub] = got
    if "_images" in values:
        values["_images"].append({k: values.pop(k) for k in ("IMAGE", "TO", "PHI") if k in values})
    if kw.args and not kw.subs:
        need = [i for i in _spec_items(kw.args) if i[1] == ""]
        if len(values.get("_args", [])) < len(need):
            raise InputError("too few values", line_no, name, " ".join(tokens[1:]) or "nothing",
                             f"{len(need)} value(s) ({kw.args})")
    return Statement(name, values, line_no, text)


def parse_lines(lines):
    """Parse a whole deck: (statements, errors); every bad line gives one error, parsing goes on."""
    out, errors = [], []
    it = logical_lines(lines)
    while True:
        try:
            line_no, text, raw = next(it)
        except StopIteration:
            break
        except InputError as e:
            errors.append(e)
            break
        if text is None:
            continue
        try:
            st = parse_statement(line_no, text)
        except InputError as e:
            errors.append(e)
            continue
        if st is not None:
            st.text = raw
            out.append(st)
    return out, errors
