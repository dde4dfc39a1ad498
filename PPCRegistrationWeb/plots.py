"""Small plots for the page as inline SVG (a millisecond each; matplotlib took ~0.3 s a plot on the server's
thread): the registration's mTRE / similarity per update and the histogram of the last correspondences'
weights."""

from __future__ import annotations

import math
from html import escape

import numpy as np

WIDTH, HEIGHT = 420, 210
LEFT, RIGHT, TOP, BOTTOM = 46, 46, 12, 34
BLUE, ORANGE, GREEN, PURPLE, GREY = "#4e9de0", "#f0a04b", "#5cb85c", "#a77dd6", "#bbbbbb"


def _frame(body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">'
            f'<rect width="100%" height="100%" fill="#1e1e1e"/>' + "".join(body) + "</svg>")


def _axes(body: list[str]) -> tuple[float, float]:
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    body.append(f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="{GREY}"/>')
    return w, h


def _polyline(xs, ys, colour: str, dash: str = "") -> str:
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y))
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"{extra}/>'


def history_plot(mtre_mm: list[float | None], similarity: list[float], operators: list[str]) -> str:
    """mTRE (mm, log scale, left axis; when a ground truth is known) and gradient correlation (right axis) per
    update; refinement updates as hollow circles; the 2 mm success line dashed green."""
    body: list[str] = []
    w, h = _axes(body)
    n = len(similarity)
    if n == 0:
        return _frame(body, "no updates yet")
    x = [LEFT + w * (i + 0.5) / n for i in range(n)]
    known = [m for m in mtre_mm if m is not None and m > 0]
    if known:
        lo = 10 ** math.floor(math.log10(min(min(known), 1.0)))
        hi = 10 ** math.ceil(math.log10(max(max(known), 2.5)))

        def ym(v: float) -> float:
            return TOP + h * (1 - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

        ys = [ym(m) if m is not None and m > 0 else float("nan") for m in mtre_mm]
        body.append(_polyline([LEFT, LEFT + w], [ym(2.0)] * 2, GREEN, "4 3"))
        body.append(_polyline(x, ys, BLUE))
        for xi, yi, op in zip(x, ys, operators):
            if math.isfinite(yi):
                fill = "none" if op == "refine" else BLUE
                body.append(f'<circle cx="{xi:.1f}" cy="{yi:.1f}" r="2.5" fill="{fill}" stroke="{BLUE}"/>')
        decade = lo
        while decade <= hi * 1.001:
            body.append(f'<text x="{LEFT - 4}" y="{ym(decade) + 4:.1f}" text-anchor="end" fill="{BLUE}">'
                        f'{decade:g}</text>')
            decade *= 10
        body.append(f'<text x="12" y="{TOP + h / 2}" fill="{BLUE}" transform="rotate(-90 12 {TOP + h / 2})" '
                    'text-anchor="middle">mTRE (mm)</text>')
    else:
        body.append(f'<text x="{LEFT + 6}" y="{TOP + 14}" fill="{GREY}">no ground truth: mTRE unknown</text>')
    s = np.asarray(similarity, dtype=float)
    s_lo, s_hi = float(np.nanmin(s)), float(np.nanmax(s))
    s_lo, s_hi = (s_lo - 0.01, s_hi + 0.01) if s_hi - s_lo < 0.02 else (s_lo, s_hi)
    body.append(_polyline(x, [TOP + h * (1 - (v - s_lo) / (s_hi - s_lo)) for v in s], ORANGE))
    for v, y in ((s_hi, TOP + 10), (s_lo, TOP + h)):
        body.append(f'<text x="{LEFT + w + 4}" y="{y:.1f}" fill="{ORANGE}">{v:.3f}</text>')
    body.append(f'<text x="{WIDTH - 8}" y="{TOP + h / 2}" fill="{ORANGE}" text-anchor="middle" '
                f'transform="rotate(90 {WIDTH - 8} {TOP + h / 2})">similarity (GC)</text>')
    body.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 8}" fill="{GREY}" text-anchor="middle">update 1 … {n} '
                f'(filled: PPC, hollow: refinement)</text>')
    return _frame(body, f"mTRE and similarity over {n} updates")


def weight_histogram(weights: np.ndarray, bins: int = 20) -> str:
    """Histogram of correspondence weights in [0, 1] (learned: PointNet attention; classic: robust weights)."""
    body: list[str] = []
    w_ax, h_ax = _axes(body)
    w = np.asarray(weights, dtype=float).reshape(-1)
    counts, _ = np.histogram(w, bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    bar = w_ax / bins
    for i, c in enumerate(counts):
        hh = h_ax * c / top
        body.append(f'<rect x="{LEFT + i * bar + 1:.1f}" y="{TOP + h_ax - hh:.1f}" width="{bar - 2:.1f}" '
                    f'height="{hh:.1f}" fill="{PURPLE}"><title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c}</title>'
                    '</rect>')
    for v in (0.0, 0.5, 1.0):
        body.append(f'<text x="{LEFT + v * w_ax:.1f}" y="{TOP + h_ax + 13}" fill="{GREY}" '
                    f'text-anchor="middle">{v:g}</text>')
    body.append(f'<text x="{LEFT - 4}" y="{TOP + 10}" fill="{GREY}" text-anchor="end">{top}</text>')
    mean = float(w.mean()) if w.size else float("nan")
    body.append(f'<text x="{LEFT + w_ax / 2}" y="{HEIGHT - 6}" fill="{GREY}" text-anchor="middle">weight '
                f'({w.size} points, mean {mean:.2f})</text>')
    return _frame(body, f"weights of {w.size} correspondences")
