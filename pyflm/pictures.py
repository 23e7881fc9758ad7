"""PNG pictures a person checks by eye: spots found, predictions over an image (MOSFLM's colours)."""
from __future__ import annotations

import numpy as np

from .fileio import atomic_path

# MOSFLM's colours: predictions blue full, yellow partial, red overlapped, green too wide;
# found spots red above the indexing threshold, yellow below.
COLOURS = {"full": (60, 120, 255), "partial": (255, 220, 0), "overlap": (255, 40, 40),
           "wide": (40, 220, 40), "strong": (255, 40, 40), "weak": (255, 220, 0)}


def scaled(data, lo_pct=90.0, hi_pct=99.95):
    """An 8-bit grey image (white background, dark spots, as MOSFLM shows them), asinh-stretched."""
    d = np.asarray(data, float)
    valid = d >= 0
    if not valid.any():
        return np.full(d.shape, 255, np.uint8)
    lo, hi = np.percentile(d[valid], [lo_pct, hi_pct])
    hi = max(hi, lo + 1)
    t = np.arcsinh(np.clip(d - lo, 0, None) / (0.1 * (hi - lo) + 1e-9)) / np.arcsinh(10.0)
    g = 255 - np.clip(t * 255, 0, 255)
    g[~valid] = 200
    return g.astype(np.uint8)


def save_overlay(path, data, marks, *, title=None, crop=None, box=6):
    """Write a PNG of `data` ([slow, fast]) with marks drawn: (fast px, slow px, colour name or RGB,
    half-size in px or None).  crop = (fast0, slow0, fast1, slow1) keeps part of the image."""
    from PIL import Image, ImageDraw
    g = scaled(data)
    img = Image.fromarray(g).convert("RGB")
    f0 = s0 = 0
    if crop:
        f0, s0, f1, s1 = crop
        img = img.crop((f0, s0, f1, s1))
    draw = ImageDraw.Draw(img)
    for m in marks:
        f, s, colour = m[0] - f0, m[1] - s0, m[2]
        half = m[3] if len(m) > 3 and m[3] else box
        rgb = COLOURS.get(colour, colour) if isinstance(colour, str) else colour
        draw.rectangle([f - half, s - half, f + half, s + half], outline=tuple(rgb))
    if title:
        draw.text((5, 5), title, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def spot_picture(path, data, spots, threshold, **kw):
    """Found spots: red above the I/sigma threshold used for indexing, yellow below."""
    ok = spots[spots["flag"] == 0]
    isig = ok["intensity"] / np.maximum(ok["sigma"], 1e-9)
    marks = [(f, s, "strong" if q >= threshold else "weak", 5) for f, s, q in
             zip(ok["fast"], ok["slow"], isig)]
    return save_overlay(path, data, marks, title=f"{len(ok)} spots", **kw)
