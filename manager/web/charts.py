"""Server-rendered SVG charts: no JavaScript, no external assets, works offline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from html import escape

# Drawing area, in viewBox units; the SVG scales to its container.
WIDTH, HEIGHT = 540, 240
LEFT, RIGHT, TOP, BOTTOM = 40, 40, 34, 36


def nice_ticks(maximum: float, count: int = 4) -> list[float]:
    """Round tick values from 0 up to at least `maximum`: steps of 1, 2 or 5 × 10^k."""
    if maximum <= 0:
        return [0.0, 1.0]
    raw = maximum / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    top = math.ceil(maximum / step - 1e-9) * step
    return [i * step for i in range(round(top / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}" if value < 10 else f"{value:,.0f}"


@dataclass(frozen=True)
class _Scale:
    """The plot's geometry for `rows`: two left/right scales over one drawing area."""

    rows: Sequence[tuple[date, int, float]]
    task_ticks: list[float]
    hour_ticks: list[float]
    plot_w: float = WIDTH - LEFT - RIGHT
    plot_h: float = HEIGHT - TOP - BOTTOM

    @property
    def base_y(self) -> float:
        return TOP + self.plot_h

    @property
    def slot(self) -> float:
        return self.plot_w / max(len(self.rows), 1)

    def y_tasks(self, value: float) -> float:
        return self.base_y - self.plot_h * value / self.task_ticks[-1]

    def y_hours(self, value: float) -> float:
        return self.base_y - self.plot_h * value / self.hour_ticks[-1]


def daily_chart(
    rows: Sequence[tuple[date, int, float]],
    title: str = "Tasks started and transcoding hours per day",
) -> str:
    """An SVG of tasks started per day (bars, left axis) and hours per day (line, right axis).

    `rows` are (day, tasks started, transcoding hours), oldest first. Every text is
    escaped; each bar has a <title> with its figures, shown on hover.
    """
    scale = _Scale(
        rows,
        nice_ticks(max((r[1] for r in rows), default=0)),
        nice_ticks(max((r[2] for r in rows), default=0.0)),
    )
    total_tasks = sum(r[1] for r in rows)
    total_hours = sum(r[2] for r in rows)
    summary = (
        f"{total_tasks} tasks started, {total_hours:.1f} transcoding hours in {len(rows)} days"
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<desc id="chart-desc">{escape(summary)}</desc>',
        *_axes(scale),
        *_bars_and_line(scale),
        *_legend(scale),
        "</svg>",
    ]
    return "\n".join(out)


def _axes(scale: _Scale) -> list[str]:
    """Grid lines and the left axis (tasks); the right axis (hours) at the same heights:
    both scales have their own ticks."""
    out = []
    right = LEFT + scale.plot_w
    for tick in scale.task_ticks:
        y = scale.y_tasks(tick)
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="axis tasks" x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{escape(_fmt(tick))}</text>'
        )
    for tick in scale.hour_ticks:
        y = scale.y_hours(tick)
        out.append(
            f'<text class="axis hours" x="{right + 6}" y="{y + 4:.1f}">{escape(_fmt(tick))}</text>'
        )
    base_y = scale.base_y
    out.append(f'<line class="baseline" x1="{LEFT}" y1="{base_y}" x2="{right}" y2="{base_y}"/>')
    return out


def _bars_and_line(scale: _Scale) -> list[str]:
    """A bar per day with its figures on hover, day and month labels, and the hours line."""
    out: list[str] = []
    points: list[tuple[float, float]] = []
    n, base_y, slot = max(len(scale.rows), 1), scale.base_y, scale.slot
    bar_w = max(slot * 0.6, 1.0)
    for i, (day, started, hours) in enumerate(scale.rows):
        cx = LEFT + slot * i + slot / 2
        y = scale.y_tasks(started)
        tip = f"{day.isoformat()}: {started} tasks started, {hours:.1f} transcoding hours"
        out.append(
            f'<rect class="bar" x="{cx - bar_w / 2:.1f}" y="{y:.1f}" '
            f'width="{bar_w:.1f}" height="{base_y - y:.1f}"><title>{escape(tip)}</title></rect>'
        )
        # The day of the month under every bar, the month under the first day and each 1st.
        if n <= 31 or i % math.ceil(n / 31) == 0:
            out.append(
                f'<text class="axis day" x="{cx:.1f}" y="{base_y + 14}" text-anchor="middle">'
                f"{day.day}</text>"
            )
        if i == 0 or day.day == 1:
            out.append(
                f'<text class="axis month" x="{cx:.1f}" y="{base_y + 28}" text-anchor="middle">'
                f"{escape(day.strftime('%b'))}</text>"
            )
        points.append((cx, scale.y_hours(hours)))
    if points:
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline class="line" points="{line}"/>')
        out += [f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in points]
    return out


def _legend(scale: _Scale) -> list[str]:
    """The axis titles and a legend."""
    legend_x = LEFT + 8
    return [
        f'<text class="axis-title tasks" x="{LEFT - 6}" y="{TOP - 14}" text-anchor="end">'
        "tasks</text>",
        f'<text class="axis-title hours" x="{LEFT + scale.plot_w + 6}" y="{TOP - 14}">hours</text>',
        f'<rect class="bar" x="{legend_x}" y="{TOP - 24}" width="12" height="10"/>'
        f'<text class="legend" x="{legend_x + 16}" y="{TOP - 15}">tasks started</text>'
        f'<line class="line" x1="{legend_x + 120}" y1="{TOP - 19}" '
        f'x2="{legend_x + 140}" y2="{TOP - 19}"/>'
        f'<circle class="dot" cx="{legend_x + 130}" cy="{TOP - 19}" r="3"/>'
        f'<text class="legend" x="{legend_x + 146}" y="{TOP - 15}">transcoding hours</text>',
    ]
