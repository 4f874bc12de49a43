"""Pictures for the reports, as inline SVG strings (standard library only: the Vertex UI renders an
HTML artifact as is, and nothing else needs installing in the task).

* ``line_chart``: one series against the step (the training loss, the learning rate);
* ``heatmap``: a confusion matrix, rows true class, columns predicted, shaded by row share.
"""

from __future__ import annotations

import html
from typing import Sequence


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def line_chart(xs: Sequence[float], ys: Sequence[float], title: str, y_label: str,
               width: int = 560, height: int = 240) -> str:
    """An SVG polyline of (xs, ys) with labelled axes; a single point is drawn as a dot."""
    if not xs or len(xs) != len(ys):
        raise ValueError(f"{title}: need as many x as y values, at least one ({len(xs)}, {len(ys)})")
    left, right, top, bottom = 64, 16, 28, 36
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0

    def px(x: float) -> float:
        return left + (x - x_low) / ((x_high - x_low) or 1) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y_low) / ((y_high - y_low) or 1) * (height - top - bottom)

    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    grid = "".join(
        f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
        f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11">{t:.3g}</text>'
        for t in _ticks(y_low, y_high))
    x_ticks = "".join(
        f'<text x="{px(t):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
        f'font-size="11">{t:.0f}</text>' for t in _ticks(x_low, x_high))
    dots = "".join(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#1a73e8"/>'
                   for x, y in zip(xs, ys))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{html.escape(title)}">'
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>'
            f'{grid}{x_ticks}<polyline points="{points}" fill="none" stroke="#1a73e8" '
            f'stroke-width="2"/>{dots}'
            f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" font-size="11">step</text>'
            f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
            f'text-anchor="middle">{html.escape(y_label)}</text></svg>')


def heatmap(names: Sequence[str], matrix: Sequence[Sequence[int]], title: str,
            predicted_names: Sequence[str] | None = None, cell: int = 22) -> str:
    """An SVG confusion matrix: each cell shaded by its share of the true row, count printed."""
    columns = list(predicted_names or names)
    if len(matrix) != len(names) or any(len(row) != len(columns) for row in matrix):
        raise ValueError(f"{title}: a {len(names)} x {len(columns)} matrix was expected")
    label_w, top = 150, 150
    width, height = label_w + cell * len(columns) + 8, top + cell * len(names) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="4" y="16" font-size="13">{html.escape(title)} (rows: true, columns: '
             f'predicted)</text>']
    for j, name in enumerate(columns):
        x = label_w + j * cell + cell / 2
        parts.append(f'<text x="{x:.1f}" y="{top - 6}" font-size="10" '
                     f'transform="rotate(-60 {x:.1f} {top - 6})">{html.escape(str(name))}</text>')
    for i, (name, row) in enumerate(zip(names, matrix)):
        y = top + i * cell
        total = sum(row) or 1
        parts.append(f'<text x="{label_w - 4}" y="{y + cell * 0.7:.1f}" font-size="10" '
                     f'text-anchor="end">{html.escape(str(name))}</text>')
        for j, count in enumerate(row):
            share = count / total
            shade = int(255 - 200 * share)
            parts.append(f'<rect x="{label_w + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="rgb({shade},{shade},255)" stroke="#fff"><title>{html.escape(str(name))}'
                         f' -> {html.escape(str(columns[j]))}: {count}</title></rect>')
            if count:
                parts.append(f'<text x="{label_w + j * cell + cell / 2}" y="{y + cell * 0.7:.1f}" '
                             f'font-size="9" text-anchor="middle" '
                             f'fill="{"#fff" if share > 0.6 else "#000"}">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)
